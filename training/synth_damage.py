"""Synthetic damage on good pose crops: the negatives a feature network learns to tell from good screws.

Research code for issue 14 (a ResNet18 trained in-domain as the patch memory's feature extractor). Every kind
of damage is drawn where it can occur on a real screw, inside the part's silhouette
(``training.augment.part_alpha(uint8) > 0.5``), and returns the image and the pixels it changed:

- ``cutpaste``: a patch of the same part pasted elsewhere on it (CutPaste, Li et al. 2021): right texture,
  wrong place — a displaced crest, a doubled edge;
- ``scratch``: a thin dark or bright curved line, 1–2 px wide (what `scratch_head` / `scratch_neck` look like);
- ``crest``: one thread crest tip on the silhouette crushed (erased to background) or bent along the axis by a
  local warp (what `thread_side` / `thread_top` look like: a few pixels at the edge);
- ``blemish``: a Perlin-noise blob of changed brightness and texture (DRAEM, Zavrtanik et al. 2021).

Works on float images of any scale (e.g. the daemon's normalised crops): amplitudes are multiples of the
part's own grey-level spread. Deterministic for a given ``rng`` state.
"""

from __future__ import annotations

import cv2
import numpy as np

from training.augment import part_alpha

KINDS = ("cutpaste", "scratch", "crest", "blemish")
MIN_CHANGE = 0.05  # a pixel counts as damaged when it moved by more than this × the part's spread


def part_mask(pixels: np.ndarray) -> np.ndarray:
    """uint8 (H, W) crop → bool (H, W): where the part (with its edge and shadow margin) lies."""
    return np.asarray(part_alpha(pixels) > 0.5)


