"""Score → verdict, and the fail-safe verdicts for frames the model did not decide.

The operating point comes from the model package (``model.json`` ``decision``), never from daemon config, so a
threshold always travels with the model it was calibrated for. So do the gauges' tolerance bands (``gauges``):
a part is REJECTed when the model or a gauge says so, and the verdict's detail says which. Gauges with margins
(``gauges.margins``, engine.gauges.Margins) also add to the model's logit before its sigmoid: the score a
verdict carries is then the model's and the gauges' together, the one the package's threshold was calibrated
on. Anything that is not a finite score in [0, 1] is an engine error: a NaN compares false against every
threshold and would otherwise PASS.

The logit is checked too, *before* its sigmoid is trusted: ``sigmoid(-inf)`` is exactly 0.0, a confident PASS, and
an FP16 engine that overflows returns ±inf (or ±65504, its largest finite value). A logit that is not finite or
whose magnitude exceeds :data:`MAX_ABS_LOGIT` is REJECT ``engine_error`` for that frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from daemon.types import Frame, Outcome, Reason, Verdict
from engine.backend import BackendError, sigmoid
from engine.gauges import GaugeSet, Violation, check
from engine.package import Call, Decision
from engine.pose import Measurements

# The largest |logit| believed to be a model's answer. A calibrated classifier's logits are within tens (the
# float32 sigmoid is already 1.0 at +17 and below 1e-38 at -88); 1e4 is far beyond any of them, well inside
# float32, and below FP16's largest finite value (65504), so a saturated FP16 output is caught as well.
MAX_ABS_LOGIT = 1e4

_CALLS = {
    Call.PASS: (Outcome.PASS, Reason.MODEL),
    Call.REJECT: (Outcome.REJECT, Reason.MODEL),
    Call.GREY: (Outcome.REJECT, Reason.GREY_ZONE),
}


class Rejecter(Protocol):
    """What the stages that reject a part without a model result need: the fail-safe REJECT, and the gauges
    that say whether parts are measured on the way (preprocessing). A :class:`Decider` is one; so is the
    daemon's production model slot (daemon.models), which passes them to whichever model is production."""

    @property
    def gauges(self) -> GaugeSet | None: ...

    def reject(
        self,
        frame: Frame,
        reason: Reason,
        detail: dict[str, Any] | None = None,
        timings_ms: dict[str, float] | None = None,
    ) -> Verdict: ...


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
        *,
        logit: float | None = None,
        measurements: Measurements | None = None,
    ) -> Verdict:
        """The verdict on a model result. ``logit`` (when given: the inference stage always does) is the raw
        output ``score`` was computed from; an implausible one rejects the part whatever its score says. With
        gauge margins, ``score`` is recomputed from ``logit`` plus what the part's ``measurements`` add, and the
        detail says what each added; a part without measurements then cannot be scored (REJECT
        ``engine_error``)."""
        if logit is not None and not valid_logit(logit):
            return self.reject(
                frame,
                Reason.ENGINE_ERROR,
                {"error": f"model returned logit {logit!r} (not finite or |logit| > {MAX_ABS_LOGIT:g})"},
                timings_ms,
            )
        added: dict[str, float] = {}
        margins = self.gauges.margins if self.gauges is not None else None
        if margins is not None and logit is not None:
            if measurements is None:
                return self.reject(
                    frame,
                    Reason.ENGINE_ERROR,
                    {"error": "the package's score adds gauge margins, but the part has no measurements"},
                    timings_ms,
                )
            added = margins.contributions(measurements)
            if added:
                score = float(sigmoid(np.array([logit + margins.total(added)]))[0])
        if not (math.isfinite(score) and 0.0 <= score <= 1.0):
            return self.reject(
                frame, Reason.ENGINE_ERROR, {"error": f"model returned score {score!r}"}, timings_ms
            )
        outcome, reason = _CALLS[self.decision.classify(score)]
        detail: dict[str, Any] | None = None
        if added:
            # The score is no longer the model's alone: what the model said and what each measurement added.
            detail = {
                "margins": {k: round(v, 4) for k, v in added.items()},
                "model_logit": round(float(logit or 0.0), 4),
            }
        if violations:
            # Inference still ran, so the record shows whether the model alone would have caught the part.
            rejected_by = ["gauges"] if outcome is Outcome.PASS else ["gauges", "model"]
            detail = (detail or {}) | {
                "gauges": [_violation(v) for v in violations],
                "rejected_by": rejected_by,
            }
            outcome, reason = Outcome.REJECT, Reason.OUT_OF_TOLERANCE
        return self._verdict(frame, outcome, reason, score, detail, timings_ms)

    def violations(self, measurements: Measurements | None) -> list[Violation]:
        """The bands of this model's gauges that a part's measurements fall outside ([] without gauges).
        Measured once in preprocessing, checked by the model that decides the part's batch."""
        if self.gauges is None or measurements is None:
            return []
        return check(measurements, self.gauges)

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


def valid_logit(logit: float) -> bool:
    """A finite logit of plausible magnitude (see :data:`MAX_ABS_LOGIT`); NaN is not."""
    return math.isfinite(logit) and abs(logit) <= MAX_ABS_LOGIT


def _violation(v: Violation) -> dict[str, Any]:
    """A gauge violation for the verdict's detail; a non-finite measurement as text (JSON has no NaN/inf)."""
    d = v.to_dict()
    if not math.isfinite(v.value):
        d["value"] = repr(v.value)
    return d


def as_logits(out: Any, n: int) -> np.ndarray:
    """The backend's output as n float64 logits, or BackendError: a malformed output fails the whole batch."""
    try:
        logits = np.asarray(out, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise BackendError(f"backend output is not numeric ({type(exc).__name__}: {exc})") from None
    if logits.shape != (n,):
        raise BackendError(f"backend output has shape {logits.shape}, expected ({n},)")
    return logits
