"""Dimensional gauging: tolerance bands on ``engine.pose`` measurements, learned from OK parts.

A band is ``[quantile(q_lo) − margin, quantile(q_hi) + margin]`` of the OK parts' values, one-sided where only one
direction is a defect (straightness: a bent part is *more* crooked, never less). Quantiles, not median ± k·MAD:
on screws-300 OK lengths have a sharp lower edge (905 px) and a long upper tail (to 942 px), so a symmetric
MAD band either cuts into the upper tail (16/250 OK rejected at 3·MAD) or opens far below the lower edge and lets
the shortened fronts through (6/10 caught at 5·MAD); the quantile band follows each edge (2/250, 9/10).
The margin is in pixels because it stands for the measurement's repeatability and the quantile's sampling error,
not for the spread of the parts.

The ``GaugeSet`` is what ``model.json`` holds under ``gauges``; ``check`` is the run-time test (µs per part).
numpy only (plus engine.pose); the figure imports matplotlib when it is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np

from engine.pose import Measurements, PoseParams

# The scalar measurements a band can be put on, with their units. (The width profile is not gauged: bands on
# its 64 bins together reject 37/250 OK screws of screws-300, 5-fold, for 5/10 thread_side and 2/10 thread_top.)
UNITS: dict[str, str] = {
    "length_px": "px",
    "head_width_px": "px",
    "tip_width_px": "px",
    "straightness_px": "px",
    "area_px2": "px2",
}
MEASUREMENTS: tuple[str, ...] = tuple(UNITS)
# Measured on screws-300 (docs/gauging.md): length catches 9/10 shortened fronts at 2/250 OK rejected, and
# straightness the bent one it misses at no further OK cost. Head width, tip width and area catch no NG part the
# two miss, so each would only add false-reject risk on parts not yet seen (every band rejects ~1 % of new OK
# parts by construction of its quantiles, before the margin).
DEFAULT_BANDS: tuple[str, ...] = ("length_px", "straightness_px")
DEFAULT_ONE_SIDED: Mapping[str, Literal["low", "high"]] = {"straightness_px": "high"}
DEFAULT_QUANTILES: tuple[float, float] = (0.005, 0.995)
DEFAULT_MARGIN_PX = 2.0  # ~10× a part's length repeatability (0.17 px s.d. over 12 rotations of its photo)
SCHEMA_VERSION = 1
# PoseParams fields that shape only the crop or decide which frames are refused, never a measured value: a
# model's pose parameters may differ from the calibration's in these. (A list of the harmless ones, so that a
# field added to PoseParams later counts as changing measurements until someone says otherwise.)
_NOT_MEASURING = frozenset(
    {
        "crop_width", "crop_height", "fill", "min_blob_area_px", "second_object_frac", "border_margin_px",
        "min_length_px", "max_length_px", "max_width_px", "min_head_tip_ratio",
    }
)  # fmt: skip


def _strict(d: Mapping[str, Any], cls: type, what: str) -> None:
    if not isinstance(d, Mapping):
        raise ValueError(f"{what} must be a JSON object, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {what} key(s) {unknown}; this inspectd understands {sorted(known)}")


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


@dataclass(frozen=True, slots=True)
class Band:
    """Accepted range of one measurement; ``None`` = open on that side. A value on the edge is in the band."""

    name: str
    low: float | None
    high: float | None
    unit: str = "px"

    def __post_init__(self) -> None:
        if self.name not in UNITS:
            raise ValueError(f"band on unknown measurement {self.name!r}; gaugeable: {list(MEASUREMENTS)}")
        if self.low is None and self.high is None:
            raise ValueError(f"band {self.name} needs a low or a high limit")
        for side in (self.low, self.high):
            if side is not None and not math.isfinite(side):
                raise ValueError(f"band {self.name} has a non-finite limit {side}")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"band {self.name}: low {self.low} > high {self.high}")

    def contains(self, value: float) -> bool:
        if math.isnan(value):  # a measurement that cannot be trusted never passes
            return False
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def describe(self) -> str:
        lo = "−∞" if self.low is None else f"{self.low:.2f}"
        hi = "+∞" if self.high is None else f"{self.high:.2f}"
        return f"[{lo}, {hi}] {self.unit}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "low": self.low, "high": self.high, "unit": self.unit}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Band:
        _strict(d, cls, "gauges band")
        return cls(
            str(d["name"]), _opt_float(d.get("low")), _opt_float(d.get("high")), str(d.get("unit", "px"))
        )


@dataclass(frozen=True, slots=True)
class Violation:
    """A measurement outside its band; ``to_dict`` goes into the verdict's ``detail``."""

    name: str
    value: float
    low: float | None
    high: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": round(self.value, 3), "low": self.low, "high": self.high}

    def describe(self) -> str:
        return f"{self.name} {self.value:.2f} outside {Band(self.name, self.low, self.high).describe()}"


