"""engine.preprocess_torch (the batched, device-agnostic preprocessing of GPU stations) against the reference,
engine.preprocess (OpenCV), on the CPU: CLAHE identical, the pose crop within a grey level, the resize as
OpenCV's, the network input within the documented tolerance, and no verdict flips through a real package."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine.backend import create_backend  # noqa: E402
from engine.drift import brightness_contrast  # noqa: E402
from engine.package import load_package  # noqa: E402
from engine.parity import compare, run_backend  # noqa: E402
from engine.pose import PoseParams, crop_matrix, estimate_pose, normalise  # noqa: E402
from engine.preprocess import Preprocessor, PreprocessParams, device_preprocessor  # noqa: E402
from engine.preprocess_torch import MAX_LEVELS, MAX_SHARE, clahe, warp_affine  # noqa: E402
from tests.model_support import Screws, patch_package, rendered_screws  # noqa: E402


def _images(n: int, h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        im = cv2.GaussianBlur(rng.integers(0, 256, (h, w)).astype(np.uint8), (0, 0), 2 + k)
        out.append(cv2.normalize(im, None, 20 + 15 * k, 220, cv2.NORM_MINMAX))
    return np.stack(out)


@pytest.mark.parametrize(
    ("h", "w", "grid", "clip"),
    [
        (320, 1000, (8, 8), 2.0),  # the default crop: whole tiles
        (100, 130, (8, 8), 2.0),  # padded on both sides
        (96, 130, (8, 8), 2.0),  # divisible rows, yet OpenCV pads a whole tile of them
        (96, 160, (7, 5), 3.0),  # a grid that is not square (cv::Size is width, height)
        (64, 64, (8, 8), 0.0),  # no clipping
    ],
)
def test_clahe_is_opencvs(h: int, w: int, grid: tuple[int, int], clip: float) -> None:
    x = _images(3, h, w, seed=h + w)
    ref = np.stack([cv2.createCLAHE(clip, grid).apply(im) for im in x])
    got = clahe(torch.from_numpy(x), clip, grid).numpy()
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("fill", ["median", "replicate"])
def test_the_pose_crop_is_within_a_grey_level_of_opencvs(fill: str) -> None:
    screws = rendered_screws(6, seed=5)
    p = PoseParams(fill=fill)
    for frame in screws.frames:
        pose = estimate_pose(frame, p)
        ref = normalise(frame, pose, p)
        inverse = cv2.invertAffineTransform(crop_matrix(pose, p))[None]
        value = None if fill == "replicate" else [float(round(pose.background))]
        got = warp_affine(torch.from_numpy(frame)[None], inverse, (p.crop_height, p.crop_width), value)[0]
        diff = np.abs(got.numpy().astype(int) - ref.astype(int))
        assert diff.max() <= 1 and np.count_nonzero(diff) <= 1e-3 * diff.size


def test_a_crop_reaching_out_of_the_frame_takes_the_border() -> None:
    frame = _images(1, 64, 80, seed=1)
    m = np.array([[0.9, 0.3, -20.0], [-0.3, 0.9, 30.0]])  # rotates and moves part of the crop off the frame
    for border, fill in ((cv2.BORDER_CONSTANT, [37.0]), (cv2.BORDER_REPLICATE, None)):
        ref = cv2.warpAffine(
            frame[0], m, (90, 70), flags=cv2.INTER_LINEAR, borderMode=border, borderValue=37.0
        )
        inverse = cv2.invertAffineTransform(m)[None]
        got = warp_affine(torch.from_numpy(frame), inverse, (70, 90), fill)[0].numpy()
        diff = np.abs(got.astype(int) - ref.astype(int))
        assert diff.max() <= 1 and np.count_nonzero(diff) <= 0.01 * diff.size


@pytest.mark.parametrize(
    ("params", "exact"),
    [
        (PreprocessParams(input_size=(256, 256)), True),  # the ResNet18 preset: whole frame, area 4×
        (PreprocessParams(input_size=(256, 256), order="resize_then_clahe", interpolation="linear"), True),
        (PreprocessParams(input_size=(320, 1000), pose=PoseParams().to_dict()), False),  # the default
        (PreprocessParams(input_size=(160, 500), pose=PoseParams().to_dict()), False),  # area 2×
        (PreprocessParams(input_size=(144, 448), pose=PoseParams(fill="replicate").to_dict()), False),
    ],
)
def test_the_network_input_is_the_cpus_within_the_documented_tolerance(
    params: PreprocessParams, exact: bool
) -> None:
    screws = rendered_screws(5, seed=11)
    cpu = Preprocessor(params)
    ref = cpu.batch(screws.frames)
    gpu = device_preprocessor(params, "cpu")
    got = gpu(screws.frames)
    levels = np.abs(np.rint((got.batch.numpy() - ref) * 255.0 * params.std))
    assert levels.max() <= (0 if exact else MAX_LEVELS)
    assert np.count_nonzero(levels) <= MAX_SHARE * levels.size
    stats = np.array([brightness_contrast(cpu.crop(f)) for f in screws.frames])
    np.testing.assert_allclose(got.brightness, stats[:, 0], atol=1e-3)
    np.testing.assert_allclose(got.contrast, stats[:, 1], atol=1e-3)


def test_frames_of_several_sizes_and_given_poses_in_one_call() -> None:
    params = PreprocessParams(input_size=(64, 64))
    frames = [
        _images(1, 200, 240, seed=3)[0],
        _images(1, 128, 128, seed=4)[0],
        _images(1, 200, 240, seed=5)[0],
    ]
    got = device_preprocessor(params, "cpu")(frames).batch.numpy()
    np.testing.assert_array_equal(got, Preprocessor(params).batch(frames))
    posed = PreprocessParams(input_size=(80, 250), pose=PoseParams().to_dict())
    screws = rendered_screws(2, seed=9)
    poses = [estimate_pose(f, PoseParams()) for f in screws.frames]
    gpu = device_preprocessor(posed, "cpu")
    np.testing.assert_array_equal(gpu(screws.frames, poses).batch.numpy(), gpu(screws.frames).batch.numpy())


def test_a_device_that_cannot_be_had_is_a_clear_error() -> None:
    params = PreprocessParams()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            device_preprocessor(params, "cuda")
    with pytest.raises(ValueError, match="cpu or cuda"):
        device_preprocessor(params, "meta")


@pytest.fixture(scope="module")
def patch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Screws]:
    return patch_package(tmp_path_factory.mktemp("patch") / "pkg")


def test_no_verdict_flips_through_the_patch_memory(patch: tuple[Path, Screws]) -> None:
    pkg_dir, screws = patch
    pkg = load_package(pkg_dir)
    cpu = Preprocessor(pkg.meta.preprocess).batch(screws.frames)
    gpu = device_preprocessor(pkg.meta.preprocess, "cpu")(screws.frames).batch.numpy()
    with create_backend("onnxruntime", pkg, max_batch=8) as ort:
        ref, got = run_backend(ort, cpu), run_backend(ort, gpu)
    cmp = compare(ref, got, pkg.meta.decision)
    print(
        f"GPU-path preprocessing vs OpenCV, patch memory: {cmp.flips} flips, max |Δlogit| {cmp.max_abs_logit:.3g}"
    )
    assert cmp.flips == 0 and math.isfinite(cmp.max_abs_logit) and cmp.max_abs_logit < 0.25
