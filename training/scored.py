"""What an evaluation scored, and what it scored with: the types the evaluation (``training.evaluate``) fills
and its report (``training.report``) draws, kept apart so that neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.dataset import Sample
from engine.gauges import GaugeSet
from engine.package import Decision
from engine.preprocess import PreprocessParams
from engine.split import Split

FAILED_LOGIT = 30.0  # stands for "REJECT because preprocessing failed" in the score lists


@dataclass
class Scored:
    samples: list[Sample]
    logits: np.ndarray  # (N,) NG logits; FAILED_LOGIT where preprocessing failed
    failed: dict[str, str]
    pixels: dict[str, np.ndarray]  # path → what the network saw (uint8), for the heatmap overlays
    cams: dict[str, np.ndarray]  # path → CAM (h, w) in the network's feature resolution
    neutral_logits: np.ndarray | None = None  # the same images on one shared background (see score)
    gauge_reject: np.ndarray | None = None  # (N,) bool: outside a gauge band (None: the target has no gauges)
    # (N,) what the gauges' margins added to each logit (already in ``logits``; None: the target has none)
    margin_logits: np.ndarray | None = None


@dataclass(frozen=True)
class Target:
    kind: str  # "package" | "run"
    path: Path
    preprocess: PreprocessParams
    decision: Decision
    split: Split | None
    history: list[dict[str, Any]]
    info: dict[str, Any]
    gauges: GaugeSet | None = None  # applied beside the model, as the daemon applies them
