"""Find labelled images: two class folders, the MVTec AD layout, or a CSV of path,label[,defect_type].

Every sample carries its class (0 OK, 1 NG) and a defect type (``""`` for OK parts) taken from a sub-folder
or from the file-name prefix (``thread_top007.png`` → ``thread_top``), so splits can be stratified by type and
reports can give recall per type. Paths are stored relative to the data root: split files and model packages
stay valid when the folder moves.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cv2

# The one table of what an image file and a class folder are called: training, replay, the bench, the parity
# checks and the simulated camera all read labelled folders through this module.
IMAGE_SUFFIXES = frozenset({".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg", ".pgm"})
CLASS_NAMES = ("OK", "NG")  # label 0, label 1: the names on the camera wire, in reports and in labels.csv
OK_NAMES = frozenset({"ok", "good", "pass", "passed", "okay", "normal"})
NG_NAMES = frozenset(
    {"ng", "not-good", "not_good", "notgood", "nok", "bad", "defect", "defective", "fail", "failed", "reject"}
)
LABEL_WORDS = {**dict.fromkeys(OK_NAMES | {"0"}, 0), **dict.fromkeys(NG_NAMES | {"1"}, 1)}
CSV_NAMES = ("labels.csv", "dataset.csv")
_PREFIX = re.compile(r"^(?P<type>[A-Za-z][A-Za-z_\-]*?)[_\-\s]*\d+$")


class DataError(ValueError):
    """The data folder cannot be used as given; the message says which folder or file and why."""


@dataclass(frozen=True, slots=True)
class Sample:
    path: str  # relative to the dataset root, '/'-separated
    label: int  # 0 OK, 1 NG
    defect_type: str = ""  # "" for OK parts; "ng" when an NG image has no recognisable type

    @property
    def group(self) -> str:
        """The stratification key: "OK" or the defect type."""
        return "OK" if self.label == 0 else (self.defect_type or "ng")


@dataclass(frozen=True, slots=True)
class Dataset:
    root: Path
    layout: str  # "folders" | "mvtec" | "csv"
    samples: tuple[Sample, ...]
    unreadable: tuple[str, ...] = field(default=())  # relative paths that failed a quick decode; excluded

    def abspath(self, sample: Sample) -> Path:
        return self.root / sample.path

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(s.group for s in self.samples).items()))

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in self.counts().items())
        extra = f"; {len(self.unreadable)} unreadable, excluded" if self.unreadable else ""
        return f"{len(self.samples)} images in {self.root} ({self.layout}): {parts}{extra}"

    def content_hash(self) -> str:
        """sha256 over (path, label, defect type, file bytes) of every sample: the training-data identity."""
        h = hashlib.sha256()
        for s in sorted(self.samples, key=lambda s: s.path):
            h.update(f"{s.path}\0{s.label}\0{s.defect_type}\0".encode())
            with open(self.abspath(s), "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
        return h.hexdigest()


def defect_type_from_name(stem: str) -> str:
    """``manipulated_front003`` → ``manipulated_front``; ``scratch-head_12`` → ``scratch-head``; else ``""``."""
    m = _PREFIX.match(stem)
    if not m:
        return ""
    kind = m.group("type").strip("_- ").lower()
    return "" if kind in NG_NAMES or kind in {"img", "image", "frame"} else kind


def discover(root: str | Path, *, check_readable: bool = True) -> Dataset:
    """Find the labelled images under ``root`` (a folder, or a CSV file). Raises :class:`DataError`."""
    path = Path(root)
    if not path.exists():
        raise DataError(f"--data {path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataError(f"--data {path}: a file must be a CSV of path,label[,defect_type]")
        ds = _from_csv(path)
    else:
        csv_file = next((path / n for n in CSV_NAMES if (path / n).is_file()), None)
        if (path / "train" / "good").is_dir() and (path / "test").is_dir():
            ds = _from_mvtec(path)
        elif csv_file is not None:
            ds = _from_csv(csv_file)
        else:
            ds = _from_folders(path)
    return _checked(ds, check_readable)


def image_files(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursive), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def label_from_folders(parts: Iterable[str]) -> str | None:
    """ "OK" or "NG" from the nearest class-folder name among ``parts`` (a relative path's folders, outermost
    first: ``("good",)``, ``("not-good", "scratch_head")``), else None."""
    for name in reversed([p.lower() for p in parts]):
        if name in OK_NAMES:
            return CLASS_NAMES[0]
        if name in NG_NAMES:
            return CLASS_NAMES[1]
    return None


def _rel(p: Path, root: Path) -> str:
    return p.relative_to(root).as_posix()


def _ng_sample(p: Path, root: Path, class_dir: Path) -> Sample:
    """Defect type from the sub-folder of the NG folder when there is one, else from the file-name prefix."""
    sub = p.relative_to(class_dir).parts
    kind = sub[0].lower() if len(sub) > 1 else defect_type_from_name(p.stem)
    return Sample(_rel(p, root), 1, kind)


def _from_folders(root: Path) -> Dataset:
    dirs = [d for d in root.iterdir() if d.is_dir()]
    ok = [d for d in dirs if d.name.lower() in OK_NAMES]
    ng = [d for d in dirs if d.name.lower() in NG_NAMES]
    if not ok or not ng:
        missing = " and ".join(n for n, found in (("an OK", ok), ("an NG", ng)) if not found)
        raise DataError(
            f"--data {root}: found no {missing} class folder. Expected two folders named like "
            f"{sorted(OK_NAMES)} / {sorted(NG_NAMES)} (case-insensitive), the MVTec AD layout "
            f"(train/good, test/<defect>), or a labels.csv with path,label[,defect_type]; "
            f"sub-folders here: {sorted(d.name for d in dirs)}"
        )
    samples: list[Sample] = []
    for d in ok:
        samples += [Sample(_rel(p, root), 0, "") for p in image_files(d)]
    for d in ng:
        samples += [_ng_sample(p, root, d) for p in image_files(d)]
    for d in ok + ng:
        if not image_files(d):
            raise DataError(f"class folder {d} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return Dataset(root, "folders", tuple(samples))


def _from_mvtec(root: Path) -> Dataset:
    """MVTec AD: train/good and test/good are OK, test/<defect>/ are NG of that type; ground_truth/ is ignored.

    All images are pooled and re-split by :mod:`engine.split` (MVTec's own train split holds no NG parts).
    """
    samples = [Sample(_rel(p, root), 0, "") for p in image_files(root / "train" / "good")]
    for d in sorted(x for x in (root / "test").iterdir() if x.is_dir()):
        label = 0 if d.name.lower() in OK_NAMES else 1
        samples += [
            Sample(_rel(p, root), label, "" if label == 0 else d.name.lower()) for p in image_files(d)
        ]
    return Dataset(root, "mvtec", tuple(samples))


def _from_csv(path: Path) -> Dataset:
    root = path.parent
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise DataError(f"{path} has no rows")
    cols = {c.strip().lower(): c for c in rows[0] if c}
    pcol = next((cols[c] for c in ("path", "file", "filename", "image") if c in cols), None)
    lcol = next((cols[c] for c in ("label", "class") if c in cols), None)
    tcol = next((cols[c] for c in ("defect_type", "defect", "type") if c in cols), None)
    if pcol is None or lcol is None:
        raise DataError(f"{path} needs columns path (or file) and label; it has {list(rows[0])}")
    samples = []
    for i, row in enumerate(rows, start=2):
        word = (row[lcol] or "").strip().lower()
        if word not in LABEL_WORDS:
            raise DataError(f"{path} line {i}: label {row[lcol]!r} is neither OK nor NG")
        rel = (row[pcol] or "").strip()
        if not rel:
            raise DataError(f"{path} line {i}: empty path")
        label = LABEL_WORDS[word]
        kind = (row.get(tcol) or "").strip().lower() if tcol else ""
        if label == 1 and not kind:
            kind = defect_type_from_name(Path(rel).stem)
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise DataError(f"{path} line {i}: {rel} must be a path inside {root} (relative, no '..')")
        if not (root / rel).is_file():
            raise DataError(f"{path} line {i}: {rel} does not exist")
        samples.append(Sample(Path(rel).as_posix(), label, kind if label == 1 else ""))
    return Dataset(root, "csv", tuple(samples))


def _readable(path: Path) -> bool:
    # A reduced decode reads the whole stream (a truncated PNG fails) at an eighth of the cost.
    img = cv2.imread(str(path), cv2.IMREAD_REDUCED_GRAYSCALE_8)
    return img is not None and img.size > 0


def _checked(ds: Dataset, check_readable: bool) -> Dataset:
    if not ds.samples:
        raise DataError(f"--data {ds.root}: no images found")
    bad = tuple(s.path for s in ds.samples if check_readable and not _readable(ds.abspath(s)))
    excluded = set(bad)
    good = tuple(s for s in ds.samples if s.path not in excluded)
    if not good:
        raise DataError(
            f"--data {ds.root}: none of the {len(ds.samples)} images could be read (e.g. {bad[:3]})"
        )
    for label, name in ((0, "OK"), (1, "NG")):
        if not any(s.label == label for s in good):
            raise DataError(f"--data {ds.root}: no readable {name} images; training needs both classes")
    return Dataset(ds.root, ds.layout, good, bad)


def subset(ds: Dataset, paths: Iterable[str]) -> list[Sample]:
    """The samples named by ``paths`` (a split's list), in that order; unknown paths are an error."""
    by_path = {s.path: s for s in ds.samples}
    missing = [p for p in paths if p not in by_path]
    if missing:
        raise DataError(
            f"{len(missing)} image(s) of the split are not in {ds.root} (e.g. {missing[:3]}); "
            "the data folder changed since the split was made — pass a new split or the original data"
        )
    return [by_path[p] for p in paths]
