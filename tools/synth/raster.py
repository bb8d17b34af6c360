"""Small vectorised helpers of the renderer: lookup tables instead of long per-pixel expressions, and fast noise."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

F32 = NDArray[np.float32]
REF = 1024.0  # geometry is specified in pixels of a 1024² frame and scaled by size / REF


def centred_frac(t: F32) -> F32:
    """Signed distance of t to the nearest integer, in [-0.5, 0.5)."""
    out: F32 = (t - np.floor(t + 0.5)).astype(np.float32)
    return out


def noise_lut(sigma: float, offset: float = 0.0) -> F32:
    """Table from a uniform byte to a Gaussian sample (inverse normal CDF): cheap per-pixel noise via cv2.LUT."""
    p = (np.arange(256) + 0.5) / 256.0
    z = np.sqrt(-2.0 * np.log(np.minimum(p, 1 - p)))  # Abramowitz & Stegun 26.2.23, |error| < 5e-4
    q = z - (2.515517 + 0.802853 * z + 0.010328 * z * z) / (
        1 + 1.432788 * z + 0.189269 * z * z + 0.001308 * z**3
    )
    lut: F32 = (offset + np.sign(p - 0.5) * q * sigma).astype(np.float32)
    return lut


def random_bytes(rng: np.random.Generator, shape: tuple[int, int]) -> NDArray[np.uint8]:
    """Uniform random bytes, straight from the bit generator (4× faster than ``rng.integers``)."""
    n = shape[0] * shape[1]
    return rng.bit_generator.random_raw(n // 8 + 1).view(np.uint8)[:n].reshape(shape)


def lut(x: NDArray[np.floating[Any]], lo: float, hi: float, table: F32) -> F32:
    """``f(x)`` through a 256-entry table of f over [lo, hi]: a few memory passes instead of a long expression."""
    idx = cv2.convertScaleAbs(x, alpha=255.0 / (hi - lo), beta=-lo * 255.0 / (hi - lo))
    return np.asarray(cv2.LUT(idx, table), np.float32)
