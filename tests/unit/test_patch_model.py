"""The patch memory (engine.patch_model) and its fit (training.patch_memory): nearest-neighbour search over the
offsets, leave-one-out, the mask, state round trips, and torch vs ONNX Runtime after export."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine.model import CamHead, model_from_state  # noqa: E402
from engine.package import Decision, load_package  # noqa: E402
from engine.patch_model import FAR, PatchEnsemble, PatchMemory, crop_view, searched_cells  # noqa: E402
from engine.preprocess import PreprocessParams  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.export import export_package  # noqa: E402
from training.patch_memory import PatchSettings, fit, fit_members  # noqa: E402

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


def test_searched_cells_are_the_mask_grown_by_the_window() -> None:
    mask = torch.zeros(5, 7)
    mask[2, 3] = 1.0
    cells = searched_cells(mask, [(0, 0), (1, 0), (-1, 0), (0, 2)])
    assert [(int(c) // 7, int(c) % 7) for c in cells] == [(1, 3), (2, 3), (2, 5), (3, 3)]
    edge = torch.zeros(5, 7)
    edge[0, 6] = 1.0  # a window that leaves the grid reaches no cell there
    assert [int(c) for c in searched_cells(edge, [(-1, 0), (0, 1), (1, 0)])] == [13]


def test_inference_searches_only_what_the_score_reads_and_finds_the_same_distances(
    fitted: tuple[PatchMemory, np.ndarray, np.ndarray],
) -> None:
    """The served search (the mask grown by the window, |b|² folded into the product) equals the full grid's
    on every scored cell, at a fraction of the bank; off the part it is not searched and no score reads it."""
    model, _, _ = fitted
    x = torch.from_numpy(_x(np.concatenate([_screws(3, seed=7), _screws(1, seed=9)])))
    everywhere = PatchMemory.from_state({**model.state_dict(), "mask": torch.ones_like(model.mask)})
    with torch.no_grad():
        feats = model.features(x)
        served = model.distances(feats)
        full = everywhere.distances(feats)
        on = model.mask > 0
        torch.testing.assert_close(served[:, on], full[:, on], rtol=1e-6, atol=1e-5)
        assert bool((served[:, ~on] <= FAR).all())
        z, heat = model.with_heatmap(x)
        assert bool(torch.isfinite(z).all()) and float(heat[:, ~on].abs().max()) == 0.0
    assert model.bank_aug.shape[0] == len(searched_cells(model.mask, model._offsets)) >= int(on.sum())
    left = model.mask.clone()
    left[:, left.shape[1] // 2 :] = 0.0  # a part that lies in the left half only
    smaller = PatchMemory.from_state({**model.state_dict(), "mask": left})
    assert smaller.bank_aug.shape[0] < model.mask.numel()  # the bank the search streams shrinks with it


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
            # Scored everywhere (inference computes the part's cells only; leave-one-out, the whole grid).
            everywhere = torch.ones_like(model.mask)
            other = PatchMemory(model.kernel, model.bank[:, :, keep], everywhere, model.offsets, 8 // 2)
            assert torch.allclose(loo[i], other.distances(feats[i : i + 1])[0], rtol=1e-5, atol=1e-4)
        on = model.mask > 0
        assert float(model.distances(feats)[:, on].max()) < 1e-3  # each image is its own nearest neighbour


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
    _assert_onnxruntime_equals_torch(model, x, tmp_path, "patch")


def _assert_onnxruntime_equals_torch(
    model: torch.nn.Module, x: np.ndarray, tmp_path: Path, name: str
) -> None:
    """Exported (verified on ``x``), the package's ONNX Runtime logits and heat maps equal torch's at batches
    1, 3 and all of ``x``."""
    meta = export_package(
        model,
        tmp_path / "pkg",
        preprocess=PreprocessParams(input_size=(H, W)),
        decision=Decision(threshold=0.5),
        name=name,
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
        assert heat.shape == tuple(ref_map[:n].shape)
        np.testing.assert_allclose(z, ref_z[:n].numpy(), rtol=1e-5, atol=1e-4)
        scale = float(ref_map[:n].abs().max())  # the export's own CAM bound: 1e-3 of the map's scale
        np.testing.assert_allclose(heat, ref_map[:n].numpy(), rtol=0, atol=1e-3 * scale)


# ---- the residual feature, the spread options, views, ensembles -------------------------------------------

SMALL = PatchSettings(patch=8, stride=4, dims=16, window=(1, 3))
HALF = (0, H, 0, W, 2)  # the whole input at half resolution
BAND = (8, 40, 32, 96, 1)  # rows 8:40, columns 32:96 at full resolution


def _quiet(_: str) -> None:
    pass


def _logits(model: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out: np.ndarray = model(torch.from_numpy(_x(pixels)))[:, 0].numpy()
    return out


def _checker(pixels: np.ndarray, rows: slice, cols: slice, amplitude: int) -> np.ndarray:
    """``pixels`` with a 1-pixel checkerboard of ± ``amplitude`` grey levels added over ``rows`` × ``cols``."""
    out = pixels.astype(np.int16)
    yy, xx = np.mgrid[rows, cols]
    out[:, rows, cols] += np.where((yy + xx) % 2 == 0, amplitude, -amplitude).astype(np.int16)
    return np.clip(out, 0, 255).astype(np.uint8)


def _own_columns(n: int, phases: int, images: int) -> torch.Tensor:
    """Bank columns holding the first ``images`` training images (and their axially moved copies)."""
    return torch.stack([torch.arange(images) + p * n for p in range(phases)], 1)


@pytest.fixture(scope="module")
def residual_fit() -> tuple[PatchMemory, np.ndarray]:
    good = _screws(24, seed=1)
    return fit(_x(good), good, replace(SMALL, residual=True), log=_quiet)


def test_the_residual_feature_is_the_patch_norm_outside_the_kept_components(
    residual_fit: tuple[PatchMemory, np.ndarray],
) -> None:
    model, _ = residual_fit
    k = int(model.kernel.shape[0])
    assert model.bank.shape[1] == k + 1  # the codes plus the residual norm
    comps = model.kernel.reshape(k, -1).double().numpy()  # (K, 64)
    rng = np.random.default_rng(3)
    images = np.concatenate(
        [
            rng.normal(0.0, 1.0, (1, 1, H, W)),  # nothing like a screw: most of each patch is outside
            _x(_checker(_screws(1, seed=4), slice(20, 28), slice(40, 48), 30)),
        ]
    ).astype(np.float32)
    with torch.no_grad():
        feats = model.features(torch.from_numpy(images)).double().numpy()  # (2, K + 1, gh, gw)
    windows = np.lib.stride_tricks.sliding_window_view(images[:, 0], (8, 8), axis=(1, 2))[:, ::4, ::4]
    for b, i, j in [(0, 0, 0), (0, 5, 11), (0, 10, 22), (1, 5, 9), (1, 4, 10), (1, 6, 11)]:
        patch = windows[b, i, j].astype(np.float64).ravel()
        v = patch - patch.mean()
        coef = np.linalg.lstsq(comps.T, v, rcond=None)[0]
        outside = v - comps.T @ coef  # the mean-free patch minus its projection on the components
        assert np.linalg.norm(outside) > 0.1 * np.linalg.norm(v)  # not a vanishing difference of two norms
        np.testing.assert_allclose(feats[b, :k, i, j], comps @ patch, rtol=1e-4, atol=1e-4)
        assert feats[b, k, i, j] == pytest.approx(np.linalg.norm(outside), rel=1e-4)


def test_the_residual_feature_catches_fine_detail_the_components_miss(
    fitted: tuple[PatchMemory, np.ndarray, np.ndarray],
    residual_fit: tuple[PatchMemory, np.ndarray],
) -> None:
    plain, loo_plain, _ = fitted
    residual, loo_residual = residual_fit
    bad = _checker(_screws(8, seed=99), slice(22, 28), slice(40, 46), 30)  # fine texture on the bar
    margin_plain = float(_logits(plain, bad).min() - loo_plain.max())  # min defect − max good logit
    margin_residual = float(_logits(residual, bad).min() - loo_residual.max())
    assert margin_plain < 0.0  # the 16 components hardly see a 1-pixel checkerboard: some parts pass
    assert margin_residual > 1.0  # with its norm outside them every defective part is above every good one


@pytest.fixture(scope="module")
def contrast_fit() -> tuple[PatchMemory, np.ndarray]:
    good = _screws(24, seed=1)
    return fit(_x(good), good, replace(SMALL, residual=True, contrast=5), log=_quiet)


def _soft_stain(pixels: np.ndarray, amplitude: float, sigma: float) -> np.ndarray:
    """``pixels`` brightened by a smooth Gaussian blob on the bar, wider than an 8-pixel patch."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    blob = amplitude * np.exp(-(((yy - 24) / sigma) ** 2 + ((xx - 48) / (2 * sigma)) ** 2) / 2)
    return np.clip(pixels + blob, 0, 255).astype(np.uint8)


