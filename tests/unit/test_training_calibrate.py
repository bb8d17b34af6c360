"""Threshold calibration (with the gauges' rejects, the escape bound, grey-zone budgets) and metrics against
hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.backend import sigmoid
from engine.package import Decision
from engine.stats import escape_upper_bound
from training.calibrate import budget_table, calibrate, margin_text, zone_counts
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


def test_the_ok_logits_are_kept_as_the_drift_reference() -> None:
    # The scores the threshold was set against, sorted: export ships them as model.json's score_reference.
    z, y = _case([0.5, -3, -1, -2], [1, 3, 2])
    cal = calibrate(z, y)
    assert cal.ok_logits == (-3.0, -2.0, -1.0, 0.5)
    assert "ok_logits" not in cal.to_dict()  # run.json keeps them under score_reference, not twice


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


# -- one decision with the gauges -------------------------------------------------------------------------
def test_an_ng_the_gauges_reject_no_longer_pulls_the_threshold_down() -> None:
    """A shortened front the model scores below every OK part: alone it costs every false reject; with the
    gauges rejecting it, the threshold sits under the weakest NG the model itself must catch."""
    z, y = _case([-3, -2, -1, 0.5], [-4, 1, 2])
    alone = calibrate(z, y)
    assert alone.threshold_logit == pytest.approx(-5.0) and alone.false_reject_rate == 1.0
    g = np.array([False] * 4 + [True, False, False])
    cal = calibrate(z, y, gauge_reject=g)
    assert cal.threshold_logit == pytest.approx(0.75)  # half-way between the NG at 1 and the OK at 0.5
    assert (cal.recall, cal.false_reject_rate) == (1.0, 0.0)  # combined: the gauges catch the -4
    assert (cal.model_recall, cal.model_false_reject_rate) == (pytest.approx(2 / 3), 0.0)
    assert (cal.ng_rejected_by_gauges, cal.ok_rejected_by_gauges, cal.gauges) == (1, 0, True)
    d = cal.to_dict()
    assert d["model_recall"] == pytest.approx(2 / 3) and d["gauges"] is True and d["escapes"] == 0


def test_ok_parts_the_gauges_reject_count_as_false_rejects_of_the_verdict() -> None:
    z, y = _case([-3, -2, -1, 0.5], [1, 2])
    g = np.array([False, True, False, False, False, False])  # the OK at -2 is out of tolerance
    cal = calibrate(z, y, gauge_reject=g)
    assert cal.threshold_logit == pytest.approx(0.75)
    assert cal.false_reject_rate == pytest.approx(1 / 4) and cal.model_false_reject_rate == 0.0
    assert cal.ok_rejected_by_gauges == 1


def test_when_the_gauges_meet_the_target_alone_the_model_rejects_only_above_every_ok() -> None:
    z, y = _case([-3, -1, 2.5], [0, 1])
    cal = calibrate(z, y, gauge_reject=np.array([False, False, False, True, True]))
    assert cal.threshold_logit == pytest.approx(3.5)  # no score above 2.5: a margin above it
    assert (cal.recall, cal.false_reject_rate, cal.model_recall) == (1.0, 0.0, 0.0)


def test_without_gauge_flags_the_combined_numbers_are_the_models() -> None:
    z, y = _case([-3, -1, 2.5], [1, 2, 3])
    cal = calibrate(z, y)
    assert cal.gauges is False and cal.ng_rejected_by_gauges == cal.ok_rejected_by_gauges == 0
    assert (cal.model_recall, cal.model_false_reject_rate) == (cal.recall, cal.false_reject_rate)
    all_pass = calibrate(z, y, gauge_reject=np.zeros(6, bool))
    assert all_pass.threshold_logit == cal.threshold_logit and all_pass.gauges is True


def test_gauge_flags_must_be_one_boolean_per_logit() -> None:
    z, y = _case([-3, -1], [1, 2])
    with pytest.raises(ValueError, match="gauge_reject must be a boolean array of 4"):
        calibrate(z, y, gauge_reject=np.zeros(3, bool))
    with pytest.raises(ValueError, match="gauge_reject"):
        calibrate(z, y, gauge_reject=np.zeros(4))


# -- the escape rate's upper bound --------------------------------------------------------------------------
def test_calibration_reports_the_escape_rate_with_its_upper_bound() -> None:
    z, y = _case([-3] * 10, [1.0] * 45)
    cal = calibrate(z, y)
    assert cal.escapes == 0 and cal.escape_rate_upper == pytest.approx(0.0644, abs=5e-5)  # 45 NG → 6.4 %
    z, y = _case([-3, -2, 0.5], [0, 1, 2, 3])
    cal = calibrate(z, y, target_recall=0.75)  # 3 of 4 NG must be caught: the one at 0 escapes
    assert cal.escapes == 1 and cal.to_dict()["escape_rate"] == 0.25
    assert cal.escape_rate_upper == pytest.approx(escape_upper_bound(1, 4))


# -- a false-reject budget spent on a margin below the weakest NG ----------------------------------------
def test_a_false_reject_budget_lowers_the_threshold_into_the_room_the_recall_target_leaves() -> None:
    # 10 OK at -5 … 4, NG at 2.5 and 6: the recall threshold (2.25) rejects 2 OK (20 %)
    ok = [-5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0]
    z, y = _case(ok, [2.5, 6.0])
    plain = calibrate(z, y)
    assert plain.threshold_logit == pytest.approx(2.25) and plain.false_reject_rate == pytest.approx(0.2)
    cal = calibrate(z, y, frr_budget=0.5)  # 5 OK may be rejected (4 … 0): the edge half-way between -1 and 0
    assert cal.threshold_logit == pytest.approx(-0.5) and cal.false_reject_rate == pytest.approx(0.5)
    assert cal.recall == 1.0
    d = cal.to_dict()
    assert d["frr_budget"] == 0.5
    assert d["recall_threshold_logit"] == pytest.approx(2.25) and d["margin_logit"] == pytest.approx(2.75)
    assert "frr_budget" in plain.to_dict() and plain.to_dict()["margin_logit"] == 0.0


def test_a_budget_the_recall_target_already_spends_leaves_the_threshold_alone() -> None:
    ok = [-5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0]
    z, y = _case(ok, [2.5, 6.0])
    for budget in (0.0, 0.1, 0.2):  # at most 0, 1, 2 OK: T1 (2 OK above it) is already that low or lower
        cal = calibrate(z, y, frr_budget=budget)
        assert cal.threshold_logit == pytest.approx(2.25), budget
        assert cal.recall == 1.0
    assert calibrate(z, y, frr_budget=0.3).threshold_logit == pytest.approx(
        1.5
    )  # a third OK: between 1 and 2


def test_the_budget_counts_the_gauges_ok_rejects_and_never_exceeds_it_on_ties() -> None:
    ok = [-5.0, -4.0, -3.0, -2.0, 0.5, 0.5, 1.0, 2.0, 3.0, 4.0]  # two OK tied at 0.5
    z, y = _case(ok, [6.0, 2.5])
    g = np.zeros(12, bool)
    g[0] = True  # the OK at -5 is out of tolerance: one of the budget's rejects
    cal = calibrate(z, y, gauge_reject=g, frr_budget=0.5)  # 5 rejects: the gauges' 1 + 4 by the model
    # the 5th-highest OK (0.5) is tied with the 6th: the edge goes above both (half-way to 1), 5 rejects in all
    assert cal.threshold_logit == pytest.approx(0.75)
    assert cal.false_reject_rate == pytest.approx(0.5) and cal.ok_rejected_by_gauges == 1
    with pytest.raises(ValueError, match="frr_budget"):
        calibrate(z, y, frr_budget=1.0)


# -- what a grey-zone budget buys ---------------------------------------------------------------------------
def test_budget_table_counts_where_each_budget_sends_the_parts() -> None:
    # 10 OK at -5 … 4 (the top 4 above the threshold), 2 NG: one at 2.2, one out of tolerance at -9.
    ok = [-5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0]
    z, y = _case(ok, [2.2, -9.0])
    g = np.array([False] * 11 + [True])
    cal = calibrate(z, y, gauge_reject=g, grey_zone_frr=0.1)
    assert cal.threshold_logit == pytest.approx(2.1)  # under the NG at 2.2; the -9 is the gauges'
    rows = {r["budget"]: r for r in cal.to_dict()["grey_zone_budgets"]}
    assert sorted(rows) == [0.0, 0.01, 0.02, 0.05, 0.1, 0.2]
    zero, ten, twenty = rows[0.0], rows[0.1], rows[0.2]
    # budget 0: T2 above every OK: the 2 OK above T1 (3, 4) go to a person, so does the NG at 2.2
    assert (zero["ok_scrapped"], zero["ok_reinspected"], zero["ng_rejected"], zero["ng_reinspected"]) == (
        0,
        2,
        1,
        1,
    )
    assert zero["grey_zone"][1] == pytest.approx(_sig(5.0), abs=1e-6)  # a margin above the OK at 4
    # budget 10 % (1 of 10 OK may be scrapped unseen): T2 between 3 and 4
    assert (ten["ok_scrapped"], ten["ok_reinspected"], ten["ng_rejected"], ten["ng_reinspected"]) == (
        1,
        1,
        1,
        1,
    )
    assert ten["grey_zone"] == list(cal.grey_zone or ())
    # budget 20 %: 2 OK may be scrapped unseen: T2 falls to T1 (half-way between 2 and 2.2), no grey zone
    assert twenty["grey_zone"] is None
    assert (twenty["ok_scrapped"], twenty["ok_reinspected"], twenty["ng_rejected"], twenty["ng_passed"]) == (
        2,
        0,
        2,
        0,
    )
    for r in rows.values():
        assert r["ok_scrapped"] + r["ok_reinspected"] + r["ok_passed"] == 10
        assert r["ng_rejected"] + r["ng_reinspected"] + r["ng_passed"] == 2


def test_ok_parts_the_gauges_scrap_use_up_the_budget_first() -> None:
    z, y = _case([-3.0, -2.0, 1.0, 2.0], [1.5, 3.0])  # T1 half-way between 1 and 1.5: only the OK at 2 above
    g = np.array([True, False, False, False, False, False])  # one OK (-3) out of tolerance: 25 % scrapped
    t1 = calibrate(z, y, gauge_reject=g).threshold_logit
    assert t1 == pytest.approx(1.25)
    (row,) = budget_table(z, y, t1, gauge_reject=g, budgets=[0.25])
    assert (
        row["ok_scrapped"] == 1 and row["ok_reinspected"] == 1
    )  # the budget is spent: the OK at 2 to a person
    (row,) = budget_table(z, y, t1, budgets=[0.25])  # without that gauge reject the model may scrap it unseen
    assert row["ok_scrapped"] == 1 and row["ok_reinspected"] == 0 and row["grey_zone"] is None


def test_zone_counts_use_the_decision_rule_and_never_grey_a_gauge_reject() -> None:
    p = np.array([0.1, 0.5, 0.9, 0.5, 0.1])
    y = np.array([0, 0, 0, 1, 1])
    c = zone_counts(p, y, np.array([False, True, False, False, True]), Decision(0.4, (0.4, 0.8)))
    assert c == {"ok_scrapped": 2, "ok_reinspected": 0, "ok_passed": 1, "ng_rejected": 1, "ng_reinspected": 1,
                 "ng_passed": 0}  # fmt: skip


def test_margin_text_says_what_the_budget_did() -> None:
    ok = [-5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0]
    z, y = _case(ok, [2.5, 6.0])
    assert margin_text(calibrate(z, y).to_dict()) == ""
    assert "2.75 logit below the weakest NG into the 50 % false-reject budget" in margin_text(
        calibrate(z, y, frr_budget=0.5).to_dict()
    )
    assert "already spent" in margin_text(calibrate(z, y, frr_budget=0.1).to_dict())
    assert margin_text({}) == ""  # a package calibrated before budgets existed
