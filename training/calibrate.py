"""Decision threshold from the validation split: the highest threshold that still catches ``target_recall``
of the NG parts there, and what it costs in false rejects.

Thresholds are placed half-way (in logit space) between the scores they separate, never on a score: an image
exactly at the threshold would make the verdict depend on the last bit of floating point, and the export's
torch-vs-ONNX Runtime verdict check runs on these very images. The decision itself is on the NG probability
``sigmoid(logit)`` computed as the daemon computes it (engine.backend.sigmoid, float32).

Optional grey zone: T2 is the lowest threshold whose validation false-reject rate is ≤ ``grey_zone_frr``;
scores in [T1, T2) become REJECT ``grey_zone`` (a person re-inspects), scores ≥ T2 REJECT ``model``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.backend import sigmoid
from engine.package import Decision

EDGE_MARGIN = 1.0  # logit margin when nothing lies on the other side of a threshold


@dataclass(frozen=True, slots=True)
class Calibration:
    threshold: float  # on the NG probability
    threshold_logit: float
    target_recall: float
    recall: float  # achieved on the calibration (validation) images
    false_reject_rate: float
    n_ok: int
    n_ng: int
    grey_zone: tuple[float, float] | None = None
    grey_fraction: float = 0.0  # share of validation images that fall in the grey zone
    split: str = "val"

    def decision(self) -> Decision:
        return Decision(threshold=self.threshold, grey_zone=self.grey_zone)

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "target_recall": self.target_recall,
            "threshold": self.threshold,
            "threshold_logit": self.threshold_logit,
            "recall": self.recall,
            "false_reject_rate": self.false_reject_rate,
            "n_ok": self.n_ok,
            "n_ng": self.n_ng,
            "grey_zone": list(self.grey_zone) if self.grey_zone else None,
            "grey_fraction": self.grey_fraction,
        }


def _between(upper: float, scores: np.ndarray) -> float:
    """Half-way between ``upper`` and the largest score strictly below it (or a margin below)."""
    below = scores[scores < upper]
    return (upper + float(below.max())) / 2.0 if below.size else upper - EDGE_MARGIN


def _prob(logit: float) -> float:
    return float(sigmoid(np.array([logit], dtype=np.float32))[0])


def calibrate(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    target_recall: float = 1.0,
    grey_zone_frr: float | None = None,
    split: str = "val",
) -> Calibration:
    """``logits``: NG logits of the calibration images; ``labels``: 1 NG, 0 OK."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    if y.sum() == 0 or (~y).sum() == 0:
        raise ValueError("calibration needs both OK and NG images")
    if not np.isfinite(z).all():
        raise ValueError("calibration logits contain NaN or infinity")
    ng = np.sort(z[y])[::-1]
    k = max(1, math.ceil(target_recall * len(ng) - 1e-9))  # NG images that must score ≥ the threshold
    t1 = _between(float(ng[k - 1]), z)
    thr = _prob(t1)
    p = sigmoid(z.astype(np.float32))
    reject = p >= thr
    grey = None
    grey_fraction = 0.0
    if grey_zone_frr is not None:
        ok = np.sort(z[~y])[::-1]
        allowed = math.floor(grey_zone_frr * len(ok) + 1e-9)  # OK images that may score ≥ T2
        if allowed < len(ok):
            pivot = float(ok[allowed])  # the highest OK score that must stay below T2
            above = z[z > pivot]
            t2 = (pivot + float(above.min())) / 2.0 if above.size else pivot + EDGE_MARGIN
        else:
            t2 = t1
        hi = _prob(max(t1, t2))
        if hi > thr:
            grey = (thr, hi)
            grey_fraction = float(np.mean((p >= thr) & (p < hi)))
    return Calibration(
        threshold=thr,
        threshold_logit=t1,
        target_recall=target_recall,
        recall=float(reject[y].mean()),
        false_reject_rate=float(reject[~y].mean()),
        n_ok=int((~y).sum()),
        n_ng=int(y.sum()),
        grey_zone=grey,
        grey_fraction=grey_fraction,
        split=split,
    )
