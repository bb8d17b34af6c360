"""The gauges' margins in the score (engine.gauges.Margins): what a part's measurements add to its logit, how they
are learnt from good parts, how they travel in model.json, and how the daemon's Decider scores with them."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from daemon.decision import Decider
from daemon.types import Frame, Outcome, Reason
from engine.backend import sigmoid
from engine.gauges import (
    MAX_MARGIN_LOGIT,
    MIN_MARGIN_SCALE,
    Band,
    GaugeSet,
    Margin,
    Margins,
    learn_margins,
)
from engine.package import Decision
from engine.pose import Measurements, PoseParams
from training.config import PRESETS, TrainConfig
from training.gauge_fit import DEFAULT_BANDS, fit_gauge_set

FRAME = Frame("cam", 1, "part-1", time.monotonic(), time.time())


def _m(length: float = 910.0, straight: float = 5.0, crest: float = 0.5) -> Measurements:
    return Measurements(length, 284.0, 100.0, (1.0,) * 4, straight, 1.1e5, crest)


MARGINS = Margins(
    (Margin("length_px", 910.0, 2.0, "both"), Margin("straightness_px", 5.0, 1.0, "high")), k=4.0, weight=0.25
)


# --------------------------------------------------------------------------------------------- the term
@pytest.mark.parametrize(
    ("m", "expected"),
    [
        (_m(), 0.0),  # at the good parts' median
        (_m(length=910.0 + 8.0), 0.0),  # exactly k robust s.d. out: still nothing
        (_m(length=910.0 - 7.9, straight=5.0 - 30.0), 0.0),  # straightness is one-sided: straighter is fine
        (_m(length=910.0 - 12.0), 0.25 * (6.0 - 4.0)),  # 6 s.d. short
        (_m(length=910.0 + 12.0, straight=5.0 + 10.0), 0.25 * 2.0 + 0.25 * 6.0),  # both add up
    ],
)
def test_a_part_adds_a_quarter_logit_per_robust_sd_beyond_k(m: Measurements, expected: float) -> None:
    assert MARGINS.term(m) == pytest.approx(expected, abs=1e-12)
    assert MARGINS.terms([m, _m()]) == pytest.approx([expected, 0.0])


def test_the_term_is_capped_and_a_non_finite_measurement_adds_the_cap() -> None:
    assert MARGINS.term(_m(length=0.0)) == MAX_MARGIN_LOGIT  # 455 s.d. short
    for bad in (math.nan, math.inf, -math.inf):
        assert MARGINS.contributions(_m(straight=bad)) == {"straightness_px": MAX_MARGIN_LOGIT}
        assert MARGINS.term(_m(straight=bad)) == MAX_MARGIN_LOGIT


def test_contributions_name_only_the_measurements_that_add() -> None:
    assert MARGINS.contributions(_m(length=920.0)) == {"length_px": pytest.approx(0.25)}
    assert MARGINS.contributions(_m()) == {}


# -------------------------------------------------------------------------------------------- learning
def test_margins_are_the_good_parts_median_and_robust_sd_on_the_bands_sides() -> None:
    rng = np.random.default_rng(0)
    lengths = 910.0 + 3.0 * rng.standard_normal(400)
    lengths[:8] = 700.0  # a few outliers among the "good" parts move neither the median nor the MAD much
    ok = [_m(length=float(v), straight=5.0 + float(s)) for v, s in zip(lengths, rng.random(400), strict=True)]
    mg = learn_margins(ok, ("length_px", "straightness_px"), {"straightness_px": "high"}, k=3.0, weight=0.5)
    length, straight = mg.margins
    assert (mg.k, mg.weight) == (3.0, 0.5)
    assert (length.name, length.side, straight.side) == ("length_px", "both", "high")
    assert length.center == pytest.approx(910.0, abs=0.5)
    assert length.scale == pytest.approx(3.0, rel=0.15)


def test_a_measurement_all_good_parts_share_gets_the_pose_repeatability_as_its_scale() -> None:
    mg = learn_margins([_m(straight=0.0)] * 20, ("straightness_px",))
    assert mg.margins[0].scale == MIN_MARGIN_SCALE["px"]
    assert mg.term(_m(straight=0.17 * 5)) == pytest.approx(0.25 * (5 - 4))


def test_learning_skips_non_finite_values_and_refuses_when_none_is_left() -> None:
    mg = learn_margins([_m(crest=v) for v in (0.4, 0.5, math.nan, 0.6)], ("crest_dip_px",))
    assert mg.margins[0].center == pytest.approx(0.5)
    with pytest.raises(ValueError, match="crest_dip_px"):
        learn_margins([_m(crest=math.nan)] * 3, ("crest_dip_px",))


def test_fit_gauge_set_learns_margins_only_when_asked() -> None:
    ok = [_m(length=900.0 + i, straight=4.0 + 0.1 * i, crest=0.3 + 0.01 * i) for i in range(30)]
    plain, _ = fit_gauge_set(ok, {}, pose=PoseParams().to_dict())
    assert plain.margins is None and "margins" not in plain.to_dict()  # packages without them: unchanged JSON
    gs, _ = fit_gauge_set(ok, {}, pose=PoseParams().to_dict(), margins={"k": 5})
    assert gs.margins is not None and gs.margins.k == 5.0 and gs.margins.weight == 0.25
    assert [(m.name, m.side) for m in gs.margins.margins] == [
        ("length_px", "both"),
        ("straightness_px", "high"),
        ("crest_dip_px", "high"),
    ]
    assert [m.name for m in gs.margins.margins] == list(DEFAULT_BANDS)


# -------------------------------------------------------------------------------------------- model.json
def _gauges(margins: Margins | None = MARGINS) -> GaugeSet:
    return GaugeSet(bands=(Band("length_px", 890.0, 930.0),), pose=PoseParams().to_dict(), margins=margins)


def test_margins_roundtrip_through_model_json() -> None:
    gs = _gauges()
    assert GaugeSet.from_dict(json.loads(json.dumps(gs.to_dict()))) == gs
    assert GaugeSet.from_dict({**gs.to_dict(), "margins": None}).margins is None


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d["margins"].update(sigma=3), "sigma"),
        (lambda d: d["margins"]["margins"][0].update(unit="px"), "unit"),
        (lambda d: d["margins"]["margins"][0].update(name="pitch_px"), "pitch_px"),
        (lambda d: d["margins"]["margins"][0].update(side="up"), "side"),
        (lambda d: d["margins"]["margins"][0].update(scale=0.0), "scale"),
        (lambda d: d["margins"]["margins"][0].update(center=math.nan), "finite"),
        (lambda d: d["margins"].update(weight=0), "weight"),
        (lambda d: d["margins"].update(k=-1), "k -1"),
        (lambda d: d["margins"].update(margins=[]), "at least one"),
        (lambda d: d["margins"]["margins"].append(d["margins"]["margins"][0]), "one margin per"),
        (lambda d: d["margins"].pop("margins"), "missing"),
        (lambda d: d["margins"]["margins"][0].pop("center"), "malformed"),
    ],
)
def test_margins_from_dict_is_strict(edit: Callable[[dict[str, Any]], object], match: str) -> None:
    d = _gauges().to_dict()
    edit(d)
    with pytest.raises(ValueError, match=match):
        GaugeSet.from_dict(d)


# ----------------------------------------------------------------------------------------------- daemon
def test_the_decider_scores_the_logit_plus_what_the_measurements_add() -> None:
    decider = Decider(Decision(threshold=0.5), "m", _gauges())
    logit = -1.0
    score = float(sigmoid(np.array([logit]))[0])
    within = decider.decide(FRAME, score, {}, logit=logit, measurements=_m())
    assert (within.outcome, within.score, within.detail) == (Outcome.PASS, score, None)
    # 910 − 24: 12 s.d. short, 2 logits added → sigmoid(1.0): REJECT by the score, with what each added
    out = decider.decide(FRAME, score, {}, logit=logit, measurements=_m(length=886.0))
    assert (out.outcome, out.reason) == (Outcome.REJECT, Reason.MODEL)
    assert out.score == pytest.approx(float(sigmoid(np.array([1.0]))[0]))
    assert out.detail == {"margins": {"length_px": 2.0}, "model_logit": -1.0}


def test_with_margins_a_band_violation_keeps_both_details() -> None:
    decider = Decider(Decision(threshold=0.99), "m", _gauges())
    m = _m(length=880.0)  # outside the band [890, 930] and 15 s.d. short
    v = decider.decide(FRAME, 0.1, {}, decider.violations(m), logit=-2.2, measurements=m)
    assert (v.outcome, v.reason) == (Outcome.REJECT, Reason.OUT_OF_TOLERANCE)
    assert v.detail is not None and v.detail["margins"] == {"length_px": pytest.approx(0.25 * 11)}
    assert v.detail["gauges"][0]["name"] == "length_px" and v.detail["rejected_by"] == ["gauges"]


def test_a_part_without_measurements_cannot_be_scored_with_margins() -> None:
    decider = Decider(Decision(threshold=0.5), "m", _gauges())
    v = decider.decide(FRAME, 0.1, {}, logit=-2.2, measurements=None)
    assert (v.outcome, v.reason, v.score) == (Outcome.REJECT, Reason.ENGINE_ERROR, None)
    assert "measurements" in (v.detail or {})["error"]
    # without margins the same call is the model's verdict
    plain = Decider(Decision(threshold=0.5), "m", _gauges(None)).decide(FRAME, 0.1, {}, logit=-2.2)
    assert (plain.outcome, plain.score) == (Outcome.PASS, 0.1)


def test_an_implausible_logit_is_still_an_engine_error_with_margins() -> None:
    decider = Decider(Decision(threshold=0.5), "m", _gauges())
    v = decider.decide(FRAME, 0.0, {}, logit=-math.inf, measurements=_m(length=0.0))
    assert (v.outcome, v.reason, v.score) == (Outcome.REJECT, Reason.ENGINE_ERROR, None)


# ----------------------------------------------------------------------------------------------- config
def test_the_default_preset_learns_margins_and_the_option_is_checked() -> None:
    assert PRESETS["default"].gauge_margins == {}
    assert PRESETS["cnn"].gauge_margins is None
    assert TrainConfig.from_dict({"gauge_margins": {"k": 3, "weight": 0.5}}).gauge_margins == {
        "k": 3,
        "weight": 0.5,
    }
    for bad in ({"k": -1}, {"weight": 0}, {"sigma": 1}, {"k": "4"}, {"k": True}, [4, 0.25]):
        with pytest.raises(ValueError, match="gauge_margins"):
            TrainConfig.from_dict({"gauge_margins": bad})
