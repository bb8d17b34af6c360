"""engine.gauges and training.gauge_fit on the 300 real screws: k-fold false-reject cost and NG caught, per band
and for the defaults.

Every part is judged by bands learned from the OK parts of the other folds (stratified by kind), so neither an OK
part nor an NG part is ever judged by a band it helped to learn. Skips without ../shared/data/screws-300 (or
$INSPECTD_REALDATA). Run with ``-s`` to see the table (the numbers in docs/gauging.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from engine.gauges import MEASUREMENTS, outside
from engine.pose import Measurements, PoseError, estimate_pose
from engine.preprocess import load_gray
from training.gauge_fit import DEFAULT_BANDS, kfold_cost, learn_bands

pytestmark = pytest.mark.realdata

FOLDS = 5


@dataclass(frozen=True)
class Real:
    names: list[str]
    kinds: list[str]  # "ok" or the defect type
    parts: list[Measurements]
    failures: list[tuple[str, str]]

    def fold_of(self) -> np.ndarray:
        """Stratified folds: within each kind, parts in name order go round-robin."""
        fold = np.empty(len(self.parts), np.intp)
        for kind in set(self.kinds):
            idx = sorted((i for i, k in enumerate(self.kinds) if k == kind), key=lambda i: self.names[i])
            fold[idx] = np.arange(len(idx)) % FOLDS
        return fold


@pytest.fixture(scope="module")
def real(realdata: Path) -> Real:
    files = sorted((realdata / "good").glob("*.png")) + sorted((realdata / "not-good").glob("*.png"))
    names, kinds, parts, failures = [], [], [], []
    for f in files:
        try:
            m = estimate_pose(load_gray(str(f))).measurements
        except PoseError as e:
            failures.append((f.name, str(e)))
            continue
        names.append(f.stem)
        kinds.append("ok" if f.parent.name == "good" else f.stem.rstrip("0123456789"))
        parts.append(m)
    return Real(names, kinds, parts, failures)


def _kfold_outside(real: Real) -> dict[str, np.ndarray]:
    """Per measurement: which parts fall outside the band learned on the OK parts of the other folds."""
    fold = real.fold_of()
    out = {n: np.zeros(len(real.parts), bool) for n in MEASUREMENTS}
    for k in range(FOLDS):
        train = [
            m for m, kind, f in zip(real.parts, real.kinds, fold, strict=True) if kind == "ok" and f != k
        ]
        judged = np.flatnonzero(fold == k)
        held = [real.parts[int(i)] for i in judged]
        for band in learn_bands(train, names=MEASUREMENTS):
            out[band.name][judged] = outside(held, band)
    return out


def test_gauges_kfold(real: Real) -> None:
    assert len(real.parts) + len(real.failures) == 300
    assert real.failures == []
    kinds = np.array(real.kinds)
    out = _kfold_outside(real)
    out["defaults (any)"] = np.logical_or.reduce([out[n] for n in DEFAULT_BANDS])
    types = sorted(set(real.kinds) - {"ok"})
    print(f"\n{FOLDS}-fold, bands [q0.5 % − 2 px, q99.5 % + 2 px] (straightness, crest dip: high only)")
    print(f"  {'band':16s} {'OK rejected':>12s}" + "".join(f"  {t[:17]:>17s}" for t in types))
    for name, flags in out.items():
        cells = [f"{int(flags[kinds == t].sum())}/{int((kinds == t).sum())}" for t in ["ok", *types]]
        print(f"  {name:16s} {cells[0]:>12s}" + "".join(f"  {c:>17s}" for c in cells[1:]))

    n_ok = int((kinds == "ok").sum())
    short = kinds == "manipulated_front"
    length, any_default = out["length_px"], out["defaults (any)"]
    assert length[kinds == "ok"].sum() <= 0.02 * n_ok, "length band rejects more than 2 % of OK parts"
    assert length[short].sum() >= 8, f"length band caught {length[short].sum()}/10 shortened fronts"
    assert any_default[kinds == "ok"].sum() <= 0.02 * n_ok
    assert any_default[short].sum() >= 9, "straightness should add the bent front the length band misses"


def test_kfold_cost_of_the_library_matches(real: Real) -> None:
    """kfold_cost (random folds over OK parts only) tells the same story as the stratified folds above."""
    ok = [m for m, kind in zip(real.parts, real.kinds, strict=True) if kind == "ok"]
    costs = [kfold_cost(ok, k=FOLDS, seed=seed) for seed in range(5)]
    for name in DEFAULT_BANDS:
        rates = [c[name] for c in costs]
        print(f"\n  {name}: OK false-reject over 5 fold seeds {[f'{r:.3f}' for r in rates]}")
        assert max(rates) <= 0.02, (name, rates)
