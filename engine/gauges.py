"""Dimensional gauging at run time: tolerance bands on ``engine.pose`` measurements, and the check against them.

The ``GaugeSet`` is what ``model.json`` holds under ``gauges``; ``load_gauges`` opens it for the daemon and
``check`` is the run-time test (µs per part). ``values``, ``outside`` and ``outside_any`` are the same test over
many parts at once. ``Margins`` (``gauges.margins``) carry the same measurements into the model's score: how far
a part lies beyond the good parts' spread, in robust standard deviations, added to its logit. Bands are learned
from OK parts by ``training.gauge_fit`` (``inspectd train`` by default, ``inspectd calibrate-gauges`` to
calibrate a package again); the OK-vs-NG figure is ``engine.gauge_plot``.
numpy only (plus engine.pose).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

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
    "crest_dip_px": "px",
}
MEASUREMENTS: tuple[str, ...] = tuple(UNITS)
# Defaults of a GaugeSet's learning parameters (training.gauge_fit explains them).
DEFAULT_QUANTILES: tuple[float, float] = (0.005, 0.995)
DEFAULT_MARGIN_PX = 2.0  # ~10× a part's length repeatability (0.17 px s.d. over 12 rotations of its photo)
SCHEMA_VERSION = 1
# PoseParams fields that shape only the crop or decide which frames are refused, never a measured value: a
# model's pose parameters may differ from the calibration's in these. (A list of the harmless ones, so that a
# field added to PoseParams later counts as changing measurements until someone says otherwise.)
_NOT_MEASURING = frozenset(
    {
        "crop_width", "crop_height", "fill", "anchor", "head_margin_px", "min_blob_area_px",
        "second_object_frac", "border_margin_px", "min_length_px", "max_length_px", "max_width_px",
        "min_head_tip_ratio",
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
        # A measurement that cannot be trusted never passes: NaN compares False against every limit, and ±inf is
        # "inside" a band open on that side (−inf ≤ high), so neither is ever in a band, one-sided or not.
        if not math.isfinite(value):
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


# The gauges' margins (``Margins``): defaults of the default preset, measured by repeated 5-fold on screws-300
# (docs/training.md, "The gauges' margins in the score").
DEFAULT_MARGIN_K = 4.0  # robust s.d. beyond the good parts' median before a measurement adds to the logit
DEFAULT_MARGIN_WEIGHT = 0.25  # logit per robust s.d. beyond that
# The most the margins add to a logit: far past any calibrated threshold (sigmoid(−30 + 50) ≈ 1), far inside the
# daemon's plausible-logit check. A measurement that is NaN or infinite adds exactly this (it cannot pass a band
# either).
MAX_MARGIN_LOGIT = 50.0
# The smallest robust s.d. a margin uses, per unit: the pose's own repeatability (0.17 px s.d. of a part's length
# over 12 rotations of its photo), so that a measurement all good parts share exactly (a synthetic screw's
# straightness) does not turn a tenth of a pixel into tens of s.d. (px2: that times a ~200 px wide part's edge.)
MIN_MARGIN_SCALE = {"px": 0.17, "px2": 0.17 * 200.0}
_SIDES = ("both", "high", "low")


@dataclass(frozen=True, slots=True)
class Margin:
    """One measurement's reference on good parts: its median (``center``) and robust s.d. (``scale``: 1.4826 ×
    the median absolute deviation, at least ``MIN_MARGIN_SCALE``), and which side counts (``high``: only above
    the median, as a one-sided band; ``low``; ``both``)."""

    name: str
    center: float
    scale: float
    side: str = "both"

    def __post_init__(self) -> None:
        if self.name not in UNITS:
            raise ValueError(f"margin on unknown measurement {self.name!r}; gaugeable: {list(MEASUREMENTS)}")
        if self.side not in _SIDES:
            raise ValueError(f"margin {self.name}: side must be one of {list(_SIDES)}, got {self.side!r}")
        if not math.isfinite(self.center) or not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(
                f"margin {self.name}: center {self.center} and scale {self.scale} must be finite, scale > 0"
            )

    def distance(self, value: float) -> float:
        """How many robust s.d. ``value`` lies from the median on this margin's side (≤ 0 on the other side);
        +inf for a value that is not finite."""
        if not math.isfinite(value):
            return math.inf
        z = (value - self.center) / self.scale
        return abs(z) if self.side == "both" else (z if self.side == "high" else -z)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "center": self.center, "scale": self.scale, "side": self.side}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Margin:
        _strict(d, cls, "gauges margin")
        return cls(str(d["name"]), float(d["center"]), float(d["scale"]), str(d.get("side", "both")))


@dataclass(frozen=True, slots=True)
class Margins:
    """The gauges' margins in the model's score (``gauges.margins``): the part's logit plus ``weight`` × Σ
    max(0, d − ``k``) over the measurements, d each one's :meth:`Margin.distance` (at most
    ``MAX_MARGIN_LOGIT`` in all). A part within ``k`` robust s.d. of the good parts on every measurement keeps
    the model's logit exactly; one beyond scores higher the further out it lies, so a defect that bends or
    shortens a part ranks above good parts even where the model sees it weakly. The package's threshold is
    calibrated on this score, so it travels with the margins, and the daemon, the evaluation and replay all add
    them the same way (:meth:`term`)."""

    margins: tuple[Margin, ...]
    k: float = DEFAULT_MARGIN_K
    weight: float = DEFAULT_MARGIN_WEIGHT

    def __post_init__(self) -> None:
        names = [m.name for m in self.margins]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup or not names:
            raise ValueError(f"gauges margins: one margin per measurement, at least one (got {names})")
        if not (math.isfinite(self.k) and self.k >= 0 and math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(
                f"gauges margins: k {self.k} must be ≥ 0 and weight {self.weight} > 0, both finite"
            )

    def contributions(self, measurements: Measurements) -> dict[str, float]:
        """Per measurement, what it adds to the logit (only those that add anything; each at most
        ``MAX_MARGIN_LOGIT``, as is their sum in :meth:`term`)."""
        out: dict[str, float] = {}
        for m in self.margins:
            d = m.distance(float(getattr(measurements, m.name)))
            if d > self.k:
                out[m.name] = min(MAX_MARGIN_LOGIT, self.weight * (d - self.k))  # +inf → the cap
        return out

    def term(self, measurements: Measurements) -> float:
        """What this part's measurements add to its logit: 0.0 within every margin."""
        return self.total(self.contributions(measurements))

    @staticmethod
    def total(contributions: Mapping[str, float]) -> float:
        """What :meth:`contributions` add up to on a logit (at most ``MAX_MARGIN_LOGIT``)."""
        return min(MAX_MARGIN_LOGIT, sum(contributions.values()))

    def terms(self, measurements: Sequence[Measurements]) -> np.ndarray:
        """:meth:`term` of many parts (float64)."""
        return np.array([self.term(m) for m in measurements], np.float64)

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.k, "weight": self.weight, "margins": [m.to_dict() for m in self.margins]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Margins:
        _strict(d, cls, "gauges margins")
        if "margins" not in d:
            raise ValueError("gauges margins is missing the key 'margins'")
        try:
            return cls(
                tuple(Margin.from_dict(m) for m in d["margins"]),
                float(d.get("k", DEFAULT_MARGIN_K)),
                float(d.get("weight", DEFAULT_MARGIN_WEIGHT)),
            )
        except (TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"gauges margins: malformed value ({type(exc).__name__}: {exc})") from None


