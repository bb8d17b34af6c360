"""The model the benchmark runs: a given package, or a real-sized ResNet18 package made on the spot.

Speed does not depend on the weights, so without ``--model`` the benchmark exports
``engine.model.build_model(None)`` (random weights, seeded) with the default preprocessing into a cache
directory, once: the same network, the same ONNX export and the same ``model.json`` a trained package has.
Its torch state (``model.pt``, written by the export) lets the torch backend and the naive loop run the very
same weights.

INT8: a given package is never modified; its ``model.int8.onnx`` is used when ``inspectd quantize`` recorded
one. The generated package is quantised here through the same agreement gate (``engine.quantize``), on the
benchmark's own images; whether the gate passed is reported with the numbers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.package import TORCH_VARIANT, Decision, ModelPackage, load_package
from engine.preprocess import Preprocessor, PreprocessParams

GENERATED_NAME = "bench-resnet18"


@dataclass(frozen=True, slots=True)
class Int8Status:
    available: bool
    gate: str  # "passed" | "refused" | "recorded" (a given package's own record) | "absent" | "error"
    detail: dict[str, Any]


def default_cache() -> Path:
    return Path.home() / ".cache" / "inspectd" / "bench"


def generated_package(cache: Path, params: PreprocessParams | None = None, *, seed: int = 0) -> ModelPackage:
    """A ResNet18 package with seeded random weights (exported once, then reused from ``cache``)."""
    params = params or PreprocessParams()
    key = hashlib.sha256(json.dumps({**params.to_dict(), "seed": seed}, sort_keys=True).encode()).hexdigest()
    out = cache / f"{GENERATED_NAME}-{key[:10]}"
    if (out / "model.json").is_file():
        cached = load_package(out)
        if cached.meta.variant(TORCH_VARIANT) is not None:  # else made before export wrote the torch state
            return cached
    import torch

    from engine.model import build_model
    from training.export import export_package

    torch.manual_seed(seed)
    model = build_model(None).eval()
    export_package(
        model,
        out,
        preprocess=params,
        decision=Decision(threshold=0.5),
        name=GENERATED_NAME,
        training={"note": "random weights: for speed measurements only", "seed": seed},
    )
    return load_package(out)


def int8_status(package: ModelPackage, generated: bool, images: Sequence[np.ndarray]) -> Int8Status:
    """Make (generated package) or find (given package) the INT8 variant, with its agreement record."""
    from engine.quantize import INT8_FILE, QuantizeRefused, quantize_package

    record = package.meta.variant("int8")
    if record is not None and (package.directory / INT8_FILE).is_file():
        return Int8Status(True, "recorded", {"agreement": record.get("agreement", {})})
    if not generated:
        return Int8Status(False, "absent", {"hint": "inspectd quantize MODEL_DIR --data DIR"})
    pre = Preprocessor(package.meta.preprocess)
    batch = pre.batch(list(images))
    half = max(1, len(batch) // 2)
    try:
        result = quantize_package(
            package, batch[:half], batch[half:] if len(batch) > 1 else batch, data="bench"
        )
    except QuantizeRefused as exc:
        return Int8Status(False, "refused", {"error": str(exc)})
    except Exception as exc:  # onnxruntime.quantization missing or failing: report, keep benchmarking
        return Int8Status(False, "error", {"error": f"{type(exc).__name__}: {exc}"})
    return Int8Status(True, "passed", {"agreement": result.record["agreement"]})
