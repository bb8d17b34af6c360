"""GPU preprocessing (engine.preprocess_torch on CUDA, the daemon's ``batching.preprocess_device = "cuda"``)
against OpenCV on the CPU: within the documented tolerance, the same as torch on the CPU, no verdict flips; and
the daemon's device stage end to end. Skipped without CUDA."""

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
from engine.package import load_package  # noqa: E402
from engine.parity import compare, run_backend  # noqa: E402
from engine.pose import PoseParams  # noqa: E402
from engine.preprocess import Preprocessor, PreprocessParams, device_preprocessor  # noqa: E402
from engine.preprocess_torch import MAX_LEVELS, MAX_SHARE  # noqa: E402
from tests.model_support import Screws, patch_package, rendered_screws  # noqa: E402


@pytest.mark.parametrize(
    "params",
    [
        PreprocessParams(input_size=(320, 1000), pose=PoseParams().to_dict()),  # the default preset
        PreprocessParams(input_size=(256, 256)),  # the ResNet18's whole frame
    ],
)
def test_cuda_preprocessing_is_opencvs_within_tolerance(params: PreprocessParams) -> None:
    screws = rendered_screws(16, seed=13)
    ref = Preprocessor(params).batch(screws.frames)
    cuda = device_preprocessor(params, "cuda")
    t0 = time.perf_counter()
    got = cuda(screws.frames)
    torch.cuda.synchronize()
    print(
        f"{params.input_size}: {1000 * (time.perf_counter() - t0) / len(screws.frames):.2f} ms per frame (first call)"
    )
    levels = np.abs(np.rint((got.batch.cpu().numpy() - ref) * 255.0 * params.std))
    assert levels.max() <= MAX_LEVELS and np.count_nonzero(levels) <= MAX_SHARE * levels.size
    on_cpu = device_preprocessor(params, "cpu")(screws.frames).batch.numpy()
    assert float(np.abs(got.batch.cpu().numpy() - on_cpu).max()) * 255.0 * params.std <= 1.0 + 1e-3


@pytest.fixture(scope="module")
def patch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Screws]:
    return patch_package(tmp_path_factory.mktemp("patch") / "pkg")


def test_no_verdict_flips_with_cuda_preprocessing(patch: tuple[Path, Screws]) -> None:
    pkg_dir, screws = patch
    pkg = load_package(pkg_dir)
    cpu = Preprocessor(pkg.meta.preprocess).batch(screws.frames)
    gpu = device_preprocessor(pkg.meta.preprocess, "cuda")(screws.frames).batch.cpu().numpy()
    with create_backend("onnxruntime", pkg, max_batch=16) as ort:
        cmp = compare(run_backend(ort, cpu), run_backend(ort, gpu), pkg.meta.decision)
    assert cmp.flips == 0
