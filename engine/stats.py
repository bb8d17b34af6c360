"""Summary statistics as the reports write them (replay.json, bench.json, metrics.json): percentiles of a
sample, an exact upper bound on an escape rate, and who rejected what (model, gauges, both)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["ESCAPE_CONFIDENCE", "binomial_cdf", "escape_upper_bound", "percentiles", "rejections_by_source"]

ESCAPE_CONFIDENCE = 0.95  # of the one-sided upper bound on an escape rate, wherever one is reported


def percentiles(
    values: Iterable[float], keys: Sequence[str] = ("p50", "p95", "p99", "max"), *, digits: int = 3
) -> dict[str, float | int | None]:
    """``{key: value}`` for each of ``keys``, in that order, rounded to ``digits``.

    A key is ``"pQ"`` (the Q-th percentile, numpy's linear interpolation; ``"p99.9"`` works), ``"min"``,
    ``"max"``, ``"mean"`` or ``"n"`` (the sample size). Of an empty sample every value is None, except
    ``n`` = 0. Each report asks for its own keys and rounding, so the files keep their shapes.
    """
    a = np.asarray(list(values), dtype=np.float64)
    quantiles = [float(k[1:]) for k in keys if k.startswith("p")]
    unknown = [k for k in keys if not k.startswith("p") and k not in ("min", "max", "mean", "n")]
    if unknown:
        raise ValueError(f"unknown statistic(s) {unknown}: use pQ, min, max, mean or n")
    if a.size == 0:
        return {k: 0 if k == "n" else None for k in keys}
    at = dict(zip(quantiles, np.percentile(a, quantiles).tolist(), strict=True)) if quantiles else {}
    out: dict[str, float | int | None] = {}
    for k in keys:
        if k == "n":
            out[k] = int(a.size)
            continue
        if k.startswith("p"):
            v = at[float(k[1:])]
        elif k == "min":
            v = float(a.min())
        elif k == "max":
            v = float(a.max())
        else:
            v = float(a.mean())
        out[k] = round(float(v), digits)
    return out


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X ≤ k) for X ~ Binomial(n, p), each term in log space (lgamma), so no n overflows a float."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if k < 0:
        return 0.0
    if k >= n or p == 0.0:
        return 1.0
    if p == 1.0:
        return 0.0
    lp, lq, ln = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    total = sum(
        math.exp(ln - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq)
        for i in range(k + 1)
    )
    return min(1.0, total)


def escape_upper_bound(misses: int, n: int, confidence: float = ESCAPE_CONFIDENCE) -> float:
    """One-sided Clopper-Pearson (exact binomial) upper bound on a miss rate seen as ``misses`` of ``n``.

    The largest rate p that would still show ``misses`` or fewer with probability ≥ 1 − ``confidence``: the point
    estimate ``misses / n`` says nothing about how few parts it rests on, and "0 of 45 NG escaped" only shows the
    escape rate to be below 6.4 % (for 0 misses the bound is 1 − (1 − confidence)^(1/n)). With ``n`` = 0 nothing
    is known and the bound is 1. Found by bisection on :func:`binomial_cdf` (it falls as p rises), to ~1e-15.
    """
    if n < 0 or not 0 <= misses <= max(n, 0):
        raise ValueError(f"misses must be in [0, n] and n ≥ 0, got misses={misses}, n={n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if misses == n:
        return 1.0
    alpha = 1.0 - confidence
    lo, hi = misses / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2.0
        if binomial_cdf(misses, n, mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def rejections_by_source(
    ng: Sequence[bool] | np.ndarray,
    groups: Sequence[str],
    by_model: Sequence[bool] | np.ndarray,
    by_gauges: Sequence[bool] | np.ndarray,
) -> dict[str, Any]:
    """What the model and the gauges each reject, and together, as counts: of the NG parts (overall and per
    defect type in ``groups``) and of the OK parts. ``gauges_only``: NG parts the model alone would have passed.

    The one breakdown the evaluation report and replay's report both show, so "caught by the gauges" means the
    same in both. A part rejected for any other reason (a fail-safe REJECT) is in neither column.
    """
    y = np.asarray(ng, dtype=bool)
    m = np.asarray(by_model, dtype=bool)
    g = np.asarray(by_gauges, dtype=bool)
    kinds = np.asarray(list(groups), dtype=object)
    if not (len(y) == len(m) == len(g) == len(kinds)):
        raise ValueError(
            f"ng, groups, by_model and by_gauges differ in length: {len(y)}, {len(kinds)}, {len(m)}, {len(g)}"
        )

    def counts(sel: np.ndarray) -> dict[str, int]:
        return {
            "n": int(sel.sum()),
            "model": int((sel & m).sum()),
            "gauges": int((sel & g).sum()),
            "either": int((sel & (m | g)).sum()),
            "gauges_only": int((sel & g & ~m).sum()),
        }

    return {
        "ng": counts(y),
        "ok": counts(~y),
        "per_type": {str(t): counts(y & (kinds == t)) for t in sorted({str(k) for k in kinds[y]})},
    }
