"""The frame around the part: a light mottled background with dust, the part's soft cast shadow, the part warped
into place, session lighting and sensor noise. The background and the shadow are drawn at a quarter of the
resolution.
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray

from tools.synth.part import Canvas
from tools.synth.raster import F32, REF, noise_lut, random_bytes


def _background(rng: np.random.Generator, lo: int, level: float) -> F32:
    """Light paper-like background at low resolution: a lighting slope, vignetting and mottling."""
    yy, xx = np.mgrid[0:lo, 0:lo].astype(np.float32) / lo - 0.5
    gx, gy = rng.uniform(-14, 14, 2)
    bg = level + gx * xx + gy * yy - 18.0 * (xx * xx + yy * yy)
    bg += 3.5 * cv2.resize(
        rng.standard_normal((5, 5)).astype(np.float32), (lo, lo), interpolation=cv2.INTER_CUBIC
    )
    bg += 2.4 * cv2.resize(rng.standard_normal((48, 48)).astype(np.float32), (lo, lo))
    out: F32 = bg.astype(np.float32)
    return out


def _shadow(alpha: F32, mat: NDArray[np.float64], lo: int, size: int, rng: np.random.Generator) -> F32:
    """Soft cast shadow at low resolution, as a light factor; the light is upper left, the shadow falls lower right."""
    sc, q = size / REF, lo / size
    shade = np.zeros((lo, lo), np.float32)
    for dx, dy, sigma, k in ((3.0, 4.0, 3.0, 0.10), (10.0, 13.0, 18.0, 0.28)):
        m = mat * q
        m[:, 2] += np.array([dx, dy]) * sc * rng.uniform(0.7, 1.3) * q
        shade += k * cv2.GaussianBlur(cv2.warpAffine(alpha, m, (lo, lo)), (0, 0), max(sigma * sc * q, 0.5))
    return 1.0 - shade


def compose(cv: Canvas, mat: NDArray[np.float64], size: int, rng: np.random.Generator) -> NDArray[np.uint8]:
    """Background and shadow, the screw warped into its bounding box, session lighting and sensor noise.

    Full-frame work stays in 8 bit (resize, blend, noise) because it is memory-bound.
    """
    lo = max(size // 4, 8)
    level = rng.uniform(190.0, 206.0)
    bg_lo = _background(rng, lo, level) * _shadow(cv.alpha, mat, lo, size, rng)
    img = cv2.resize(cv2.convertScaleAbs(bg_lo), (size, size), interpolation=cv2.INTER_LINEAR)
    for _ in range(int(rng.integers(15, 60))):  # dust specks
        x, y = (int(v) for v in rng.integers(0, size * 16, 2))
        rad = int(rng.uniform(0.6, 2.6) * size / REF * 16) + 8
        cv2.circle(img, (x, y), rad, round(level - rng.uniform(15, 55)), -1, cv2.LINE_AA, 4)
    h, w = cv.img.shape
    corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], np.float64) @ mat.T
    x0, y0 = np.maximum(np.floor(corners.min(0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(corners.max(0)).astype(int) + 1, size)
    m = mat.copy()
    m[:, 2] -= (x0, y0)
    roi = (
        int(x1 - x0),
        int(y1 - y0),
    )  # single-channel 8-bit warps are several times faster than float/2-channel
    fg = cv2.warpAffine(cv2.convertScaleAbs(cv.img), m, roi)
    a = cv2.warpAffine(cv2.convertScaleAbs(cv.alpha, alpha=255.0), m, roi).astype(np.float32) * np.float32(
        1 / 255
    )
    img[y0:y1, x0:x1] = cv2.blendLinear(fg, img[y0:y1, x0:x1], a, 1.0 - a)
    noise = cv2.LUT(
        random_bytes(rng, (size, size)),
        np.clip(np.round(noise_lut(rng.uniform(1.0, 1.6), 128.0)), 0, 255).astype(np.uint8),
    )
    return np.asarray(cv2.addWeighted(img, rng.uniform(0.93, 1.07), noise, 1.0, -128.0), np.uint8)
