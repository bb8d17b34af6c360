"""On-the-fly augmentation of the training split, applied to the cached output of ``Preprocessor.geometric``.

Order per image: background swap → flips → one affine warp (rotation, scale, shift) → background illumination → contrast →
brightness → noise → coarse dropout, all on uint8, then the daemon's own ``Preprocessor.normalise_into``. Working after the deterministic
part (pose crop → CLAHE → resize) is exact for flips, shifts by whole pixels, brightness, dropout and noise;
it is an approximation for rotation and scaling (CLAHE's tiles are axis-aligned, so CLAHE-then-rotate differs
slightly from rotate-then-CLAHE, and rotating the resized image interpolates twice). Those augmented images
are only ever training inputs; validation, test, calibration and serving never see them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import cv2
import numpy as np


@dataclass(frozen=True, slots=True)
class AugmentConfig:
    hflip: float = (
        0.5  # probability of a left-right mirror (with pose crops: head to the right — unrealistic)
    )
    vflip: float = 0.5  # probability of an up-down mirror (with pose crops: a mirror across the screw's axis)
    rotate_deg: float = 10.0  # uniform in ±rotate_deg; 180 = full circle (whole-frame mode only makes sense)
    scale: float = 0.0  # uniform zoom in 1 ± scale
    shift_x: float = 0.0  # uniform shift in ± shift_x × width (pose crops: along the axis — moves the ends)
    shift_y: float = 0.0  # uniform shift in ± shift_y × height
    brightness: float = 0.0  # uniform offset in ± brightness gray levels
    contrast: float = 0.0  # uniform gain in 1 ± contrast about the image mean
    dropout_p: float = 0.0  # probability of coarse dropout (1–3 rectangles filled with the image median)
    dropout_frac: float = 0.1  # rectangle side as a fraction of the image side
    noise_std: float = 0.0  # Gaussian pixel noise, gray levels
    background: float = 0.0  # ± gray levels of a random illumination plane added to the background only
    background_swap: float = 0.0  # probability of taking the background (and cast shadow) from another image

    def __post_init__(self) -> None:
        for name in ("hflip", "vflip", "dropout_p", "background_swap"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augment.{name} must be a probability in [0, 1], got {getattr(self, name)}")
        for name in (
            "rotate_deg",
            "scale",
            "shift_x",
            "shift_y",
            "brightness",
            "contrast",
            "noise_std",
            "background",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"augment.{name} must be ≥ 0, got {getattr(self, name)}")
        if self.rotate_deg > 180 or self.scale >= 1 or self.contrast >= 1 or not 0 < self.dropout_frac < 1:
            raise ValueError("augment: rotate_deg ≤ 180, scale < 1, contrast < 1 and 0 < dropout_frac < 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AugmentConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown augment option(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: float(v) for k, v in d.items()})


def augment(
    img: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator, donor: np.ndarray | None = None
) -> np.ndarray:
    """One random view of a (H, W) uint8 image; the input is not modified. ``donor``: another training image
    (same size, any class) whose background ``background_swap`` may take; without one the option does nothing."""
    out = img
    if donor is not None and cfg.background_swap and rng.random() < cfg.background_swap:
        out = swap_background(img, donor)
    if rng.random() < cfg.hflip:
        out = out[:, ::-1]
    if rng.random() < cfg.vflip:
        out = out[::-1, :]
    h, w = out.shape
    angle = rng.uniform(-cfg.rotate_deg, cfg.rotate_deg) if cfg.rotate_deg else 0.0
    zoom = rng.uniform(1 - cfg.scale, 1 + cfg.scale) if cfg.scale else 1.0
    tx = rng.uniform(-cfg.shift_x, cfg.shift_x) * w if cfg.shift_x else 0.0
    ty = rng.uniform(-cfg.shift_y, cfg.shift_y) * h if cfg.shift_y else 0.0
    out = np.ascontiguousarray(out)
    if angle or zoom != 1.0 or tx or ty:
        m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, zoom)
        m[:, 2] += np.array([tx, ty])
        # Replicate the border: the light background continues, no black corners for the model to learn.
        out = cv2.warpAffine(out, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if cfg.brightness or cfg.contrast or cfg.noise_std or cfg.background:
        f = out.astype(np.float32)
        if cfg.background:
            f += (1.0 - part_alpha(out)) * _plane(h, w, cfg.background, rng)
        if cfg.contrast:
            mean = float(f.mean())
            f = (f - mean) * rng.uniform(1 - cfg.contrast, 1 + cfg.contrast) + mean
        if cfg.brightness:
            f += rng.uniform(-cfg.brightness, cfg.brightness)
        if cfg.noise_std:
            f += rng.normal(0.0, cfg.noise_std, f.shape).astype(np.float32)
        out = np.clip(np.rint(f), 0, 255).astype(np.uint8)
    if cfg.dropout_p and rng.random() < cfg.dropout_p:
        out = out.copy() if out is img else out
        fill = int(np.median(out))
        for _ in range(int(rng.integers(1, 4))):
            rh, rw = max(1, int(h * cfg.dropout_frac)), max(1, int(w * cfg.dropout_frac))
            y, x = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
            out[y : y + rh, x : x + rw] = fill
    return out


def part_alpha(img: np.ndarray) -> np.ndarray:
    """Soft mask (float32, 1 on the part, 0 on the background) of a dark part on a light background: Otsu on a
    blurred copy, dilated, holes filled, feathered, so the part, its edge and its shadow stay as they were."""
    h, w = img.shape
    k = max(3, (min(h, w) // 24) | 1)
    blur = cv2.GaussianBlur(img, (5, 5), 0)
    _, mask = cv2.threshold(blur, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(mask, contours, -1, 255, thickness=cv2.FILLED)  # highlights on the metal are part too
    alpha: np.ndarray = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (k, k), 0)
    return alpha


def swap_background(img: np.ndarray, donor: np.ndarray) -> np.ndarray:
    """``img``'s part on ``donor``'s background. Pose-normalised crops put every part in the same place, so
    outside both silhouettes the donor shows plain background; where only the donor's part lies, ``img`` is kept.
    Decorrelates background, cast shadow and acquisition session from the label."""
    a = part_alpha(img)
    keep = np.maximum(a, part_alpha(donor))
    mixed = img.astype(np.float32) * keep + donor.astype(np.float32) * (1.0 - keep)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def _plane(h: int, w: int, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """a + b·x + c·y over the image, each coefficient uniform in ± amplitude (x, y in [-0.5, 0.5])."""
    a, b, c = rng.uniform(-amplitude, amplitude, 3)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    plane: np.ndarray = a + b * (x / max(w - 1, 1) - 0.5) + c * (y / max(h - 1, 1) - 0.5)
    return plane
