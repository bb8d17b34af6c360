"""The patch memory (engine.patch_model) and its fit (training.patch_memory): nearest-neighbour search over the
offsets, leave-one-out, the mask, state round trips, and torch vs ONNX Runtime after export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine.model import CamHead, model_from_state  # noqa: E402
from engine.package import Decision, load_package  # noqa: E402
from engine.patch_model import PatchMemory  # noqa: E402
from engine.preprocess import PreprocessParams  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.export import export_package  # noqa: E402
from training.patch_memory import PatchSettings, fit  # noqa: E402

H, W = 48, 96


def _screws(n: int, seed: int) -> np.ndarray:
    """uint8 (n, H, W): a dark bar with a periodic 'thread' at a random phase on a light, noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    out = []
    for _ in range(n):
        phase = rng.uniform(0, 2 * np.pi)
        bar = (np.abs(yy - H / 2) < 10 + 3 * np.sin(xx * 2 * np.pi / 12 + phase)) & (xx > 8) & (xx < W - 8)
        img = np.where(bar, 60.0, 200.0) + rng.normal(0, 3, (H, W))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def _x(pixels: np.ndarray) -> np.ndarray:
    return ((pixels.astype(np.float32) / 255.0 - 0.5) / 0.25)[:, None]


@pytest.fixture(scope="module")
def fitted() -> tuple[PatchMemory, np.ndarray, np.ndarray]:
    torch.set_num_threads(1)
    good = _screws(24, seed=1)
    model, loo = fit(
        _x(good), good, PatchSettings(patch=8, stride=4, dims=16, window=(1, 3)), log=lambda _: None
    )
    return model, loo, good


def test_a_copy_shifted_by_whole_cells_is_found_only_inside_the_window() -> None:
    rng = np.random.default_rng(0)
    bank_img = torch.from_numpy(rng.normal(0, 1, (4, 1, 40, 80)).astype(np.float32))
    kernel = torch.from_numpy(rng.normal(0, 1, (6, 1, 8, 8)).astype(np.float32))
    feats = torch.nn.functional.conv2d(bank_img, kernel, stride=4)
    gh, gw = feats.shape[2:]
    bank = feats.reshape(4, 6, gh * gw).permute(2, 1, 0)
    mask = torch.ones(gh, gw)
    query = torch.roll(bank_img[2:3], shifts=8, dims=3)  # two cells to the right
    wide = PatchMemory(kernel, bank, mask, torch.tensor([(0, dx) for dx in range(-2, 3)]), 4)
    narrow = PatchMemory(kernel, bank, mask, torch.tensor([(0, dx) for dx in range(-1, 2)]), 4)
    with torch.no_grad():
        d_wide = wide.distances(wide.features(query))[0, :, 4:]  # columns whose source moved in from the left
        d_narrow = narrow.distances(narrow.features(query))[0, :, 4:]
    assert float(d_wide.max()) < 1e-3
    assert float(d_narrow.min()) > 1.0