def damage(
    img: np.ndarray, part: np.ndarray, rng: np.random.Generator, kind: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """float (H, W) good crop, bool (H, W) part mask → (damaged float32 copy, bool damage mask ⊆ part).

    ``kind``: one of :data:`KINDS`, or None for a random one. The mask is never empty: a draw that changed too
    little (a scratch along a uniform edge, a paste onto its own twin) is redrawn."""
    if img.shape != part.shape or img.ndim != 2:
        raise ValueError(f"image {img.shape} and part mask {part.shape} must be the same 2-D shape")
    if part.sum() < 64:
        raise ValueError("the part mask covers fewer than 64 pixels: nothing to damage")
    src = np.asarray(img, np.float32)
    spread = float(src[part].std()) or 1.0
    for _ in range(20):
        k = kind if kind is not None else KINDS[int(rng.integers(len(KINDS)))]
        out = _DRAW[k](src, part, spread, rng)
        out = np.where(part, out, src).astype(np.float32)  # nothing outside the part changes
        mask = np.abs(out - src) > MIN_CHANGE * spread
        if mask.sum() >= 4:
            return out, mask
    # A last resort that always changes pixels: a short dark scratch through the part's centre.
    ys, xs = np.nonzero(part)
    c = len(ys) // 2
    out = src.copy()
    sel = (np.abs(np.arange(src.shape[0])[:, None] - ys[c]) <= 1) & (
        np.abs(np.arange(src.shape[1]) - xs[c]) <= 6
    )
    sel &= part
    out[sel] -= 2.0 * spread
    return out, sel


def _inside_point(part: np.ndarray, rng: np.random.Generator, margin: int = 0) -> tuple[int, int]:
    core = (
        part
        if margin <= 0
        else cv2.erode(part.astype(np.uint8), np.ones((2 * margin + 1,) * 2, np.uint8)) > 0
    )
    ys, xs = np.nonzero(core if core.any() else part)
    i = int(rng.integers(len(ys)))
    return int(ys[i]), int(xs[i])


def _cutpaste(src: np.ndarray, part: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    h, w = src.shape
    ph = int(rng.integers(6, min(33, h // 2)))
    pw = int(rng.integers(8, min(49, w // 2)))
    sy, sx = _inside_point(part, rng)
    dy, dx = _inside_point(part, rng)
    y0, x0 = np.clip(sy - ph // 2, 0, h - ph), np.clip(sx - pw // 2, 0, w - pw)
    y1, x1 = np.clip(dy - ph // 2, 0, h - ph), np.clip(dx - pw // 2, 0, w - pw)
    patch = src[y0 : y0 + ph, x0 : x0 + pw]
    if rng.random() < 0.5:  # a small rotation: the pasted crest leans the wrong way
        m = cv2.getRotationMatrix2D(((pw - 1) / 2, (ph - 1) / 2), float(rng.uniform(-30, 30)), 1.0)
        patch = cv2.warpAffine(patch, m, (pw, ph), borderMode=cv2.BORDER_REFLECT)
    patch = patch * float(rng.uniform(0.8, 1.2)) + float(rng.uniform(-0.3, 0.3)) * spread
    out = src.copy()
    out[y1 : y1 + ph, x1 : x1 + pw] = patch
    return out


def _scratch(src: np.ndarray, part: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    h, w = src.shape
    y, x = _inside_point(part, rng, margin=2)
    length = float(rng.uniform(8, 60))
    angle = float(rng.uniform(0, np.pi))
    bend = float(rng.uniform(-0.4, 0.4))
    t = np.linspace(-0.5, 0.5, 12)
    pts = np.stack([x + length * t * np.cos(angle + bend * t), y + length * t * np.sin(angle + bend * t)], 1)
    canvas = np.zeros((h, w), np.float32)
    shift = 4  # sub-pixel line positions
    cv2.polylines(
        canvas,
        [np.round(pts * (1 << shift)).astype(np.int32)],
        False,
        1.0,
        int(rng.integers(1, 3)),
        cv2.LINE_AA,
        shift,
    )
    canvas = cv2.GaussianBlur(canvas, (3, 3), 0.6)
    sign = -1.0 if rng.random() < 0.6 else 1.0
    return src + sign * float(rng.uniform(0.8, 2.0)) * spread * canvas


def _silhouette(src: np.ndarray, part: np.ndarray) -> np.ndarray:
    """The tight silhouette (no margin): Otsu on the part's grey levels inside the part mask, holes filled."""
    lo, hi = np.percentile(src, [1, 99])
    u8 = np.clip((src - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    _, dark = cv2.threshold(cv2.GaussianBlur(u8, (5, 5), 0), 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    dark = cv2.morphologyEx(dark, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    contours, _ = cv2.findContours(dark, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(dark, contours, -1, 255, thickness=cv2.FILLED)
    return (dark > 0) & part


def _crest(src: np.ndarray, part: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    sil = _silhouette(src, part)
    h, w = src.shape
    cols = np.nonzero(sil.any(0))[0]
    if len(cols) < 8:
        return _scratch(src, part, spread, rng)
    # Crest tips: columns where the silhouette's top (or bottom) edge reaches furthest out, locally.
    top = np.where(sil.any(0), sil.argmax(0), h)
    bottom = np.where(sil.any(0), h - 1 - sil[::-1].argmax(0), -1)
    upper = rng.random() < 0.5
    edge = top if upper else -bottom
    # A tip is the outermost point within ±15 px and stands ≥ 4 px out of the edge's median within ±30 px
    # (the flat shaft between crests is a local extreme too, but does not stand out).
    e = np.where(sil.any(0), edge, edge[cols].max()).astype(np.float64)
    near = np.lib.stride_tricks.sliding_window_view(np.pad(e, 15, mode="edge"), 31).min(1)
    wide = np.median(np.lib.stride_tricks.sliding_window_view(np.pad(e, 30, mode="edge"), 61), 1)
    tips = cols[(e[cols] == near[cols]) & (e[cols] <= wide[cols] - 4)]
    x = int(tips[rng.integers(len(tips))]) if len(tips) else int(cols[rng.integers(len(cols))])
    y = int(top[x] if upper else bottom[x])
    r = float(rng.uniform(3, 9))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    fall = np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * r * r)).astype(np.float32)
    if rng.random() < 0.5:
        # Crushed: the tip's metal becomes background (the grey level just outside the silhouette).
        ring = (cv2.dilate(sil.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0) & ~sil
        near = ring & (np.abs(yy - y) < 3 * r + 6) & (np.abs(xx - x) < 3 * r + 6)
        bg = float(np.median(src[near])) if near.any() else float(np.percentile(src, 90))
        depth = float(rng.uniform(2, 2 * r))  # how far into the crest it is crushed
        inward = (yy - y) if upper else (y - yy)
        cut = sil & (inward < depth) & (np.abs(xx - x) < r * float(rng.uniform(0.8, 1.6)))
        # … with the dark rim that outlines it (the tight silhouette stops just inside the rim).
        cut = (cv2.dilate(cut.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0) & part
        alpha = cv2.GaussianBlur(cut.astype(np.float32), (3, 3), 0.7)
        return src * (1 - alpha) + bg * alpha
    # Bent: the tip pushed along the axis (towards head or tip), strongest at the edge.
    amount = float(rng.choice([-1, 1]) * rng.uniform(2, 2 * r))
    map_x = xx - amount * fall
    return cv2.remap(src, map_x, yy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def perlin(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin noise in about [-1, 1], ``res`` lattice cells per side."""
    h, w = shape
    gy, gx = res
    angles = rng.uniform(0, 2 * np.pi, (gy + 1, gx + 1))
    grad = np.stack([np.cos(angles), np.sin(angles)], -1)
    y = np.linspace(0, gy, h, endpoint=False)
    x = np.linspace(0, gx, w, endpoint=False)
    yi, xi = y.astype(int), x.astype(int)
    fy, fx = (y - yi)[:, None], (x - xi)[None, :]

    def dot(dy: int, dx: int) -> np.ndarray:
        g = grad[yi[:, None] + dy, xi[None, :] + dx]
        return np.asarray(g[..., 0] * (fx - dx) + g[..., 1] * (fy - dy))

    def fade(t: np.ndarray) -> np.ndarray:
        return np.asarray(6 * t**5 - 15 * t**4 + 10 * t**3)

    u, v = fade(fx), fade(fy)
    top = dot(0, 0) * (1 - u) + dot(0, 1) * u
    bottom = dot(1, 0) * (1 - u) + dot(1, 1) * u
    return np.asarray((top * (1 - v) + bottom * v) * np.sqrt(2), np.float32)


def _blemish(src: np.ndarray, part: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    h, w = src.shape
    # A small window (not the whole crop): a blemish is local.
    bh, bw = int(rng.integers(12, min(49, h))), int(rng.integers(12, min(81, w)))
    cy, cx = _inside_point(part, rng)
    y0, x0 = int(np.clip(cy - bh // 2, 0, h - bh)), int(np.clip(cx - bw // 2, 0, w - bw))
    scale = int(rng.integers(2, 5))
    noise = perlin((bh, bw), (scale, scale), rng)
    blob = noise > float(rng.uniform(0.1, 0.4))
    texture = perlin((bh, bw), (scale * 3, scale * 3), rng)
    change = float(rng.choice([-1, 1]) * rng.uniform(0.6, 1.5)) * spread + 0.5 * spread * texture
    alpha = cv2.GaussianBlur(blob.astype(np.float32), (5, 5), 1.0)
    out = src.copy()
    out[y0 : y0 + bh, x0 : x0 + bw] += alpha * change
    return out


_DRAW = {"cutpaste": _cutpaste, "scratch": _scratch, "crest": _crest, "blemish": _blemish}