def test_the_contrast_feature_is_the_patch_mean_against_its_surround(
    contrast_fit: tuple[PatchMemory, np.ndarray],
) -> None:
    model, _ = contrast_fit
    k = int(model.kernel.shape[0])
    assert model.bank.shape[1] == k + 2  # the codes, the residual norm, the contrast
    assert int(model.contrast) == 5
    images = _x(_soft_stain(_screws(2, seed=5), 60, 7))
    with torch.no_grad():
        feats = model.features(torch.from_numpy(images)).double().numpy()  # (2, K + 2, gh, gw)
    means = np.lib.stride_tricks.sliding_window_view(images[:, 0].astype(np.float64), (8, 8), axis=(1, 2))
    means = means[:, ::4, ::4].mean(axis=(3, 4))  # (2, gh, gw) patch means
    gh, gw = means.shape[1:]
    for b, i, j in [(0, 0, 0), (0, 5, 11), (1, 4, 10), (1, gh - 1, gw - 1), (0, 2, gw - 2)]:
        around = means[b, max(i - 2, 0) : i + 3, max(j - 2, 0) : j + 3]  # 5 × 5 cells, those inside the grid
        assert feats[b, k + 1, i, j] == pytest.approx(8.0 * (means[b, i, j] - around.mean()), abs=1e-4)


