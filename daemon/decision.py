"""Score → verdict, and the fail-safe verdicts for frames the model did not decide.

The operating point comes from the model package (``model.json`` ``decision``), never from daemon config, so a
threshold always travels with the model it was calibrated for. So do the gauges' tolerance bands (``gauges``):
a part is REJECTed when the model or a gauge says so, and the verdict's detail says which. Anything that is not a finite score in [0, 1]
is an engine error: a NaN compares false against every threshold and would otherwise PASS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from daemon.types import Frame, Outcome, Reason, Verdict
from engine.gauges import GaugeSet, Violation
from engine.package import Call, Decision

_CALLS = {
    Call.PASS: (Outcome.PASS, Reason.MODEL),
    Call.REJECT: (Outcome.REJECT, Reason.MODEL),
    Call.GREY: (Outcome.REJECT, Reason.GREY_ZONE),
}


class Decider:
    def __init__(self, decision: Decision, model_id: str, gauges: GaugeSet | None = None) -> None:
        self.decision = decision
        self.gauges = gauges
        self.model_id = model_id
        self.threshold = float(decision.threshold)

    def decide(
        self,
        frame: Frame,
        score: float,
        timings_ms: dict[str, float],
        violations: Sequence[Violation] = (),
    ) -> Verdict:
        if not (math.isfinite(score) and 0.0 <= score <= 1.0):
            return self.reject(
                frame, Reason.ENGINE_ERROR, {"error": f"model returned score {score!r}"}, timings_ms
            )
        outcome, reason = _CALLS[self.decision.classify(score)]
        detail: dict[str, Any] | None = None
        if violations:
            # Inference still ran, so the record shows whether the model alone would have caught the part.
            rejected_by = ["gauges"] if outcome is Outcome.PASS else ["gauges", "model"]
            detail = {"gauges": [v.to_dict() for v in violations], "rejected_by": rejected_by}
            outcome, reason = Outcome.REJECT, Reason.OUT_OF_TOLERANCE
        return self._verdict(frame, outcome, reason, score, detail, timings_ms)

    def reject(
        self,
        frame: Frame,
        reason: Reason,
        detail: dict[str, Any] | None = None,
        timings_ms: dict[str, float] | None = None,
    ) -> Verdict:
        """A REJECT for a part that was not (or could not be) inspected: no score."""
        return self._verdict(frame, Outcome.REJECT, reason, None, detail, timings_ms or {})

    def _verdict(
        self,
        frame: Frame,
        outcome: Outcome,
        reason: Reason,
        score: float | None,
        detail: dict[str, Any] | None,
        timings_ms: dict[str, float],
    ) -> Verdict:
        return Verdict(
            frame_id=frame.frame_id,
            source=frame.source,
            outcome=outcome,
            reason=reason,
            score=score,
            threshold=self.threshold,
            model=self.model_id,
            t_capture=frame.t_capture,
            t_arrival=frame.t_arrival,
            label=frame.label,
            detail=detail,
            timings_ms=timings_ms,
        )
