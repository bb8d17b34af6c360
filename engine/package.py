"""The model package: ``model.onnx`` + ``model.json`` in one directory (+ ``model.pt``, the torch state).

``model.json`` is the contract between training and serving: preprocessing parameters, the decision
threshold(s), class order, provenance and the sha256 of the ONNX file. The daemon derives everything from it
and refuses a package it does not understand or whose ONNX file does not match.

Files derived from the same network (``model.pt``: the torch state the torch backend rebuilds the network from;
``model.int8.onnx``: written by ``inspectd quantize``) are *variants*: each has a record in ``model.json``
(``variants.<name>``: file, sha256, the sha256 of the ``model.onnx`` it belongs to) and is refused when its
bytes or its source do not match. A package without a variant loads and serves as before; only the backend
that needs the file says it is missing.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from engine.preprocess import PreprocessParams

SCHEMA_VERSION = 1
ONNX_NAME = "model.onnx"
META_NAME = "model.json"
TORCH_NAME = "model.pt"  # the torch state (variant "torch"), written by training.export
TORCH_VARIANT = "torch"
CLASS_ORDER = ("OK", "NG")  # the single logit is the NG (defect) logit


class PackageError(ValueError):
    """A model package that cannot be served; the message says which file/field and why."""


class IntegrityError(PackageError):
    """The package's ``model.onnx`` is not the file its ``model.json`` vouches for (or it vouches for none)."""


class Call(IntEnum):
    """What the operating point says about a score (the daemon turns it into a verdict and its reason)."""

    PASS = 0
    REJECT = 1
    GREY = 2  # REJECT grey_zone: a person re-inspects


@dataclass(frozen=True, slots=True)
class Decision:
    """Operating point on the NG probability: score ≥ threshold → REJECT.

    With a grey zone (low, high): score < low → PASS, score ≥ high → REJECT (model),
    in between → REJECT ``grey_zone`` so a person can re-inspect.
    """

    threshold: float = 0.5
    grey_zone: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0 or math.isnan(self.threshold):
            raise PackageError(f"decision.threshold must be within [0, 1], got {self.threshold}")
        if self.grey_zone is not None:
            lo, hi = self.grey_zone
            if not 0.0 <= lo <= hi <= 1.0:
                raise PackageError(f"decision.grey_zone must be 0 ≤ low ≤ high ≤ 1, got {self.grey_zone}")

    @property
    def bounds(self) -> tuple[float, float]:
        """(low, high): below low PASS, at or above high REJECT, in between grey (low == high without one)."""
        if self.grey_zone is None:
            return float(self.threshold), float(self.threshold)
        return float(self.grey_zone[0]), float(self.grey_zone[1])

    def classify(self, score: float) -> Call:
        """The one threshold / grey-zone rule: the daemon's decision, export's and the backends' parity checks
        and the reports all call this. ``score`` is the NG probability, already checked to be finite."""
        low, high = self.bounds
        if score < low:
            return Call.PASS
        return Call.REJECT if score >= high else Call.GREY

    def classify_all(self, scores: Iterable[float]) -> np.ndarray:
        """:meth:`classify` over many scores, as int8 (0 PASS, 1 REJECT, 2 grey)."""
        return np.array([self.classify(float(s)) for s in scores], dtype=np.int8)

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "grey_zone": list(self.grey_zone) if self.grey_zone else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Decision:
        unknown = sorted(set(d) - {"threshold", "grey_zone"})
        if unknown:
            raise PackageError(f"unknown decision field(s) {unknown}")
        gz = d.get("grey_zone")
        return cls(threshold=float(d["threshold"]), grey_zone=(float(gz[0]), float(gz[1])) if gz else None)


