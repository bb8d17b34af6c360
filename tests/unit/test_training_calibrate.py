"""Threshold calibration and metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.backend import sigmoid
from training.calibrate import calibrate
from training.metrics import at_threshold, auroc, pr_curve, roc_curve


def _sig(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def _case(ok: list[float], ng: list[float]) -> tuple[np.ndarray, np.ndarray]:
    return np.array(ok + ng, np.float32), np.array([0] * len(ok) + [1] * len(ng))


def test_threshold_sits_half_way_between_the_lowest_ng_and_the_next_score_below() -> None:
    z, y = _case([-3, -2, -1, 0.5], [1, 2, 3])
    cal = calibrate(z, y)
    assert cal.threshold_logit == pytest.approx(0.75)
    assert cal.threshold == pytest.approx(_sig(0.75), abs=1e-6)
    assert (cal.recall, cal.false_reject_rate, cal.n_ok, cal.n_ng) == (1.0, 0.0, 4, 3)


def test_full_recall_costs_the_ok_parts_above_the_lowest_ng() -> None:
    z, y = _case([-3, -1, 2.5], [1, 2, 3])
    cal = calibrate(z, y)
    assert cal.threshold_logit == pytest.approx(0.0) and cal.threshold == pytest.approx(0.5)
    assert cal.recall == 1.0 and cal.false_reject_rate == pytest.approx(1 / 3)


def test_lower_target_recall_moves_the_threshold_up() -> None:
    z, y = _case([-3, -1, 2.5], [1, 2, 3])
    cal = calibrate(z, y, target_recall=0.6)  # ceil(0.6 × 3) = 2 NG must stay above: the 2nd highest is 2
    assert cal.threshold_logit == pytest.approx(1.5)
    assert cal.recall == pytest.approx(2 / 3) and cal.false_reject_rate == pytest.approx(1 / 3)


def test_nothing_below_the_lowest_ng_uses_a_margin() -> None:
    z, y = _case([1, 2], [0, 5])
    cal = calibrate(z, y)
    assert cal.threshold_logit == pytest.approx(-1.0) and cal.false_reject_rate == 1.0 and cal.recall == 1.0


def test_a_tie_between_ok_and_ng_rejects_both() -> None:
    z, y = _case([1.0, -2], [1.0, 3])
    cal = calibrate(z, y)
    assert cal.threshold_logit == pytest.approx(-0.5) and cal.false_reject_rate == 0.5 and cal.recall == 1.0


def test_threshold_never_lies_on_a_score_so_float_noise_cannot_flip_a_verdict() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, 200).astype(np.float32)
    y = (rng.random(200) < 0.2).astype(int)
    cal = calibrate(z, y, target_recall=0.9)
    p = sigmoid(z)
    for eps in (-1e-4, 1e-4):  # the export check's logit tolerance
        assert ((sigmoid(z + np.float32(eps)) >= cal.threshold) == (p >= cal.threshold)).all()


def test_grey_zone_upper_edge_keeps_the_ok_false_rejects_at_the_target() -> None:
    z, y = _case([-3, -1, 2.5], [1, 2, 3])
    cal = calibrate(z, y, grey_zone_frr=0.0)
    assert cal.grey_zone == (pytest.approx(0.5), pytest.approx(_sig(2.75), abs=1e-6))
    assert cal.grey_fraction == pytest.approx(3 / 6)  # logits 1, 2 and 2.5 lie in [0, 2.75)
    d = cal.decision()
    assert d.threshold == cal.threshold and d.grey_zone == cal.grey_zone


def test_grey_zone_is_omitted_when_it_would_be_empty() -> None:
    z, y = _case([-3, -2], [1, 2])
    assert calibrate(z, y, grey_zone_frr=0.0).grey_zone is None  # separable: T2 = T1 = -0.5
    cal = calibrate(z, y, grey_zone_frr=0.5)  # one OK may lie above T2: pivot -3, T2 = -2.5 < T1
    assert cal.grey_zone is None and cal.grey_fraction == 0.0


def test_calibration_refuses_one_class_and_nan() -> None:
    with pytest.raises(ValueError, match="both OK and NG"):
        calibrate(np.array([1.0, 2.0]), np.array([1, 1]))
    with pytest.raises(ValueError, match="NaN"):
        calibrate(np.array([np.nan, 2.0]), np.array([0, 1]))


def test_auroc_hand_cases() -> None:
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auroc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)  # a tie counts half
    assert auroc(np.array([3.0, 1.0, 2.0]), np.array([1, 0, 0])) == 1.0
    assert math.isnan(auroc(np.array([1.0]), np.array([1])))


def test_curves_and_threshold_metrics() -> None:
    s, y = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    fpr, tpr = roc_curve(s, y)
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1]
    rec, prec = pr_curve(s, y)
    assert rec.tolist() == [0.5, 0.5, 1, 1] and prec.tolist() == [1, 0.5, 2 / 3, 0.5]
    m = at_threshold(s >= 0.35, y)
    assert m["confusion"] == {"tp": 2, "fp": 1, "tn": 1, "fn": 0}
    assert (m["recall"], m["precision"], m["false_reject_rate"], m["accuracy"]) == (1.0, 2 / 3, 0.5, 0.75)
    assert m["f1"] == pytest.approx(0.8)
