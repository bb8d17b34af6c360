"""Stratified train/val/test splits (and k-fold), made once before any augmentation and saved as JSON.

Stratification is by ``Sample.group`` (OK, or the NG defect type), so each split holds every defect type in
proportion. Shuffling is seeded per group, so adding a defect type does not reshuffle the others. The split
file lists relative image paths and the data hash; evaluation and later runs load it instead of re-splitting,
so no image ever moves from test into training between runs.
"""

from __future__ import annotations

import json
import math
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.dataset import DataError, Sample

SPLIT_VERSION = 1
PARTS = ("train", "val", "test")


@dataclass(frozen=True, slots=True)
class Split:
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    seed: int = 0
    method: str = "holdout"  # "holdout" or "kfold"
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    fold: int | None = None
    folds: int | None = None
    data_hash: str = ""

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for part in PARTS:
            for p in getattr(self, part):
                if p in seen:
                    raise DataError(f"split puts {p} in both {seen[p]} and {part}")
                seen[p] = part

    def part(self, name: str) -> tuple[str, ...]:
        if name == "all":
            return self.train + self.val + self.test
        if name not in PARTS:
            raise ValueError(f"split part must be one of {[*PARTS, 'all']}, got {name!r}")
        paths: tuple[str, ...] = getattr(self, name)
        return paths

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": SPLIT_VERSION,
            "method": self.method,
            "seed": self.seed,
            "fractions": list(self.fractions),
            "fold": self.fold,
            "folds": self.folds,
            "data_hash": self.data_hash,
            **{p: list(getattr(self, p)) for p in PARTS},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Split:
        if d.get("version") != SPLIT_VERSION:
            raise DataError(f"split file version {d.get('version')!r} is not {SPLIT_VERSION}")
        fr = tuple(float(x) for x in d.get("fractions", (0.8, 0.1, 0.1)))
        return cls(
            train=tuple(d["train"]),
            val=tuple(d["val"]),
            test=tuple(d["test"]),
            seed=int(d.get("seed", 0)),
            method=str(d.get("method", "holdout")),
            fractions=(fr[0], fr[1], fr[2]),
            fold=d.get("fold"),
            folds=d.get("folds"),
            data_hash=str(d.get("data_hash", "")),
        )

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        tmp.replace(p)
        return p

    @classmethod
    def load(cls, path: str | Path) -> Split:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise DataError(f"cannot read split file {path}: {exc}") from None

    def describe(self, samples: Sequence[Sample]) -> str:
        by_path = {s.path: s for s in samples}
        out = []
        for part in PARTS:
            items = [by_path[p] for p in getattr(self, part) if p in by_path]
            ng = sum(s.label for s in items)
            out.append(f"{part} {len(items)} ({len(items) - ng} OK / {ng} NG)")
        return ", ".join(out)


def _by_class(samples: Sequence[Sample], seed: int) -> dict[int, list[str]]:
    """Paths per class, ordered by stratum (defect type), each stratum shuffled by its own seeded generator
    (so adding a defect type does not reshuffle the others). Taking evenly spaced positions from such a list
    is a stratified draw that stays proportional even when a stratum holds only one or two images."""
    groups: dict[tuple[int, str], list[str]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: s.path):
        groups[(s.label, s.group)].append(s.path)
    out: dict[int, list[str]] = defaultdict(list)
    for (label, name), paths in sorted(groups.items()):
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        out[label] += [paths[i] for i in rng.permutation(len(paths))]
    return dict(out)


def allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder rounding of ``n`` into parts; a part with a positive fraction gets ≥ 1 when n allows."""
    raw = [n * f for f in fractions]
    counts = [math.floor(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: (raw[i] - counts[i], -i), reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    for i, f in enumerate(fractions):  # val/test need at least one image of each class to be judged
        if f > 0 and counts[i] == 0 and n >= len(fractions):
            donor = max(range(len(counts)), key=lambda j: counts[j])
            counts[donor] -= 1
            counts[i] += 1
    return counts


def _spread(n: int, k: int, phase: float) -> list[int]:
    """``k`` evenly spaced positions in range(n)."""
    return sorted({min(n - 1, int((j + phase) * n / k)) for j in range(k)}) if k else []


def _take(seq: list[str], k: int, phase: float) -> tuple[list[str], list[str]]:
    """(the ``k`` evenly spaced items of ``seq``, the rest, in order)."""
    pos = set(_spread(len(seq), k, phase))
    return [p for i, p in enumerate(seq) if i in pos], [p for i, p in enumerate(seq) if i not in pos]


def make_split(
    samples: Sequence[Sample],
    *,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    data_hash: str = "",
) -> Split:
    """Stratified holdout split by class and defect type."""
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or min(fr) < 0 or not math.isclose(sum(fr), 1.0, abs_tol=1e-6) or fr[0] <= 0:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    parts: dict[str, list[str]] = {p: [] for p in PARTS}
    for seq in _by_class(samples, seed).values():
        _, n_val, n_test = allocate(len(seq), fr)
        val, rest = _take(seq, n_val, 0.25)
        test, train = _take(rest, n_test, 0.75)
        parts["train"] += train
        parts["val"] += val
        parts["test"] += test
    split = Split(
        train=tuple(sorted(parts["train"])),
        val=tuple(sorted(parts["val"])),
        test=tuple(sorted(parts["test"])),
        seed=seed,
        fractions=(fr[0], fr[1], fr[2]),
        data_hash=data_hash,
    )
    _require_both_classes(split, samples)
    return split


def make_kfold(
    samples: Sequence[Sample],
    *,
    folds: int,
    fold: int,
    val_fraction: float = 0.1,
    seed: int = 0,
    data_hash: str = "",
) -> Split:
    """Fold ``fold`` of a stratified ``folds``-fold split: that fold is the test part; ``val_fraction`` of
    all images (stratified) is taken from the remaining folds for checkpoint choice and calibration."""
    if folds < 2 or not 0 <= fold < folds:
        raise ValueError(f"need folds ≥ 2 and 0 ≤ fold < folds, got fold {fold} of {folds}")
    if not 0 < val_fraction < 1 - 1 / folds:
        raise ValueError(
            f"val fraction must be in (0, {1 - 1 / folds:.2f}) with {folds} folds, got {val_fraction}"
        )
    parts: dict[str, list[str]] = {p: [] for p in PARTS}
    for seq in _by_class(samples, seed).values():
        test = [p for i, p in enumerate(seq) if i % folds == fold]  # every fold gets every stratum
        rest = [p for i, p in enumerate(seq) if i % folds != fold]
        n_val = allocate(len(seq), (1 - val_fraction, val_fraction))[1]
        val, train = _take(rest, min(n_val, len(rest) - 1), 0.25)
        parts["test"] += test
        parts["val"] += val
        parts["train"] += train
    test_fr = 1.0 / folds
    split = Split(
        train=tuple(sorted(parts["train"])),
        val=tuple(sorted(parts["val"])),
        test=tuple(sorted(parts["test"])),
        seed=seed,
        method="kfold",
        fold=fold,
        folds=folds,
        fractions=(1 - test_fr - val_fraction, val_fraction, test_fr),
        data_hash=data_hash,
    )
    _require_both_classes(split, samples)
    return split


def _require_both_classes(split: Split, samples: Sequence[Sample]) -> None:
    labels = {s.path: s.label for s in samples}
    for part in ("train", "val"):
        got = {labels[p] for p in getattr(split, part)}
        if got != {0, 1}:
            raise DataError(
                f"the {part} split has no {'NG' if 1 not in got else 'OK'} images "
                f"({len(getattr(split, part))} images); add data or change the split fractions"
            )
