"""The package's preprocessing for a whole batch at once, in torch, on any device: the pose crop, CLAHE, resize
and normalise of :mod:`engine.preprocess`, where a GPU pays its per-call cost once per batch, not per frame.

engine.preprocess (OpenCV, per frame) stays the definition and the default; this is a second implementation of
the same arithmetic, written after OpenCV's own, and held to it by tests (tests/unit/test_preprocess_torch.py,
tests/realdata, tests/gpu):

- **CLAHE** — OpenCV's algorithm step by step: the image padded to whole tiles (BORDER_REFLECT_101, and by a
  whole tile where OpenCV pads a dimension that needs none), a 256-bin histogram per tile, clipped at
  ``max(int(clip · tile_area / 256), 1)``, the excess spread evenly with OpenCV's residual stepping, the LUT
  ``round(cumsum · 255 / tile_area)`` in float32, and each pixel bilinear between its four tiles' LUTs in
  float32 with OpenCV's weights. Identical to ``cv2.createCLAHE(...).apply`` (0 grey levels).
- **Pose crop** — ``cv2.warpAffine`` (INTER_LINEAR) as OpenCV ≥ 4.11 computes it: the inverse map in float32,
  source coordinates by fused multiply-add, floor, bilinear in float32, rounded; the border constant (the
  median fill) or replicated. Within 1 grey level of OpenCV; a few pixels in 10⁵ differ where OpenCV's SIMD
  path rounds an exact .5 the other way.
- **Resize** — separable: one weight matrix per axis, taken from ``cv2.resize`` itself (on a float identity),
  so every interpolation OpenCV has is the same linear map, rounded as OpenCV rounds 8-bit results (halves up
  for INTER_LINEAR's fixed point; INTER_AREA by 2 in both directions as its (sum + 2) >> 2). Identical for the
  presets' sizes; within 1 grey level elsewhere. A resize to the same size is no resize, as in OpenCV.
- **Normalise** — ``x · (1 / (255 · std)) − mean / std`` in float32: bit for bit numpy's.

End to end (the tolerance the tests hold it to): without a pose crop the network input is identical; with one,
the ~20 crop pixels in 320 000 that are a level off move their tiles' CLAHE tables a little, so at most
:data:`MAX_LEVELS` grey levels on at most :data:`MAX_SHARE` of the pixels (measured on the 300 real screws:
≤ 5 levels, ≤ 3.3 % of an image's pixels), and no verdict flips. The crop's light and contrast (the daemon's drift statistics) are
computed on the device from the same subsample as engine.drift.brightness_contrast (within 1e-3).

torch is imported at the top: only the GPU station's daemon (``batching.preprocess_device``), the benchmark and
tests import this module, through :func:`engine.preprocess.device_preprocessor`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from engine.pose import Pose, PoseParams, crop_matrix, estimate_pose
from engine.preprocess import INTERPOLATIONS, PreprocessParams

MAX_LEVELS = 8  # the documented tolerance on the 8-bit network input, CPU (OpenCV) vs this module …
MAX_SHARE = 0.05  # … on at most this share of its pixels
_STAT_PIXELS = 16_000  # engine.drift.brightness_contrast's subsample size


@dataclass(frozen=True, slots=True)
class Prepared:
    """A preprocessed batch: the network input on the device, and each crop's light and contrast."""

    batch: torch.Tensor  # float32 (N, 1, H, W)
    brightness: np.ndarray  # float64 (N,)
    contrast: np.ndarray  # float64 (N,)


