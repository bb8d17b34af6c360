"""What a replay pushes: the images of a labelled folder (or part of a model's split) with their ground truth.

Ground truth comes from :mod:`engine.dataset` (class folders, MVTec layout, labels CSV) and the split from
:mod:`engine.split`, both torch-free, the same modules training uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine import dataset as td
from engine.dataset import CLASS_NAMES, DataError, discover, subset
from engine.package import ModelPackage
from engine.split import Split
from replay import ReplayError
from replay.source import ReplayItem


# -- what to replay ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Selection:
    root: Path
    layout: str  # folders | mvtec | csv | unlabelled
    part: str  # all | train | val | test
    items: list[ReplayItem]
    notes: list[str] = field(default_factory=list)


def select(
    data: Path,
    *,
    labels: Path | None = None,
    part: str = "all",
    split_file: Path | None = None,
    package: ModelPackage | None = None,
) -> Selection:
    """The images to replay, with their ground truth, in a stable order (sorted by relative path)."""
    source = _source(data, labels)
    notes: list[str] = []
    try:
        ds = discover(source, check_readable=False)  # unreadable files are replayed: decode_error REJECTs
    except DataError as exc:
        if source.is_file() or not source.is_dir() or part != "all":
            raise ReplayError(str(exc)) from None
        notes.append(f"not a labelled dataset ({exc}); labels from class-folder names where there are any")
        return Selection(source, "unlabelled", part, _loose(source), notes)

    split: Split | None = None
    try:
        if split_file is not None:
            split = Split.load(split_file)
        elif package is not None and package.meta.training.get("split"):
            split = Split.from_dict(package.meta.training["split"])
    except DataError as exc:
        raise ReplayError(str(exc)) from None
    if part == "all":
        samples = sorted(ds.samples, key=lambda s: s.path)
    else:
        if split is None:
            raise ReplayError(
                f"--split {part}: the model package records no split; pass --split-file SPLIT_JSON or --split all"
            )
        try:
            samples = subset(ds, split.part(part))
        except DataError as exc:
            raise ReplayError(str(exc)) from None
        samples = sorted(samples, key=lambda s: s.path)
        if split.data_hash and split.data_hash != ds.content_hash():
            notes.append(
                f"{ds.root} differs from the data the split was made on (content hash): some files changed"
            )
    items = [
        ReplayItem(
            path=ds.abspath(s),
            frame_id=s.path,
            label=CLASS_NAMES[s.label],
            defect_type=(s.defect_type or "ng") if s.label else None,
        )
        for s in samples
    ]
    if not items:
        raise ReplayError(f"nothing to replay: the {part} part of the split is empty")
    if part == "all" and split is not None:  # say so when "everything" includes what the model learnt from
        seen = set(split.train) | set(split.val)
        overlap = sum(1 for i in items if i.frame_id in seen)
        if overlap:
            notes.append(
                f"{overlap} of these {len(items)} images are in the model's train/val split; "
                "use --split test for the held-out images only"
            )
    return Selection(ds.root, ds.layout, part, items, notes)


def _source(data: Path, labels: Path | None) -> Path:
    if labels is None:
        return data
    if not labels.is_file():
        raise ReplayError(f"--labels {labels}: no such file")
    if data.is_dir() and labels.resolve().parent != data.resolve():
        raise ReplayError(
            f"--labels {labels}: a labels CSV names its images relative to its own folder (as for training); "
            f"put it in {data} or pass the CSV in place of the folder"
        )
    return labels


def _loose(root: Path) -> list[ReplayItem]:
    """Every image under ``root``; the label from the nearest class-folder name above it (OK/good…, NG/bad…)."""
    items = []
    for p in td.image_files(root):
        rel = p.relative_to(root)
        label = td.label_from_folders(rel.parts[:-1])
        kind = (td.defect_type_from_name(p.stem) or "ng") if label == "NG" else None
        items.append(ReplayItem(p, rel.as_posix(), label, kind))
    if not items:
        raise ReplayError(f"no images under {root} ({', '.join(sorted(td.IMAGE_SUFFIXES))})")
    return items