@dataclass(frozen=True, slots=True)
class GaugeSet:
    """The calibrated gauges of a model package (``model.json`` → ``gauges``)."""

    bands: tuple[Band, ...]
    pose: dict[str, Any]  # PoseParams.to_dict() the measurements were taken with; measure the same way
    margin_px: float = DEFAULT_MARGIN_PX
    quantiles: tuple[float, float] = DEFAULT_QUANTILES
    n_ok: int = 0  # OK parts the bands were learned from
    kfold: int = 5  # folds of the false-reject estimate
    false_reject_estimate: dict[str, float] = field(default_factory=dict)  # per band, k-fold; "any": union
    ng_caught: dict[str, list[int]] = field(default_factory=dict)  # defect type → [caught, total] (all bands)
    created: str = ""  # ISO 8601, UTC
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        names = [b.name for b in self.bands]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"gauges: more than one band on {dup}")
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(
                f"gauges schema_version {self.schema_version} is not understood (expects {SCHEMA_VERSION})"
            )
        if not 0.0 <= self.quantiles[0] < self.quantiles[1] <= 1.0 or not self.margin_px >= 0.0:
            raise ValueError(f"gauges: quantiles {self.quantiles} / margin_px {self.margin_px} out of range")
        PoseParams.from_dict(self.pose)  # unknown or invalid pose parameters fail here, at load

    def pose_params(self) -> PoseParams:
        return PoseParams.from_dict(self.pose)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "bands": [b.to_dict() for b in self.bands],
            "pose": dict(self.pose),
            "margin_px": self.margin_px,
            "quantiles": list(self.quantiles),
            "n_ok": self.n_ok,
            "kfold": self.kfold,
            "false_reject_estimate": dict(self.false_reject_estimate),
            "ng_caught": {k: list(v) for k, v in self.ng_caught.items()},
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GaugeSet:
        """Strict: unknown keys, missing keys and malformed values all raise ValueError naming the problem."""
        _strict(d, cls, "gauges")
        for required in ("bands", "pose"):
            if required not in d:
                raise ValueError(f"gauges is missing the key {required!r}")
        try:
            q = d.get("quantiles", DEFAULT_QUANTILES)
            fr = d.get("false_reject_estimate") or {}
            return cls(
                bands=tuple(Band.from_dict(b) for b in d["bands"]),
                pose=dict(d["pose"]),
                margin_px=float(d.get("margin_px", DEFAULT_MARGIN_PX)),
                quantiles=(float(q[0]), float(q[1])),
                n_ok=int(d.get("n_ok", 0)),
                kfold=int(d.get("kfold", 5)),
                false_reject_estimate={str(k): float(v) for k, v in fr.items()},
                ng_caught={str(k): [int(x) for x in v] for k, v in (d.get("ng_caught") or {}).items()},
                created=str(d.get("created", "")),
                schema_version=int(d.get("schema_version", SCHEMA_VERSION)),
            )
        except (TypeError, KeyError, IndexError, AttributeError) as exc:
            raise ValueError(f"gauges: malformed value ({type(exc).__name__}: {exc})") from None


def pose_mismatch(gauges: GaugeSet, params: PoseParams) -> list[str]:
    """PoseParams fields that change measurements and differ from the calibration's ([] = bands are valid).

    The daemon may measure with the model's own pose parameters only when this is empty; otherwise it must
    measure with ``gauges.pose_params()`` (or refuse the package), since e.g. ``end_fraction`` moves head and tip
    widths and ``straightness_window_px`` moves straightness.
    """
    mine = gauges.pose_params().to_dict()
    theirs = params.to_dict()
    return sorted(k for k in mine if k not in _NOT_MEASURING and mine[k] != theirs[k])


def load_gauges(
    gauges: Mapping[str, Any] | None, preprocess_pose: Mapping[str, Any] | None
) -> GaugeSet | None:
    """``model.json`` ``gauges`` → the GaugeSet the daemon applies (None: the package has no gauges).

    For the daemon at start-up, after ``load_package``: raises ValueError for gauges it cannot apply, and for
    gauges measured with other pose parameters than the model's pose crop (``preprocess.pose``), whose bands
    would not fit what the daemon measures. (Not in ``ModelMeta.from_dict``: calibrate-gauges must still be
    able to open such a package to calibrate it again.)
    """
    if gauges is None:
        return None
    gs = GaugeSet.from_dict(gauges)
    if preprocess_pose is not None:
        differ = pose_mismatch(gs, PoseParams.from_dict(dict(preprocess_pose)))
        if differ:
            raise ValueError(
                f"gauges were calibrated with other pose parameters ({', '.join(differ)}) than the model's "
                "preprocess.pose; run inspectd calibrate-gauges on this package again"
            )
    return gs


