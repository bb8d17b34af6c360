"""Summary statistics of a sample, as the reports write them (replay.json, bench.json)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["percentiles"]


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
