"""Learning gauges: tolerance bands on ``engine.pose`` measurements from OK parts, and their k-fold cost.

A band is ``[quantile(q_lo) − margin, quantile(q_hi) + margin]`` of the OK parts' values, one-sided where only one
direction is a defect (straightness: a bent part is *more* crooked, never less). Quantiles, not median ± k·MAD:
on screws-300 OK lengths have a sharp lower edge (905 px) and a long upper tail (to 942 px), so a symmetric
MAD band either cuts into the upper tail (16/250 OK rejected at 3·MAD) or opens far below the lower edge and lets
the shortened fronts through (6/10 caught at 5·MAD); the quantile band follows each edge (2/250, 9/10).
The margin is in pixels because it stands for the measurement's repeatability and the quantile's sampling error,
not for the spread of the parts.

The bands are ``engine.gauges.Band`` s, gathered into a ``GaugeSet`` by :func:`fit_gauge_set`: ``inspectd train``
learns one from the training split's OK parts (training.train), ``inspectd calibrate-gauges`` from a folder into an
existing package (training.commands.calibrate_gauges); the daemon only checks them (engine.gauges). numpy only
(plus engine).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np

from engine.gauges import (
    DEFAULT_MARGIN_PX,
    DEFAULT_QUANTILES,
    MEASUREMENTS,
    UNITS,
    Band,
    GaugeSet,
    learn_margins,
    outside,
    outside_any,
    values,
)
from engine.pose import Measurements

# Measured on screws-300 (docs/gauging.md): length catches 9/10 shortened fronts at 2/250 OK rejected, and
# straightness the bent one it misses at no further OK cost. The crest dip catches 7/10 thread_side (among them the
# three the model ranks lowest) and 1 thread_top at 1/250 OK (k-fold); with it the false-reject rate at NG recall
# 1.0 of model + gauges falls 0.112 → 0.088 on 5 folds. Head width, tip width and area catch no NG part the others
# miss, so each would only add false-reject risk on parts not yet seen (every band rejects ~1 % of new OK parts by
# construction of its quantiles, before the margin).
DEFAULT_BANDS: tuple[str, ...] = ("length_px", "straightness_px", "crest_dip_px")
# A crest tip can only fall short of its neighbours by more than an intact thread does, never by less: the crest
# dip band has only an upper limit whenever it is chosen.
DEFAULT_ONE_SIDED: Mapping[str, Literal["low", "high"]] = {"straightness_px": "high", "crest_dip_px": "high"}
DEFAULT_K = 5  # folds of the OK false-reject estimate
MIN_OK = 20  # below this the 0.5 %/99.5 % quantiles are just the extreme parts, and k-fold folds hold ~4


def _check_options(
    names: Sequence[str], q: tuple[float, float], margin_px: float, one_sided: Mapping[str, str]
) -> None:
    unknown = [n for n in (*names, *one_sided) if n not in UNITS]
    if unknown:
        raise ValueError(f"unknown measurement(s) {unknown}; gaugeable: {list(MEASUREMENTS)}")
    if not names:
        raise ValueError("no measurements to learn bands for")
    if not 0.0 <= q[0] < q[1] <= 1.0:
        raise ValueError(f"quantiles must satisfy 0 ≤ low < high ≤ 1, got {q}")
    if not margin_px >= 0.0:
        raise ValueError(f"margin_px must be ≥ 0, got {margin_px}")
    bad = {k: v for k, v in one_sided.items() if v not in ("low", "high")}
    if bad:
        raise ValueError(f"one_sided values must be 'low' or 'high' (the side that is limited), got {bad}")


def learn_bands(
    measurements: Sequence[Measurements],
    *,
    names: Sequence[str] = DEFAULT_BANDS,
    q: tuple[float, float] = DEFAULT_QUANTILES,
    margin_px: float = DEFAULT_MARGIN_PX,
    one_sided: Mapping[str, str] | None = None,
) -> tuple[Band, ...]:
    """Bands ``[quantile(q[0]) − margin, quantile(q[1]) + margin]`` from OK parts' measurements.

    ``one_sided`` maps a measurement to the one side that is limited (``"high"``: only too large is a defect);
    ``None`` uses ``DEFAULT_ONE_SIDED`` (straightness, crest dip), ``{}`` makes every band two-sided. The area band's margin
    is ``margin_px`` × the median length: a margin-wide strip along the whole part.
    """
    sides = DEFAULT_ONE_SIDED if one_sided is None else one_sided
    _check_options(names, q, margin_px, sides)
    if len(measurements) < 2:
        raise ValueError(f"need at least 2 OK parts to learn bands, got {len(measurements)}")
    bands = []
    for name in names:
        v = values(measurements, name)
        if not np.isfinite(v).all():
            raise ValueError(f"{name}: {int((~np.isfinite(v)).sum())} non-finite value(s) among the OK parts")
        lo, hi = (float(x) for x in np.quantile(v, q))
        margin = (
            margin_px * float(np.median(values(measurements, "length_px")))
            if UNITS[name] == "px2"
            else margin_px
        )
        side = sides.get(name)
        # Limits kept to 0.01 px, rounded outwards: model.json and verdicts show the band that is applied, and
        # rounding never narrows it.
        low = None if side == "high" else math.floor((lo - margin) * 100.0) / 100.0
        high = None if side == "low" else math.ceil((hi + margin) * 100.0) / 100.0
        bands.append(Band(name, low, high, UNITS[name]))
    return tuple(bands)


def kfold_flags(
    measurements_ok: Sequence[Measurements],
    *,
    k: int = 5,
    seed: int = 0,
    names: Sequence[str] = DEFAULT_BANDS,
    q: tuple[float, float] = DEFAULT_QUANTILES,
    margin_px: float = DEFAULT_MARGIN_PX,
    one_sided: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Per band, which OK parts fall outside the band learned on the folds that exclude them.

    Folds are a seeded random permutation dealt round-robin, so their sizes differ by at most one.
    """
    n = len(measurements_ok)
    if k < 2:
        raise ValueError(f"k must be ≥ 2, got {k}")
    if n < 2 * k:
        raise ValueError(f"{n} OK parts are too few for {k}-fold estimates (need ≥ {2 * k})")
    fold = np.empty(n, np.intp)
    fold[np.random.default_rng(seed).permutation(n)] = np.arange(n) % k
    flags = {name: np.zeros(n, bool) for name in names}
    for f in range(k):
        train = [m for m, g in zip(measurements_ok, fold, strict=True) if g != f]
        judged = np.flatnonzero(fold == f)
        held = [measurements_ok[int(i)] for i in judged]
        for band in learn_bands(train, names=names, q=q, margin_px=margin_px, one_sided=one_sided):
            flags[band.name][judged] = outside(held, band)
    return flags