def test_the_contrast_feature_catches_a_soft_stain_wider_than_a_patch(
    residual_fit: tuple[PatchMemory, np.ndarray],
    contrast_fit: tuple[PatchMemory, np.ndarray],
) -> None:
    plain, loo_plain = residual_fit
    contrast, loo_contrast = contrast_fit
    bad = _soft_stain(_screws(8, seed=99), 60, 7)  # mean-free patches inside it hardly differ from good ones
    margin_plain = float(_logits(plain, bad).min() - loo_plain.max())  # min defect − max good logit
    margin_contrast = float(_logits(contrast, bad).min() - loo_contrast.max())
    assert margin_plain < 0.0  # codes and residual see only its gentle edges: some parts pass
    assert margin_contrast > 1.0  # against its surround every stained part is above every good one


def test_contrast_survives_the_state_and_export(
    contrast_fit: tuple[PatchMemory, np.ndarray], tmp_path: Path
) -> None:
    model, _ = contrast_fit
    x = _x(np.concatenate([_screws(3, seed=7), _soft_stain(_screws(3, seed=8), 60, 7)]))
    again = PatchMemory.from_state(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(torch.from_numpy(x)), model(torch.from_numpy(x)))
    _assert_onnxruntime_equals_torch(model, x, tmp_path, "contrast")
    with pytest.raises(ValueError, match="odd"):
        PatchMemory(model.kernel, model.bank, model.mask, model.offsets, 4, residual=True, contrast=4)


def test_jittered_copies_are_turned_and_moved_as_asked() -> None:
    from training.patch_memory import _jittered

    x = torch.zeros(1, 1, 40, 200)
    x[0, 0, 20, :] = 1.0  # a line along the axis through the centre row
    row = torch.arange(40, dtype=torch.float32)

    def centre_rows(img: torch.Tensor, cols: list[int]) -> list[float]:
        return [float((img[0, 0, :, c] * row).sum() / img[0, 0, :, c].sum()) for c in cols]

    assert torch.allclose(_jittered(x, 0.0, 0.0), x, atol=1e-4)
    assert centre_rows(_jittered(x, 0.0, 3.0), [0, 100, 199]) == pytest.approx([23.0] * 3, abs=1e-3)
    # 2° about the centre (row 19.5, column 99.5): the ends move ∓ 99.5 · tan 2° ≈ 3.5 rows, the middle stays
    turned = centre_rows(_jittered(x, 2.0, 0.0), [0, 100, 199])
    shift = 99.5 * np.tan(np.deg2rad(2.0))
    assert turned == pytest.approx(
        [20.0 + shift, 20.0 + 0.5 * np.tan(np.deg2rad(2.0)), 20.0 - shift], abs=0.05
    )


def test_jittered_copies_join_the_memory_and_leave_one_out_drops_them_with_their_image() -> None:
    good = _screws(12, seed=1)
    plain, _ = fit(_x(good), good, SMALL, log=_quiet)
    jit = replace(SMALL, jitter=((1.0, 0.0), (0.0, 1.5)))
    model, _ = fit(_x(good), good, jit, log=_quiet)
    n = len(good)
    assert model.bank.shape[2] == 4 * n  # as photographed, moved along the axis, turned, moved across
    x = torch.from_numpy(_x(good[:2]))
    with torch.no_grad():
        feats = model.features(x)
        own = torch.stack([torch.arange(2) + k * n for k in range(4)], 1)  # image i and its three copies
        d = model.distances(feats, exclude=own)
        for i in range(2):
            keep = [j for j in range(4 * n) if j % n != i]
            other = PatchMemory(
                model.kernel, model.bank[:, :, keep], torch.ones_like(model.mask), model.offsets, 4
            )
            assert torch.allclose(d[i], other.distances(feats[i : i + 1])[0], rtol=1e-5, atol=1e-4)
        # The same components (fitted on the crops as photographed), a superset of stored codes: each good part
        # left out is nowhere farther from the memory than without the copies, and somewhere nearer.
        assert torch.equal(model.kernel, plain.kernel)
        d_plain = plain.distances(feats, exclude=own[:, :2])
        assert bool((d <= d_plain + 1e-4).all()) and bool((d < d_plain - 1e-3).any())


