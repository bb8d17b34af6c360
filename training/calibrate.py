"""Decision threshold from the calibration images: the highest threshold that still catches ``target_recall``
of the NG parts there, and what it costs in false rejects.

Thresholds are placed half-way (in logit space) between the scores they separate, never on a score: an image
exactly at the threshold would make the verdict depend on the last bit of floating point, and the export's
torch-vs-ONNX Runtime verdict check runs on these very images. The decision itself is on the NG probability
``sigmoid(logit)`` computed as the daemon computes it (engine.backend.sigmoid, float32).

One decision with the gauges: the daemon rejects a part when the model *or* a gauge says so, so the threshold is
calibrated knowing which calibration parts the gauges reject anyway (``gauge_reject``). The recall target is met
by the two together: an NG part the gauges catch need not be caught by the model, and a shortened front with a
low model score no longer drags the threshold (and the false-reject rate) down. The reported recall and
false-reject rate are the combined ones (what the line gets); the model's own are reported beside them.

A false-reject budget (``frr_budget``) turns the recall target's spare room into a safety margin: when the
threshold that catches the weakest calibration NG rejects fewer than ``frr_budget`` of the calibration OK parts
(the gauges' OK rejects counted), the threshold is lowered to the lowest edge that still rejects at most that
share. The weakest NG the calibration saw is only the weakest of a sample: with 45 NG, a threshold just below
it catches a new NG with probability ≈ 45/46 (exchangeability), the recall the repeated k-fold measured. The
margin buys recall with false rejects the line has said it can afford; it never raises the threshold, so a
model that cannot meet the budget keeps its recall threshold.

Optional grey zone: T2 is the lowest threshold at which at most ``grey_zone_frr`` of the calibration OK parts
are scrapped automatically (by T2 or by the gauges); scores in [T1, T2) become REJECT ``grey_zone`` (a person
re-inspects), scores ≥ T2 REJECT ``model``. What each such budget buys is one table (:func:`budget_table`).

The escape rate is reported with its one-sided 95 % upper bound (Clopper-Pearson, engine.stats): with 45
calibration NG, "no escapes" means "fewer than 6.4 %", not "none".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.backend import sigmoid
from engine.package import Call, Decision
from engine.stats import ESCAPE_CONFIDENCE, escape_upper_bound

EDGE_MARGIN = 1.0  # logit margin when nothing lies on the other side of a threshold
# Automatic-scrap budgets (grey_zone_frr values) the calibration reports beside the configured one.
BUDGETS: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.10, 0.20)


@dataclass(frozen=True, slots=True)
class Calibration:
    threshold: float  # on the NG probability
    threshold_logit: float
    target_recall: float
    recall: float  # achieved on the calibration images by model and gauges together
    false_reject_rate: float  # OK calibration images rejected by the model or the gauges
    n_ok: int
    n_ng: int
    grey_zone: tuple[float, float] | None = None
    grey_fraction: float = 0.0  # share of calibration images that fall in the grey zone (gauges passed them)
    split: str = "val"
    gauges: bool = False  # whether gauge flags took part (False: every "combined" number is the model's)
    model_recall: float = math.nan  # the model alone, at the threshold
    model_false_reject_rate: float = math.nan
    ng_rejected_by_gauges: int = 0
    ok_rejected_by_gauges: int = 0
    escapes: int = 0  # NG calibration images that neither model nor gauges reject
    escape_rate_upper: float = 1.0  # one-sided ESCAPE_CONFIDENCE upper bound on the escape rate
    budgets: tuple[dict[str, Any], ...] = field(default_factory=tuple)  # budget_table rows
    frr_budget: float | None = None  # the false-reject budget the threshold was lowered into (None: not used)
    recall_threshold_logit: float = math.nan  # T1 of the recall target alone, before the budget's margin
    # The OK parts' logits, sorted: the reference the daemon's drift statistic compares with (engine.drift)
    ok_logits: tuple[float, ...] = ()

    def decision(self) -> Decision:
        return Decision(threshold=self.threshold, grey_zone=self.grey_zone)

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "target_recall": self.target_recall,
            "frr_budget": self.frr_budget,
            "recall_threshold_logit": self.recall_threshold_logit,
            "margin_logit": self.recall_threshold_logit - self.threshold_logit,
            "threshold": self.threshold,
            "threshold_logit": self.threshold_logit,
            "recall": self.recall,
            "false_reject_rate": self.false_reject_rate,
            "n_ok": self.n_ok,
            "n_ng": self.n_ng,
            "grey_zone": list(self.grey_zone) if self.grey_zone else None,
            "grey_fraction": self.grey_fraction,
            "gauges": self.gauges,
            "model_recall": self.model_recall,
            "model_false_reject_rate": self.model_false_reject_rate,
            "ng_rejected_by_gauges": self.ng_rejected_by_gauges,
            "ok_rejected_by_gauges": self.ok_rejected_by_gauges,
            "escapes": self.escapes,
            "escape_rate": self.escapes / self.n_ng if self.n_ng else None,
            "escape_rate_upper": self.escape_rate_upper,
            "escape_confidence": ESCAPE_CONFIDENCE,
            "grey_zone_budgets": [dict(row) for row in self.budgets],
        }


def _between(upper: float, scores: np.ndarray) -> float:
    """Half-way between ``upper`` and the largest score strictly below it (or a margin below)."""
    below = scores[scores < upper]
    return (upper + float(below.max())) / 2.0 if below.size else upper - EDGE_MARGIN


def _above(lower: float, scores: np.ndarray) -> float:
    """Half-way between ``lower`` and the smallest score strictly above it (or a margin above)."""
    above = scores[scores > lower]
    return (lower + float(above.min())) / 2.0 if above.size else lower + EDGE_MARGIN


def _prob(logit: float) -> float:
    return float(sigmoid(np.array([logit], dtype=np.float32))[0])


def _inputs(
    logits: np.ndarray, labels: np.ndarray, gauge_reject: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 logits, boolean NG labels and boolean gauge flags (all False without gauges), checked."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).astype(bool).reshape(-1)
    if len(y) != len(z):
        raise ValueError(f"labels has {len(y)} entries for {len(z)} calibration logits")
    if gauge_reject is None:
        return z, y, np.zeros(len(z), bool)
    g = np.asarray(gauge_reject)
    if g.dtype != np.bool_ or g.shape != z.shape:
        raise ValueError(
            f"gauge_reject must be a boolean array of {len(z)} entries (one per calibration logit), "
            f"got dtype {g.dtype}, shape {g.shape}"
        )
    return z, y, g


def _room(z: np.ndarray, y: np.ndarray, g: np.ndarray, frr: float) -> tuple[int, np.ndarray]:
    """How many OK parts the model may still reject when at most ``frr`` of them may be rejected and the gauges
    reject theirs first (negative: the gauges alone spend more), and the scores of the OK parts the gauges
    pass, highest first."""
    allowed = math.floor(frr * int((~y).sum()) + 1e-9) - int((g & ~y).sum())
    return allowed, np.sort(z[~y & ~g])[::-1]


def _upper_edge(z: np.ndarray, y: np.ndarray, g: np.ndarray, frr: float) -> float | None:
    """T2 (logit): the lowest edge at which at most ``frr`` of the OK parts are scrapped automatically, the
    OK parts the gauges reject counted first; None when the budget is not binding (no grey zone needed)."""
    allowed, ok = _room(z, y, g, frr)  # scraps left for the model
    if allowed >= len(ok):
        return None
    return _above(float(ok[max(allowed, 0)]), z)  # the highest OK score that must stay below T2


def _budget_edge(z: np.ndarray, y: np.ndarray, g: np.ndarray, frr: float) -> float:
    """The lowest edge (logit) at which at most ``frr`` of the OK parts are rejected by the model or the gauges
    (the gauges' OK rejects counted first); placed half-way above the highest OK score that must pass, so tied
    scores never take the count over the budget."""
    allowed, ok = _room(z, y, g, frr)  # rejects left for the model
    if allowed < 0:
        return math.inf  # the gauges alone spend more than the budget: no room for a margin
    if allowed >= len(ok):
        return _between(float(ok[-1]), z)  # every OK part the gauges pass may be rejected
    return _above(float(ok[allowed]), z)


def zone_counts(
    p_ng: np.ndarray, labels: np.ndarray, gauge_reject: np.ndarray | None, decision: Decision
) -> dict[str, int]:
    """Where a decision sends the parts: OK and NG rejected automatically (score ≥ T2, or outside a gauge band:
    ``out_of_tolerance`` is never a grey-zone verdict), sent to re-inspection (grey zone) and passed.

    The one count behind every grey-zone budget table (the calibration's and the evaluation report's).
    """
    y = np.asarray(labels).astype(bool)
    g = np.zeros(len(y), bool) if gauge_reject is None else np.asarray(gauge_reject, dtype=bool)
    calls = decision.classify_all(np.asarray(p_ng, dtype=np.float64))
    auto = g | (calls == Call.REJECT)
    grey = ~g & (calls == Call.GREY)
    passed = ~auto & ~grey
    return {
        "ok_scrapped": int((auto & ~y).sum()),
        "ok_reinspected": int((grey & ~y).sum()),
        "ok_passed": int((passed & ~y).sum()),
        "ng_rejected": int((auto & y).sum()),
        "ng_reinspected": int((grey & y).sum()),
        "ng_passed": int((passed & y).sum()),
    }


def _decision(t1: float, t2: float | None) -> Decision:
    """The operating point for T1 and T2 (logits); no grey zone when T2 does not lie above T1."""
    thr = _prob(t1)
    hi = _prob(max(t1, t2)) if t2 is not None else thr
    return Decision(threshold=thr, grey_zone=(thr, hi) if hi > thr else None)


def budget_table(
    logits: np.ndarray,
    labels: np.ndarray,
    threshold_logit: float,
    *,
    gauge_reject: np.ndarray | None = None,
    budgets: Sequence[float] = BUDGETS,
) -> list[dict[str, Any]]:
    """What a re-inspection budget buys, on the calibration images: for each ``grey_zone_frr`` in ``budgets``
    (share of OK parts that may be scrapped without a person looking), the grey zone it sets above T1
    (``threshold_logit``) and :func:`zone_counts` there. A smaller budget sends more parts to a person."""
    z, y, g = _inputs(logits, labels, gauge_reject)
    p = sigmoid(z.astype(np.float32))
    rows = []
    for b in sorted(set(budgets)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"grey-zone budget must be in [0, 1), got {b}")
        d = _decision(threshold_logit, _upper_edge(z, y, g, b))
        rows.append(
            {"budget": b, "grey_zone": list(d.grey_zone) if d.grey_zone else None} | zone_counts(p, y, g, d)
        )
    return rows


def margin_text(cal: dict[str, Any]) -> str:
    """What the false-reject budget did to the threshold, in words ("" when no budget was configured)."""
    budget = cal.get("frr_budget")
    if budget is None:
        return ""
    margin = cal.get("margin_logit") or 0.0
    if margin <= 0:
        return f"; false-reject budget {100 * budget:.0f} % already spent by the recall target (no margin)"
    return f"; threshold lowered {margin:.2f} logit below the weakest NG into the {100 * budget:.0f} % false-reject budget"


def calibrate(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    target_recall: float = 1.0,
    grey_zone_frr: float | None = None,
    split: str = "val",
    gauge_reject: np.ndarray | None = None,
    frr_budget: float | None = None,
) -> Calibration:
    """``logits``: NG logits of the calibration images; ``labels``: 1 NG, 0 OK; ``gauge_reject``: which of them
    the gauges reject whatever the model says (bool, one per image; None: no gauges). A flag for an OK part the
    bands were learnt from must come from bands learnt without it (training.gauge_fit.kfold_flags), or the
    combined false-reject rate is optimistic. ``frr_budget``: lower T1 into this share of false rejects when
    the recall target leaves room (module docstring); None keeps T1 where the recall target puts it."""
    z, y, g = _inputs(logits, labels, gauge_reject)
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    if grey_zone_frr is not None and not 0 <= grey_zone_frr < 1:
        raise ValueError(f"grey_zone_frr must be in [0, 1), got {grey_zone_frr}")
    if frr_budget is not None and not 0 <= frr_budget < 1:
        raise ValueError(f"frr_budget must be in [0, 1), got {frr_budget}")
    if y.sum() == 0 or (~y).sum() == 0:
        raise ValueError("calibration needs both OK and NG images")
    if not np.isfinite(z).all():
        raise ValueError("calibration logits contain NaN or infinity")
    need = max(1, math.ceil(target_recall * int(y.sum()) - 1e-9))  # NG that model or gauges must reject
    k = need - int((g & y).sum())  # of which the model must catch this many among the NG the gauges pass
    # k ≤ 0: the gauges meet the target alone, and the model still rejects what scores above every OK part.
    t1 = _between(float(np.sort(z[y & ~g])[::-1][k - 1]), z) if k > 0 else _above(float(z[~y].max()), z)
    t_recall = t1
    if frr_budget is not None:
        t1 = min(t1, _budget_edge(z, y, g, frr_budget))
    decision = _decision(t1, _upper_edge(z, y, g, grey_zone_frr) if grey_zone_frr is not None else None)
    p = sigmoid(z.astype(np.float32))
    model = p >= decision.threshold
    reject = model | g
    grey_fraction = 0.0
    if decision.grey_zone:
        counts = zone_counts(p, y, g, decision)
        grey_fraction = (counts["ok_reinspected"] + counts["ng_reinspected"]) / len(z)
    escapes = int((y & ~reject).sum())
    budgets = (*BUDGETS, *(() if grey_zone_frr is None else (grey_zone_frr,)))
    return Calibration(
        threshold=decision.threshold,
        threshold_logit=t1,
        target_recall=target_recall,
        recall=float(reject[y].mean()),
        false_reject_rate=float(reject[~y].mean()),
        n_ok=int((~y).sum()),
        n_ng=int(y.sum()),
        grey_zone=decision.grey_zone,
        grey_fraction=grey_fraction,
        split=split,
        gauges=gauge_reject is not None,
        model_recall=float(model[y].mean()),
        model_false_reject_rate=float(model[~y].mean()),
        ng_rejected_by_gauges=int((g & y).sum()),
        ok_rejected_by_gauges=int((g & ~y).sum()),
        escapes=escapes,
        escape_rate_upper=escape_upper_bound(escapes, int(y.sum()), ESCAPE_CONFIDENCE),
        budgets=tuple(budget_table(z, y, t1, gauge_reject=g, budgets=budgets)),
        frr_budget=frr_budget,
        recall_threshold_logit=t_recall,
        ok_logits=tuple(np.sort(z[~y]).tolist()),
    )