def kfold_cost(
    measurements_ok: Sequence[Measurements],
    k: int = 5,
    seed: int = 0,
    **learn: Any,
) -> dict[str, float]:
    """Per band, the OK false-reject rate estimated by k-fold (bands learned without the judged part).

    ``learn`` is passed to ``learn_bands`` (names, q, margin_px, one_sided).
    """
    flags = kfold_flags(measurements_ok, k=k, seed=seed, **learn)
    return {name: float(f.mean()) for name, f in flags.items()}


def fit_gauge_set(
    ok: Sequence[Measurements],
    ng: Mapping[str, Sequence[Measurements]],
    *,
    pose: Mapping[str, Any],
    names: Sequence[str] = DEFAULT_BANDS,
    q: tuple[float, float] = DEFAULT_QUANTILES,
    margin_px: float = DEFAULT_MARGIN_PX,
    one_sided: Mapping[str, str] | None = None,
    k: int = DEFAULT_K,
    seed: int = 0,
    margins: Mapping[str, float] | None = None,
) -> tuple[GaugeSet, np.ndarray]:
    """The ``GaugeSet`` of bands on ``names`` learnt from the OK parts ``ok``, measured with ``pose``
    (PoseParams.to_dict()), with its k-fold OK false-reject estimate and the NG parts it catches per defect type
    (``ng``: type → parts; NG parts never shape a band). Also returns, per OK part, whether bands learnt
    without it reject it (k-fold): the honest flag for calibrating a threshold on those same parts.

    ``margins`` (``{"k": …, "weight": …}``, {} for the defaults; None for none): the same measurements' margins
    in the score (engine.gauges.Margins), learnt from the same OK parts, on the bands' sides.
    """
    bands = learn_bands(ok, names=names, q=q, margin_px=margin_px, one_sided=one_sided)
    flags = kfold_flags(ok, k=k, seed=seed, names=names, q=q, margin_px=margin_px, one_sided=one_sided)
    any_ok = np.logical_or.reduce([flags[n] for n in names])
    gauges = GaugeSet(
        bands=bands,
        pose=dict(pose),
        margin_px=margin_px,
        quantiles=q,
        n_ok=len(ok),
        kfold=k,
        false_reject_estimate={n: float(flags[n].mean()) for n in names} | {"any": float(any_ok.mean())},
        ng_caught={t: [int(outside_any(parts, bands).sum()), len(parts)] for t, parts in ng.items()},
        created=created_now(),
        margins=None
        if margins is None
        else learn_margins(
            ok,
            names,
            DEFAULT_ONE_SIDED if one_sided is None else one_sided,
            **{key: float(v) for key, v in margins.items()},
        ),
    )
    return gauges, any_ok


def created_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