def test_sd_pool_raises_each_cell_spread_to_its_neighbours_and_keeps_mu(
    fitted: tuple[PatchMemory, np.ndarray, np.ndarray],
) -> None:
    one, loo_one, good = fitted
    three, loo_three = fit(_x(good), good, replace(SMALL, sd_pool=3), log=_quiet)
    assert torch.equal(three.mu, one.mu)
    assert bool((three.sd >= one.sd).all()) and bool((three.sd > one.sd).any())
    # The floor and the 1e-6 clamp commute with the max: the pooled spread is the 3 × 3 max of the plain one.
    pooled = torch.nn.functional.max_pool2d(one.sd[None, None], 3, stride=1, padding=1)[0, 0]
    assert torch.equal(three.sd, pooled)
    assert np.isfinite(loo_three).all() and not np.array_equal(loo_three, loo_one)


def test_spread_from_an_upper_quantile_of_the_good_distances(
    fitted: tuple[PatchMemory, np.ndarray, np.ndarray],
) -> None:
    _, _, good = fitted
    n = len(good)
    model, loo = fit(_x(good), good, replace(SMALL, spread_quantile=0.9), log=_quiet)
    assert loo.shape == (n,) and np.isfinite(loo).all()
    with torch.no_grad():
        d = model.distances(model.features(torch.from_numpy(_x(good))), exclude=_own_columns(n, 2, n))
    d = d.double().numpy()  # (n, gh, gw) leave-one-out distances of the good images
    zq = NormalDist().inv_cdf(0.9)
    mu = d.mean(0)
    np.testing.assert_allclose(model.mu.numpy(), mu, rtol=1e-5, atol=1e-6)
    # 0.1 × (n − 1) = 2.3 → each cell's spread from its 2nd largest distance: (d₍₂₎ − mu) / z₀.₉.
    raw = np.clip((np.sort(d, 0)[-2] - mu) / zq, 0.0, None)
    floor = 0.05 * np.median(raw)
    np.testing.assert_allclose(model.sd.numpy(), np.maximum(raw, floor), rtol=1e-4)
    # Each image's own logit: mean and quantile taken over the other n − 1 images (their 2nd largest).
    for i in (0, 7, n - 1):
        others = np.delete(d, i, 0)
        mu_i = others.mean(0)
        sd_i = np.maximum(np.clip((np.sort(others, 0)[-2] - mu_i) / zq, 0.0, None), floor)
        z = (d[i] - mu_i) / sd_i
        top = np.sort(z[model.mask.numpy() > 0])[-int(model.top_k) :].mean()
        expected = (top - float(model.shift)) / float(model.scale)
        assert loo[i] == pytest.approx(expected, rel=1e-4, abs=1e-4)


