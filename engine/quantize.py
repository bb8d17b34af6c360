"""Static INT8 quantisation of a package's ONNX model for the CPU, refused when it changes a verdict.

ONNX Runtime's static QDQ quantisation, per-channel weights, ``reduce_range=True``: without VNNI (these AVX2
CPUs) the U8S8 kernels use ``vpmaddubsw``, whose 16-bit intermediate saturates with full 8-bit weights and
gives wrong outputs; 7-bit weights avoid the saturation. Calibration runs on real images through the
package's own preprocessing; agreement with FP32 is measured on *other* images (the validation sample), and
the file is only written when verdict flips stay within tolerance (default: none).

The result is recorded in ``model.json`` — file, sha256, the sha256 of the model.onnx it was made from,
settings, calibration summary and agreement — so the ONNX Runtime backend refuses a stale or swapped INT8
file. The record lives in ``model.json`` ``variants``, read and written through :class:`engine.package.ModelMeta`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from engine.package import ModelPackage, sha256_file, write_meta
from engine.parity import Comparison, Tolerance, compare

INT8_FILE = "model.int8.onnx"
VARIANT = "int8"


class QuantizeRefused(RuntimeError):
    """The INT8 model disagrees with FP32 beyond tolerance; nothing was written."""

    def __init__(self, message: str, comparison: Comparison) -> None:
        super().__init__(message)
        self.comparison = comparison


@dataclass(frozen=True, slots=True)
class QuantizeSettings:
    per_channel: bool = True
    reduce_range: bool = True
    activation_type: str = "QUInt8"
    weight_type: str = "QInt8"
    calibrate_method: str = "MinMax"
    quant_format: str = "QDQ"
    # Kept in FP32: the stem conv reads the 1-channel image itself (quantising its input and 49-tap kernels
    # caused every flip measured on screws-300) and the fc head is one dot product; both are cheap in FP32.
    fp32_stem: bool = True
    fp32_head: bool = True
    chunk: int = 8  # calibration images per ORT run


# ── quantise, measure, decide ──────────────────────────────────────────────────────────────────────────────


Quantizer = Callable[[Path, Path, np.ndarray, str, QuantizeSettings], None]


def ort_static_int8(
    src: Path, dst: Path, calib: np.ndarray, input_name: str, settings: QuantizeSettings
) -> None:
    """ONNX Runtime static quantisation of ``src`` into ``dst``, calibrated on ``calib`` (N, 1, H, W)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type hints
        def __init__(self) -> None:
            self._chunks = iter(range(0, len(calib), settings.chunk))

        def get_next(self) -> dict[str, np.ndarray] | None:
            i = next(self._chunks, None)
            return None if i is None else {input_name: calib[i : i + settings.chunk]}

    prepared = dst.with_name(f".{dst.name}.pre.onnx")
    try:
        # Shape inference + graph optimisation first, as ORT recommends: quantisation parameters then
        # belong to the fused graph that actually runs.
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=False)
        excluded = _fp32_nodes(prepared, input_name, settings)
        quantize_static(
            str(prepared),
            str(dst),
            Reader(),
            quant_format=getattr(QuantFormat, settings.quant_format),
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            activation_type=getattr(QuantType, settings.activation_type),
            weight_type=getattr(QuantType, settings.weight_type),
            calibrate_method=getattr(CalibrationMethod, settings.calibrate_method),
            nodes_to_exclude=excluded,
        )
    finally:
        prepared.unlink(missing_ok=True)


def _fp32_nodes(model_path: Path, input_name: str, settings: QuantizeSettings) -> list[str]:
    """Names of the nodes ``settings`` keeps in FP32: convs fed by the graph input, and Gemm/MatMul."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    names = []
    for node in graph.node:
        if settings.fp32_stem and node.op_type == "Conv" and input_name in node.input:
            names.append(node.name)
        if settings.fp32_head and node.op_type in ("Gemm", "MatMul"):
            names.append(node.name)
    return names


def ort_logits(
    path: Path, batch: np.ndarray, input_name: str, output_name: str, chunk: int = 32
) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    parts = [
        sess.run([output_name], {input_name: batch[i : i + chunk]})[0] for i in range(0, len(batch), chunk)
    ]
    return np.concatenate(parts).astype(np.float32).reshape(-1)


@dataclass(frozen=True, slots=True)
class QuantizeResult:
    path: Path
    comparison: Comparison
    record: dict[str, Any]


def quantize_package(
    package: ModelPackage,
    calib: np.ndarray,
    val: np.ndarray,
    *,
    calib_files: Sequence[str] = (),
    val_files: Sequence[str] = (),
    tolerance: Tolerance | None = None,
    settings: QuantizeSettings | None = None,
    quantizer: Quantizer = ort_static_int8,
    data: str = "",
    calib_data: str | None = None,
) -> QuantizeResult:
    """Quantise, compare with FP32 on ``val``; write ``model.int8.onnx`` + its record only if within
    tolerance, else raise :class:`QuantizeRefused` leaving the package exactly as it was."""
    tolerance = tolerance or Tolerance()
    settings = settings or QuantizeSettings()
    if len(calib) == 0 or len(val) == 0:
        raise ValueError(f"need calibration and validation images, got {len(calib)} and {len(val)}")
    meta = package.meta
    final = package.directory / INT8_FILE
    tmp = package.directory / f".{INT8_FILE}.tmp{os.getpid()}"
    try:
        quantizer(package.onnx_path, tmp, calib, meta.input_name, settings)
        ref = ort_logits(package.onnx_path, val, meta.input_name, meta.output_name)
        got = ort_logits(tmp, val, meta.input_name, meta.output_name)
        cmp = compare(ref, got, meta.decision)
        if not cmp.passes(tolerance):
            flipped = (
                [val_files[i] for i in cmp.flip_indices[:5]] if val_files else list(cmp.flip_indices[:5])
            )
            raise QuantizeRefused(
                f"INT8 disagrees with FP32 on {cmp.flips} of {cmp.n} validation images (tolerance "
                f"{tolerance.max_flips}; max |Δscore| {cmp.max_abs_score:.3g}); e.g. {flipped}. "
                "Nothing written.",
                cmp,
            )
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    import onnxruntime

    record = {
        "file": INT8_FILE,
        "sha256": sha256_file(final),
        "source_onnx_sha256": meta.onnx_sha256,
        "precision": "int8",
        "quantization": {"tool": f"onnxruntime {onnxruntime.__version__}", **asdict(settings)},
        "calibration": {
            "n_images": len(calib),
            "files_sha256": _names_digest(calib_files),
            "data": calib_data or data,
        },
        "agreement": {**cmp.to_dict(), "files_sha256": _names_digest(val_files), "data": data},
        "tolerance": asdict(tolerance),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_meta(package.directory, meta.with_variant(VARIANT, record))
    return QuantizeResult(final, cmp, record)


def _names_digest(names: Sequence[str]) -> str:
    """Which images were used, compactly: sha256 of the sorted file names."""
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:16] if names else ""
