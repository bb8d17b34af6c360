"""Fitting engine.patch_model.PatchMemory on the good screws of the training split (no gradient descent).

The fit sees only OK images: the NG images of the training split are left for calibration (see
training.train), so the threshold is set on every NG image the fit never saw rather than on the few of the
validation split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch
import torch.nn.functional as F

from engine.patch_model import PatchEnsemble, PatchMemory, crop_view, register_views
from training.augment import part_alpha

CHUNK = 16  # images per distance batch: (L, CHUNK, N) floats stay a few hundred MB


@dataclass(frozen=True, slots=True)
class PatchSettings:
    patch: int = 16  # patch side (input pixels)
    stride: int = 8
    dims: int = 32  # principal components kept per patch
    window: tuple[int, int] = (1, 2)  # neighbours searched ± (rows, columns) of grid cells
    pca_images: int = 60  # images whose patches the principal components are computed from
    sd_floor: float = (
        0.05  # sd ≥ this × its median over the grid: a location that never varies cannot explode
    )
    mask_share: float = 0.6  # a cell is scored when more than this share of the good parts cover it (0 = any)
    top_k: int = 4  # the score is the mean of this many largest cell z-scores (1 = the largest)
    axial_phases: int = 2  # the memory also holds each good crop moved along the axis by k/phases of a stride
    spread_quantile: float = 0.0  # > 0: the per-cell spread from this upper quantile of good distances
    sd_pool: int = 1  # a cell's spread is at least its neighbours' within this window (odd; 1 = its own)
    residual: bool = False  # one more feature: the patch's norm outside the kept components (fine detail)
    # (top, bottom, left, right, pool): the input region this memory sees and its block averaging (pool 2 =
    # half resolution); None = the whole input as it comes.
    view: tuple[int, int, int, int, int] | None = None
    # > 0: keep this many stored patches per grid cell, chosen by greedy k-centre (PatchCore's coreset) from
    # the good images' patches and their moved copies; inference cost falls in proportion. 0 = keep all.
    bank_size: int = 0
    # (first, last, max_shift) in view pixels: register each view's thread phase (engine.patch_model.
    # register_views) on its columns first:last within ± max_shift before coding; None = no registration.
    align: tuple[int, int, int] | None = None
    # > 0 (odd): one more feature, each patch's mean against its surround of this many grid cells (a scrape
    # or stain wider than a patch); 0 = none.
    contrast: int = 0
    # The memory also holds each good crop turned by ``degrees`` about the input's centre and moved ``rows``
    # across the axis, one copy per (degrees, rows): the pose crop's own residual jitter. () = none.
    jitter: tuple[tuple[float, float], ...] = ()


def _mask(pixels_ok: np.ndarray, s: PatchSettings) -> torch.Tensor:
    """Grid cells where the part lies: a patch there overlaps the silhouette of more than ``mask_share`` of
    the good screws. Dust on the background plate far from any screw then cannot reject a part."""
    sil = torch.from_numpy(np.stack([part_alpha(img) > 0.5 for img in pixels_ok]).astype(np.float32))
    sil = crop_view(sil[:, None], s.view)[:, 0]  # the silhouette share over the same view as the patches
    share = F.max_pool2d(sil[:, None], s.patch, stride=s.stride)[:, 0].mean(0)
    return (share > s.mask_share).float()


def _coreset(bank: torch.Tensor, m: int) -> torch.Tensor:
    """(L, m) column indices per cell: greedy k-centre over each cell's (K, N) stored codes, starting from the
    code nearest the cell's mean; each next pick is the code farthest from those picked (PatchCore's coreset,
    per location). The kept codes cover the good variation with far fewer columns."""
    cells = bank.shape[0]
    b = bank.permute(0, 2, 1)  # (L, N, K)
    rows = torch.arange(cells)
    pick = ((b - b.mean(1, keepdim=True)) ** 2).sum(2).argmin(1)
    idx = torch.empty(cells, m, dtype=torch.int64)
    idx[:, 0] = pick
    nearest = ((b - b[rows, pick][:, None]) ** 2).sum(2)  # (L, N) distance to the closest pick so far
    for j in range(1, m):
        pick = nearest.argmax(1)
        idx[:, j] = pick
        nearest = torch.minimum(nearest, ((b - b[rows, pick][:, None]) ** 2).sum(2))
    return idx


def _quantile_spread(d: torch.Tensor, mu: torch.Tensor, q: float, *, leave_out: bool = False) -> torch.Tensor:
    """Per-cell spread from an upper quantile of the good distances: (quantile − mu) / z_q, so a Gaussian cell
    gets its sd back and a cell with a heavy tail (a glint some good parts have) a wider one.

    ``d``: (n, gh, gw) good distances. ``leave_out``: (n, gh, gw), image i's spread from the others only (its
    own distance, if among the top, is replaced by the next order statistic)."""
    n = d.shape[0]
    k = max(1, min(n - 2, round((1.0 - q) * (n - 1))))  # the k-th largest of the others
    top = torch.topk(d, k + 1, dim=0).values  # (k + 1, gh, gw), descending
    zq = NormalDist().inv_cdf(q)
    if not leave_out:
        return ((top[k - 1] - mu) / zq).clamp_min(0.0)
    qi = torch.where(d >= top[k - 1], top[k], top[k - 1])
    return ((qi - mu) / zq).clamp_min(0.0)


def _pool(sd: torch.Tensor, k: int) -> torch.Tensor:
    """(..., gh, gw) spread maps, each cell raised to the largest within a k × k window around it."""
    if k <= 1:
        return sd
    shape = sd.shape
    flat = sd.reshape(-1, 1, *shape[-2:])
    return F.max_pool2d(flat, k, stride=1, padding=k // 2).reshape(shape)


def _align_reference(views: torch.Tensor, align: tuple[int, int, int], rounds: int = 3) -> torch.Tensor:
    """The reference thread (1, 1, h, last − first; mean-free) the views are registered to: start from the first
    good view, then ``rounds`` times register every good view to it and take their mean."""
    first, last, _ = align
    ref = views[:1]
    for _ in range(rounds):
        window = ref[..., first:last] - ref[..., first:last].mean()
        moved = [register_views(views[i : i + CHUNK], window, align)[0] for i in range(0, len(views), CHUNK)]
        ref = torch.cat(moved).mean(0, keepdim=True)
    return (ref[..., first:last] - ref[..., first:last].mean()).contiguous()


def _move_along_axis(x: torch.Tensor, px: int) -> torch.Tensor:
    """(N, 1, H, W) moved ``px`` columns towards the tip; the first column is repeated into the gap."""
    if px <= 0:
        return x
    return torch.cat([x[..., :1].expand(*x.shape[:-1], px), x[..., :-px]], dim=-1)


def _jittered(x: torch.Tensor, degrees: float, rows: float) -> torch.Tensor:
    """(N, 1, H, W) turned by ``degrees`` about the centre and moved ``rows`` pixels down (bilinear, border
    values repeated), the pose crop's residual error made on purpose."""
    h, w = x.shape[2:]
    a = np.deg2rad(degrees)
    # affine_grid works in normalised coordinates ([-1, 1] on each axis): the rotation in pixels, rescaled.
    theta = torch.tensor(
        [
            [np.cos(a), -np.sin(a) * h / w, 0.0],
            [np.sin(a) * w / h, np.cos(a), -2.0 * rows / h],
        ],
        dtype=x.dtype,
    )
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def fit(
    x_ok: np.ndarray,
    pixels_ok: np.ndarray,
    settings: PatchSettings = PatchSettings(),
    *,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[PatchMemory, np.ndarray]:
    """``x_ok``: float32 (N, 1, H, W) normalised good crops; ``pixels_ok``: the same as uint8 (N, H, W).

    Returns the model and each good image's leave-one-out logit (scored against the memory without its own
    patches: what a good screw the fit never saw would score)."""
    s = settings
    n = x_ok.shape[0]
    x = torch.from_numpy(np.ascontiguousarray(x_ok, np.float32))
    height, width = crop_view(x[:1], s.view).shape[2:]
    if n < 3:
        raise ValueError(f"a patch memory needs at least 3 good training images, got {n}")
    if min(height, width) < s.patch:
        raise ValueError(f"input {height}×{width} is smaller than one {s.patch}-pixel patch")
    ref: torch.Tensor | None = None
    if s.align is not None:
        first, last, shift_max = s.align
        if not 1 <= shift_max <= first < last <= width - shift_max:
            raise ValueError(
                f"align {s.align}: need 1 ≤ max_shift ≤ first < last ≤ view width {width} − max_shift"
            )
        ref = _align_reference(crop_view(x, s.view), s.align)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n, generator=g)[: min(n, s.pca_images)]
    pca_views = crop_view(x[pick], s.view)
    if ref is not None and s.align is not None:
        pca_views = register_views(pca_views, ref, s.align)[0]
    patches = F.unfold(pca_views, s.patch, stride=s.stride).permute(0, 2, 1).reshape(-1, s.patch * s.patch)
    patches = patches - patches.mean(1, keepdim=True)
    dims = min(s.dims, patches.shape[1])
    # Exact PCA from the (D × D) covariance: deterministic, unlike pca_lowrank's random projections.
    cov = torch.cov(patches.T.double())
    evals, evecs = torch.linalg.eigh(cov)
    comps = evecs[:, torch.argsort(evals, descending=True)[:dims]].T.float()  # (K, D)
    comps = comps * torch.sign(comps.sum(1, keepdim=True) + 1e-12)  # a fixed sign per component
    comps = comps - comps.mean(1, keepdim=True)  # projecting x − mean(x) = projecting x on this
    kernel = comps.reshape(dims, 1, s.patch, s.patch).contiguous()
    # A model without a bank yet: its feature map is what the bank stores (the codes, plus the residual norm and
    # the contrast when asked for).
    grid = F.conv2d(crop_view(x[:1], s.view), kernel, stride=s.stride).shape[2:]
    extra = int(s.residual) + int(s.contrast > 0)  # features beyond the codes
    probe = PatchMemory(
        kernel,
        torch.zeros(grid[0] * grid[1], dims + extra, 1),
        torch.ones(*grid),
        torch.zeros(1, 2),
        s.stride,
        residual=s.residual,
        view=s.view,
        align=s.align,
        align_ref=ref,
        contrast=s.contrast,
    )
    pool = s.view[4] if s.view else 1

    def features(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([probe.features(t[i : i + CHUNK]) for i in range(0, len(t), CHUNK)])

    with torch.no_grad():
        if s.align is None:
            feats = features(x)
            # The thread's phase slides its pattern along the axis by any amount; the search moves in whole
            # grid cells. Crops moved by a fraction of a cell fill in between, so a good thread finds a twin.
            moved = [feats] + [
                features(_move_along_axis(x, round(k * s.stride * pool / s.axial_phases)))
                for k in range(1, s.axial_phases)
            ]
            moved += [features(_jittered(x, deg, rows)) for deg, rows in s.jitter]
        else:  # registered views; the moved copies are of those (a registration would undo the move)
            views = torch.cat([probe.crop(x[i : i + CHUNK]) for i in range(0, n, CHUNK)])
            feats = probe.codes(views)
            moved = [feats] + [
                probe.codes(_move_along_axis(views, round(k * s.stride / s.axial_phases)))
                for k in range(1, s.axial_phases)
            ]
            for deg, rows in s.jitter:
                jit = _jittered(x, deg, rows)
                moved.append(
                    probe.codes(torch.cat([probe.crop(jit[i : i + CHUNK]) for i in range(0, n, CHUNK)]))
                )
    gh, gw = feats.shape[2:]
    bank = torch.cat(moved, 0).reshape(n * len(moved), dims + extra, gh * gw).permute(2, 1, 0).contiguous()
    origin: torch.Tensor | None = None  # (L, N) the good image each kept column came from (thinned bank only)
    if 0 < s.bank_size < bank.shape[2]:
        keep = _coreset(bank, s.bank_size)
        bank = torch.gather(bank, 2, keep[:, None, :].expand(-1, bank.shape[1], -1)).contiguous()
        origin = keep % n  # columns are image i, then its moved copies at i + n, i + 2n …
    offsets = torch.tensor(
        [
            (dy, dx)
            for dy in range(-s.window[0], s.window[0] + 1)
            for dx in range(-s.window[1], s.window[1] + 1)
        ]
    )
    mask = _mask(pixels_ok, s)
    if not mask.any():
        where = "" if s.view is None else f" of the view {s.view[:4]} (rows top:bottom, columns left:right)"
        raise ValueError(
            f"no grid cell{where} is covered by more than {s.mask_share:g} of the good parts' silhouettes; "
            "lower patch_mask_share, or choose patch_members regions where the part lies (the default's are "
            "regions of the pose crop: without --pose they see arbitrary parts of the frame), or check that the "
            "images show dark parts on a light background"
        )
    model = PatchMemory(
        kernel,
        bank,
        mask,
        offsets,
        s.stride,
        top_k=min(s.top_k, int(mask.sum())),
        residual=s.residual,
        view=s.view,
        align=s.align,
        align_ref=ref,
        contrast=s.contrast,
    )
    log(
        f"patch memory: {n} good images × {s.axial_phases} axial phase(s)"
        + (f" + {len(s.jitter)} jittered cop{'y' if len(s.jitter) == 1 else 'ies'}" if s.jitter else "")
        + f", {gh}×{gw} cells of {s.patch}² patches, "
        f"{dims} components, {len(offsets)} offsets, {int(mask.sum())} cells on the part"
    )
    # Leave-one-out: each good image against the bank without itself (and its moved copies) gives the per-cell
    # spread of good screws.
    with torch.no_grad():
        if origin is None:
            own = [  # bank columns of image i: i, i + n, i + 2n … (its moved copies)
                torch.stack([torch.arange(i, min(i + CHUNK, n)) + p * n for p in range(len(moved))], 1)
                for i in range(0, n, CHUNK)
            ]
            loo = torch.cat(
                [
                    model.distances(feats[i : i + CHUNK], exclude=own[j])
                    for j, i in enumerate(range(0, n, CHUNK))
                ]
            )
        else:
            loo = torch.cat(
                [
                    model.distances(
                        feats[i : i + CHUNK], exclude=torch.arange(i, min(i + CHUNK, n)), origin=origin
                    )
                    for i in range(0, n, CHUNK)
                ]
            )
        mu = loo.mean(0)
        sd = loo.std(0) if s.spread_quantile == 0 else _quantile_spread(loo, mu, s.spread_quantile)
        floor = s.sd_floor * sd.median()
        sd = torch.maximum(_pool(sd, s.sd_pool), floor).clamp_min(1e-6)
        model.mu.copy_(mu)
        model.sd.copy_(sd)
        # Each good image's own score, with the per-cell statistics taken without it (closed form): a glint that
        # image i alone has would otherwise widen sd at that cell and hide itself. These scores are what a good
        # screw the fit never saw would get; they set the logit scale and go into the calibration.
        d = loo.double()
        s1, s2 = d.sum(0), (d * d).sum(0)
        mu_i = (s1 - d) / (n - 1)
        if s.spread_quantile == 0:
            var_i = ((s2 - d * d) - (n - 1) * mu_i * mu_i) / max(n - 2, 1)
            spread_i = var_i.clamp_min(0.0).sqrt()
        else:
            spread_i = _quantile_spread(d, mu_i, s.spread_quantile, leave_out=True)
        sd_i = torch.maximum(_pool(spread_i, s.sd_pool), floor.double()).clamp_min(1e-6)
        scores = model.score_of(((d - mu_i) / sd_i).float())  # shift 0, scale 1 so far
        shift = float(scores.mean() + 3.0 * scores.std())
        scale = float(scores.std().clamp_min(1e-3))
        model.shift.fill_(shift)
        model.scale.fill_(scale)
        loo_logits = ((scores - shift) / scale).numpy().astype(np.float32)
    return model.eval(), loo_logits


def fit_members(
    x_ok: np.ndarray,
    pixels_ok: np.ndarray,
    members: list[PatchSettings],
    *,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[PatchMemory | PatchEnsemble, np.ndarray]:
    """One memory per settings, fitted on the same good images; several make a :class:`PatchEnsemble`
    whose leave-one-out logits are the mean of the members' (as its forward)."""
    fitted = [fit(x_ok, pixels_ok, m, seed=seed, log=log) for m in members]
    if len(fitted) == 1:
        return fitted[0]
    size = (int(x_ok.shape[2]), int(x_ok.shape[3]))
    model = PatchEnsemble([m for m, _ in fitted], size).eval()
    return model, np.mean([loo for _, loo in fitted], 0).astype(np.float32)