def _pooled(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = torch.nn.functional.avg_pool2d(torch.from_numpy(x), 2).numpy()
    return out


def _halved(pixels: np.ndarray) -> np.ndarray:
    """uint8 (n, H, W) → (n, H/2, W/2), each 2 × 2 block averaged."""
    n, h, w = pixels.shape
    return np.rint(pixels.reshape(n, h // 2, 2, w // 2, 2).mean((2, 4))).astype(np.uint8)


def test_a_pooled_view_equals_a_memory_fitted_on_pooled_inputs(
    fitted: tuple[PatchMemory, np.ndarray, np.ndarray],
) -> None:
    _, _, good = fitted
    n = len(good)
    viewed, _ = fit(_x(good), good, replace(SMALL, view=HALF), log=_quiet)
    plain, _ = fit(_pooled(_x(good)), _halved(good), SMALL, log=_quiet)
    assert viewed.input_grid == plain.input_grid == (5, 11)
    assert torch.equal(viewed.kernel, plain.kernel) and torch.equal(viewed.mask, plain.mask)
    # The axially moved copies fill their gap with the first column: at full resolution before the pooling
    # (the view) or after it. Only the cells of the first grid column see that gap.
    diff = (viewed.bank - plain.bank).abs().amax(1).reshape(5, 11, 2 * n)
    assert float(diff[:, :, :n].max()) < 1e-5 and float(diff[:, 1:, :].max()) < 1e-5
    assert float(diff[:, 0, n:].max()) > 1e-3
    # With the first two columns alike, both fills agree and so does everything else.
    same = good.copy()
    same[:, :, 1] = same[:, :, 0]
    viewed, loo_viewed = fit(_x(same), same, replace(SMALL, view=HALF), log=_quiet)
    plain, loo_plain = fit(_pooled(_x(same)), _halved(same), SMALL, log=_quiet)
    assert torch.equal(viewed.mask, plain.mask)
    assert torch.allclose(viewed.bank, plain.bank, rtol=1e-5, atol=1e-5)
    assert torch.allclose(viewed.mu, plain.mu, rtol=1e-4, atol=1e-5)
    assert torch.allclose(viewed.sd, plain.sd, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(loo_viewed, loo_plain, rtol=1e-4, atol=1e-4)
    fresh = _screws(6, seed=21)
    fresh[3:, 20:26, 40:46] = 250
    full = _x(fresh)
    with torch.no_grad():
        a = viewed(torch.from_numpy(full))
        b = plain(torch.from_numpy(_pooled(full)))
        assert torch.equal(crop_view(torch.from_numpy(full), HALF), torch.from_numpy(_pooled(full)))
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    assert float(a[3:].min()) > float(a[:3].max())  # and it still tells the scratched parts apart


def test_a_band_view_reacts_only_to_what_lies_inside_the_band(
    fitted: tuple[PatchMemory, np.ndarray, np.ndarray],
) -> None:
    whole, loo_whole, good = fitted
    band, loo_band = fit(_x(good), good, replace(SMALL, view=BAND), log=_quiet)
    assert band.input_grid == (7, 15)  # (32 − 8) / 4 + 1 rows, (64 − 8) / 4 + 1 columns
    fresh = _screws(4, seed=11)
    left = fresh.copy()
    left[:, 20:26, 14:20] = 250  # on the bar, left of the band's column 32
    above = fresh.copy()
    above[:, 0:6, 40:46] = 0  # a dark blob above the band's row 8
    inside = fresh.copy()
    inside[:, 20:26, 60:66] = 250
    assert (_logits(whole, left).min() > loo_whole.max()) and (_logits(whole, inside).min() > loo_whole.max())
    x = torch.from_numpy(_x(fresh))
    assert torch.equal(crop_view(x, BAND), x[:, :, 8:40, 32:96]) and crop_view(x, None) is x
    ref = _logits(band, fresh)
    assert np.array_equal(_logits(band, left), ref)
    assert np.array_equal(_logits(band, above), ref)
    assert _logits(band, inside).min() > max(ref.max(), loo_band.max())


MEMBERS = [replace(SMALL, view=HALF), replace(SMALL, view=BAND, residual=True, sd_pool=3)]


@pytest.fixture(scope="module")
def ensemble() -> tuple[PatchEnsemble, np.ndarray, np.ndarray]:
    good = _screws(24, seed=1)
    model, loo = fit_members(_x(good), good, MEMBERS, seed=0, log=_quiet)
    assert isinstance(model, PatchEnsemble)
    return model, loo, good


def test_an_ensemble_is_the_mean_of_its_members(
    ensemble: tuple[PatchEnsemble, np.ndarray, np.ndarray],
) -> None:
    model, loo, good = ensemble
    alone = [fit(_x(good), good, s, seed=0, log=_quiet) for s in MEMBERS]
    np.testing.assert_allclose(loo, (alone[0][1] + alone[1][1]) / 2, rtol=1e-6, atol=1e-6)
    assert not np.allclose(alone[0][1], alone[1][1])  # the members do differ
    fresh = _screws(5, seed=31)
    fresh[2:, 20:26, 60:66] = 250
    mine = [_logits(m, fresh) for m, _ in alone]
    np.testing.assert_allclose(_logits(model, fresh), (mine[0] + mine[1]) / 2, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        logit, heat = model.with_heatmap(torch.from_numpy(_x(fresh)))
    np.testing.assert_allclose(logit.numpy(), (mine[0] + mine[1]) / 2, rtol=1e-6, atol=1e-6)
    assert heat.shape == (5, H // 8, W // 8)
    single = fit_members(_x(good), good, MEMBERS[1:], seed=0, log=_quiet)
    assert isinstance(single[0], PatchMemory) and np.array_equal(single[1], alone[1][1])


def test_ensemble_state_round_trip(ensemble: tuple[PatchEnsemble, np.ndarray, np.ndarray]) -> None:
    model, _, _ = ensemble
    state = model.state_dict()
    again = model_from_state({k: v.clone() for k, v in state.items()})
    assert isinstance(again, PatchEnsemble)
    members = list(again.members)
    assert [m._view for m in members] == [HALF, BAND] and [m._residual for m in members] == [False, True]
    assert torch.equal(members[1].sd, model.members[1].sd)  # the band's pooled spread travels as is
    x = _x(_screws(3, seed=41))
    x[1:, :, 20:26, 60:66] = 3.0
    with torch.no_grad():
        assert torch.equal(model(torch.from_numpy(x)), again(torch.from_numpy(x)))
        for a, b in zip(
            model.with_heatmap(torch.from_numpy(x)), again.with_heatmap(torch.from_numpy(x)), strict=True
        ):
            assert torch.equal(a, b)
    assert again.state_dict().keys() == state.keys()


def _band_only_defect(
    model: PatchEnsemble,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 1-px checkerboard over rows 20:28, columns 56:64 (gone at half resolution) on 4 fresh parts: the
    ensemble's logits and maps without and with it, and the band member's own map with it."""
    fresh = _screws(4, seed=51)
    bad = _checker(fresh, slice(20, 28), slice(56, 64), 40)
    half, band = model.members
    with torch.no_grad():
        xg, xb = torch.from_numpy(_x(fresh)), torch.from_numpy(_x(bad))
        for a, b in zip(half.with_heatmap(xg), half.with_heatmap(xb), strict=True):
            assert torch.allclose(a, b, atol=1e-5)  # the half-resolution member sees nothing
        logit_good, heat_good = model.with_heatmap(xg)
        logit_bad, heat_bad = model.with_heatmap(xb)
        _, band_map = band.with_heatmap(xb)
    return logit_good, heat_good, logit_bad, heat_bad, band_map


def test_the_ensemble_map_shows_a_band_only_defect_near_it_and_nowhere_else(
    ensemble: tuple[PatchEnsemble, np.ndarray, np.ndarray],
) -> None:
    model, loo, _ = ensemble
    logit_good, heat_good, logit_bad, heat_bad, band_map = _band_only_defect(model)
    assert float(logit_bad.min()) > max(float(logit_good.max()), float(loo.max()))
    # The band member (grid 7 × 15, cell (i, j) = rows 8+4i : 16+4i, columns 32+4j : 40+4j) puts it on the
    # patches that hold it: its peak is cell (3, 6), rows 20:28, columns 56:64.
    assert all(divmod(int(band_map[b].argmax()), 15) == (3, 6) for b in range(4))
    changed = (heat_bad - heat_good).abs() > 1e-4  # (B, 6, 12) cells of 8 × 8 pixels
    assert bool(changed.any(2).any(1).all())
    rows, cols = np.nonzero(changed.any(0).numpy())
    assert set(rows.tolist()) <= {2, 3} and set(cols.tolist()) <= {6, 7, 8}  # rows 16:32, columns 48:72


def test_the_ensemble_map_keeps_a_member_peak_on_the_cell_under_it(
    ensemble: tuple[PatchEnsemble, np.ndarray, np.ndarray],
) -> None:
    model, _, _ = ensemble
    _, _, _, heat_bad, band_map = _band_only_defect(model)
    # The band member's strongest patch covers rows 20:28, columns 56:64 exactly: ensemble cells (2 or 3, 7).
    # (Resampling its 15 columns onto 8 cells by nearest neighbour dropped column 6 and put column 7,
    # pixels 60:68, on cell 8, off the defect, as the map's peak; the map now takes the largest per cell.)
    for b in range(4):
        peak = divmod(int(heat_bad[b].argmax()), 12)
        assert peak[0] in (2, 3) and peak[1] == 7
        assert float(heat_bad[b].max()) == pytest.approx(float(band_map[b].max()))


def test_ensemble_export_onnxruntime_equals_torch_at_any_batch(
    ensemble: tuple[PatchEnsemble, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    model, _, _ = ensemble
    bad = _screws(4, seed=8)
    bad[:2, 20:26, 40:46] = 250  # seen by both members
    bad = np.concatenate([bad[:2], _checker(bad[2:], slice(20, 28), slice(56, 64), 40)])  # by the band only
    x = _x(np.concatenate([_screws(5, seed=7), bad]))
    with torch.no_grad():
        assert model.with_heatmap(torch.from_numpy(x))[1].shape == (len(x), H // 8, W // 8)
    _assert_onnxruntime_equals_torch(model, x, tmp_path, "patch-ensemble")


def test_config_patch_members() -> None:
    with pytest.raises(ValueError, match="patch_members"):
        TrainConfig(patch_members=({"region": [0.0, 1.5, 0.0, 1.0]},))  # beyond the input
    with pytest.raises(ValueError, match="patch_members"):
        TrainConfig(patch_members=({"region": [0.0, 1.0, 0.0]},))  # three edges
    with pytest.raises(ValueError, match="patch_members"):
        TrainConfig(patch_members=({"region": [0.5, 0.5, 0.0, 1.0]},))  # empty
    with pytest.raises(ValueError, match="patch_members"):
        TrainConfig(patch_members=({"pool": 0},))
    for contrast in (4, -1, 2.0):  # an odd number of grid cells, or 0
        with pytest.raises(ValueError, match="patch_members"):
            TrainConfig(patch_members=({"contrast": contrast},))
    # A typo in a member's key is caught when the members are built, naming the member and the key; a pixel
    # view is not a config key (regions are fractions, so a member follows the input size).
    odd = TrainConfig(patch_members=({"dims": 8}, {"strides": 4}))
    with pytest.raises(ValueError, match=r"patch_members\[1\].*'strides'"):
        odd.patch_members_settings()
    with pytest.raises(ValueError, match=r"patch_members\[0\].*'view'"):
        TrainConfig(patch_members=({"view": [0, 8, 0, 8, 1]},)).patch_members_settings()
    cfg = TrainConfig(
        input_size=(H, W),
        patch_residual=True,
        patch_sd_pool=3,
        patch_spread_quantile=0.9,
        patch_members=(
            {"pool": 2, "dims": 8},
            {"region": [8 / H, 40 / H, 32 / W, 1.0], "window": [1, 1]},
        ),
    )
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    half, band = again.patch_members_settings()
    assert half == PatchSettings(dims=8, residual=True, sd_pool=3, spread_quantile=0.9, view=(0, H, 0, W, 2))
    assert band.view == BAND and band.window == (1, 1) and band.dims == 32 and band.residual
    # The same regions on a twice larger input: twice the pixels.
    big = TrainConfig.from_dict({"input_size": [2 * H, 2 * W]}, cfg)
    assert [m.view for m in big.patch_members_settings()] == [(0, 2 * H, 0, 2 * W, 2), (16, 80, 64, 2 * W, 1)]
    assert TrainConfig(patch_residual=True).patch_members_settings() == [PatchSettings(residual=True)]


def test_the_coreset_keeps_distinct_codes_and_a_full_size_one_changes_nothing() -> None:
    from training.patch_memory import _coreset

    # One cell, 2-D codes: three distinct points, each stored four times. Greedy k-centre keeps all three before
    # any duplicate, starting from the one nearest the mean.
    pts = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    bank = pts.repeat(4, 1).T[None]  # (1, K=2, N=12)
    keep = _coreset(bank, 3)[0]
    assert sorted({tuple(bank[0, :, int(j)].tolist()) for j in keep}) == sorted(
        tuple(p) for p in pts.tolist()
    )
    good = _screws(12, seed=3)
    s = PatchSettings(patch=8, stride=4, dims=8, window=(1, 1))
    whole, loo_whole = fit(_x(good), good, s, log=lambda _: None)
    same, loo_same = fit(_x(good), good, replace(s, bank_size=24), log=lambda _: None)  # 12 images × 2 phases
    assert torch.equal(same.bank, whole.bank)
    np.testing.assert_array_equal(loo_whole, loo_same)
    thin, loo_thin = fit(_x(good), good, replace(s, bank_size=6), log=lambda _: None)
    assert thin.bank.shape[2] == 6 and np.isfinite(loo_thin).all()
    # Each good image, left out, is farther from the thinned memory than from the full one on average.
    assert float(thin.mu.mean()) >= float(whole.mu.mean())


# ---- thread-phase registration ------------------------------------------------------------------------------

ALIGN = (20, 76, 6)  # columns 20:76 of the 96-pixel input (the regular 'thread'), ± half its 12-pixel pitch


def test_registration_finds_the_shift_and_moves_the_view_back() -> None:
    from engine.patch_model import register_views

    ref_img = torch.from_numpy(_x(_screws(1, seed=4)))  # (1, 1, H, W)
    window = ref_img[..., 20:76] - ref_img[..., 20:76].mean()
    shifted = [torch.roll(ref_img, d, dims=3) for d in (-5, -2, 0, 3, 6)]  # content moved d columns
    moved, d = register_views(torch.cat(shifted), window, ALIGN)
    assert d.tolist() == [-5, -2, 0, 3, 6]
    # Away from the edges (which roll wrapped around), each view is back where the reference has it.
    torch.testing.assert_close(moved[..., 10:86], ref_img.expand(5, -1, -1, -1)[..., 10:86])


def test_an_aligned_memory_registers_the_phase_and_its_map_stays_on_the_defect(tmp_path: Path) -> None:
    good = _screws(24, seed=1)
    s = replace(SMALL, window=(1, 0), align=ALIGN)
    model, loo = fit(_x(good), good, s, log=_quiet)
    assert model.align.tolist() == list(ALIGN) and tuple(model.align_ref.shape) == (1, 1, H, 56)
    plain, _ = fit(_x(good), good, replace(SMALL, window=(1, 0)), log=_quiet)
    fresh = _screws(8, seed=99)
    bad = fresh.copy()
    bad[:, 20:26, 40:46] = 250
    with torch.no_grad():
        z_good = model(torch.from_numpy(_x(fresh)))[:, 0].numpy()
        z_bad, heat = model.with_heatmap(torch.from_numpy(_x(bad)))
    assert float(z_bad.min()) > max(float(z_good.max()), float(loo.max()))
    # Without a column search the plain memory meets a new phase between its stored ones; registered, a good
    # part's patches lie closer to their nearest stored twins.
    with torch.no_grad():
        near = [
            float((m.distances(m.features(torch.from_numpy(_x(fresh)))) * m.mask).mean())
            for m in (model, plain)
        ]
    assert near[0] < near[1]
    for b in range(len(bad)):  # the map is put back where the view was before its registration
        peak = np.unravel_index(int(np.argmax(heat[b].numpy())), tuple(heat.shape[1:]))
        assert abs(peak[0] * 4 + 4 - 23) <= 8 and abs(peak[1] * 4 + 4 - 43) <= 8
    again = model_from_state(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(torch.from_numpy(_x(bad))), model(torch.from_numpy(_x(bad))))
    x = _x(np.concatenate([_screws(5, seed=7), bad[:4]]))
    _assert_onnxruntime_equals_torch(model, x, tmp_path, "patch-aligned")


def test_a_state_from_before_registration_and_contrast_loads_without_them(
    fitted: tuple[PatchMemory, np.ndarray, np.ndarray],
) -> None:
    model, _, good = fitted
    old = {k: v for k, v in model.state_dict().items() if k not in ("align", "align_ref", "contrast")}
    again = PatchMemory.from_state(old)
    assert again.align.tolist() == [0, 0, 0] and int(again.contrast) == 0
    with torch.no_grad():
        torch.testing.assert_close(
            again(torch.from_numpy(_x(good[:3]))), model(torch.from_numpy(_x(good[:3])))
        )


def test_config_align_is_fractions_of_the_member_view() -> None:
    cfg = TrainConfig(
        input_size=(H, W),
        patch_members=({"pool": 2}, {"region": [8 / H, 40 / H, 0.0, 1.0], "align": [0.25, 0.75, 0.0625]}),
    )
    half, band = cfg.patch_members_settings()
    assert half.align is None and band.align == (24, 72, 6)
    with pytest.raises(ValueError, match=r"patch_members\[0\]\.align"):
        TrainConfig(input_size=(H, W), patch_members=({"align": [0.2, 0.8]},)).patch_members_settings()
    good = _screws(6, seed=2)
    with pytest.raises(ValueError, match="align"):
        fit(_x(good), good, replace(SMALL, align=(4, 95, 6)), log=_quiet)  # the search leaves the view


def _pixel_heat(model: PatchEnsemble, x: torch.Tensor) -> torch.Tensor:
    """The ensemble's map the long way: every member's map put back on the input pixels, the largest per cell."""
    h, w = model._input
    maps = []
    for m in model._members:
        heat = m.with_heatmap(x)[1]
        t, _, left, _, pool = m._view or (0, h, 0, w, 1)
        step = m._stride * pool
        gh, gw = m.input_grid
        pixels = torch.nn.functional.interpolate(heat[:, None], scale_factor=float(step), mode="nearest")
        maps.append(torch.nn.functional.pad(pixels, (left, w - left - gw * step, t, h - t - gh * step)))
    full = torch.stack(maps).max(0).values
    c = model._cell
    return torch.nn.functional.max_pool2d(full, c, stride=c, ceil_mode=True)[:, 0]


@pytest.mark.parametrize("view", [(0, H, 0, W, 2), (5, 37, 13, 91, 1), (3, 45, 7, 95, 2)])
def test_the_cell_map_is_the_largest_over_each_cells_pixels(
    ensemble: tuple[PatchEnsemble, np.ndarray, np.ndarray], view: tuple[int, int, int, int, int]
) -> None:
    """The map gathered cell by cell equals the member maps put back on the input pixels and max-pooled, also
    for views whose corner and step do not line up with the 8-pixel cells."""
    model, _, good = ensemble
    fresh = _screws(3, seed=41)
    fresh[1:, 20:26, 60:66] = 250
    x = torch.from_numpy(_x(fresh))
    odd = fit_members(_x(good), good, [MEMBERS[1], replace(SMALL, view=view)], seed=0, log=_quiet)[0]
    assert isinstance(odd, PatchEnsemble)
    with torch.no_grad():
        for m in (model, odd):
            heat = m.with_heatmap(x)[1]
            torch.testing.assert_close(heat, _pixel_heat(m, x), rtol=0, atol=0)
            assert float(heat.max()) > 0
