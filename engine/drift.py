"""Score drift: the good parts a model was calibrated on, kept in ``model.json``, and how far the parts on the line
have moved away from them. numpy (and OpenCV for a crop's statistics) only: training writes the reference, the
daemon compares against it.

**The reference** (:class:`ScoreReference`, ``model.json`` → ``score_reference``) is the sorted NG logits of the
calibration's OK parts (``training.calibrate``: validation OK, and for the patch memory the training OK scored
leave-one-out), exactly the scores the threshold was set against. Logits, not probabilities: a float32 sigmoid
rounds many good parts to the same probability, and a logit keeps them apart.

**The statistic** is a population-stability index (PSI) over quantile bins of that reference, restricted to the
parts the operating point passes (logit below the PASS bound: the threshold, or the grey zone's lower edge).
Restricting both sides to passed parts keeps the NG rate out of it: more defective parts arriving move the
parts *above* the bound, which the NG-rate alert watches, and leave the passed parts' distribution alone. What
moves the statistic is the good parts looking different — lighting, a new supplier's batch, a dusty lens — in
either direction: scores creeping up towards the threshold (false rejects coming), or down, where a defect may
no longer stand out (escapes coming, while the NG rate even falls).

``PSI = Σ (o_i − e_i) · ln(o_i / e_i)`` over the bins, ``o`` the window's shares and ``e`` the reference's, each
smoothed by half a part per bin so an empty bin is finite. The usual reading: below 0.1 no shift, 0.1–0.25 a
moderate one, above 0.25 a significant one. Sampling alone gives about ``(k − 1) · (1/n_ref + 1/n_window)``
(k bins), which is why the bins hold at least :data:`MIN_PARTS_PER_BIN` reference parts each: 0.05 from a
reference of any size plus 0.02 from a 500-part window, well under the alert's 0.25.

The median rank says which way: the share of the reference's passed parts scored at or below the window's
median passed score. 0.5 as calibrated; towards 1 the parts look worse than the calibration's good parts,
towards 0 better.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

SCHEMA_VERSION = 1
KIND = "ok_calibration_logits"
MIN_PARTS_PER_BIN = 20  # reference parts per bin, at least: the reference's own sampling noise stays ≤ 0.05
MAX_BINS = 10
MIN_BINS = 2
MIN_REFERENCE = MIN_BINS * MIN_PARTS_PER_BIN  # passed reference parts needed for a statistic at all
SMOOTHING = 0.5  # parts added to every bin on both sides: an empty bin is finite, a full one barely moves


@dataclass(frozen=True, slots=True)
class ScoreReference:
    """The sorted NG logits of the good calibration parts (``model.json`` → ``score_reference``)."""

    logits: tuple[float, ...]
    source: str = ""  # which images: the calibration's split name, e.g. "val + train OK (leave-one-out)"
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(
                f"score_reference schema_version {self.schema_version} is not understood "
                f"(expects {SCHEMA_VERSION})"
            )
        if not self.logits:
            raise ValueError("score_reference has no logits")
        a = np.asarray(self.logits, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ValueError("score_reference logits must be finite")
        if (np.diff(a) < 0).any():
            raise ValueError("score_reference logits must be sorted ascending")

    @classmethod
    def from_logits(cls, logits: Iterable[float], source: str = "") -> ScoreReference:
        """The reference of these OK logits (any order)."""
        return cls(tuple(sorted(float(x) for x in logits)), source)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "kind": KIND,
            "source": self.source,
            "n": len(self.logits),
            "logits": list(self.logits),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ScoreReference:
        """Strict: unknown keys, another kind and malformed values raise ValueError naming the problem."""
        if not isinstance(d, Mapping):
            raise ValueError(f"score_reference must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - {"schema_version", "kind", "source", "n", "logits"})
        if unknown:
            raise ValueError(f"unknown score_reference key(s) {unknown}")
        if d.get("kind", KIND) != KIND:
            raise ValueError(f"score_reference kind {d.get('kind')!r} is not understood (expects {KIND!r})")
        try:
            logits = tuple(float(x) for x in d["logits"])
            ref = cls(logits, str(d.get("source", "")), int(d.get("schema_version", SCHEMA_VERSION)))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"score_reference: malformed ({type(exc).__name__}: {exc})") from None
        if "n" in d and d["n"] != len(logits):
            raise ValueError(f"score_reference n = {d['n']} but it holds {len(logits)} logits")
        return ref

    def bins(self, pass_below: float) -> PsiBins:
        """The PSI bins for an operating point whose PASS bound is ``pass_below`` (an NG probability: the
        threshold, or the grey zone's lower edge). Raises :class:`NoReference` when fewer than
        :data:`MIN_REFERENCE` reference parts lie below it."""
        bound = logit(pass_below)
        r = np.asarray(self.logits, dtype=np.float64)
        r = r[r < bound]
        if r.size < MIN_REFERENCE:
            raise NoReference(
                f"only {r.size} of the {len(self.logits)} reference parts pass at {pass_below:.4g} "
                f"(a drift statistic needs {MIN_REFERENCE})"
            )
        k = max(MIN_BINS, min(MAX_BINS, r.size // MIN_PARTS_PER_BIN))
        # Inner edges half-way between the order statistics at the k-quantiles: no reference part lies on one.
        at = [round(r.size * j / k) for j in range(1, k)]
        edges = np.unique([(r[i - 1] + r[i]) / 2.0 for i in at])
        counts = np.bincount(np.searchsorted(edges, r, side="right"), minlength=edges.size + 1)
        return PsiBins(edges=tuple(edges.tolist()), counts=tuple(int(c) for c in counts), passed=tuple(r.tolist()),
                       pass_logit=bound)  # fmt: skip


class NoReference(ValueError):
    """No drift statistic can be computed against this reference (the message says why)."""


@dataclass(frozen=True, slots=True)
class PsiBins:
    """Quantile bins of the reference's passed parts, in logit space, and what a window is compared with."""

    edges: tuple[float, ...]  # k − 1 inner edges, ascending; bin i holds edges[i-1] ≤ x < edges[i]
    counts: tuple[int, ...]  # reference parts per bin (k)
    passed: tuple[float, ...]  # the reference's passed logits, sorted (the median rank's scale)
    pass_logit: float  # logits at or above this are not passed: left out on both sides

    @property
    def n_reference(self) -> int:
        return len(self.passed)

    def expected(self) -> np.ndarray:
        """The reference's smoothed share per bin."""
        c = np.asarray(self.counts, dtype=np.float64)
        shares: np.ndarray = (c + SMOOTHING) / (c.sum() + SMOOTHING * c.size)
        return shares

    def window_counts(self, passed: np.ndarray) -> np.ndarray:
        """Parts per bin of ``passed`` (logits already below :attr:`pass_logit`)."""
        edges = np.asarray(self.edges, dtype=np.float64)
        return np.bincount(np.searchsorted(edges, passed, side="right"), minlength=edges.size + 1)

    def psi(self, passed: np.ndarray) -> float:
        """The PSI of a window's passed logits against the reference (NaN for an empty window)."""
        if passed.size == 0:
            return math.nan
        c = self.window_counts(passed).astype(np.float64)
        o = (c + SMOOTHING) / (c.sum() + SMOOTHING * c.size)
        e = self.expected()
        return float(np.sum((o - e) * np.log(o / e)))

    def median_rank(self, passed: np.ndarray) -> float:
        """The share of the reference's passed parts scored at or below the window's median (NaN if empty)."""
        if passed.size == 0:
            return math.nan
        ref = np.asarray(self.passed, dtype=np.float64)
        m = float(np.median(passed))
        # Mid-rank: ties (a reference part exactly at the median) count half.
        lo, hi = np.searchsorted(ref, m, side="left"), np.searchsorted(ref, m, side="right")
        return float((lo + hi) / 2.0 / ref.size)


def logit(p: float) -> float:
    """The logit of an NG probability; ±inf at 1 and 0 (a bound nothing reaches, or everything does)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {p}")
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p / (1.0 - p))


def load_reference(d: Mapping[str, Any] | None) -> ScoreReference | None:
    """``model.json`` ``score_reference`` → the reference (None: the package has none). ValueError if malformed."""
    return None if d is None else ScoreReference.from_dict(d)


# About 16 000 pixels of a crop are plenty for its mean and spread; a stride keeps the cost at ~10 µs a part.
_STAT_PIXELS = 16_384


def brightness_contrast(crop: np.ndarray) -> tuple[float, float]:
    """(mean, standard deviation) of the gray levels of a crop (uint8, before CLAHE): the light on the part
    and its contrast, on an evenly strided subsample of about 16 000 pixels."""
    step = max(1, math.isqrt(crop.size // _STAT_PIXELS))
    mean, sd = cv2.meanStdDev(crop[::step, ::step])
    return float(mean[0, 0]), float(sd[0, 0])
