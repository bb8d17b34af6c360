"""Patch memory: a nearest-neighbour anomaly model on pose-normalised crops, as one exportable network.

Every pose-normalised crop puts the same part of the screw at the same place, up to a few pixels and the thread's
phase (how far the screw is turned about its own axis, which slides the thread pattern along the axis). So a
patch of a good screw has a close twin among the good screws' patches *near the same place*; a scratch, a chipped
head or a crushed crest does not. The model stores the good training screws' patch features (the memory bank)
and scores a crop by how far its worst patch is from its nearest stored neighbour:

1. features: one convolution, kernel ``patch × patch`` at ``stride``, whose filters are the leading principal
   components of mean-subtracted good patches (so each feature vector is that patch's PCA code, independent of
   the patch's mean brightness);
2. distance: for every grid location, the squared distance to the nearest bank vector at the same location
   shifted by one of ``offsets`` (grid cells; along the axis about half a thread pitch each way);
3. z-score per location with the good screws' own leave-one-out distances (``mu``, ``sd``): background corners
   and the thread's edge vary differently, and this puts them on one scale;
4. score: the mean of the ``top_k`` largest z over ``mask`` (where the good parts lie, so the background and
   its cast shadow cannot decide), mapped to a logit ``(score − shift) / scale``.

Training is fitting, not gradient descent (training/patch_memory.py). The network is plain tensor algebra
(Conv, Pad, Slice, MatMul, ReduceMin/Max), so it exports to ONNX and TensorRT like the ResNet18 and the daemon
serves it through the same backends; ``with_heatmap`` gives the z-map as its class-activation map.

Precision: only the projection (the PCA convolution) may run in FP16. Everything after it runs in an
:class:`Fp32Island`: the residual norm (Σx² − (Σx)²/p² − |code|²) and the distance (|q|² + |b|² − 2 q·b)
subtract large, nearly equal sums, which FP16's 11-bit mantissa would turn into noise of the size of the
distances themselves. The island is a module named ``fp32``, so it also marks its nodes in the exported ONNX
(``…/fp32/…``): engine.onnx_fp16 keeps them FP32 in the FP16 graph TensorRT 11 builds from, and
engine.trt_build pins them to FP32 on TensorRT 10. The torch backend runs a model with islands under autocast
(FP16 where autocast allows, FP32 inside the islands) rather than converting its weights to FP16.

This module imports torch at the top: only training, export and the torch backend import it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.onnx_fp16 import FP32_SCOPE

ARCH = "patch_memory"
FAR = 1.0e4  # a distance for "no neighbour here" (the shifted window left the grid); z-scores stay finite


# Every Fp32Island is an attribute named FP32_SCOPE ("fp32"), which names the scope of its nodes in the exported
# ONNX; engine.onnx_fp16 keeps that scope FP32.
assert FP32_SCOPE == "fp32"


class Fp32Island(nn.Module):
    """``island(fn, *args)`` = ``fn(*args)`` in FP32, whatever the caller runs in: autocast is off inside and
    floating-point tensor arguments are cast to float32 (a no-op, and no ONNX node, when they already are).

    Holds no parameters (a model's state dict does not change); its attribute name, :data:`FP32_SCOPE`, names
    the scope of the ops it runs when the model is exported to ONNX."""

    def forward(self, fn: Any, *args: Any) -> Any:
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return fn(*(_as_fp32(a) for a in args))


def _as_fp32(a: Any) -> Any:
    if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float32:
        return a.float()
    return a


def has_fp32_islands(model: nn.Module) -> bool:
    """True when ``model`` keeps parts of its computation in FP32 (it must not be converted to FP16 wholesale)."""
    return any(isinstance(m, Fp32Island) for m in model.modules())


def crop_view(x: torch.Tensor, view: tuple[int, int, int, int, int] | None) -> torch.Tensor:
    """(B, C, H, W) → rows top:bottom, columns left:right of ``view``, averaged over pool × pool blocks."""
    if view is None:
        return x
    top, bottom, left, right, pool = view
    # Only what narrows: an exported Slice copies even when it keeps everything. A model has one input size
    # (codes() checks its grid), so the tracer may take the comparison as the constant it is.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # type: ignore[attr-defined]
        h, w = int(x.shape[2]), int(x.shape[3])
    if (top, bottom) != (0, h):
        x = x[:, :, top:bottom]
    if (left, right) != (0, w):
        x = x[:, :, :, left:right]
    return F.avg_pool2d(x, pool) if pool > 1 else x


def searched_cells(mask: torch.Tensor, offsets: list[tuple[int, int]]) -> torch.Tensor:
    """Flat indices of the bank cells a search over ``offsets`` reaches from the cells where ``mask`` > 0 (the
    query at cell m meets the bank at m + (dy, dx)), ascending."""
    gh, gw = mask.shape
    on = mask > 0
    need = torch.zeros(gh, gw, dtype=torch.bool)
    for dy, dx in offsets:
        src = on[max(-dy, 0) : gh - max(dy, 0), max(-dx, 0) : gw - max(dx, 0)]
        need[max(dy, 0) : gh - max(-dy, 0), max(dx, 0) : gw - max(-dx, 0)] |= src
    return need.flatten().nonzero().flatten()


def _search_plan(
    mask: torch.Tensor, offsets: list[tuple[int, int]], cells: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index plan of the served search (:meth:`PatchMemory._on_part`) over the searched bank ``cells``:

    - ``q_idx`` (C · n_off,): for bank cell c and offset o, the flat query cell c − o whose window meets c there
      (the grid size L where that lies outside the grid: a padded column);
    - ``d_idx`` (M · n_off,): for part cell m (where ``mask`` > 0) and offset o, the product row c · n_off + o of
      bank cell c = m + o (C · n_off where m + o leaves the grid: a FAR row);
    - ``part_pos`` (L,): each grid cell's row among the M part cells (M elsewhere: a FAR row)."""
    gh, gw = mask.shape
    n_off, L = len(offsets), gh * gw
    cy, cx = cells // gw, cells % gw
    q_idx = torch.empty(len(cells), n_off, dtype=torch.int64)
    row = torch.full((L,), -1, dtype=torch.int64)
    row[cells] = torch.arange(len(cells))
    part = (mask > 0).flatten().nonzero().flatten()
    py, px = part // gw, part % gw
    d_idx = torch.empty(len(part), n_off, dtype=torch.int64)
    for o, (dy, dx) in enumerate(offsets):
        qy, qx = cy - dy, cx - dx
        inside = (qy >= 0) & (qy < gh) & (qx >= 0) & (qx < gw)
        q_idx[:, o] = torch.where(inside, qy * gw + qx, L)
        by, bx = py + dy, px + dx
        inside = (by >= 0) & (by < gh) & (bx >= 0) & (bx < gw)
        r = row[(by.clamp(0, gh - 1) * gw + bx.clamp(0, gw - 1))]
        if bool((inside & (r < 0)).any()):
            raise ValueError("searched cells do not cover the part's windows")  # searched_cells guarantees it
        d_idx[:, o] = torch.where(inside, r * n_off + o, len(cells) * n_off)
    pos = torch.full((L,), len(part), dtype=torch.int64)
    pos[part] = torch.arange(len(part))
    return q_idx.flatten(), d_idx.flatten(), pos


def _view_of(v: Any) -> tuple[int, int, int, int, int] | None:
    if v is None:
        return None
    t = tuple(int(i) for i in (v.tolist() if hasattr(v, "tolist") else v))
    if len(t) != 5:
        raise ValueError(f"a patch memory's view has 5 entries (top, bottom, left, right, pool), got {t}")
    return None if not any(t) else (t[0], t[1], t[2], t[3], t[4])


def register_views(
    v: torch.Tensor, ref: torch.Tensor, align: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Thread-phase registration: (B, 1, h, w) views → the views moved along the axis so their thread lines up
    with ``ref``, and each view's shift (B,) in pixels.

    ``align`` = (first, last, max_shift): the view's columns first:last (the regular thread, away from the head
    and the tapered tip) are compared with ``ref`` (1, 1, h, last − first; mean-free) at every shift within
    ± max_shift (about half a thread pitch: the phase is only defined modulo one pitch). The best shift d moves
    the view by −d (column j takes column j + d; the edge column fills in), so the thread's crests sit where the
    reference has them. One correlation (a convolution with a fixed kernel), an ArgMax and a GatherElements:
    it exports to ONNX and TensorRT like the rest of the memory."""
    first, last, s = align
    corr = F.conv2d(v[..., first - s : last + s], ref)  # (B, 1, 1, 2s + 1): the score of each shift
    d = corr.flatten(1).argmax(1) - s  # (B,)
    w = v.shape[-1]
    idx = (torch.arange(w, device=v.device)[None, :] + d[:, None]).clamp(0, w - 1)  # (B, w)
    return torch.gather(v, 3, idx[:, None, None, :].expand(-1, v.shape[1], v.shape[2], -1)), d


def _align_of(a: Any) -> tuple[int, int, int] | None:
    if a is None:
        return None
    t = tuple(int(i) for i in (a.tolist() if hasattr(a, "tolist") else a))
    if len(t) != 3:
        raise ValueError(f"a patch memory's align has 3 entries (first, last, max_shift), got {t}")
    return None if not any(t) else (t[0], t[1], t[2])


class PatchMemory(nn.Module):
    kernel: torch.Tensor
    bank: torch.Tensor
    bank_sq: torch.Tensor
    bank_m2: torch.Tensor
    bank_aug: torch.Tensor
    cell_idx: torch.Tensor
    q_idx: torch.Tensor
    d_idx: torch.Tensor
    part_pos: torch.Tensor
    mask: torch.Tensor
    offsets: torch.Tensor
    stride: torch.Tensor
    mu: torch.Tensor
    sd: torch.Tensor
    shift: torch.Tensor
    scale: torch.Tensor
    top_k: torch.Tensor
    residual: torch.Tensor
    contrast: torch.Tensor
    view: torch.Tensor
    align: torch.Tensor
    align_ref: torch.Tensor

    def __init__(
        self,
        kernel: torch.Tensor,  # (K, 1, p, p)
        bank: torch.Tensor,  # (L, K, N): grid location, feature, stored good patch
        mask: torch.Tensor,  # (gh, gw) 1 where a part can lie, else 0
        offsets: torch.Tensor,  # (n, 2) int: (dy, dx) grid-cell shifts searched
        stride: int,
        mu: torch.Tensor | None = None,  # (gh, gw)
        sd: torch.Tensor | None = None,  # (gh, gw)
        shift: float = 0.0,
        scale: float = 1.0,
        top_k: int = 1,
        residual: bool = False,
        view: tuple[int, int, int, int, int] | None = None,
        align: tuple[int, int, int] | None = None,  # (first, last, max_shift): see register_views
        align_ref: torch.Tensor | None = None,  # (1, 1, view height, last − first), mean-free
        contrast: int = 0,  # > 0: one more feature, the patch mean against its surround of this many cells
    ) -> None:
        super().__init__()
        gh, gw = mask.shape
        if kernel.ndim != 4 or kernel.shape[1] != 1 or bank.ndim != 3:
            raise ValueError(f"kernel (K,1,p,p) and bank (L,K,N) expected, got {kernel.shape}, {bank.shape}")
        if contrast < 0 or (contrast > 0 and contrast % 2 == 0):
            raise ValueError(f"contrast must be 0 or an odd number of grid cells, got {contrast}")
        if bank.shape[0] != gh * gw or bank.shape[1] != kernel.shape[0] + int(residual) + int(contrast > 0):
            raise ValueError(
                f"bank {tuple(bank.shape)} does not fit grid {gh}×{gw} and {kernel.shape[0]} features"
            )
        f32 = torch.float32
        self.register_buffer("kernel", kernel.to(f32).contiguous())
        self.register_buffer("bank", bank.to(f32).contiguous())
        self.register_buffer("bank_sq", (self.bank**2).sum(1, keepdim=True))  # (L, 1, N)
        # −2·bank, so the product needs no scaling pass over its (L, n_off·B, N) result (not saved: derived).
        self.register_buffer("bank_m2", -2.0 * self.bank, persistent=False)
        self.register_buffer("mask", mask.to(f32))
        self.register_buffer("offsets", offsets.to(torch.int64).reshape(-1, 2))
        self.register_buffer("stride", torch.tensor(int(stride), dtype=torch.int64))
        self.register_buffer("mu", (mu if mu is not None else torch.zeros(gh, gw)).to(f32))
        self.register_buffer("sd", (sd if sd is not None else torch.ones(gh, gw)).to(f32))
        self.register_buffer("shift", torch.tensor(float(shift), dtype=f32))
        self.register_buffer("scale", torch.tensor(float(scale), dtype=f32))
        if not 1 <= int(top_k) <= int(mask.sum().item()):
            raise ValueError(f"top_k {top_k} must be between 1 and the {int(mask.sum().item())} scored cells")
        self.register_buffer("top_k", torch.tensor(int(top_k), dtype=torch.int64))
        self.register_buffer("residual", torch.tensor(bool(residual)))
        self.register_buffer("contrast", torch.tensor(int(contrast), dtype=torch.int64))
        # (top, bottom, left, right, pool): the memory sees input rows top:bottom, columns left:right, averaged
        # over pool × pool blocks; all zero = the whole input as it comes.
        if view is not None and (view[4] < 1 or not 0 <= view[0] < view[1] or not 0 <= view[2] < view[3]):
            raise ValueError(f"view (top, bottom, left, right, pool) must be a non-empty region, got {view}")
        self.register_buffer("view", torch.tensor(view or (0, 0, 0, 0, 0), dtype=torch.int64))
        self._view = _view_of(view)
        # Thread-phase registration of the view before its patches are coded (all zero = none).
        if align is not None:
            first, last, shift_max = align
            if not 1 <= shift_max <= first < last or align_ref is None:
                raise ValueError(
                    f"align (first, last, max_shift) needs max_shift ≤ first < last, got {align}"
                )
            if tuple(align_ref.shape) != (1, 1, align_ref.shape[2], last - first):
                raise ValueError(f"align_ref {tuple(align_ref.shape)} must be (1, 1, h, {last - first})")
        self.register_buffer("align", torch.tensor(align or (0, 0, 0), dtype=torch.int64))
        ref = align_ref if align is not None and align_ref is not None else torch.zeros(1, 1, 1, 1)
        self.register_buffer("align_ref", ref.to(f32).contiguous())
        self._align = _align_of(align)
        self._residual = bool(residual)
        self._contrast = int(contrast)
        self._top_k = int(top_k)
        self._grid = (int(gh), int(gw))
        self._offsets = [(int(dy), int(dx)) for dy, dx in self.offsets.tolist()]
        # What inference searches: only the bank cells some scored cell's window reaches (the mask grown by the
        # offsets; about half the grid: the rest is background no score reads), with |b|² folded into the
        # product as one more feature row: [q, 1] · [−2b; |b|²] = |b|² − 2 q·b, so the (cells, n_off·B, N)
        # product takes one pass (MatMul) instead of two (MatMul, Add). Derived, not saved. See _on_part().
        cells = searched_cells(self.mask, self._offsets)
        self.register_buffer("cell_idx", cells, persistent=False)
        aug = torch.cat([self.bank_m2, self.bank_sq], 1).index_select(0, cells).contiguous()
        self.register_buffer("bank_aug", aug, persistent=False)  # (C, K + 1, N)
        q_idx, d_idx, part = _search_plan(self.mask, self._offsets, cells)
        self.register_buffer("q_idx", q_idx, persistent=False)
        self.register_buffer("d_idx", d_idx, persistent=False)
        self.register_buffer("part_pos", part, persistent=False)
        self._stride = int(stride)
        self._patch = int(kernel.shape[-1])
        self.fp32 = Fp32Island()  # no parameters: the state dict keys are unchanged

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PatchMemory:
        """The model a ``state_dict()`` was saved from (every shape and setting is in the state itself)."""
        missing = sorted(
            {"kernel", "bank", "mask", "offsets", "stride", "mu", "sd", "shift", "scale", "top_k"}
            - set(state)
        )
        if missing:
            raise ValueError(f"not a patch-memory state dict: missing {missing}")
        return cls(
            state["kernel"],
            state["bank"],
            state["mask"],
            state["offsets"],
            int(state["stride"]),
            state["mu"],
            state["sd"],
            float(state["shift"]),
            float(state["scale"]),
            int(state["top_k"]),
            bool(state["residual"]) if "residual" in state else False,
            _view_of(state.get("view")),
            _align_of(state.get("align")),  # packages from before registration have neither
            state.get("align_ref"),
            int(state["contrast"]) if "contrast" in state else 0,  # packages from before it have none
        )

    @property
    def input_grid(self) -> tuple[int, int]:
        return self._grid

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) normalised crops → (B, K, gh, gw) patch codes (the projection may run in FP16; the
        residual norm runs in FP32)."""
        return self.codes(self.crop(x.to(self.kernel.dtype)))

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, h, w) views (already cropped and registered) → (B, K, gh, gw) patch codes."""
        f = F.conv2d(x, self.kernel, stride=self._stride)
        if self._residual:
            f = torch.cat([f, self.fp32(self.residual_norm, x, f).to(f.dtype)], 1)
        if self._contrast:
            f = torch.cat([f, self.local_contrast(x).to(f.dtype)], 1)
        tracing = torch.jit.is_tracing()  # type: ignore[attr-defined,no-untyped-call]  # not re-exported
        if not tracing and tuple(f.shape[2:]) != self._grid:
            raise ValueError(
                f"input {tuple(x.shape[2:])} gives a {tuple(f.shape[2:])} grid; fitted for {self._grid}"
            )
        return f

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """The part of the (B, 1, H, W) input this memory looks at (its ``view``), registered when it aligns."""
        return self._crop_and_shift(x)[0]

    def _crop_and_shift(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        v = crop_view(x, self._view)
        if self._align is None:
            return v, None
        tracing = torch.jit.is_tracing()  # type: ignore[attr-defined,no-untyped-call]  # not re-exported
        if not tracing and v.shape[-1] < self._align[1] + self._align[2]:
            raise ValueError(f"view {tuple(v.shape[2:])} too narrow for align {self._align}")
        moved, d = self.fp32(register_views, v, self.align_ref, self._align)
        return moved.to(v.dtype), d

    def unshift(self, heat: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """(B, gh, gw) cells of registered views → where they lie in the view as it came (the registration moved
        it by −d pixels; cells that come from outside the grid are 0)."""
        gw = heat.shape[-1]
        cells = torch.div(d + self._stride // 2, self._stride, rounding_mode="floor")
        src = torch.arange(gw, device=heat.device)[None, :] - cells[:, None]  # (B, gw)
        inside = ((src >= 0) & (src < gw)).to(heat.dtype)
        idx = src.clamp(0, gw - 1)[:, None, :].expand(-1, heat.shape[1], -1)
        return torch.gather(heat, 2, idx) * inside[:, None, :]

    def residual_norm(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """(B, 1, gh, gw): the norm of each mean-free patch outside the kept components.

        The codes keep the components along which good patches vary most; a thin scratch or a bent crest tip
        is mostly *outside* them, so its code alone may have a close good twin. This norm is one more feature
        (in the codes' pixel units): the distance then never falls below the difference in unexplained detail.
        """
        p = self._patch
        # Patch means by AveragePool (a box sum; cheaper than a convolution with a ones kernel, same sums).
        m1 = F.avg_pool2d(x, p, stride=self._stride)
        m2 = F.avg_pool2d(x * x, p, stride=self._stride)
        energy = float(p * p) * (m2 - m1 * m1) - (codes * codes).sum(1, keepdim=True)
        return torch.sqrt(torch.clamp(energy, min=0.0))

    def local_contrast(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, gh, gw): each patch's mean brightness against the mean of the patches around it (``contrast``
        × ``contrast`` cells), times the patch side: the patch's projection on the constant component, taken
        against its surround instead of the whole image.

        The codes and the residual norm are mean-free, so a patch inside a bright scrape or a dark stain as wide
        as the patch looks like a flat good patch; only the defect's edges show. Against its surround such a
        patch stands out, while the session's overall brightness (a confound) still cannot enter the score.
        """
        p, k = self._patch, self._contrast
        m = F.avg_pool2d(x, p, stride=self._stride)
        around = F.avg_pool2d(m, k, stride=1, padding=k // 2, count_include_pad=False)
        return float(p) * (m - around)

    def distances(
        self, feats: torch.Tensor, exclude: torch.Tensor | None = None, origin: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, K, gh, gw) codes → (B, gh, gw) squared distance to the nearest bank patch within the offsets.

        All offsets go into one batched product, so the bank is read from memory once per batch, not once per
        offset. Without ``exclude`` (inference) only the part's cells are computed, FAR elsewhere (no score or
        heat map reads them; :meth:`_on_part`). ``exclude``: (B,) or (B, m) bank columns holding each query's
        own patches (leave-one-out while fitting, on every cell of the grid)."""
        if exclude is None:
            return self._on_part(feats)
        b, k = feats.shape[0], feats.shape[1]
        gh, gw = self._grid
        cells = gh * gw
        shifted = []
        for dy, dx in self._offsets:
            # Move the query by (dy, dx): the code at query cell m lands on bank cell m + (dy, dx).
            q = F.pad(feats, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))
            shifted.append(q[:, :, max(-dy, 0) : max(-dy, 0) + gh, max(-dx, 0) : max(-dx, 0) + gw])
        n_off = len(shifted)
        qf = torch.cat(shifted, 0).reshape(n_off * b, k, cells).permute(2, 0, 1)  # (L, n_off·B, K)
        dmin = self._all_cells(qf, b, n_off, exclude, origin)
        dmin = dmin.permute(1, 0).reshape(n_off * b, 1, gh, gw)  # at bank cell m + (dy, dx)
        best: torch.Tensor | None = None
        for i, (dy, dx) in enumerate(self._offsets):
            # ... and back to the query cell m; cells whose m + (dy, dx) left the grid have no neighbour.
            di = F.pad(
                dmin[i * b : (i + 1) * b], (max(-dx, 0), max(dx, 0), max(-dy, 0), max(dy, 0)), value=FAR
            )
            di = di[:, :, max(dy, 0) : max(dy, 0) + gh, max(dx, 0) : max(dx, 0) + gw]
            best = di if best is None else torch.minimum(best, di)
        assert best is not None
        return best[:, 0]

    def _on_part(self, feats: torch.Tensor) -> torch.Tensor:
        """:meth:`distances` as inference computes them: on the part's cells (the mask), FAR elsewhere (no score
        or heat map reads them). Every (searched bank cell, offset) pair's query is gathered straight from the
        codes (``q_idx``), and each part cell's nearest over its window straight from the products (``d_idx``):
        two Gathers instead of shifting, padding and transposing the whole grid once per offset."""
        b, k = feats.shape[0], feats.shape[1]
        gh, gw = self._grid
        n_off, c = len(self._offsets), self.cell_idx.shape[0]
        # (L + 1, B, K + 1): each cell's [q, 1] (the product's augmented row), row L the outside's query; gathered
        # by whole rows, the queries come out in product order. |q|² likewise, both once per grid cell.
        flat = F.pad(feats.reshape(b, k, gh * gw).permute(2, 0, 1), (0, 0, 0, 0, 0, 1))
        sq = (flat * flat).sum(2).index_select(0, self.q_idx).reshape(c, n_off * b)
        q = F.pad(flat, (0, 1), value=1.0).index_select(0, self.q_idx).reshape(c, n_off * b, k + 1)
        d = torch.bmm(q, self.bank_aug)  # (C, n_off·B, N)
        dc = (d.min(2).values + sq).reshape(c * n_off, b)  # row = cell · n_off + offset
        dc = F.pad(dc, (0, 0, 0, 1), value=FAR)  # the last row: a neighbour outside the grid
        best = (
            dc.index_select(0, self.d_idx).reshape(-1, n_off, b).min(1).values
        )  # (M, B) on the part's cells
        grid = F.pad(best, (0, 0, 0, 1), value=FAR).index_select(0, self.part_pos)  # (L, B): off the part FAR
        return grid.permute(1, 0).reshape(b, gh, gw)

    def _all_cells(
        self, qf: torch.Tensor, b: int, n_off: int, exclude: torch.Tensor, origin: torch.Tensor | None
    ) -> torch.Tensor:
        """(L, n_off·B, K) shifted codes → (L, n_off·B) squared distance to the nearest bank patch of each bank
        cell, on every cell of the grid and with each query's own bank columns excluded (leave-one-out while
        fitting: the spreads are per cell, background included)."""
        d = torch.bmm(qf, self.bank_m2) + self.bank_sq  # (L, n_off·B, N)
        if origin is not None:
            # A thinned bank keeps different images' patches at each cell: ``origin`` (L, N) names the good
            # image of each kept column, ``exclude`` (B,) each query's own image.
            ids = exclude.reshape(b).repeat(n_off)  # (n_off·B,), in qf's row order
            d = d.masked_fill(origin[:, None, :] == ids[None, :, None], FAR)
        else:
            cols = exclude.reshape(b, -1).repeat(n_off, 1)  # (n_off·B, m), in qf's row order
            rows = torch.arange(n_off * b).unsqueeze(1).expand_as(cols)
            d[:, rows, cols] = FAR
        return d.min(2).values + (qf * qf).sum(2)  # (L, n_off·B)

    def z_of(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, K, gh, gw) codes → (B, gh, gw) z-scores."""
        return (self.distances(feats) - self.mu) / self.sd

    def zmap(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) → (B, gh, gw) z-scores, computed in FP32 from the codes on."""
        z: torch.Tensor = self.fp32(self.z_of, self.features(x))
        return z

    def score_of(self, z: torch.Tensor) -> torch.Tensor:
        """(B, gh, gw) z-map → (B,) logit: the mean of the ``top_k`` largest z where the part lies (a lone
        odd cell — a speck, a glint — counts for 1/top_k of a defect that spans several)."""
        # Selected, not multiplied: off the part z is not searched (and may be huge), and inf · 0 is NaN.
        masked = torch.where(self.mask > 0, z, -FAR).flatten(1)
        top = masked.max(1).values if self._top_k == 1 else masked.topk(self._top_k, dim=1).values.mean(1)
        return (top - self.shift) / self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) → (B, 1) NG logits, the ResNet18's contract."""
        logit: torch.Tensor = self.fp32(self._logit, self.features(x))
        return logit.unsqueeze(1).to(x.dtype)

    def _logit(self, feats: torch.Tensor) -> torch.Tensor:
        return self.score_of(self.z_of(feats))

    def with_heatmap(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) logits and the (B, gh, gw) map of z-scores above 0 on the part: where it looks unlike any good screw."""
        v, d = self._crop_and_shift(x.to(self.kernel.dtype))
        logit, heat = self.fp32(self._logit_and_map, self.codes(v))
        if d is not None:
            heat = self.unshift(heat, d)
        return logit.to(x.dtype), heat.to(x.dtype)

    def _logit_and_map(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.z_of(feats)
        return self.score_of(z), torch.where(self.mask > 0, torch.clamp(z, min=0.0), 0.0)


class PatchEnsemble(nn.Module):
    """Several patch memories on one input, each looking at its own ``view`` (e.g. the whole crop at half
    resolution and the thread band at full resolution); the logit is the mean of theirs.

    Each member's logit is already standardised on its own good parts (leave-one-out), so the mean weighs
    them alike. The heat map is every member's z-map put back where it looked, on one grid of ``cell``-pixel
    cells over the input (⌈H/cell⌉ × ⌈W/cell⌉), the largest where they overlap.
    """

    def __init__(self, members: list[PatchMemory], input_size: tuple[int, int], cell: int = 8) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one patch memory")
        self.members = nn.ModuleList(members)
        self._members = list(members)
        self.register_buffer("input_size", torch.tensor(input_size, dtype=torch.int64))
        self.register_buffer("cell", torch.tensor(int(cell), dtype=torch.int64))
        self._input = (int(input_size[0]), int(input_size[1]))
        self._cell = int(cell)
        self.fp32 = Fp32Island()
        for i, m in enumerate(members):
            _, b, _, r, _ = m._view or (0, input_size[0], 0, input_size[1], 1)
            if b > input_size[0] or r > input_size[1]:
                raise ValueError(f"member {i}'s view {m._view} must lie inside the {input_size} input")
        # Which member cells each output cell's pixels come from (derived, not saved): see heat_cells().
        for i, m in enumerate(members):
            self.register_buffer(f"heat_idx_{i}", heat_cells(m, self._input, self._cell), persistent=False)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PatchEnsemble:
        n = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("members."))
        members = [
            PatchMemory.from_state(
                {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"members.{i}.")}
            )
            for i in range(n)
        ]
        size = state["input_size"].tolist()
        return cls(members, (int(size[0]), int(size[1])), int(state["cell"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) → (B, 1) NG logits."""
        mean: torch.Tensor = self.fp32(_mean, *[m(x) for m in self._members])
        return mean

    def with_heatmap(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = self._input
        c = self._cell
        logits: list[torch.Tensor] = []
        cells: torch.Tensor | None = None
        for i, m in enumerate(self._members):
            logit, heat = m.with_heatmap(x)
            logits.append(logit)
            # Each output cell: the largest of the member cells whose pixels it covers (0 where none does; the
            # maps are ≥ 0), gathered by rows of the batch from the flat map and its appended 0.
            idx: torch.Tensor = getattr(self, f"heat_idx_{i}")  # (O, R)
            flat = F.pad(heat.flatten(1).permute(1, 0), (0, 0, 0, 1))  # (gh·gw + 1, B)
            mc = flat.index_select(0, idx.flatten()).reshape(idx.shape[0], idx.shape[1], -1).max(1).values
            cells = mc if cells is None else torch.maximum(cells, mc)
        assert cells is not None
        out = cells.permute(1, 0).reshape(-1, -(-h // c), -(-w // c))
        mean: torch.Tensor = self.fp32(_mean, *logits)
        return mean.to(x.dtype), out


def heat_cells(m: PatchMemory, input_size: tuple[int, int], cell: int) -> torch.Tensor:
    """(O, R) int64: for each ``cell``-pixel cell of the input (⌈H/cell⌉ × ⌈W/cell⌉, row-major), the flat
    indices of member ``m``'s grid cells whose pixels it covers — a member cell covers stride × pool pixels
    from its view's corner — padded with gh·gw (a 0). The ensemble's map is the largest of them, exactly the
    largest over the cell's pixels of the member map put back on the input (a finer member's peak is never
    dropped), without building that full-resolution map."""
    h, w = input_size
    top, _, left, _, pool = m._view or (0, h, 0, w, 1)
    step = m._stride * pool
    gh, gw = m.input_grid

    def spans(n_out: int, origin: int, n_cells: int, limit: int) -> list[list[int]]:
        out = []
        for i in range(n_out):
            a, b = i * cell, min((i + 1) * cell, limit)  # the output cell's pixels [a, b)
            # member cells u whose pixels [origin + u·step, origin + (u + 1)·step) meet [a, b)
            first, last = max(0, (a - origin) // step), min(n_cells - 1, (b - 1 - origin) // step)
            out.append(list(range(first, last + 1)))
        return out

    rows, cols = spans(-(-h // cell), top, gh, h), spans(-(-w // cell), left, gw, w)
    sets = [[u * gw + v for u in ru for v in cv] for ru in rows for cv in cols]
    r = max(1, max(len(s) for s in sets))
    return torch.tensor([s + [gh * gw] * (r - len(s)) for s in sets], dtype=torch.int64)


def _mean(*logits: torch.Tensor) -> torch.Tensor:
    return torch.stack(logits, 0).mean(0)
