"""training.variants' member fusion: weighted member logits, the ``w=`` decisions, the per-member dump."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.dataset import Dataset, Sample
from training.variants import (
    Fold,
    FoldScores,
    Scored,
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
    for bad in ("w=1,x", "nonsense", "budget=lots"):
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
