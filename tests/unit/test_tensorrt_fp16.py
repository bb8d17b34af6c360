"""FP16 on both TensorRT API generations, against the fake tensorrt + CUDA runtime, for both model kinds:

- TensorRT 11 (no ``BuilderFlag.FP16``): a strongly typed network parsed from the FP16 copy of the verified
  ONNX (engine.onnx_fp16): FP32 inputs and outputs, the patch memory's fp32 scopes FP32, no layer precisions
  (a strongly typed network refuses them), TF32 off where the model has fp32 scopes;
- TensorRT 10: ``BuilderFlag.FP16`` on the package's own ONNX, the fp32 scopes pinned to FP32 with
  ``OBEY_PRECISION_CONSTRAINTS``.

The fake runs what it parsed with ONNX Runtime (the FP16 graph really computes in FP16), so verdicts are
compared with ONNX Runtime FP32: no flips, through the backend and through build-engine's parity gate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")

from engine.backend import create_backend
from engine.onnx_fp16 import in_fp32_scope, to_fp16
from engine.package import load_package
from engine.parity import compare, run_backend
from engine.trt_build import EngineCache
from inspectd.cli import main
from tests.model_support import Screws, network_input, patch_package, resnet_package, write_images
from tests.unit import fake_cudart, fake_tensorrt

UNGATED = {"rebuild": True, "allow_ungated": True}


@pytest.fixture(scope="module")
def patch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Screws]:
    return patch_package(tmp_path_factory.mktemp("patch") / "pkg")


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resnet_package(tmp_path_factory.mktemp("r18") / "pkg", input_size=(64, 64))


def _install(monkeypatch: pytest.MonkeyPatch, version: str) -> tuple[Any, Any]:
    return fake_tensorrt.install(monkeypatch, version=version), fake_cudart.install(monkeypatch)


def _fresh(pkg_dir: Path) -> Any:
    """The package with an empty engine cache (module-scoped packages are shared between tests)."""
    for p in (pkg_dir / "engines").glob("*") if (pkg_dir / "engines").is_dir() else ():
        p.unlink()
    return load_package(pkg_dir)


def _reference_and_tensorrt(pkg: Any, x: np.ndarray, **options: Any) -> tuple[np.ndarray, np.ndarray]:
    with create_backend("onnxruntime", pkg, max_batch=8) as ort:
        ref = run_backend(ort, x)
    with create_backend("tensorrt", pkg, max_batch=8, **options) as be:
        got = run_backend(be, x)
    return ref, got


def test_tensorrt_11_builds_fp16_as_a_strongly_typed_network_from_the_fp16_onnx(
    monkeypatch: pytest.MonkeyPatch, patch: tuple[Path, Screws]
) -> None:
    trt, cuda = _install(monkeypatch, "11.1.0")
    pkg_dir, screws = patch
    pkg = _fresh(pkg_dir)
    x = network_input(screws, pkg.meta.preprocess)
    ref, got = _reference_and_tensorrt(pkg, x, precision="fp16", **UNGATED)
    (build,) = trt.builds
    assert build["strongly_typed"] is True and build["fp16"] is False and build["fp32_layers"] == []
    assert build["tf32"] is False  # the model has fp32 scopes: TF32 would undo them
    assert build["io_dtypes"] == {"input": "FLOAT", "logit": "FLOAT", "cam": "FLOAT"}
    fp16 = to_fp16(pkg.onnx_path.read_bytes())
    assert trt.parsed == [("bytes", fp16.sha256)] and fp16.sha256 != pkg.meta.onnx_sha256
    assert fp16.fp16_nodes > 0 and fp16.fp32_nodes > fp16.fp16_nodes  # the distance path stayed FP32
    cmp = compare(ref, got, pkg.meta.decision)
    print(f"TensorRT 11 (fake) fp16 vs ORT fp32, patch memory: max |Δlogit| {cmp.max_abs_logit:.3g}")
    assert cmp.flips == 0 and 0 < cmp.max_abs_logit < 0.05
    cache = EngineCache(pkg.engine_cache_dir)
    (key,) = cache.entries()
    record = json.loads(cache.sidecar_path(cache.plan_path(key)).read_text())
    assert key.precision == "fp16" and "strongly typed" in record["precision_route"]
    assert cuda.live == 0


def test_tensorrt_10_builds_fp16_weakly_typed_with_the_fp32_scopes_pinned(
    monkeypatch: pytest.MonkeyPatch, patch: tuple[Path, Screws]
) -> None:
    trt, _ = _install(monkeypatch, "10.3.0")
    pkg_dir, screws = patch
    pkg = _fresh(pkg_dir)
    x = network_input(screws, pkg.meta.preprocess)
    ref, got = _reference_and_tensorrt(pkg, x, precision="fp16", **UNGATED)
    (build,) = trt.builds
    assert build["fp16"] is True and build["strongly_typed"] is False
    assert build["obey"] is True and build["tf32"] is False
    assert build["fp32_layers"] and all(in_fp32_scope(name) for name in build["fp32_layers"])
    assert any(name.endswith("/MatMul") for name in build["fp32_layers"])  # the distance
    assert trt.parsed == [("bytes", pkg.meta.onnx_sha256)]  # the package's own ONNX
    assert compare(ref, got, pkg.meta.decision).flips == 0


@pytest.mark.parametrize("version", ["10.3.0", "11.1.0"])
def test_the_resnet18_builds_fp16_on_both_generations(
    monkeypatch: pytest.MonkeyPatch, resnet: Path, version: str
) -> None:
    trt, _ = _install(monkeypatch, version)
    pkg = _fresh(resnet)
    x = np.random.default_rng(3).normal(0, 1, (12, 1, 64, 64)).astype(np.float32)
    ref, got = _reference_and_tensorrt(pkg, x, precision="fp16", **UNGATED)
    (build,) = trt.builds
    assert build["strongly_typed"] is (version == "11.1.0") and build["fp16"] is (version == "10.3.0")
    assert build["fp32_layers"] == [] and build["obey"] is False  # nothing to pin: a plain conv net
    assert build["tf32"] is True  # no fp32 scopes: TensorRT's default stays
    cmp = compare(ref, got, pkg.meta.decision)
    assert cmp.flips == 0 and cmp.max_abs_logit < 0.05


def test_build_engine_gates_a_tensorrt_11_fp16_plan_on_real_images(
    monkeypatch: pytest.MonkeyPatch,
    patch: tuple[Path, Screws],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    trt, _ = _install(monkeypatch, "11.1.0")
    pkg_dir, screws = patch
    pkg = _fresh(pkg_dir)
    data = write_images(screws, tmp_path / "data")
    args = ["build-engine", str(pkg_dir), "--fp16", "--data", str(data), "--limit", "0", "--max-batch", "8"]
    assert main(args) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "strongly typed" in out and "activated:" in out
    cache = EngineCache(pkg.engine_cache_dir)
    (key,) = cache.entries()
    record = json.loads(cache.sidecar_path(cache.plan_path(key)).read_text())
    assert record["parity"]["gated"] is True and record["parity"]["flips"] == 0
    assert record["parity"]["n"] == len(screws.frames)
    with create_backend("tensorrt", pkg, max_batch=8) as be:  # served without allow_ungated
        assert be.describe()["gate"] == "passed" and be.precision == "fp16"
    assert len(trt.builds) == 1


def test_a_strongly_typed_network_never_gets_layer_precisions(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake is strict where TensorRT 11 is: what the builds above did not do, they could not have done."""
    from onnx import TensorProto, helper

    _install(monkeypatch, "11.1.0")
    import tensorrt as trt

    builder = trt.Builder(trt.Logger())
    network = builder.create_network(0)
    assert network.strongly_typed  # 11: always
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["logit"], name="/fp32/Relu")],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["N"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert trt.OnnxParser(network, trt.Logger()).parse(model.SerializeToString())
    with pytest.raises(RuntimeError, match="strongly typed"):
        network.get_layer(0).precision = trt.DataType.FLOAT
    with pytest.raises(TypeError, match="unknown network creation flags"):
        builder.create_network(1 << 0)  # EXPLICIT_BATCH: gone in 11
    assert not hasattr(trt.BuilderFlag, "FP16") and not hasattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS")
