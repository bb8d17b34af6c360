"""training.variants' member fusion: weighted member logits, the ``w=`` decisions, the per-member dump."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.dataset import Dataset, Sample
from engine.pose import Measurements
from training.variants import (
    Fold,
    FoldScores,
    Scored,
    decide,
    decision,
    load_folds,
    save_folds,
    stack_folds,
    summarise,
)


def _scores() -> FoldScores:
    rng = np.random.default_rng(0)
    return FoldScores(rng.normal(size=(3, 7)), rng.normal(size=(3, 4)), rng.normal(size=(3, 20)), 1.5)


def test_plain_fusion_is_the_ensembles_mean() -> None:
    sc = _scores()
    for got, member_logits in zip(sc.fused(), (sc.test, sc.ng, sc.loo), strict=True):
        np.testing.assert_allclose(got, member_logits.mean(0))


def test_weights_are_normalised_and_zero_leaves_a_member_out() -> None:
    sc = _scores()
    test, ng, loo = sc.fused((2.0, 2.0, 0.0))
    np.testing.assert_allclose(test, sc.test[:2].mean(0))
    np.testing.assert_allclose(ng, sc.ng[:2].mean(0))
    np.testing.assert_allclose(loo, sc.loo[:2].mean(0))
    np.testing.assert_allclose(sc.fused((0, 0, 5))[0], sc.test[2])


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, -1.0, 1.0), (0.0, 0.0, 0.0)])
def test_weights_that_do_not_fit_are_refused(weights: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="weights"):
        _scores().fused(weights)


def test_decisions_by_name_and_by_weights() -> None:
    assert decision("default") == {}
    assert decision("w=1,0.5,0") == {"weights": (1.0, 0.5, 0.0)}
    assert decision("budget=0.05") == {"frr_budget": 0.05}
    assert decision("budget=none") == {"frr_budget": None}  # the recall threshold, whatever the preset says
    assert decision("no_margins") == {"margins": None}
    assert decision("margins=3,0.5") == {"margins": {"k": 3.0, "weight": 0.5}}
    assert decision("band_margin=6") == {"band_margin_px": 6.0}
    for bad in ("w=1,x", "nonsense", "budget=lots", "margins=3", "band_margin=wide"):
        with pytest.raises(ValueError, match="unknown decision"):
            decision(bad)


def test_member_logits_round_trip(tmp_path: Path) -> None:
    folds = [Fold(r, f, np.arange(10) + f, np.arange(7) + r, _scores()) for r in range(2) for f in range(2)]
    save_folds(tmp_path / "v.npz", folds)
    back = load_folds(tmp_path / "v.npz")
    assert [(f.repeat, f.fold) for f in back] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for a, b in zip(folds, back, strict=True):
        np.testing.assert_array_equal(a.fit_idx, b.fit_idx)
        np.testing.assert_array_equal(a.test_idx, b.test_idx)
        for x, y in zip(a.scores.fused(), b.scores.fused(), strict=True):
            np.testing.assert_array_equal(x, y)
        assert b.scores.fit_s == a.scores.fit_s


def test_stacked_runs_are_one_run_with_every_member_in_order() -> None:
    a = [Fold(0, f, np.arange(10) + f, np.arange(7), _scores()) for f in range(2)]
    rng = np.random.default_rng(1)
    b = [
        Fold(
            0,
            f,
            np.arange(10) + f,
            np.arange(7),
            FoldScores(*(rng.normal(size=(1, n)) for n in (7, 4, 20)), 2.0),
        )
        for f in range(2)
    ]
    both = stack_folds([a, b])
    for s, x, y in zip(both, a, b, strict=True):
        for part in ("test", "ng", "loo"):
            np.testing.assert_array_equal(
                getattr(s.scores, part), np.vstack([getattr(x.scores, part), getattr(y.scores, part)])
            )
        assert s.scores.fit_s == 3.5
    other_folds = [Fold(0, f, np.arange(10) + f + 1, np.arange(7), _scores()) for f in range(2)]
    with pytest.raises(ValueError, match="same folds"):
        stack_folds([a, other_folds])
    with pytest.raises(ValueError, match="same folds"):
        stack_folds([a, a[:1]])


def test_the_summary_ranks_what_the_gauges_reject_above_every_logit() -> None:
    samples = [Sample(f"ok{i}.png", 0) for i in range(4)] + [
        Sample(f"ng{i}.png", 1, "dent") for i in range(2)
    ]
    ds = Dataset(Path("/nowhere"), "folders", tuple(samples))
    logits = np.array([0.0, 1.0, 2.0, 3.0, 2.5, -1.0])  # ng1 scores below every OK part
    gauges = np.array([False, False, False, False, False, True])  # … and the gauges reject it
    s = summarise([Scored(np.arange(6), logits, 2.2, gauges, 1.0)], ds, repeats=1)
    assert s["auroc_pooled"] == pytest.approx((3 / 4 + 0) / 2)  # ng0 above 3 of 4 OK, ng1 above none
    assert s["auroc_pooled_with_gauges"] == pytest.approx((3 / 4 + 1) / 2)
    assert s["frr_at_recall1_with_gauges"] == pytest.approx(1 / 4)  # the threshold need only reach ng0


def test_the_default_decision_adds_the_gauge_margins_learnt_on_the_fit_side() -> None:
    """Good parts 910 ± 2 px long, and two held-out NG 15 and 30 px short, which a model that scores every part
    0 cannot rank: the default decision ranks them above the good parts by their length margins, learnt from the
    fit side's good parts; ``no_margins`` leaves the model's logits alone."""
    rng = np.random.default_rng(1)
    n_ok = 40
    lengths = [910.0 + 2.0 * float(v) for v in rng.standard_normal(n_ok)] + [895.0, 880.0, 870.0]
    meas = [Measurements(v, 284.0, 100.0, (1.0,), 5.0, 1.1e5, 1.0) for v in lengths]
    samples = [Sample(f"ok{i}.png", 0) for i in range(n_ok)] + [
        Sample(f"ng{i}.png", 1, "short") for i in range(3)
    ]
    ds = Dataset(Path("/nowhere"), "folders", tuple(samples))
    fit_idx = np.r_[np.arange(30), 42]
    test_idx = np.r_[np.arange(30, 40), 40, 41]
    zeros = FoldScores(np.zeros((1, 12)), np.zeros((1, 1)), np.zeros((1, 30)), 1.0)
    folds = [Fold(0, 0, fit_idx, test_idx, zeros)]
    with_margins, without = decide("v", {}, ds, meas, folds, ("default", "no_margins"))
    assert without["auroc_pooled"] == pytest.approx(0.5)  # every logit 0: the model alone cannot rank
    assert with_margins["auroc_pooled"] == 1.0  # both short parts now score above every good one
    assert with_margins["per_type"]["short"]["auroc"] == 1.0
