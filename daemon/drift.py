"""What the line's parts look like lately, against what the model was calibrated on: sliding windows and the drift
gauges computed from them.

The hot path only appends: the inference stage hands over one batch at a time (the logits it decided with, and
each part's crop brightness, contrast and gauge measurements, measured in the preprocessing pool), which costs a
few numpy slice assignments under a lock per batch. Everything else — the PSI against the package's
``score_reference`` (engine.drift), the median rank, means and quantiles — is computed when Prometheus scrapes,
on the HTTP thread: :class:`DriftMonitor` is a Prometheus collector, so a statistic is at most one scrape old
and costs nothing between scrapes.

Gauges (every one labelled ``line``; NaN while there is nothing to say):

- ``inspectd_score_drift_psi``: PSI of the passed parts' scores in the window against the reference's passed
  parts (engine.drift explains the choice); NaN without a reference or with fewer than ``min_parts`` passed.
- ``inspectd_score_drift_median_rank``: where the window's median passed score falls in the reference (0.5 as
  calibrated; towards 1 parts look worse, towards 0 better).
- ``inspectd_score_drift_parts``: passed parts in the window (what the PSI is computed over).
- ``inspectd_score_reference_parts``: the reference's passed parts; 0 = no reference (a package exported
  before references existed, or one with too few good calibration parts): drift is not measured.
- ``inspectd_crop_brightness`` / ``inspectd_crop_contrast``: window mean of each part's mean / standard
  deviation of gray level in its crop, before CLAHE.
- ``inspectd_part_measurement{measurement, quantile}``: 5th, 50th and 95th percentile over the window of each
  gauged measurement; ``inspectd_gauge_band{measurement, edge}``: the package's band limits beside them.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.drift import PsiBins
from engine.gauges import Band
from engine.pose import Measurements

QUANTILES = (0.05, 0.5, 0.95)


@dataclass(frozen=True, slots=True)
class PartImage:
    """What the preprocessing pool measured of one part: its crop's light and, with gauges, its measurements."""

    brightness: float  # mean gray level of the crop (0–255), before CLAHE
    contrast: float  # standard deviation of the gray levels of the crop
    measurements: Measurements | None = None


class _Ring:
    """The last ``size`` floats appended (NaN-free appends are the caller's business)."""

    def __init__(self, size: int) -> None:
        self._a = np.empty(size, np.float64)
        self._n = 0  # values held (≤ size)
        self._pos = 0  # where the next value goes

    def extend(self, values: np.ndarray) -> None:
        size = self._a.size
        values = values[-size:]
        k = values.size
        end = self._pos + k
        if end <= size:
            self._a[self._pos : end] = values
        else:
            first = size - self._pos
            self._a[self._pos :] = values[:first]
            self._a[: k - first] = values[first:]
        self._pos = end % size
        self._n = min(size, self._n + k)

    def values(self) -> np.ndarray:
        return self._a[: self._n].copy()  # order does not matter to any statistic here


