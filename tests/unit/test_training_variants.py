"""training.variants' member fusion: weighted member logits, the ``w=`` decisions, the per-member dump."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.variants import Fold, FoldScores, decision, load_folds, save_folds


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
    for bad in ("w=1,x", "nonsense"):
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