def check(measurements: Measurements, gauges: GaugeSet) -> list[Violation]:
    """The bands this part's measurements fall outside ([] = within tolerance)."""
    out: list[Violation] = []
    for band in gauges.bands:
        value = float(getattr(measurements, band.name))
        if not band.contains(value):
            out.append(Violation(band.name, value, band.low, band.high))
    return out


def values(measurements: Sequence[Measurements], name: str) -> np.ndarray:
    """One measurement of many parts as a float64 array."""
    if name not in UNITS:
        raise ValueError(f"unknown measurement {name!r}; gaugeable: {list(MEASUREMENTS)}")
    return np.fromiter((getattr(m, name) for m in measurements), np.float64, len(measurements))


def outside(measurements: Sequence[Measurements], band: Band) -> np.ndarray:
    """Boolean mask: which parts fall outside ``band`` (vectorised ``not band.contains``)."""
    v = values(measurements, band.name)
    inside = ~np.isnan(v)
    if band.low is not None:
        inside &= v >= band.low
    if band.high is not None:
        inside &= v <= band.high
    return ~inside


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
    ``None`` uses ``DEFAULT_ONE_SIDED`` (straightness), ``{}`` makes every band two-sided. The area band's margin
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


def created_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def gauge_figure(
    ok: Sequence[Measurements],
    ng: Mapping[str, Sequence[Measurements]] | Sequence[Measurements],
    gauges: GaugeSet | Sequence[Band] | None,
    names: Sequence[str] = MEASUREMENTS,
) -> bytes:
    """PNG: one histogram per measurement, OK vs NG (stacked by defect type), the bands drawn on top.

    Each panel's title counts the parts outside its band. Drawn with matplotlib's object API on an Agg canvas:
    no pyplot, so no global figure state and no display backend (safe in report threads).
    """
    from io import BytesIO

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = {k: list(g) for k, g in (ng.items() if isinstance(ng, Mapping) else [("NG", ng)]) if len(g)}
    bands = {b.name: b for b in (gauges.bands if isinstance(gauges, GaugeSet) else (gauges or ()))}
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    # Fixed spacing instead of a layout engine, and step histograms (one polygon per group, not one rectangle
    # per bin): together 5× faster to draw, which matters when a report embeds several of these.
    fig = Figure(figsize=(5.0 * cols, 3.4 * rows), dpi=100)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.09, top=0.92, wspace=0.22, hspace=0.5)
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        _panel(ax, name, list(ok), groups, bands.get(name))
        if i == 0:
            ax.legend(fontsize=7)
    buf = BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _panel(
    ax: Any, name: str, ok: list[Measurements], groups: dict[str, list[Measurements]], band: Band | None
) -> None:
    v_ok = values(ok, name)
    v_ng = {k: values(g, name) for k, g in groups.items()}
    edges_of_band = [e for e in ((band.low, band.high) if band else ()) if e is not None]
    span = np.concatenate([v_ok, *v_ng.values(), np.array(edges_of_band, np.float64)])
    span = span[np.isfinite(span)]
    lo, hi = (float(span.min()), float(span.max())) if span.size else (0.0, 1.0)
    bins = np.linspace(lo, max(hi, lo + 1.0), 41).tolist()
    ax.hist(v_ok, bins=bins, histtype="stepfilled", color="0.7", label=f"OK ({len(v_ok)})")
    if v_ng:
        labels = [f"{k} ({len(v)})" for k, v in v_ng.items()]
        ax.hist(list(v_ng.values()), bins=bins, histtype="stepfilled", stacked=True, alpha=0.85, label=labels)
    title = f"{name}  (no band)"
    if band is not None:
        for edge in edges_of_band:
            ax.axvline(edge, color="crimson", lw=1.5, ls="--")
        low = band.low if band.low is not None else lo
        ax.axvspan(low, band.high if band.high is not None else hi, color="green", alpha=0.07, lw=0)
        n_ng = sum(len(g) for g in groups.values())
        ng_out = sum(int(outside(g, band).sum()) for g in groups.values())
        title = (
            f"{name}  band {band.describe()}\n"
            f"OK out {int(outside(ok, band).sum())}/{len(ok)}, NG out {ng_out}/{n_ng}"
        )
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(UNITS[name])
    ax.set_ylabel("parts")