def learn_margins(
    ok: Sequence[Measurements],
    names: Sequence[str],
    sides: Mapping[str, str] | None = None,
    *,
    k: float = DEFAULT_MARGIN_K,
    weight: float = DEFAULT_MARGIN_WEIGHT,
) -> Margins:
    """The margins of ``names`` from good parts: each measurement's median and robust s.d. over the parts that
    have a finite value of it; ``sides`` as the bands' one-sided mapping (``high``/``low``; the rest both)."""
    out = []
    for name in names:
        v = values(ok, name)
        v = v[np.isfinite(v)]
        if v.size == 0:
            raise ValueError(f"no good part has a finite {name}: no margin can be learnt on it")
        center = float(np.median(v))
        mad = float(np.median(np.abs(v - center)))
        out.append(
            Margin(
                name,
                center,
                max(1.4826 * mad, MIN_MARGIN_SCALE[UNITS[name]]),
                (sides or {}).get(name, "both"),
            )
        )
    return Margins(tuple(out), k, weight)


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
    # Added to the model's logit (``Margins``); the package's threshold was calibrated with them. None: none.
    margins: Margins | None = None

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
        } | ({"margins": self.margins.to_dict()} if self.margins is not None else {})

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
                margins=Margins.from_dict(d["margins"]) if d.get("margins") is not None else None,
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
    """The bands this part's measurements fall outside ([] = within tolerance). A NaN or infinite measurement is
    outside every band (a violation, so the part is REJECTed ``out_of_tolerance``), never inside one."""
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
    inside: np.ndarray = np.isfinite(v)  # as Band.contains: NaN and ±inf are never inside
    if band.low is not None:
        inside &= v >= band.low
    if band.high is not None:
        inside &= v <= band.high
    return ~inside


def outside_any(measurements: Sequence[Measurements], bands: Sequence[Band]) -> np.ndarray:
    """Boolean mask: which parts fall outside at least one of ``bands`` (vectorised ``bool(check(...))``): the
    parts the gauges reject."""
    out = np.zeros(len(measurements), bool)
    for band in bands:
        out |= outside(measurements, band)
    return out