class TorchPreprocessor:
    """:class:`engine.preprocess.Preprocessor`'s work for many frames per call, on ``device``."""

    def __init__(self, params: PreprocessParams, device: str = "cuda") -> None:
        self.params = params
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"preprocessing on {device!r} asked for, but CUDA is not available here")
            if (self.device.index or 0) >= torch.cuda.device_count():
                raise RuntimeError(f"no CUDA device {device!r} here ({torch.cuda.device_count()} device(s))")
        elif self.device.type != "cpu":
            raise RuntimeError(f"preprocessing runs on cpu or cuda devices, not {device!r}")
        self.pose = PoseParams.from_dict(params.pose) if params.pose is not None else None
        self._weights: dict[tuple[int, int], torch.Tensor] = {}
        self._staging = (
            threading.local()
        )  # per calling thread: pinned host memory the frames are stacked into
        self._scale = np.float32(1.0 / (255.0 * params.std))
        self._offset = np.float32(params.mean / params.std)

    # -- the whole path ----------------------------------------------------------------------------------------
    def __call__(self, frames: Sequence[np.ndarray], poses: Sequence[Pose | None] | None = None) -> Prepared:
        """2-D uint8 frames (any sizes) → their network input. With a pose crop, ``poses[i]`` is frame i's pose
        (estimated here, on the CPU, where None); a frame without a part raises engine.pose.PoseError."""
        n = len(frames)
        h, w = self.params.input_size
        out = torch.empty((n, 1, h, w), dtype=torch.float32, device=self.device)
        light = np.zeros(n)
        contrast = np.zeros(n)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, f in enumerate(frames):
            if f.ndim != 2 or f.dtype != np.uint8:
                raise ValueError(f"expected 2-D uint8 frames, got shape {f.shape} dtype {f.dtype}")
            groups.setdefault((int(f.shape[0]), int(f.shape[1])), []).append(i)
        for idx in groups.values():
            x = self.upload([frames[i] for i in idx])
            if self.pose is not None:
                crops = self.crop(x, [_pose_of(frames[i], poses, i, self.pose) for i in idx])
            else:
                crops = x
            b, c = self.light_and_contrast(crops)
            light[idx], contrast[idx] = b, c
            out[idx] = self.normalise(self.equalised(crops))
        return Prepared(out, light, contrast)

    def upload(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """Frames of one size → uint8 (N, H, W) on the device: one host copy (into pinned memory kept per thread
        and grown as needed, so the transfer is a DMA and nothing is allocated per batch), one transfer."""
        if self.device.type != "cuda":
            return torch.from_numpy(np.stack(frames))
        n, (h, w) = len(frames), frames[0].shape
        pinned: torch.Tensor | None = getattr(self._staging, "buffer", None)
        if pinned is None or pinned.numel() < n * h * w:
            pinned = torch.empty(n * h * w, dtype=torch.uint8).pin_memory()
            self._staging.buffer = pinned
        host = pinned[: n * h * w].view(n, h, w)
        np.stack(frames, out=host.numpy())
        # Synchronous: the staging buffer is reused by this thread's next call.
        return host.to(self.device)

    def crop(self, frames: torch.Tensor, poses: Sequence[Pose]) -> torch.Tensor:
        """uint8 (N, H, W) frames and their poses → uint8 (N, crop_height, crop_width) pose crops."""
        assert self.pose is not None
        p = self.pose
        inverse = np.stack([cv2.invertAffineTransform(crop_matrix(q, p)) for q in poses])
        fill = None if p.fill == "replicate" else [float(round(q.background)) for q in poses]
        return warp_affine(frames, inverse, (p.crop_height, p.crop_width), fill)

    def equalised(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 (N, h, w) → CLAHE and resize in the package's order → uint8 (N, H, W)."""
        p = self.params
        size = p.input_size
        if p.order == "clahe_then_resize":
            return self.resize(clahe(crops, p.clahe_clip_limit, p.clahe_tile_grid), size)
        return clahe(self.resize(crops, size), p.clahe_clip_limit, p.clahe_tile_grid)

    def resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        _, hi, wi = x.shape
        if (hi, wi) == (h, w):
            return x
        interp = INTERPOLATIONS[self.params.interpolation]
        if interp == cv2.INTER_AREA and (hi, wi) == (2 * h, 2 * w):
            # OpenCV's 2 × 2 area average for 8-bit rounds (sum + 2) >> 2.
            s = F.avg_pool2d(x[:, None].float(), 2)[:, 0] * 4.0
            return torch.div(s + 2.0, 4.0, rounding_mode="floor").to(torch.uint8)
        y = torch.matmul(torch.matmul(self._axis(hi, h, interp), x.float()), self._axis(wi, w, interp).T)
        # OpenCV's 8-bit bilinear resize is fixed point and rounds halves up (a 4× downscale samples exactly
        # between two pixels); its other interpolations round to even, as torch.round.
        y = torch.floor(y + 0.5) if interp == cv2.INTER_LINEAR else torch.round(y)
        return y.clamp_(0, 255).to(torch.uint8)

    def _axis(self, n_in: int, n_out: int, interp: int) -> torch.Tensor:
        key = (n_in, n_out)
        if key not in self._weights:
            # Row i of OpenCV's resize of a float identity is its response to a unit pixel at i: its weights.
            eye = np.eye(n_in, dtype=np.float32)
            w = cv2.resize(eye, (n_out, n_in), interpolation=interp).T
            self._weights[key] = torch.from_numpy(np.ascontiguousarray(w)).to(self.device)
        return self._weights[key]

    def normalise(self, img8: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W) → float32 (N, 1, H, W): (x/255 − mean)/std, as numpy computes it."""
        return (img8.float() * float(self._scale) - float(self._offset))[:, None]

    def light_and_contrast(self, crops: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Each crop's mean and standard deviation of grey levels, on engine.drift's strided subsample."""
        _, h, w = crops.shape
        step = max(1, math.isqrt((h * w) // _STAT_PIXELS))
        sub = crops[:, ::step, ::step].reshape(crops.shape[0], -1).double()
        mean = sub.mean(1)
        sd = ((sub - mean[:, None]) ** 2).mean(1).sqrt()
        both = torch.stack([mean, sd]).cpu().numpy()
        return both[0], both[1]

    def warmup(self, frame_shape: tuple[int, int] = (1024, 1024)) -> None:
        """Run the kernels once (CUDA context, cuBLAS handles, the resize weights) before the first parts."""
        frame = np.zeros(frame_shape, np.uint8)
        x = self.upload([frame])
        if self.pose is not None:
            p = self.pose
            shift = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # any map: only the kernels matter here
            crops = warp_affine(x, shift[None], (p.crop_height, p.crop_width), [0.0])
        else:
            crops = x
        self.light_and_contrast(crops)
        self.normalise(self.equalised(crops))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def batch_into(
        self, frames: Sequence[np.ndarray], poses: Sequence[Pose | None] | None, out: np.ndarray
    ) -> Prepared:
        """:meth:`__call__`, the network input written into ``out`` (float32 (N, 1, H, W), host memory)."""
        prepared = self(frames, poses)
        out[...] = prepared.batch.cpu().numpy()
        return prepared


def _pose_of(frame: np.ndarray, poses: Sequence[Pose | None] | None, i: int, params: PoseParams) -> Pose:
    pose = poses[i] if poses is not None else None
    return pose if pose is not None else estimate_pose(frame, params)


# -- the kernels ---------------------------------------------------------------------------------------------------
def warp_affine(
    frames: torch.Tensor, inverse: np.ndarray, size: tuple[int, int], fill: Sequence[float] | None
) -> torch.Tensor:
    """``cv2.warpAffine(frame, M, (w, h), flags=INTER_LINEAR)`` for each uint8 (H, W) frame, given each map's
    inverse (crop → frame, float64 (N, 2, 3)). ``fill``: BORDER_CONSTANT with that value per frame; None:
    BORDER_REPLICATE."""
    n, hs, ws = frames.shape
    h, w = size
    dev = frames.device
    m = torch.from_numpy(np.asarray(inverse, dtype=np.float32)).to(dev).double()  # OpenCV's float32 map
    y = torch.arange(h, device=dev, dtype=torch.float64)[None, :, None]
    x = torch.arange(w, device=dev, dtype=torch.float64)[None, None, :]
    # One rounding per step, as OpenCV's float32 fused multiply-adds: (y·M1 + M2), then M0·x + that.
    row_x = (y * m[:, 0, 1, None, None] + m[:, 0, 2, None, None]).float().double()
    row_y = (y * m[:, 1, 1, None, None] + m[:, 1, 2, None, None]).float().double()
    sx = (m[:, 0, 0, None, None] * x + row_x).float()
    sy = (m[:, 1, 0, None, None] * x + row_y).float()
    x0, y0 = torch.floor(sx), torch.floor(sy)
    fx, fy = sx - x0, sy - y0
    ix, iy = x0.long(), y0.long()
    src = frames.reshape(n, -1)
    base = (torch.arange(n, device=dev) * (hs * ws))[:, None, None]
    flat = src.reshape(-1)
    fills = None if fill is None else torch.tensor(list(fill), device=dev, dtype=torch.float32)[:, None, None]

    def tap(dy: int, dx: int) -> torch.Tensor:
        yy, xx = iy + dy, ix + dx
        inside = (yy >= 0) & (yy < hs) & (xx >= 0) & (xx < ws)
        v = flat[base + yy.clamp(0, hs - 1) * ws + xx.clamp(0, ws - 1)].float()
        return v if fills is None else torch.where(inside, v, fills)

    p00, p01, p10, p11 = tap(0, 0), tap(0, 1), tap(1, 0), tap(1, 1)
    v0 = _fma(fx, p01 - p00, p00)
    v1 = _fma(fx, p11 - p10, p10)
    return torch.round(_fma(fy, v1 - v0, v0)).clamp_(0, 255).to(torch.uint8)


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a·b + c rounded once to float32 (the product of two float32 is exact in float64)."""
    return (a.double() * b.double() + c.double()).float()


def clahe(x: torch.Tensor, clip_limit: float, tile_grid: tuple[int, int]) -> torch.Tensor:
    """``cv2.createCLAHE(clip_limit, tile_grid).apply`` on each uint8 (H, W) image of (N, H, W)."""
    n, h, w = x.shape
    tiles_x, tiles_y = int(tile_grid[0]), int(tile_grid[1])  # cv::Size(width, height)
    dev = x.device
    if h % tiles_y or w % tiles_x:
        # OpenCV pads both dimensions, each by (tiles − size % tiles): a whole tile where none was needed.
        rows = _reflect101(torch.arange(h + tiles_y - h % tiles_y, device=dev), h)
        cols = _reflect101(torch.arange(w + tiles_x - w % tiles_x, device=dev), w)
        ext = x[:, rows][:, :, cols]
    else:
        ext = x
    th, tw = ext.shape[1] // tiles_y, ext.shape[2] // tiles_x
    area = th * tw
    count = n * tiles_y * tiles_x
    tiles = ext.reshape(n, tiles_y, th, tiles_x, tw).permute(0, 1, 3, 2, 4).reshape(count, area)
    offsets = (torch.arange(count, device=dev) * 256)[:, None]
    hist = torch.bincount((tiles.long() + offsets).reshape(-1), minlength=count * 256).reshape(count, 256)
    if clip_limit > 0:
        limit = max(int(clip_limit * area / 256), 1)
        clipped = (hist - limit).clamp(min=0).sum(1, keepdim=True)
        hist = hist.clamp(max=limit)
        per_bin = clipped // 256
        residual = clipped - per_bin * 256
        step = (256 // residual.clamp(min=1)).clamp(min=1)
        i = torch.arange(256, device=dev)[None, :]
        hist = hist + per_bin + ((residual > 0) & (i % step == 0) & (i // step < residual)).long()
    scale = torch.tensor(255.0, dtype=torch.float32) / torch.tensor(float(area), dtype=torch.float32)
    lut = torch.round(hist.cumsum(1).float() * scale.to(dev)).clamp_(0, 255).reshape(-1)
    inv_th = float(np.float32(1.0) / np.float32(th))
    inv_tw = float(np.float32(1.0) / np.float32(tw))
    ty1, ty2, ya = _tile_weights(h, inv_th, tiles_y, dev)
    tx1, tx2, xa = _tile_weights(w, inv_tw, tiles_x, dev)
    v = x.long()
    img = (torch.arange(n, device=dev) * (tiles_y * tiles_x * 256))[:, None, None]

    def lut_at(ty: torch.Tensor, tx: torch.Tensor) -> torch.Tensor:
        return lut[img + (ty[:, None] * (tiles_x * 256) + tx[None, :] * 256)[None] + v]

    xa_, ya_ = xa[None, None, :], ya[None, :, None]
    top = lut_at(ty1, tx1) * (1.0 - xa_) + lut_at(ty1, tx2) * xa_
    bottom = lut_at(ty2, tx1) * (1.0 - xa_) + lut_at(ty2, tx2) * xa_
    return torch.round(top * (1.0 - ya_) + bottom * ya_).clamp_(0, 255).to(torch.uint8)


def _tile_weights(
    size: int, inv: float, tiles: int, dev: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pixel: the two tiles it lies between and the weight of the second (float32, as OpenCV)."""
    f = torch.arange(size, dtype=torch.float32, device=dev) * torch.tensor(inv, dtype=torch.float32) - 0.5
    t1 = torch.floor(f)
    a = f - t1
    first = t1.long()
    return first.clamp(min=0), (first + 1).clamp(max=tiles - 1), a


def _reflect101(i: torch.Tensor, n: int) -> torch.Tensor:
    period = 2 * (n - 1)
    i = i.abs() % period
    return torch.where(i >= n, period - i, i)