class DriftMonitor:
    """Sliding windows of the last ``window`` scored parts and crops, and the drift gauges over them.

    ``bins``: the package's reference bins at its operating point (None: no reference, ``no_reference`` says
    why); ``bands``: the package's gauge bands (measurements are kept only for these). Thread-safe:
    :meth:`observe` is called by the inference workers, :meth:`collect` and :meth:`snapshot` by others.
    """

    def __init__(
        self,
        line: str,
        *,
        bins: PsiBins | None = None,
        no_reference: str = "",
        bands: Sequence[Band] = (),
        window: int = 500,
        min_parts: int = 100,
    ) -> None:
        if window < 1 or not 1 <= min_parts <= window:
            raise ValueError(f"need window ≥ 1 and 1 ≤ min_parts ≤ window, got {window}, {min_parts}")
        self.line = line
        self.bins = bins
        self.no_reference = "" if bins is not None else (no_reference or "the package has no score_reference")
        self.bands = tuple(bands)
        self.window = window
        self.min_parts = min_parts
        self._pass_logit = bins.pass_logit if bins is not None else math.inf
        self._lock = threading.Lock()
        self._logits = _Ring(window)
        self._brightness = _Ring(window)
        self._contrast = _Ring(window)
        self._measured = {b.name: _Ring(window) for b in self.bands}

    # -- the hot path: once per batch ------------------------------------------------------------------------
    def observe(self, logits: Sequence[float], images: Sequence[PartImage]) -> None:
        """One batch: the logits the model decided its parts with, and the images measured on the way."""
        scores = np.asarray(logits, dtype=np.float64)
        if images:
            light = np.array([(p.brightness, p.contrast) for p in images], np.float64)
            measured = {
                name: np.array([getattr(p.measurements, name) for p in images if p.measurements is not None])
                for name in self._measured
            }
        with self._lock:
            if scores.size:
                self._logits.extend(scores)
            if images:
                self._brightness.extend(light[:, 0])
                self._contrast.extend(light[:, 1])
                for name, values in measured.items():
                    if values.size:
                        self._measured[name].extend(values)

    # -- on demand: at a scrape, or a replay's report -------------------------------------------------------
    def _windows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        with self._lock:
            return (
                self._logits.values(),
                self._brightness.values(),
                self._contrast.values(),
                {name: ring.values() for name, ring in self._measured.items()},
            )

    def snapshot(self) -> dict[str, Any]:
        """Every statistic as plain data (NaN as None): what the gauges say now."""
        logits, brightness, contrast, measured = self._windows()
        passed = logits[logits < self._pass_logit]
        psi = rank = math.nan
        if self.bins is not None and passed.size >= self.min_parts:
            psi, rank = self.bins.psi(passed), self.bins.median_rank(passed)
        quantiles = {
            name: dict(zip(QUANTILES, np.quantile(v, QUANTILES).tolist(), strict=True)) if v.size else {}
            for name, v in measured.items()
        }
        return {
            "psi": _num(psi),
            "median_rank": _num(rank),
            "scored_parts": int(logits.size),
            "passed_parts": int(passed.size),
            "min_parts": self.min_parts,
            "reference_parts": self.bins.n_reference if self.bins is not None else 0,
            "bins": len(self.bins.counts) if self.bins is not None else 0,
            "no_reference": self.no_reference or None,
            "crop_brightness": _num(float(brightness.mean())) if brightness.size else None,
            "crop_contrast": _num(float(contrast.mean())) if contrast.size else None,
            "measurements": {
                name: {f"p{round(q * 100):02d}": _num(x) for q, x in qs.items()}
                for name, qs in quantiles.items()
            },
        }

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.snapshot()
        line = [self.line]

        def gauge(name: str, doc: str, value: float | int | None) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["line"])
            g.add_metric(line, math.nan if value is None else float(value))
            return g

        yield gauge(
            "inspectd_score_drift_psi",
            "Population-stability index of the passed parts' scores in the window against the good calibration "
            "parts (model.json score_reference); NaN without a reference or with too few passed parts.",
            s["psi"],
        )
        yield gauge(
            "inspectd_score_drift_median_rank",
            "Share of the reference's passed parts scored at or below the window's median passed score "
            "(0.5 as calibrated; towards 1 parts look worse, towards 0 better).",
            s["median_rank"],
        )
        yield gauge("inspectd_score_drift_parts", "Passed parts in the drift window.", s["passed_parts"])
        yield gauge(
            "inspectd_score_reference_parts",
            "Good calibration parts the drift statistic compares with (0: no reference, drift not measured).",
            s["reference_parts"],
        )
        yield gauge(
            "inspectd_crop_brightness",
            "Mean gray level (0-255) of the parts' crops before CLAHE, averaged over the drift window.",
            s["crop_brightness"],
        )
        yield gauge(
            "inspectd_crop_contrast",
            "Standard deviation of the gray levels of the parts' crops before CLAHE, averaged over the window.",
            s["crop_contrast"],
        )
        measured = GaugeMetricFamily(
            "inspectd_part_measurement",
            "Quantiles over the drift window of each gauged measurement (unit in the measurement's name).",
            labels=["line", "measurement", "quantile"],
        )
        for name, qs in s["measurements"].items():
            for q in QUANTILES:
                value = qs.get(f"p{round(q * 100):02d}")
                measured.add_metric([self.line, name, f"{q:g}"], math.nan if value is None else value)
        yield measured
        bands = GaugeMetricFamily(
            "inspectd_gauge_band",
            "The model package's tolerance band limits, per measurement and edge (low, high).",
            labels=["line", "measurement", "edge"],
        )
        for band in self.bands:
            for edge, limit in (("low", band.low), ("high", band.high)):
                if limit is not None:
                    bands.add_metric([self.line, band.name, edge], limit)
        yield bands


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x


if TYPE_CHECKING:  # mypy proves that a DriftMonitor is a prometheus_client Collector
    _IS_COLLECTOR: type[Collector] = DriftMonitor
