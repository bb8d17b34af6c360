"""The real TensorRT path (NVIDIA's container or a station): build → cache hit → cache miss on a changed ONNX →
parity gate, and the integrity checks (plan sha256, gate record, ungated refused). Skipped cleanly where
``import tensorrt`` or a CUDA device is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

pytestmark = pytest.mark.gpu

trt = pytest.importorskip("tensorrt")


def _enter(kind: str, package: Any, **options: Any) -> None:
    """Open and close a backend: what is under test happens in ``__enter__``."""
    with create_backend(kind, package, **options):
        pass


def _cuda_devices() -> int:
    try:
        from engine.backends.tensorrt import import_cudart

        err, n = import_cudart().cudaGetDeviceCount()
    except Exception:
        return 0
    return int(n) if int(err) == 0 else 0


if _cuda_devices() == 0:
    pytest.skip("no CUDA device", allow_module_level=True)

from engine.backend import create_backend  # noqa: E402
from engine.package import load_package  # noqa: E402
from engine.parity import compare, list_images, preprocess_images  # noqa: E402
from engine.trt_build import (  # noqa: E402
    EngineCache,
    EngineKeyMismatch,
    PlanIntegrityError,
    UngatedPlanError,
    sha256_bytes,
)
from inspectd.cli import main  # noqa: E402
from tests.helpers import drawn_image, tiny_package  # noqa: E402

SIZE = (256, 256)


def _package(d: Path, seed: int) -> Path:
    """ResNet18 exported like training does when torch is here (the PyTorch container); else the tiny ONNX
    model (NVIDIA's TensorRT container has no torch)."""
    try:
        import torch

        from engine.model import build_model
        from engine.package import Decision
        from engine.preprocess import PreprocessParams
        from training.export import export_package
    except ImportError:
        tiny_package(d, input_size=SIZE, seed=seed)
        return d
    torch.manual_seed(seed)
    export_package(
        build_model(None).eval(),
        d,
        preprocess=PreprocessParams(input_size=SIZE),
        decision=Decision(),
        name="gpu",
    )
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for label, n in (("good", 12), ("not-good", 4)):
        (root / label).mkdir()
        for i in range(n):
            img = drawn_image(512, seed=31 * i + len(label))
            cv2.imwrite(str(root / label / f"{i:03d}.png"), cv2.add(img, 6 * i))
    return root


def test_build_hit_miss_and_parity_gate(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pkg_dir = _package(tmp_path / "pkg", seed=0)
    args = ["build-engine", str(pkg_dir), "--data", str(data), "--max-batch", "8", "--opt-batch", "4"]
    assert main(args) == 0, capsys.readouterr().out
    cache = EngineCache(pkg_dir / "engines")
    assert len(cache.entries()) == 1
    assert any(p.name.startswith("timing-") for p in cache.directory.iterdir())
    (gated_key,) = cache.entries()
    gated_plan = cache.plan_path(gated_key)
    record = cache.read_record(gated_plan)
    assert record is not None and record["plan_sha256"] == sha256_bytes(gated_plan.read_bytes())
    assert record["parity"]["gated"] is True and record["parity"]["plan_sha256"] == record["plan_sha256"]

    pkg = load_package(pkg_dir)
    batch = preprocess_images(pkg, list_images(data))[:8]
    with create_backend("onnxruntime", pkg, max_batch=8) as ort:
        ref = ort.infer(batch)
    with create_backend("tensorrt", pkg, max_batch=8, opt_batch=4) as be:  # rebuild off: must hit the cache
        assert be.warmed_batch_sizes == tuple(range(1, 9))
        assert be.describe()["gate"] == "passed"
        got = be.infer(batch)
    cmp = compare(ref, got, pkg.meta.decision)
    print(f"TensorRT fp16 vs ORT fp32: max |Δlogit| {cmp.max_abs_logit:.3g}, flips {cmp.flips}/{cmp.n}")
    assert cmp.flips == 0 and cmp.max_abs_logit < 0.05 * max(1.0, float(np.abs(ref).max()))

    capsys.readouterr()
    assert main(args) == 0 and "cache hit" in capsys.readouterr().out

    # A corrupted plan is refused before the real deserializer sees a byte of it.
    good = gated_plan.read_bytes()
    gated_plan.write_bytes(good[: len(good) // 2])
    with pytest.raises(PlanIntegrityError, match="replaced or corrupted"):
        _enter("tensorrt", pkg, max_batch=8, opt_batch=4)
    gated_plan.write_bytes(good)

    _package(pkg_dir, seed=1)  # retrained: new model.onnx in the same package
    changed = load_package(pkg_dir)
    with pytest.raises(EngineKeyMismatch, match="onnx_sha256"):
        _enter("tensorrt", changed, max_batch=8, opt_batch=4)
    with pytest.raises(UngatedPlanError, match="allow_ungated"):  # a build at start is ungated: refused
        _enter("tensorrt", changed, max_batch=8, opt_batch=4, rebuild=True)
    with create_backend(
        "tensorrt", changed, max_batch=8, opt_batch=4, rebuild=True, allow_ungated=True
    ) as be:
        assert be.describe()["gate"] == "ungated-accepted"
        be.infer(batch[:3])
    assert len(cache.entries()) == 2

    # The gate refuses what exceeds its tolerance: FP16 never reproduces FP32 scores exactly.
    strict = [*args, "--force", "--max-score-delta", "0"]
    assert main(strict) == 1 and "REFUSED" in capsys.readouterr().out


def test_the_patch_memory_builds_and_gates_in_fp16(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default model kind on this TensorRT's FP16 route (10: weakly typed, fp32 scopes pinned; 11: strongly
    typed from the FP16 graph): built, parity-gated on screws with no verdict flips, served."""
    pytest.importorskip("torch")
    from tests.model_support import patch_package, write_images

    pkg_dir, screws = patch_package(tmp_path / "patch")
    data = write_images(screws, tmp_path / "data")
    args = ["build-engine", str(pkg_dir), "--fp16", "--data", str(data), "--limit", "0", "--max-batch", "16"]
    assert main(args) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    print(out)
    assert "activated:" in out and "0/" in out
    with create_backend("tensorrt", load_package(pkg_dir), max_batch=16) as be:
        assert be.describe()["gate"] == "passed" and be.precision == "fp16"
