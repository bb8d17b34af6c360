"""Augmentation (training split only) and the training configuration."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from training.augment import AugmentConfig, augment, part_alpha
from training.config import PRESETS, TrainConfig, load_config_file

NONE = AugmentConfig(hflip=0, vflip=0, rotate_deg=0)


def _img() -> np.ndarray:
    img = np.full((40, 60), 200, np.uint8)
    img[15:25, 5:45] = 50  # a dark bar, off-centre
    return img


def test_no_op_config_returns_the_image_unchanged() -> None:
    img = _img()
    out = augment(img, NONE, np.random.default_rng(0))
    assert np.array_equal(out, img)


def test_augment_is_deterministic_for_a_generator_and_never_modifies_its_input() -> None:
    cfg = AugmentConfig(
        rotate_deg=180,
        scale=0.1,
        shift_x=0.05,
        shift_y=0.05,
        brightness=10,
        contrast=0.2,
        dropout_p=1.0,
        noise_std=3,
    )
    img = _img()
    copy = img.copy()
    a = augment(img, cfg, np.random.default_rng(5))
    b = augment(img, cfg, np.random.default_rng(5))
    c = augment(img, cfg, np.random.default_rng(6))
    assert np.array_equal(img, copy)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.shape == img.shape and a.dtype == np.uint8


def test_flips_are_exact_mirrors() -> None:
    img = _img()
    assert np.array_equal(augment(img, replace(NONE, hflip=1.0), np.random.default_rng(0)), img[:, ::-1])
    assert np.array_equal(augment(img, replace(NONE, vflip=1.0), np.random.default_rng(0)), img[::-1])


def test_brightness_shifts_the_mean_within_bounds() -> None:
    img = np.full((20, 20), 100, np.uint8)
    for seed in range(20):
        out = augment(img, replace(NONE, brightness=8), np.random.default_rng(seed))
        assert 92 <= out.mean() <= 108 and len(np.unique(out)) == 1


def test_rotation_fills_corners_with_the_background_not_black() -> None:
    img = _img()
    out = augment(img, replace(NONE, rotate_deg=45), np.random.default_rng(1))
    assert out.min() >= 50 and out[0, 0] == 200 and out[-1, -1] == 200


def test_bad_augment_options_are_named() -> None:
    with pytest.raises(ValueError, match="hflip"):
        AugmentConfig(hflip=1.5)
    with pytest.raises(ValueError, match=r"unknown augment option\(s\) \['blur'\]"):
        AugmentConfig.from_dict({"blur": 1})


def test_config_file_overrides_the_preset_and_typos_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"epochs": 3, "input_size": 64, "augment": {"rotate_deg": 180}}))
    cfg = load_config_file(f, PRESETS["recipe"])
    assert (cfg.epochs, cfg.input_size, cfg.augment.rotate_deg, cfg.pose) == (3, (64, 64), 180.0, False)
    assert cfg.augment.hflip == PRESETS["recipe"].augment.hflip  # untouched keys keep the preset's value
    toml = tmp_path / "c.toml"
    toml.write_text('lr = 0.01\nbalance = "pos_weight"\n')
    assert load_config_file(toml, TrainConfig()).lr == 0.01
    f.write_text(json.dumps({"epoch": 3}))
    with pytest.raises(ValueError, match=r"unknown training option\(s\) \['epoch'\]"):
        load_config_file(f, TrainConfig())
    with pytest.raises(ValueError, match="balance"):
        TrainConfig(balance="oversample")


def test_config_roundtrip_and_preprocess_params() -> None:
    cfg = PRESETS["default"]
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    pp = cfg.preprocess()
    assert pp.input_size == cfg.input_size and (pp.pose is not None) == cfg.pose
    assert PRESETS["recipe"].preprocess().pose is None


def test_the_demo_serves_the_default_presets_input_size() -> None:
    from tools.demo import PRODUCTION_INPUT  # tools may not import training, so the value is written twice

    assert PRESETS["default"].input_size == PRODUCTION_INPUT


def test_gauges_need_the_pose_crop_and_old_runs_had_none() -> None:
    assert PRESETS["default"].gauged and PRESETS["cnn"].gauged  # the pose-crop presets learn bands
    assert not PRESETS["recipe"].gauged  # whole frame: nothing measured
    assert not replace(PRESETS["default"], gauges=False).gauged
    saved = PRESETS["default"].to_dict()
    del saved["gauges"]  # a run saved before gauges existed learnt none
    assert TrainConfig.from_saved(saved).gauges is False
    with pytest.raises(ValueError, match="gauges"):
        TrainConfig(gauges="yes")  # type: ignore[arg-type]


def test_background_illumination_changes_the_background_and_keeps_the_part() -> None:
    img = np.full((60, 180), 190, np.uint8)
    img[20:40, 30:150] = 60  # the part
    img[25:35, 60:90] = 230  # a highlight on the metal: still part, not background
    alpha = part_alpha(img)
    assert alpha[30, 75] == pytest.approx(1.0) and alpha[2, 2] == pytest.approx(0.0)
    changed = 0
    for seed in range(5):
        out = augment(img, replace(NONE, background=20), np.random.default_rng(seed))
        assert np.array_equal(out[21:39, 31:149], img[21:39, 31:149])  # feathering may touch the corners
        changed += int(np.abs(out[:5].astype(int) - 190).max() > 0)
    assert changed >= 4


def test_background_swap_keeps_the_part_and_takes_the_donors_background() -> None:
    img = np.full((60, 180), 190, np.uint8)
    img[20:40, 30:150] = 60
    donor = np.full((60, 180), 150, np.uint8)
    donor[22:38, 30:140] = 70  # the donor's part: a little shorter and thinner
    out = augment(img, replace(NONE, background_swap=1.0), np.random.default_rng(0), donor)
    assert np.array_equal(out[21:39, 31:149], img[21:39, 31:149])  # the part is untouched
    assert out[2, 2] == 150 and out[-3, -3] == 150  # the background is the donor's
    assert np.array_equal(augment(img, replace(NONE, background_swap=1.0), np.random.default_rng(0)), img)