def test_leave_one_out_equals_a_memory_without_that_image(
    fitted: tuple[PatchMemory, np.ndarray, np.ndarray],
) -> None:
    model, _, good = fitted
    x = torch.from_numpy(_x(good[:3]))
    with torch.no_grad():
        feats = model.features(x)
        loo = model.distances(feats, exclude=torch.stack([torch.arange(3), torch.arange(3) + len(good)], 1))
        n = len(good)
        assert model.bank.shape[2] == 2 * n  # each good crop and its copy moved by half a stride
        for i in range(3):
            keep = [j for j in range(model.bank.shape[2]) if j not in (i, i + n)]
            other = PatchMemory(model.kernel, model.bank[:, :, keep], model.mask, model.offsets, 8 // 2)
            assert torch.allclose(loo[i], other.distances(feats[i : i + 1])[0], rtol=1e-5, atol=1e-4)
        assert float(model.distances(feats).max()) < 1e-3  # each image is its own nearest neighbour


def test_a_defect_on_the_part_outscores_every_good_part_and_the_map_points_at_it(
    fitted: tuple[PatchMemory, np.ndarray, np.ndarray],
) -> None:
    model, loo, _ = fitted
    fresh = _screws(8, seed=99)
    bad = fresh.copy()
    bad[:, 20:26, 40:46] = 250  # a bright scratch across the bar
    with torch.no_grad():
        z_good = model(torch.from_numpy(_x(fresh)))[:, 0].numpy()
        z_bad, heat = model.with_heatmap(torch.from_numpy(_x(bad)))
    assert float(z_bad.min()) > float(z_good.max())
    assert float(z_bad.min()) > float(loo.max())
    peak = np.unravel_index(int(np.argmax(heat[0].numpy())), tuple(heat.shape[1:]))
    assert abs(peak[0] * 4 + 4 - 23) <= 8 and abs(peak[1] * 4 + 4 - 43) <= 8  # cell centre near the blob


def test_background_dust_away_from_every_part_is_not_scored(
    fitted: tuple[PatchMemory, np.ndarray, np.ndarray],
) -> None:
    model, _, _ = fitted
    assert 0 < float(model.mask.sum()) < model.mask.numel()
    fresh = _screws(4, seed=5)
    dusty = fresh.copy()
    dusty[:, 1:4, 1:4] = 0  # a dark speck in the top-left corner cell, where no part lies
    with torch.no_grad():
        a = model(torch.from_numpy(_x(fresh)))[:, 0]
        b = model(torch.from_numpy(_x(dusty)))[:, 0]
    assert torch.allclose(a, b)


def test_state_round_trip_and_dispatch(fitted: tuple[PatchMemory, np.ndarray, np.ndarray]) -> None:
    model, _, good = fitted
    again = model_from_state(model.state_dict())
    assert isinstance(again, PatchMemory)
    x = torch.from_numpy(_x(good[:4]))
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
        logit, heat = CamHead.wrap(again)(x)
    assert logit.shape == (4,) and heat.shape == (4, *model.input_grid)
    with pytest.raises(ValueError, match="missing"):
        PatchMemory.from_state({"bank": model.bank, "kernel": model.kernel})
    with pytest.raises(ValueError, match="grid"):
        model(torch.zeros(1, 1, H + 8, W))


def test_the_score_is_the_mean_of_the_top_k_cells(fitted: tuple[PatchMemory, np.ndarray, np.ndarray]) -> None:
    model, _, _ = fitted
    assert int(model.top_k) == 4
    z = torch.zeros(2, *model.input_grid)
    cells = torch.nonzero(model.mask)
    (r0, c0), (r1, c1) = cells[0].tolist(), cells[1].tolist()
    z[0, r0, c0] = 8.0  # one odd cell
    z[1, r0, c0] = z[1, r1, c1] = 8.0  # two
    s = model.score_of(z) * model.scale + model.shift
    assert s.tolist() == pytest.approx([2.0, 4.0])
    one = PatchMemory.from_state({**model.state_dict(), "top_k": torch.tensor(1)})
    assert (one.score_of(z) * one.scale + one.shift).tolist() == pytest.approx([8.0, 8.0])
    with pytest.raises(ValueError, match="top_k"):
        PatchMemory.from_state({**model.state_dict(), "top_k": torch.tensor(10**6)})


def test_fit_refuses_what_it_cannot_fit() -> None:
    good = _screws(2, seed=0)
    with pytest.raises(ValueError, match="at least 3"):
        fit(_x(good), good, log=lambda _: None)
    good = _screws(4, seed=0)[:, :8, :8]
    with pytest.raises(ValueError, match="smaller than one"):
        fit(_x(good), good, log=lambda _: None)
    blank = np.full((4, H, W), 200, np.uint8)  # no part anywhere
    with pytest.raises(ValueError, match="patch_mask_share"):
        fit(_x(blank), blank, PatchSettings(patch=8, stride=4), log=lambda _: None)


def test_config_names_a_bad_field() -> None:
    with pytest.raises(ValueError, match="arch"):
        TrainConfig(arch="vit")
    with pytest.raises(ValueError, match="patch_stride"):
        TrainConfig(patch_size=8, patch_stride=9)
    cfg = TrainConfig.from_dict(json.loads(json.dumps(TrainConfig(patch_window=(0, 3)).to_dict())))
    assert cfg.patch_window == (0, 3) and cfg.patch_settings().window == (0, 3)
    old = {
        k: v
        for k, v in TrainConfig(arch="resnet18").to_dict().items()
        if k != "arch" and not k.startswith("patch")
    }
    assert TrainConfig.from_saved(old).arch == "resnet18"  # a run saved before the field existed
    assert TrainConfig.from_saved(TrainConfig().to_dict()).arch == "patch_memory"


def test_export_onnxruntime_equals_torch_at_any_batch(
    fitted: tuple[PatchMemory, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    model, _, _ = fitted
    bad = _screws(4, seed=8)
    bad[:, 20:26, 40:46] = 250
    x = _x(np.concatenate([_screws(6, seed=7), bad]))  # parts the memory has not stored, as in production
    meta = export_package(
        model,
        tmp_path / "pkg",
        preprocess=PreprocessParams(input_size=(H, W)),
        decision=Decision(threshold=0.5),
        name="patch",
        verify_batch=x,
    )
    assert meta.heatmap_output == "cam"
    pkg = load_package(tmp_path / "pkg")
    import onnxruntime as ort

    sess = ort.InferenceSession(str(pkg.onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref_z, ref_map = model.with_heatmap(torch.from_numpy(x))
    for n in (1, 3, len(x)):
        z, heat = sess.run(None, {pkg.meta.input_name: x[:n]})
        np.testing.assert_allclose(z, ref_z[:n].numpy(), rtol=1e-5, atol=1e-4)
        scale = float(ref_map[:n].abs().max())  # the export's own CAM bound: 1e-3 of the map's scale
        np.testing.assert_allclose(heat, ref_map[:n].numpy(), rtol=0, atol=1e-3 * scale)
