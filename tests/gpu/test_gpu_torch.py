"""torch on CUDA: FP16 (channels-last for the ResNet18; autocast with FP32 islands for the patch memory), one
CUDA graph per batch bucket — the GPU path that can be measured where TensorRT is absent — for both model
kinds, against ONNX Runtime FP32. Skipped without CUDA."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from engine.backend import create_backend  # noqa: E402
from engine.model import build_model  # noqa: E402
from engine.package import Decision, load_package  # noqa: E402
from engine.parity import compare  # noqa: E402
from engine.preprocess import PreprocessParams  # noqa: E402
from tests.model_support import Screws, network_input, patch_package  # noqa: E402

SIZE = (256, 256)


@pytest.fixture(scope="module")
def pkg_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.export import export_package

    d = tmp_path_factory.mktemp("r18") / "pkg"
    torch.manual_seed(0)
    model = build_model(None).eval()
    export_package(model, d, preprocess=PreprocessParams(input_size=SIZE), decision=Decision(), name="r18")
    return d  # with its model.pt: export writes the torch state


def test_fp16_graphs_match_onnxruntime(pkg_dir: Path) -> None:
    pkg = load_package(pkg_dir)
    batch = np.random.default_rng(0).normal(0, 1, (13, 1, *SIZE)).astype(np.float32)
    with create_backend("onnxruntime", pkg, max_batch=16) as ort:
        ref = ort.infer(batch)
    with create_backend("torch", pkg, device="cuda", max_batch=16) as tb:
        assert tb.precision == "fp16" and tb.buckets == (1, 2, 4, 8, 16)
        assert all(graph is not None for graph, _, _ in tb._graphs.values())
        got = tb.infer(batch)  # 13 → bucket 16, zero-padded
        one_by_one = np.concatenate([tb.infer(batch[i : i + 1]) for i in range(3)])
    cmp = compare(ref, got, pkg.meta.decision)
    print(f"torch cuda fp16 vs ORT fp32: max |Δlogit| {cmp.max_abs_logit:.3g}, flips {cmp.flips}/{cmp.n}")
    assert cmp.flips == 0 and cmp.max_abs_logit < 0.05 * max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(one_by_one, got[:3], atol=1e-2)  # padding does not leak between images


def test_fp16_graph_throughput_scales_with_batch(pkg_dir: Path) -> None:
    pkg = load_package(pkg_dir)
    rate: dict[int, float] = {}
    with create_backend("torch", pkg, device="cuda", max_batch=32) as tb:
        for n in (1, 8, 32):
            x = np.zeros((n, 1, *SIZE), np.float32)
            tb.infer(x)
            t0 = time.perf_counter()
            reps = 50
            for _ in range(reps):
                tb.infer(x)
            dt = (time.perf_counter() - t0) / reps
            rate[n] = n / dt
            print(f"torch cuda fp16 graphs batch {n}: {1000 * dt:.2f} ms, {rate[n]:.0f} img/s")
    assert rate[32] > 2 * rate[1]  # batching must pay on a GPU; if not, the graphs are not doing their job


@pytest.fixture(scope="module")
def patch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Screws]:
    return patch_package(tmp_path_factory.mktemp("patch") / "pkg")


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_the_patch_memory_on_cuda_keeps_onnxruntimes_verdicts(
    patch: tuple[Path, Screws], precision: str
) -> None:
    pkg_dir, screws = patch
    pkg = load_package(pkg_dir)
    x = network_input(screws, pkg.meta.preprocess)
    with create_backend("onnxruntime", pkg, max_batch=16) as ort:
        ref = np.concatenate([ort.infer(x[i : i + 16]) for i in range(0, len(x), 16)])
    with create_backend("torch", pkg, device="cuda", precision=precision, max_batch=16) as tb:
        assert tb._autocast is (precision == "fp16")  # FP16 through autocast: the islands stay FP32
        assert all(graph is not None for graph, _, _ in tb._graphs.values())
        got = np.concatenate([tb.infer(x[i : i + 16]) for i in range(0, len(x), 16)])
        alone = tb.infer(x[:1])
    cmp = compare(ref, got, pkg.meta.decision)
    print(
        f"patch memory torch cuda {precision} vs ORT fp32: max |Δlogit| {cmp.max_abs_logit:.3g}, flips {cmp.flips}/{cmp.n}"
    )
    assert cmp.flips == 0 and cmp.max_abs_logit < 0.05
    np.testing.assert_allclose(alone, got[:1], atol=1e-2)  # bucket 1 and bucket 16 agree