@dataclass(frozen=True, slots=True)
class ModelMeta:
    """What ``model.json`` holds. Informational sections (training, metrics, calibration) are free-form dicts."""

    name: str
    preprocess: PreprocessParams
    decision: Decision = field(default_factory=Decision)
    input_name: str = "input"
    output_name: str = "logit"
    heatmap_output: str | None = None  # optional second ONNX output: CAM heatmap (N, h, w)
    class_order: tuple[str, ...] = CLASS_ORDER
    opset: int | None = None
    onnx_sha256: str = ""
    gauges: dict[str, Any] | None = None  # tolerance bands from engine.pose measurements
    # engine.drift.ScoreReference: the good calibration parts' logits, what the daemon's drift statistic compares
    # with. None in packages exported before it existed: they load as before, with drift reported "no reference".
    score_reference: dict[str, Any] | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, Any] = field(
        default_factory=dict
    )  # derived files (int8), written by inspectd quantize
    created_by: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def variant(self, name: str) -> dict[str, Any] | None:
        """The record of a derived file (``int8``: ``model.int8.onnx``), or None."""
        rec = self.variants.get(name)
        return rec if isinstance(rec, dict) and "file" in rec else None

    def with_variant(self, name: str, record: dict[str, Any]) -> ModelMeta:
        return replace(self, variants={**self.variants, name: record})

    @property
    def model_id(self) -> str:
        """Short, stable id for verdicts and metrics: name + first 12 hex of the ONNX sha256."""
        return f"{self.name}@{self.onnx_sha256[:12]}" if self.onnx_sha256 else self.name

    def to_dict(self) -> dict[str, Any]:
        d = {
            "schema_version": self.schema_version,
            "name": self.name,
            "input_name": self.input_name,
            "output_name": self.output_name,
            "heatmap_output": self.heatmap_output,
            "class_order": list(self.class_order),
            "preprocess": self.preprocess.to_dict(),
            "decision": self.decision.to_dict(),
            "gauges": self.gauges,
            "opset": self.opset,
            "onnx_sha256": self.onnx_sha256,
            "calibration": self.calibration,
            "training": self.training,
            "metrics": self.metrics,
            "variants": self.variants,
            "created_by": self.created_by,
        }
        if self.score_reference is not None:  # absent rather than null: older inspectd still read the file
            d["score_reference"] = self.score_reference
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelMeta:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PackageError(
                f"model.json schema_version {version!r} is not understood by this inspectd "
                f"(expects {SCHEMA_VERSION}); re-export the model with a matching inspectd"
            )
        known = {
            "schema_version", "name", "input_name", "output_name", "heatmap_output", "class_order",
            "preprocess", "decision", "gauges", "opset", "onnx_sha256", "calibration", "training",
            "metrics", "variants", "created_by", "score_reference",
        }  # fmt: skip
        unknown = sorted(set(d) - known)
        if unknown:
            raise PackageError(f"model.json has unknown field(s) {unknown}")
        for required in ("name", "preprocess", "decision"):
            if required not in d:
                raise PackageError(f"model.json is missing the field {required!r}")
        class_order = tuple(d.get("class_order", CLASS_ORDER))
        if class_order != CLASS_ORDER:
            raise PackageError(f"model.json class_order {list(class_order)} is not {list(CLASS_ORDER)}")
        try:
            preprocess = PreprocessParams.from_dict(d["preprocess"])
        except (TypeError, ValueError) as exc:
            raise PackageError(f"model.json preprocess: {exc}") from None
        return cls(
            name=str(d["name"]),
            preprocess=preprocess,
            decision=Decision.from_dict(d["decision"]),
            input_name=str(d.get("input_name", "input")),
            output_name=str(d.get("output_name", "logit")),
            heatmap_output=d.get("heatmap_output"),
            class_order=class_order,
            opset=d.get("opset"),
            onnx_sha256=str(d.get("onnx_sha256", "")),
            gauges=d.get("gauges"),
            score_reference=d.get("score_reference"),
            calibration=dict(d.get("calibration") or {}),
            training=dict(d.get("training") or {}),
            metrics=dict(d.get("metrics") or {}),
            variants=dict(d.get("variants") or {}),
            created_by=dict(d.get("created_by") or {}),
        )


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class ModelPackage:
    directory: Path
    meta: ModelMeta

    @property
    def onnx_path(self) -> Path:
        return self.directory / ONNX_NAME

    @property
    def engine_cache_dir(self) -> Path:
        return self.directory / "engines"


