"""engine.pose on the 300 real screws: no pose failures, head left in every crop, and a length gauge.

Skips without ../shared/data/screws-300 (or $INSPECTD_REALDATA). Run with ``-s`` to see the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.pose import PoseError, estimate_pose, normalise

pytestmark = pytest.mark.realdata

FOLDS = 5
# Length gauge from OK parts: [0.5 % quantile − margin, 99.5 % quantile + margin]. The margin (2 px) is ~10×
# the measurement's repeatability (0.17 px s.d. of a part's length over 12 rotations of its photo).
Q_LO, Q_HI, MARGIN_PX = 0.005, 0.995, 2.0


@dataclass(frozen=True)
class Part:
    name: str
    kind: str  # "ok" or the defect type
    length: float
    head_width: float
    tip_width: float
    straightness: float
    head_left: bool


@dataclass(frozen=True)
class Measured:
    parts: list[Part]
    failures: list[tuple[str, str]]


@pytest.fixture(scope="module")
def measured(realdata: Path) -> Measured:
    files = sorted((realdata / "good").glob("*.png")) + sorted((realdata / "not-good").glob("*.png"))
    parts, failures = [], []
    for f in files:
        gray = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
        assert gray is not None, f
        kind = "ok" if f.parent.name == "good" else f.stem.rstrip("0123456789")
        try:
            pose = estimate_pose(gray)
        except PoseError as e:
            failures.append((f.name, str(e)))
            continue
        dark = normalise(gray, pose) < pose.threshold
        q = dark.shape[1] // 4
        m = pose.measurements
        parts.append(
            Part(
                f.stem,
                kind,
                m.length_px,
                m.head_width_px,
                m.tip_width_px,
                m.straightness_px,
                head_left=bool(dark[:, :q].sum() > 1.5 * dark[:, -q:].sum()),
            )
        )
    return Measured(parts, failures)


def test_no_pose_failures_and_head_left(measured: Measured) -> None:
    assert len(measured.parts) + len(measured.failures) == 300
    assert measured.failures == []
    assert [p.name for p in measured.parts if not p.head_left] == []
    print("\nper class: min / median / max")
    for kind in sorted({p.kind for p in measured.parts}):
        ps = [p for p in measured.parts if p.kind == kind]
        cols = {
            "length": [p.length for p in ps],
            "head_w": [p.head_width for p in ps],
            "tip_w": [p.tip_width for p in ps],
            "straight": [p.straightness for p in ps],
        }
        summary = "  ".join(f"{k} {min(v):.1f}/{np.median(v):.1f}/{max(v):.1f}" for k, v in cols.items())
        print(f"  {kind:18s} n={len(ps):3d}  {summary}")


def _fold_of(parts: list[Part]) -> dict[str, int]:
    """Stratified folds: within each kind, parts in name order go round-robin."""
    fold: dict[str, int] = {}
    for kind in sorted({p.kind for p in parts}):
        for i, p in enumerate(sorted((p for p in parts if p.kind == kind), key=lambda p: p.name)):
            fold[p.name] = i % FOLDS
    return fold


def test_length_gauge_kfold(measured: Measured) -> None:
    """A length band learned from OK parts of the other folds flags short (manipulated_front) parts."""
    parts = measured.parts
    fold = _fold_of(parts)
    rejected: dict[str, int] = {}
    with_bend: dict[str, int] = {}  # length band OR straightness above the OK parts' (reported, not asserted)
    totals: dict[str, int] = {}
    bands = []
    for k in range(FOLDS):
        train = [p for p in parts if p.kind == "ok" and fold[p.name] != k]
        lengths = np.array([p.length for p in train])
        lo = float(np.quantile(lengths, Q_LO)) - MARGIN_PX
        hi = float(np.quantile(lengths, Q_HI)) + MARGIN_PX
        bent = float(np.quantile([p.straightness for p in train], Q_HI)) + MARGIN_PX
        bands.append((lo, hi))
        for p in parts:
            if fold[p.name] == k:
                out = not lo <= p.length <= hi
                totals[p.kind] = totals.get(p.kind, 0) + 1
                rejected[p.kind] = rejected.get(p.kind, 0) + int(out)
                with_bend[p.kind] = with_bend.get(p.kind, 0) + int(out or p.straightness > bent)
    ok_fr = rejected["ok"] / totals["ok"]
    print(f"\nlength gauge, {FOLDS}-fold, bands " + ", ".join(f"[{lo:.1f}, {hi:.1f}]" for lo, hi in bands))
    for kind in sorted(totals):
        print(
            f"  {kind:18s} out of band {rejected[kind]:3d}/{totals[kind]}"
            f"   (length or straightness: {with_bend[kind]:3d}/{totals[kind]})"
        )
    assert ok_fr <= 0.02, f"OK false rejects {rejected['ok']}/{totals['ok']}"
    assert rejected["manipulated_front"] >= 8, f"manipulated_front caught {rejected['manipulated_front']}/10"
