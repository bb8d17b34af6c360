from __future__ import annotations

import math
import time

import pytest

from daemon.decision import Decider
from daemon.types import Frame, Outcome, Reason
from engine.package import Decision

FRAME = Frame("cam", 1, "part-1", time.monotonic(), time.time(), t_capture=123.0, label="NG")


@pytest.mark.parametrize(
    "score, outcome, reason",
    [
        (0.0, Outcome.PASS, Reason.MODEL),
        (0.49, Outcome.PASS, Reason.MODEL),
        (0.5, Outcome.REJECT, Reason.MODEL),
    ],
)
def test_threshold(score: float, outcome: Outcome, reason: Reason) -> None:
    v = Decider(Decision(threshold=0.5), "m").decide(FRAME, score, {"infer": 1.0})
    assert (v.outcome, v.reason, v.score, v.threshold) == (outcome, reason, score, 0.5)
    assert (v.frame_id, v.t_capture, v.label, v.timings_ms) == ("part-1", 123.0, "NG", {"infer": 1.0})


@pytest.mark.parametrize(
    "score, outcome, reason",
    [
        (0.29, Outcome.PASS, Reason.MODEL),
        (0.3, Outcome.REJECT, Reason.GREY_ZONE),
        (0.69, Outcome.REJECT, Reason.GREY_ZONE),
        (0.7, Outcome.REJECT, Reason.MODEL),
    ],
)
def test_grey_zone(score: float, outcome: Outcome, reason: Reason) -> None:
    v = Decider(Decision(threshold=0.5, grey_zone=(0.3, 0.7)), "m").decide(FRAME, score, {})
    assert (v.outcome, v.reason) == (outcome, reason)


@pytest.mark.parametrize("score", [math.nan, math.inf, -0.1, 1.5])
def test_non_finite_or_out_of_range_score_never_passes(score: float) -> None:
    v = Decider(Decision(threshold=0.5), "m").decide(FRAME, score, {})
    assert v.outcome is Outcome.REJECT and v.reason is Reason.ENGINE_ERROR and v.score is None


def test_fail_safe_reject_has_no_score() -> None:
    v = Decider(Decision(threshold=0.4), "m@x").reject(FRAME, Reason.DEADLINE, {"max_latency_ms": 5})
    assert (v.outcome, v.reason, v.score, v.threshold, v.model) == (
        Outcome.REJECT,
        Reason.DEADLINE,
        None,
        0.4,
        "m@x",
    )
    assert not v.inspected


def test_gauge_violation_rejects_and_says_who_rejected() -> None:
    import time as _time

    from daemon.decision import Decider
    from daemon.types import Frame, Outcome, Reason
    from engine.gauges import Violation
    from engine.package import Decision

    decider = Decider(Decision(threshold=0.5), "m")
    frame = Frame("cam", 1, "f", _time.monotonic(), _time.time())
    short = [Violation("length_px", 850.0, 903.8, 939.9)]
    v = decider.decide(frame, 0.1, {}, short)
    assert (v.outcome, v.reason, v.score) == (Outcome.REJECT, Reason.OUT_OF_TOLERANCE, 0.1)
    assert v.detail == {"gauges": [short[0].to_dict()], "rejected_by": ["gauges"]}
    both = decider.decide(frame, 0.9, {}, short)
    assert both.reason is Reason.OUT_OF_TOLERANCE and both.detail["rejected_by"] == ["gauges", "model"]  # type: ignore[index]
    assert decider.decide(frame, 0.1, {}, ()).outcome is Outcome.PASS


def test_a_non_finite_gauge_measurement_rejects_with_a_detail_json_can_carry() -> None:
    """Issue 16, finding 3: a NaN/inf measurement is a violation (never a PASS), and its value goes into the
    detail as text, so the published verdict keeps the gauges' detail (the wire refuses bare NaN/inf)."""
    import json

    from engine.gauges import Band, GaugeSet, check
    from engine.pose import Measurements, PoseParams

    gauges = GaugeSet(bands=(Band("straightness_px", None, 15.0),), pose=PoseParams().to_dict())
    m = Measurements(910.0, 284.0, 100.0, (1.0,) * 4, -math.inf, 1.1e5)
    violations = check(m, gauges)
    v = Decider(Decision(threshold=0.5), "m").decide(FRAME, 0.1, {}, violations)
    assert (v.outcome, v.reason, v.score) == (Outcome.REJECT, Reason.OUT_OF_TOLERANCE, 0.1)
    assert v.detail is not None and v.detail["gauges"][0]["value"] == "-inf"
    assert json.loads(json.dumps(v.detail, allow_nan=False))["gauges"][0]["high"] == 15.0