def _variant_record(package: ModelPackage, path: Path) -> dict[str, Any]:
    """The record of the file ``path`` if it is a recorded variant of this exact model.onnx; else PackageError."""
    for rec in package.meta.variants.values():
        if isinstance(rec, dict) and rec.get("file") == path.name:
            break
    else:
        raise PackageError(
            f"{path.name} is not recorded in {package.directory}/model.json; make it with 'inspectd quantize'"
        )
    if not path.is_file():
        raise PackageError(f"{path} is recorded in model.json but missing")
    if rec.get("source_onnx_sha256") != package.meta.onnx_sha256:
        raise PackageError(
            f"{path.name} was made from another model.onnx (sha256 {str(rec.get('source_onnx_sha256'))[:12]}…, "
            f"package has {package.meta.onnx_sha256[:12]}…); re-run '{rec.get('made_by', 'inspectd quantize')}'"
        )
    return rec


def verify_variant_file(package: ModelPackage, path: Path) -> dict[str, Any]:
    """The record of ``path`` if it is a recorded variant of this exact model.onnx; else PackageError."""
    rec = _variant_record(package, path)
    actual = sha256_file(path)
    if actual != rec.get("sha256"):
        raise PackageError(f"{path} sha256 {actual[:16]}… does not match its model.json record; refusing it")
    return rec


def read_variant(package: ModelPackage, name: str) -> tuple[dict[str, Any], bytes]:
    """The record of variant ``name`` and its file's bytes, read once and checked against the record (sha256,
    and the model.onnx it was made from): the caller loads exactly these bytes, never the file again.
    PackageError when the package records no such variant, or its file is missing, swapped or stale."""
    rec = package.meta.variant(name)
    if rec is None:
        raise PackageError(f"{package.directory}/{META_NAME} records no {name!r} file")
    path = package.directory / str(rec["file"])
    _variant_record(package, path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PackageError(f"{path} cannot be read: {exc}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != rec.get("sha256"):
        raise PackageError(
            f"{path} sha256 {actual[:16]}… does not match its model.json record "
            f"{str(rec.get('sha256'))[:16]}…: the file was replaced or corrupted; refusing it"
        )
    return rec, data


def load_package(directory: str | Path, *, verify: bool = True) -> ModelPackage:
    """Read and check a package. ``verify`` recomputes the ONNX sha256 (integrity: refuse a swapped file)."""
    d = Path(directory)
    if not d.is_dir():
        raise PackageError(f"model package {d} is not a directory")
    meta_path, onnx_path = d / META_NAME, d / ONNX_NAME
    for p in (meta_path, onnx_path):
        if not p.is_file():
            raise PackageError(f"model package {d} has no {p.name}")
    if (d / f"{ONNX_NAME}.data").exists():
        raise PackageError(f"{d} has external ONNX weights ({ONNX_NAME}.data); the package must be one file")
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{meta_path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise PackageError(f"{meta_path} must hold a JSON object")
    meta = ModelMeta.from_dict(raw)
    if verify:
        actual = sha256_file(onnx_path)
        if not meta.onnx_sha256:
            raise IntegrityError(f"{meta_path} has no onnx_sha256; refusing an unverifiable package")
        if actual != meta.onnx_sha256:
            raise IntegrityError(
                f"{onnx_path} sha256 {actual[:16]}… does not match model.json onnx_sha256 "
                f"{meta.onnx_sha256[:16]}…; the package was modified or is incomplete"
            )
    return ModelPackage(directory=d, meta=meta)


def write_meta(directory: str | Path, meta: ModelMeta) -> ModelMeta:
    """Write ``model.json`` with the sha256 of the ``model.onnx`` already in ``directory``."""
    d = Path(directory)
    meta = replace(meta, onnx_sha256=sha256_file(d / ONNX_NAME))
    tmp = d / f".{META_NAME}.tmp"
    tmp.write_text(json.dumps(meta.to_dict(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(d / META_NAME)  # atomic: a reader never sees half a model.json
    return meta
