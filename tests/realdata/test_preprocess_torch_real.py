"""The GPU stations' batched preprocessing (engine.preprocess_torch, here on the CPU) on the 300 real screws:
the default preset's network input within the documented tolerance of OpenCV's, and no verdict flips through a
patch memory fitted on real screws. Skips without ../shared/data/screws-300. Run with ``-s`` for the numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine.backend import create_backend  # noqa: E402
from engine.package import load_package  # noqa: E402
from engine.parity import compare, run_backend  # noqa: E402
from engine.pose import PoseParams  # noqa: E402
from engine.preprocess import Preprocessor, PreprocessParams, device_preprocessor  # noqa: E402
from engine.preprocess_torch import MAX_LEVELS, MAX_SHARE  # noqa: E402
from tests.model_support import folder_screws, patch_package  # noqa: E402

pytestmark = pytest.mark.realdata


def test_the_default_presets_input_is_opencvs_within_tolerance_on_every_real_screw(realdata: Path) -> None:
    params = PreprocessParams(input_size=(320, 1000), pose=PoseParams().to_dict())  # training's default
    screws = folder_screws(realdata, good=1000, ng=1000)
    cpu, gpu = Preprocessor(params), device_preprocessor(params, "cpu")
    worst, share = 0.0, 0.0
    for i in range(0, len(screws.frames), 16):
        frames = screws.frames[i : i + 16]
        levels = np.abs(np.rint((gpu(frames).batch.numpy() - cpu.batch(frames)) * 255.0 * params.std))
        worst = max(worst, float(levels.max()))
        share = max(
            share, float(np.count_nonzero(levels.reshape(len(frames), -1), axis=1).max() / levels[0].size)
        )
    print(
        f"{len(screws.frames)} real screws: max {worst:.0f} grey levels, at most {100 * share:.2f} % of an image's pixels"
    )
    assert len(screws.frames) == 300 and worst <= MAX_LEVELS and share <= MAX_SHARE


def test_no_verdict_flips_on_real_screws(realdata: Path, tmp_path: Path) -> None:
    pkg_dir, held = patch_package(tmp_path / "pkg", screws=folder_screws(realdata, good=60, ng=40))
    pkg = load_package(pkg_dir)
    cpu = Preprocessor(pkg.meta.preprocess).batch(held.frames)
    gpu = device_preprocessor(pkg.meta.preprocess, "cpu")(held.frames).batch.numpy()
    with create_backend("onnxruntime", pkg, max_batch=8) as ort:
        ref, got = run_backend(ort, cpu), run_backend(ort, gpu)
    cmp = compare(ref, got, pkg.meta.decision)
    print(f"{cmp.n} real screws: {cmp.flips} flips, max |Δlogit| {cmp.max_abs_logit:.3g}")
    assert cmp.flips == 0
