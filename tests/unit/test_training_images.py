"""training.images: with a pose crop, each image's gauge measurements come from the pose its crop was cut with,
and are cached beside the crop; a crop cached before measurements were kept is measured once more."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.dataset import discover
from engine.pose import PoseParams, estimate_pose
from engine.preprocess import Preprocessor, PreprocessParams, load_gray
from tools.synth import write_dataset
from training.images import load_images


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("screws")
    write_dataset(root, 2, 1, seed=4)  # 1024²: screws the pose finds
    return root


def test_measurements_come_with_the_crops_and_from_the_cache(data: Path, tmp_path: Path) -> None:
    ds = discover(data)
    params = PoseParams()
    pre = Preprocessor(PreprocessParams(input_size=(64, 200), pose=params.to_dict()))
    first = load_images(ds, ds.samples, pre, cache_dir=tmp_path)
    expect = []
    for s in ds.samples:
        gray = load_gray(str(ds.abspath(s)))
        pose = estimate_pose(gray, params)
        expect.append(pose.measurements)
        assert np.array_equal(first.pixels[len(expect) - 1], pre.geometric(gray, pose=pose))
    assert first.measurements == tuple(expect) and first.failed == {}

    again = load_images(ds, ds.samples, pre, cache_dir=tmp_path)
    assert again.measurements == first.measurements and np.array_equal(again.pixels, first.pixels)

    # Crops cached by an inspectd that kept no measurements: the crops are reused, the parts measured again.
    for f in tmp_path.rglob("*.json"):
        f.unlink()
    for f in tmp_path.rglob("*.npy"):
        np.save(f, np.zeros((64, 200), np.uint8))
    older = load_images(ds, ds.samples, pre, cache_dir=tmp_path)
    assert older.measurements == first.measurements and not older.pixels.any()


def test_without_a_pose_crop_nothing_is_measured(data: Path, tmp_path: Path) -> None:
    ds = discover(data)
    imgs = load_images(
        ds, ds.samples, Preprocessor(PreprocessParams(input_size=(32, 32))), cache_dir=tmp_path
    )
    assert imgs.measurements is None and len(imgs.pixels) == 3
