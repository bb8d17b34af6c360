"""Procedurally rendered synthetic screws, so tests and demos never need the licensed real photos.

The scene copies screws-300 in style, not photo-realism: a 1024² 8-bit grayscale top view of a silver countersunk
wood screw (conical head with a drive recess, smooth neck, right-hand thread to a pointed tip) on a light mottled
background with a soft cast shadow, at any rotation and position, with sensor noise and per-session lighting.

How it is drawn, and why this way:
- The screw is shaded in its own "canonical" frame (u along the axis from the head face to the tip, y across, in
  pixels), where the silhouette is a radius profile r(u) and the thread is a helix seen from above. There every
  step is a vectorised numpy expression on a small canvas; two 8-bit ``cv2.warpAffine`` calls then place it.
  That keeps a 1024² image under ~50 ms on one core.
- The screw lies on its head rim and thread crests, so its axis is tilted a few degrees: the head's top face shows
  as a thin ellipse and each thread crest as an arc bulging towards the tip, as in the real photos.
- OK parts vary in everything a line varies in (length ±2 %, thread phase, tilt, lighting, position, rotation,
  noise, shadow), and lighting is drawn independently of the class, so no global statistic gives the label away.
- Defects copy the five real types and are local (a few hundred to a few thousand pixels), except
  ``manipulated_front``, which is geometric: the front is cut 8–15 % short (a length gauge must catch it) and
  often bent a few degrees.

Randomness comes only from ``np.random.SeedSequence(seed)``, split into three generators (part, defect, scene), and
no global RNG state is touched: the same seed gives the same image (with the same numpy and OpenCV versions), and
``render_screw(s, defect)`` shows the same part in the same pose and light as ``render_screw(s)``: its OK twin,
which differs only by the defect (handy for tests and for checking what a model attends to).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

DEFECT_TYPES: tuple[str, ...] = (
    "manipulated_front",
    "scratch_head",
    "scratch_neck",
    "thread_side",
    "thread_top",
)

F32 = NDArray[np.float32]
BBox = tuple[float, float, float, float]  # u0, y0, u1, y1 in canonical pixels
_REF = 1024.0  # geometry is specified in pixels of a 1024² frame and scaled by size / _REF
_PNG = [cv2.IMWRITE_PNG_COMPRESSION, 3]  # explicit, so PNG bytes do not depend on OpenCV's default
_CSV_FIELDS = ("file", "label", "defect_type", "seed")


@dataclass(frozen=True)
class _Geom:
    """Screw shape in canonical pixels (u: 0 at the head face → tip; y: across, down positive)."""

    sc: float  # size / 1024
    length: float  # nominal length, head face to tip
    cut: float  # drawn length (shorter than ``length`` only for manipulated_front)
    head_r: float
    face_a: float  # half-width of the head's top-face ellipse along the axis (from the tilt)
    cone_end: float
    neck_r: float
    thread_start: float
    root0: float  # thread root radius where the thread starts …
    root1: float  # … and where the tip cone begins
    tip_len: float
    crest_h: float
    pitch: float
    phase: float  # thread phase in [0, 1): how far the screw is turned about its own axis
    bulge: float  # how far the crest arcs bulge towards the tip (axis tilt)
    fin_half: float  # half thickness of a thread fin at its root
    lean: float  # fin lean at the silhouette (du per pixel of height)


def _geometry(rng: np.random.Generator, sc: float) -> _Geom:
    """Draw the part-to-part and pose variation of an OK screw (dimensions measured on screws-300)."""
    length = 921.0 * sc * (1.0 + rng.uniform(-0.018, 0.018))
    head_r = 139.0 * sc * (1.0 + rng.uniform(-0.015, 0.015))
    neck_r = 53.0 * sc * (1.0 + rng.uniform(-0.02, 0.02))
    return _Geom(
        sc=sc,
        length=length,
        cut=length,
        head_r=head_r,
        face_a=max(head_r * math.sin(math.radians(rng.uniform(6.0, 17.0))), 1.5),
        cone_end=165.0 * sc,
        neck_r=neck_r,
        thread_start=length * rng.uniform(0.445, 0.465),
        root0=neck_r * 0.94,
        root1=neck_r * 0.88,
        tip_len=118.0 * sc,
        crest_h=33.0 * sc * (1.0 + rng.uniform(-0.06, 0.06)),
        pitch=62.0 * sc * (1.0 + rng.uniform(-0.02, 0.02)),
        phase=float(rng.uniform(0.0, 1.0)),
        bulge=rng.uniform(3.0, 8.0) * sc,
        fin_half=max(12.0 * sc, 0.8),
        lean=float(rng.uniform(-0.25, 0.05)),
    )


def _profiles(g: _Geom, u: F32) -> tuple[F32, F32, F32]:
    """Silhouette radius without fins, the radius used for shading, and thread-fin height, as functions of u."""
    rim = 10.0 * g.sc
    t_cone = np.clip((u - g.face_a - rim) / (g.cone_end - g.face_a - rim), 0.0, 1.0)
    r = g.neck_r + (g.head_r - g.neck_r) * (1.0 - t_cone) ** 1.4  # concave countersink, as measured
    face = np.sqrt(np.clip(1.0 - ((g.face_a - u) / g.face_a) ** 2, 0.0, 1.0)) * g.head_r
    r = np.where(u < g.face_a, face, r)
    tip_start = g.length - g.tip_len
    root = g.root0 + (g.root1 - g.root0) * np.clip(
        (u - g.thread_start) / (tip_start - g.thread_start), 0.0, 1.0
    )
    root = np.where(u > tip_start, g.root1 * np.clip((g.length - u) / g.tip_len, 0.0, 1.0) ** 0.9, root)
    r = np.where(u >= g.thread_start, np.maximum(root, 1.2 * g.sc), r)
    fin = g.crest_h * np.clip((u - g.thread_start) / (0.6 * g.pitch), 0.0, 1.0)
    fin *= np.minimum(1.0, 0.25 + np.clip((g.length - u) / g.tip_len, 0.0, 1.0) ** 0.6) * (
        u <= g.length - 4 * g.sc
    )
    if g.cut < g.length:  # a cut front: blunt, rounded end and no crests right at the cut
        blunt = 14.0 * g.sc
        r = np.where(
            u > g.cut - blunt, r * np.sqrt(np.clip(1.0 - ((u - g.cut + blunt) / blunt) ** 2, 0.0, 1.0)), r
        )
        fin *= np.clip((g.cut - u) / (0.4 * g.pitch), 0.0, 1.0)
    r = np.where((u < 0) | (u > g.cut), 0.0, r)
    fin = np.where(u > g.cut, 0.0, fin)
    shade_r = np.maximum(np.where(u < g.face_a, g.head_r, r), 1.0)
    return r.astype(np.float32), shade_r.astype(np.float32), fin.astype(np.float32)


def _centred_frac(t: F32) -> F32:
    """Signed distance of t to the nearest integer, in [-0.5, 0.5)."""
    return (t - np.floor(t + 0.5)).astype(np.float32)


def _noise_lut(sigma: float, offset: float = 0.0) -> F32:
    """Table from a uniform byte to a Gaussian sample (inverse normal CDF): cheap per-pixel noise via cv2.LUT."""
    p = (np.arange(256) + 0.5) / 256.0
    z = np.sqrt(-2.0 * np.log(np.minimum(p, 1 - p)))  # Abramowitz & Stegun 26.2.23, |error| < 5e-4
    q = z - (2.515517 + 0.802853 * z + 0.010328 * z * z) / (
        1 + 1.432788 * z + 0.189269 * z * z + 0.001308 * z**3
    )
    return (offset + np.sign(p - 0.5) * q * sigma).astype(np.float32)


def _bytes(rng: np.random.Generator, shape: tuple[int, int]) -> NDArray[np.uint8]:
    """Uniform random bytes, straight from the bit generator (4× faster than ``rng.integers``)."""
    n = shape[0] * shape[1]
    return rng.bit_generator.random_raw(n // 8 + 1).view(np.uint8)[:n].reshape(shape)


def _lut(x: NDArray[np.floating[Any]], lo: float, hi: float, table: F32) -> F32:
    """``f(x)`` through a 256-entry table of f over [lo, hi]: a few memory passes instead of a long expression."""
    idx = cv2.convertScaleAbs(x, alpha=255.0 / (hi - lo), beta=-lo * 255.0 / (hi - lo))
    return np.asarray(cv2.LUT(idx, table), np.float32)


# ----------------------------------------------------------------------------------------------------- the part
@dataclass
class _Canvas:
    """The screw drawn in its canonical frame: intensity, coverage and the coordinates that go with them."""

    img: F32
    alpha: F32
    u: F32  # (W,) axial coordinate of each column
    y: F32  # (H,) cross coordinate of each row
    r: F32  # (W,) silhouette radius without fins
    margin: float
    sc: float

    def rows(self, y: float) -> float:
        return y + (self.img.shape[0] - 1) / 2.0

    def cols(self, u: float) -> float:
        return u + self.margin


def _draw_screw(
    g: _Geom, rng: np.random.Generator, side_damage: tuple[int, int, float, float] | None
) -> _Canvas:
    """Shade the screw; ``side_damage`` = (side ±1, crest index, crush factor, bend) crushes one crest."""
    sc = g.sc
    m = math.ceil(8 * sc) + 2
    w, h = math.ceil(g.length + 2 * m), 2 * math.ceil(g.head_r + m)
    u = np.arange(w, dtype=np.float32) - np.float32(m)
    y = np.arange(h, dtype=np.float32) - np.float32((h - 1) / 2.0)
    r, shade_r, fin = _profiles(g, u)
    # Base tone along the axis: a lit rim band behind the face, a darker countersink with a shadowed collar where
    # it meets the neck, and a bright fillet ring just after it.
    cone = (u > g.face_a) & (u < g.cone_end + 6 * sc)
    tone = 76.0 - cone * (6.0 + 14.0 * np.clip((g.cone_end - u) / g.cone_end, 0, 1))
    tone += 22.0 * np.exp(-(((u - g.face_a - 5 * sc) / (5.0 * sc + 0.5)) ** 2))
    tone -= 16.0 * np.exp(-(((u - g.cone_end + 14 * sc) / (9.0 * sc + 0.5)) ** 2))
    tone += 12.0 * np.exp(-(((u - g.cone_end - 2 * sc) / (5.0 * sc + 0.5)) ** 2))
    # A polished cylinder: bright middle, dark edges and a specular stripe. Shade only where the part can be:
    # the whole head block, and rows within the thread's reach along the shaft.
    img = np.full((h, w), 70.0, np.float32)
    alpha = np.zeros((h, w), np.float32)
    n = np.linspace(-1.0, 1.0, 256, dtype=np.float32)
    spec_n, spec = rng.uniform(-0.45, 0.45), rng.uniform(38.0, 60.0)
    metal = 36.0 * np.sqrt(1.0 - n * n) + spec * np.exp(-(((n - spec_n) / 0.18) ** 2)) - 35.0 * n**8
    metal = metal.astype(np.float32)
    ch = int(np.searchsorted(u, g.cone_end + 8 * sc))
    r0, r1 = (int(v) for v in np.searchsorted(y, [-(g.root0 + g.crest_h + 3), g.root0 + g.crest_h + 3]))
    for rows, cols in ((slice(0, h), slice(0, ch)), (slice(r0, r1), slice(ch, w))):
        yy = y[rows, None]
        alpha[rows, cols] = np.clip(r[cols] - np.abs(yy) + 0.5, 0.0, 1.0)
        img[rows, cols] = _lut(yy / shade_r[cols], -1.0, 1.0, metal) + tone[cols]
    _draw_face(img, g, u, y, rng)
    _draw_thread(img, alpha, g, u, y, r, fin, side_damage)
    _add_texture(img, rng, sc)
    return _Canvas(img, alpha, u, y, r, float(m), sc)


def _draw_face(img: F32, g: _Geom, u: F32, y: F32, rng: np.random.Generator) -> None:
    """The head's top face: a thin ellipse with a dark rim and a Torx or Phillips recess with bright facets."""
    c1 = int(np.searchsorted(u, 2.0 * g.face_a + 1.0)) + 1
    pu = (u[None, :c1] - g.face_a) / g.face_a
    py = y[:, None] / g.head_r
    rho = np.sqrt(pu * pu + py * py)
    shade = 104.0 + 10.0 * py + rng.uniform(-6, 6)
    shade = (
        shade - 26.0 * np.exp(-(((rho - 0.97) / 0.035) ** 2)) + 12.0 * np.exp(-(((rho - 0.88) / 0.04) ** 2))
    )
    theta = np.arctan2(py, pu) - rng.uniform(0, np.pi)
    if rng.random() < 0.6:  # Torx: six rounded lobes
        recess = rho < 0.30 * (1.0 + 0.28 * np.cos(6.0 * theta))
    else:  # Phillips: a cross
        along, across = np.abs(np.cos(theta) * rho), np.abs(np.sin(theta) * rho)
        recess = (rho < 0.3) & ((along < 0.08) | (across < 0.08) | (rho < 0.12))
    facets = 48.0 + 110.0 * np.clip(np.cos(3.0 * theta + rng.uniform(0, np.pi)), 0, 1) ** 6
    shade = np.where(recess, facets, shade)
    img[:, :c1] = np.where(rho < 1.0, shade, img[:, :c1])


def _draw_thread(
    img: F32,
    alpha: F32,
    g: _Geom,
    u: F32,
    y: F32,
    r: F32,
    fin: F32,
    side_damage: tuple[int, int, float, float] | None,
) -> None:
    """Thread crests: discs seen slightly from above, so each front edge is an arc bulging towards the tip.

    The helix puts a crest a quarter pitch earlier at the top edge than at the bottom one (right-hand thread);
    beyond the root radius only the fins cover, which is what makes the saw-tooth silhouette.
    """
    thr = fin > 0
    if not thr.any():
        return
    s = max(g.sc, 0.35)  # widths of the shading bands, kept above a pixel at small sizes
    c0, c1 = int(np.argmax(thr)), int(len(thr) - np.argmax(thr[::-1]))
    r0, r1 = (int(v) for v in np.searchsorted(y, [-(g.root0 + g.crest_h + 2), g.root0 + g.crest_h + 2]))
    ys, root = y[r0:r1, None], r[None, c0:c1]
    height = np.broadcast_to(fin[None, c0:c1], (r1 - r0, c1 - c0))
    e = np.abs(ys) - root  # > 0 outside the root
    base = u[None, c0:c1] - g.thread_start - g.phase * g.pitch
    nc = np.clip(ys / root, -1.0, 1.0)
    bow = np.sqrt(1.0 - nc * nc)
    t = (base - g.pitch * np.arcsin(nc) / (2 * np.pi) - g.bulge * bow - g.lean * np.maximum(e, 0.0)) / g.pitch
    if side_damage is not None:  # one crest at the silhouette: crushed to a stub and bent over
        side, k, crush, bent = side_damage
        hit = (np.sign(ys) == side) & (np.floor(t + 0.5) == k) & (e > -0.3 * g.root0)
        height = np.where(hit, height * crush, height)
        t = np.where(hit, t - bent * np.maximum(e, 0.0) / g.pitch, t)
    dd = _centred_frac(t) * g.pitch
    q = np.linspace(-0.5, 0.5, 256, dtype=np.float32) * g.pitch
    profile = (
        40.0 * np.exp(-(((q + 2.0 * s) / (2.5 * s)) ** 2))  # lit crest edge
        - 62.0 * np.exp(-(((q - 8.0 * s) / (7.5 * s)) ** 2))  # shadowed flank towards the tip
        - 15.0 * np.exp(-(((q + 12.0 * s) / (5.0 * s)) ** 2))  # groove before the crest
    ).astype(np.float32)
    face = (height / g.crest_h) * _lut(dd, -0.5 * g.pitch, 0.5 * g.pitch, profile)
    ring = min(int(12 * s) + 2, c1 - c0)  # a shallow shoulder ring where the thread starts
    shoulder = (base + g.phase * g.pitch - g.bulge * bow)[:, :ring]
    face[:, :ring] -= 22.0 * np.exp(-((shoulder / (2.5 * s)) ** 2))
    rel = np.clip(e / np.maximum(height, 1e-3), 0.0, 1.0)
    taper = (g.fin_half * (1.0 - np.linspace(0.0, 1.0, 256)) ** 0.6).astype(np.float32)
    half = np.where(e < height, _lut(rel, 0.0, 1.0, taper), -1.0)
    a_fin = np.clip(half - np.abs(dd) + 0.5, 0.0, 1.0) * (height > 0)
    fin_img = 68.0 + 40.0 * (1.0 - rel) - 18.0 * (dd > 0)
    sub = img[r0:r1, c0:c1]
    img[r0:r1, c0:c1] = np.where(e > 0.5, np.where(a_fin > 0, fin_img, sub), sub + face)
    alpha[r0:r1, c0:c1] = np.maximum(alpha[r0:r1, c0:c1], a_fin)


def _add_texture(img: F32, rng: np.random.Generator, sc: float) -> None:
    """Machining streaks along the axis, mottling, grain and dark pits, so the metal is not a clean gradient."""
    h, w = img.shape
    lw = max(w // 24, 2)
    low = 2.5 * cv2.resize(rng.standard_normal((h // 2, lw), dtype=np.float32), (lw, h))
    low += 3.0 * cv2.resize(
        rng.standard_normal((max(h // 14, 2), max(w // 14, 2)), dtype=np.float32), (lw, h)
    )
    img += cv2.resize(low, (w, h), interpolation=cv2.INTER_LINEAR)
    grain = cv2.LUT(_bytes(rng, (h, w)), _noise_lut(8.0))
    k = int(1500 * sc * sc) + 5
    grain[rng.integers(0, h, k), rng.integers(0, w, k)] = rng.uniform(-90.0, -30.0, k).astype(np.float32)
    img += cv2.GaussianBlur(grain, (0, 0), max(0.8 * sc, 0.5))


# ------------------------------------------------------------------------------------------------------ defects
def _polygon(
    rng: np.random.Generator, cu: float, cy: float, ru: float, ry: float, k: int = 6
) -> NDArray[np.float64]:
    """A random, roughly convex polygon around (cu, cy) with radii ru, ry."""
    ang = np.sort(rng.uniform(0, 2 * np.pi, k))
    rad = rng.uniform(0.55, 1.0, k)
    return np.stack([cu + ru * rad * np.cos(ang), cy + ry * rad * np.sin(ang)], axis=1)


def _facet(
    cv: _Canvas,
    pts: NDArray[np.float64],
    rng: np.random.Generator,
    level: float,
    depth: float = 0.0,
    burr: bool = False,
) -> BBox:
    """A flat ground facet (bright, blotchy metal with faint grinding lines) where a chip or dent removed material.

    One side gets a dark edge (the step down into the chip). With ``depth`` > 0 the part of the polygon within
    ``depth`` of the silhouette is removed: a chip out of the rim. With ``burr`` the polygon also adds material
    beyond the silhouette: torn metal sticking out.
    """
    h, w = cv.img.shape
    px = np.stack([cv.cols(0) + pts[:, 0], cv.rows(0) + pts[:, 1]], axis=1)
    x0, y0 = np.maximum(np.floor(px.min(0)).astype(int) - 3, 0)
    x1, y1 = np.minimum(np.ceil(px.max(0)).astype(int) + 4, (w, h))
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(mask, [np.round((px - (x0, y0)) * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    mk = mask.astype(np.float32) / 255.0
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    phi = rng.uniform(0, np.pi)
    along = (xx * math.cos(phi) + yy * math.sin(phi)) / max(1.0, float(np.ptp(px[:, 0])))
    lines = 4.0 * np.sin((-xx * math.sin(phi) + yy * math.cos(phi)) * rng.uniform(0.6, 1.2) / max(cv.sc, 0.3))
    blotch = rng.standard_normal(((y1 - y0) // 5 + 2, (x1 - x0) // 5 + 2), dtype=np.float32)
    blotch = np.asarray(cv2.resize(blotch, (x1 - x0, y1 - y0), interpolation=cv2.INTER_CUBIC), np.float32)
    facet = level + 25.0 * (along - along.mean()) + lines + 12.0 * blotch
    edge = np.clip(mk - np.roll(mk, (2, 2), axis=(0, 1)), 0.0, 1.0)
    cv.img[y0:y1, x0:x1] = cv.img[y0:y1, x0:x1] * (1 - mk) + facet * mk - 55.0 * edge
    if depth > 0:
        outer = np.abs(cv.y[y0:y1, None]) > cv.r[None, x0:x1] - depth
        cv.alpha[y0:y1, x0:x1] *= 1.0 - mk * outer
    if burr:
        np.maximum(cv.alpha[y0:y1, x0:x1], mk, out=cv.alpha[y0:y1, x0:x1])
    return (x0 - cv.cols(0), y0 - cv.rows(0), x1 - cv.cols(0), y1 - cv.rows(0))


def _scratch(
    cv: _Canvas, rng: np.random.Generator, cu: float, cy: float, length: float, width: float
) -> BBox:
    """A thin scratch: a slightly curved bright groove with a dark shadow line beside it."""
    h, w = cv.img.shape
    ang = rng.uniform(0, np.pi)
    t = np.linspace(-0.5, 0.5, 12)
    bow = (1 - 4 * t * t) * rng.uniform(-0.15, 0.15) * length
    pu = cu + t * length * math.cos(ang) - bow * math.sin(ang)
    py = cy + t * length * math.sin(ang) + bow * math.cos(ang)
    pts = np.stack([cv.cols(0) + pu, cv.rows(0) + py], axis=1)
    off = np.array([-math.sin(ang), math.cos(ang)]) * max(width, 1.0)
    thick = max(round(width), 1)
    lit, dark = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
    cv2.polylines(lit, [np.round(pts * 16).astype(np.int32)], False, 255, thick, cv2.LINE_AA, shift=4)
    cv2.polylines(
        dark, [np.round((pts + off) * 16).astype(np.int32)], False, 255, thick, cv2.LINE_AA, shift=4
    )
    gain = rng.uniform(50.0, 85.0) / 255.0
    cv.img += gain * lit - 0.6 * gain * dark
    lo, hi = pts.min(0) - width - 2, pts.max(0) + width + 2
    return (lo[0] - cv.cols(0), lo[1] - cv.rows(0), hi[0] - cv.cols(0), hi[1] - cv.rows(0))


def _union(a: BBox, b: BBox) -> BBox:
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def _scratch_head(cv: _Canvas, g: _Geom, rng: np.random.Generator) -> BBox:
    """A chip on the head: a ground facet on the top face or countersink, or a piece out of the rim; often a scratch."""
    sc = g.sc
    side = float(rng.choice([-1.0, 1.0]))
    where = rng.choice(["face", "cone", "rim"] if g.face_a > 14 * sc else ["cone", "rim"])
    if where == "face":
        pts = _polygon(
            rng, g.face_a, side * rng.uniform(0.05, 0.6) * g.head_r, 0.9 * g.face_a, rng.uniform(28, 50) * sc
        )
        box = _facet(cv, pts, rng, rng.uniform(165, 205))
    elif where == "cone":
        cu, cy = (
            rng.uniform(g.face_a + 25 * sc, g.cone_end - 40 * sc),
            side * rng.uniform(0.0, 0.45) * g.head_r,
        )
        box = _facet(
            cv,
            _polygon(rng, cu, cy, rng.uniform(18, 34) * sc, rng.uniform(22, 42) * sc),
            rng,
            rng.uniform(150, 200),
        )
    else:
        cu = rng.uniform(g.face_a + 5 * sc, g.face_a + 50 * sc)
        ru, ry = rng.uniform(15, 30) * sc, rng.uniform(18, 32) * sc
        box = _facet(
            cv,
            _polygon(rng, cu, side * (g.head_r - 0.5 * ry), ru, ry),
            rng,
            rng.uniform(150, 200),
            depth=rng.uniform(0.2, 0.45) * ry,
        )
    if rng.random() < 0.6:
        cu = rng.uniform(g.face_a, g.cone_end - 30 * sc)
        box = _union(
            box,
            _scratch(
                cv, rng, cu, (box[1] + box[3]) / 2, rng.uniform(30, 70) * sc, rng.uniform(1.5, 3.0) * sc
            ),
        )
    return box


def _scratch_neck(cv: _Canvas, g: _Geom, rng: np.random.Generator) -> BBox:
    """A ground dent (bright facet), a long scratch, or a dark dent with a lit rim, on the smooth neck."""
    sc = g.sc
    cu = rng.uniform(g.cone_end + 35 * sc, g.thread_start - 35 * sc)
    cy = rng.uniform(-0.5, 0.5) * g.neck_r
    kind = rng.random()
    if kind < 0.5:
        pts = _polygon(rng, cu, cy, rng.uniform(20, 38) * sc, rng.uniform(18, 34) * sc)
        return _facet(cv, pts, rng, rng.uniform(140, 200))
    if kind < 0.82:
        return _scratch(cv, rng, cu, cy, rng.uniform(60, 140) * sc, rng.uniform(2.0, 4.0) * sc)
    ru, ry = rng.uniform(10, 20) * sc, rng.uniform(8, 16) * sc
    mask = np.zeros(cv.img.shape, np.uint8)
    centre = (round(cv.cols(cu) * 16), round(cv.rows(cy) * 16))
    cv2.ellipse(
        mask, centre, (int(ru * 16), int(ry * 16)), rng.uniform(0, 180), 0, 360, 255, -1, cv2.LINE_AA, 4
    )
    mk = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), max(1.5 * sc, 0.5))
    lit = np.clip(mk - np.roll(mk, -max(int(3 * sc), 1), axis=0), 0, 1)
    cv.img += -rng.uniform(35, 55) * mk + 60.0 * lit
    return (cu - ru - 3, cy - ry - 3, cu + ru + 3, cy + ry + 3)


def _thread_top(cv: _Canvas, g: _Geom, rng: np.random.Generator) -> BBox:
    """Crests flattened on the visible top of the thread, mostly towards the tip: bright ground metal, torn edge."""
    lo, hi = g.thread_start + 1.2 * g.pitch, g.length - 0.6 * g.tip_len
    cu = lo + (hi - lo) * math.sqrt(rng.uniform())  # density rises towards the tip
    root = g.root0 + (g.root1 - g.root0) * min(
        (cu - g.thread_start) / (g.length - g.tip_len - g.thread_start), 1.0
    )
    cy = rng.uniform(-0.35, 0.35) * root
    ru, ry = rng.uniform(0.35, 0.6) * g.pitch, rng.uniform(0.35, 0.6) * root
    box = _facet(cv, _polygon(rng, cu, cy, ru, ry, 9), rng, rng.uniform(135, 195))
    if rng.random() < 0.5:
        box = _union(
            box,
            _scratch(
                cv,
                rng,
                cu + rng.uniform(-ru, ru),
                cy,
                rng.uniform(15, 30) * g.sc,
                rng.uniform(1.5, 2.5) * g.sc,
            ),
        )
    return box


def _side_damage(g: _Geom, rng: np.random.Generator) -> tuple[tuple[int, int, float, float], BBox]:
    """Pick one full crest at the silhouette to crush and bend (drawn by ``_draw_thread``) and its box."""
    first = math.ceil(1.0 - g.phase)
    last = int((g.length - g.tip_len - g.thread_start) / g.pitch - g.phase)
    k = int(rng.integers(first, max(last, first) + 1))
    side = int(rng.choice([-1, 1]))
    dmg = (side, k, float(rng.uniform(0.15, 0.7)), float(rng.uniform(0.5, 1.1) * rng.choice([-1.0, 1.0])))
    uc = g.thread_start + (k + g.phase) * g.pitch + side * g.pitch / 4.0
    r_in, r_out = 0.5 * g.root1, g.root0 + g.crest_h + 3
    y0, y1 = (-r_out, -r_in) if side < 0 else (r_in, r_out)
    return dmg, (uc - 0.6 * g.pitch, y0, uc + 0.6 * g.pitch, y1)


def _crushed_crest(cv: _Canvas, g: _Geom, rng: np.random.Generator, box: BBox) -> None:
    """Torn, bright metal where the crushed crest meets the root, partly sticking out past the silhouette."""
    u0, y0, u1, _ = box
    side = -1.0 if y0 < 0 else 1.0
    cu = (u0 + u1) / 2 + rng.uniform(-0.1, 0.1) * g.pitch
    root = float(cv.r[round(cv.cols(cu))])
    cy = side * (root + rng.uniform(0.0, 0.3) * g.crest_h)
    pts = _polygon(rng, cu, cy, rng.uniform(0.2, 0.32) * g.pitch, rng.uniform(0.3, 0.5) * g.crest_h, 8)
    _facet(cv, pts, rng, rng.uniform(130, 190), burr=True)


def _mash_end(cv: _Canvas, g: _Geom, rng: np.random.Generator) -> BBox:
    """Make the cut end ragged and crushed: a jagged outline and blotchy, partly bright metal."""
    sc = g.sc
    h, w = cv.img.shape
    c0 = max(int(cv.cols(g.cut - 40 * sc)), 0)
    size = (w - c0, h)
    jag = cv2.resize(rng.uniform(0, 1, (h // 6 + 2, size[0] // 6 + 2)).astype(np.float32), size)
    to_end = (g.cut - cv.u[None, c0:]) / (12.0 * sc)  # 0 at the cut, 1 twelve pixels back
    cv.alpha[:, c0:] *= np.clip((to_end - 0.9 * jag) * 4.0 * sc + 0.5, 0.0, 1.0)
    blot = cv2.resize(
        rng.standard_normal((h // 8 + 2, size[0] // 8 + 2)).astype(np.float32),
        size,
        interpolation=cv2.INTER_CUBIC,
    )
    cv.img[:, c0:] += np.clip(1.0 - to_end / 3.0, 0.0, 1.0) * (30.0 * blot + 15.0)
    return (g.cut - 45 * sc, -g.root1 - g.crest_h, g.cut + 2, g.root1 + g.crest_h)


def _bend(cv: _Canvas, g: _Geom, pivot: float, angle: float) -> None:
    """Bend the front beyond ``pivot`` by ``angle``, smoothly over a short zone as a real bent shank does."""
    h, w = cv.img.shape
    zone = 20.0 * g.sc
    uu = np.broadcast_to(cv.u[None, :], (h, w))
    yy = np.broadcast_to(cv.y[:, None], (h, w))
    du = np.maximum(uu - pivot, 0.0)
    ramp = np.clip(du / zone, 0.0, 1.0)
    a = -angle * ramp * ramp * (3 - 2 * ramp)
    src_u = (pivot + du * np.cos(a) - yy * np.sin(a)).astype(np.float32)
    src_y = (du * np.sin(a) + yy * np.cos(a)).astype(np.float32)
    src_u = np.where(uu > pivot, src_u, uu) + np.float32(cv.cols(0))
    src_y = np.where(uu > pivot, src_y, yy) + np.float32(cv.rows(0))
    cv.img = np.asarray(
        cv2.remap(cv.img, src_u, src_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE), np.float32
    )
    cv.alpha = np.asarray(cv2.remap(cv.alpha, src_u, src_y, cv2.INTER_LINEAR, borderValue=0.0), np.float32)


# -------------------------------------------------------------------------------------------------------- scene
def _background(rng: np.random.Generator, lo: int, level: float) -> F32:
    """Light paper-like background at low resolution: a lighting slope, vignetting and mottling."""
    yy, xx = np.mgrid[0:lo, 0:lo].astype(np.float32) / lo - 0.5
    gx, gy = rng.uniform(-14, 14, 2)
    bg = level + gx * xx + gy * yy - 18.0 * (xx * xx + yy * yy)
    bg += 3.5 * cv2.resize(
        rng.standard_normal((5, 5)).astype(np.float32), (lo, lo), interpolation=cv2.INTER_CUBIC
    )
    bg += 2.4 * cv2.resize(rng.standard_normal((48, 48)).astype(np.float32), (lo, lo))
    return bg.astype(np.float32)


def _shadow(alpha: F32, mat: NDArray[np.float64], lo: int, size: int, rng: np.random.Generator) -> F32:
    """Soft cast shadow at low resolution, as a light factor; the light is upper left, the shadow falls lower right."""
    sc, q = size / _REF, lo / size
    shade = np.zeros((lo, lo), np.float32)
    for dx, dy, sigma, k in ((3.0, 4.0, 3.0, 0.10), (10.0, 13.0, 18.0, 0.28)):
        m = mat * q
        m[:, 2] += np.array([dx, dy]) * sc * rng.uniform(0.7, 1.3) * q
        shade += k * cv2.GaussianBlur(cv2.warpAffine(alpha, m, (lo, lo)), (0, 0), max(sigma * sc * q, 0.5))
    return 1.0 - shade


def _scene(cv: _Canvas, mat: NDArray[np.float64], size: int, rng: np.random.Generator) -> NDArray[np.uint8]:
    """Background and shadow, the screw warped into its bounding box, session lighting and sensor noise.

    Full-frame work stays in 8 bit (resize, blend, noise) because it is memory-bound.
    """
    lo = max(size // 4, 8)
    level = rng.uniform(190.0, 206.0)
    bg_lo = _background(rng, lo, level) * _shadow(cv.alpha, mat, lo, size, rng)
    img = cv2.resize(cv2.convertScaleAbs(bg_lo), (size, size), interpolation=cv2.INTER_LINEAR)
    for _ in range(int(rng.integers(15, 60))):  # dust specks
        x, y = (int(v) for v in rng.integers(0, size * 16, 2))
        rad = int(rng.uniform(0.6, 2.6) * size / _REF * 16) + 8
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
        _bytes(rng, (size, size)),
        np.clip(np.round(_noise_lut(rng.uniform(1.0, 1.6), 128.0)), 0, 255).astype(np.uint8),
    )
    return np.asarray(cv2.addWeighted(img, rng.uniform(0.93, 1.07), noise, 1.0, -128.0), np.uint8)


def render_screw(seed: int, defect: str | None = None, size: int = 1024) -> tuple[np.ndarray, dict[str, Any]]:
    """Render one synthetic screw: a (size, size) uint8 image and its metadata.

    Metadata: seed, size, defect, angle_deg (head→tip direction, degrees from +x towards +y), centre (x, y) of
    the axis' midpoint, head_xy, tip_xy, length_px (head face to tip as drawn), nominal_length_px (before any
    cut), head_width_px, thread_phase, tilt_deg, and defect_bbox (x0, y0, x1, y1 in image pixels, inclusive;
    None for OK parts).
    """
    if defect is not None and defect not in DEFECT_TYPES:
        raise ValueError(f"unknown defect {defect!r}; expected one of {DEFECT_TYPES}")
    # Three independent streams: the part, its defect, and the scene (pose, lighting, noise). So an NG image and
    # the OK image of the same seed show the same part in the same pose and light, and differ only by the defect.
    part, drng, scene = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    sc = size / _REF
    g = _geometry(part, sc)
    if defect == "manipulated_front":
        g = replace(g, cut=g.length * (1.0 - drng.uniform(0.08, 0.15)))
    side = _side_damage(g, drng) if defect == "thread_side" else None
    cv = _draw_screw(g, part, side[0] if side else None)

    box: BBox | None = None
    tip_u, tip_y = g.cut, 0.0
    if defect == "scratch_head":
        box = _scratch_head(cv, g, drng)
    elif defect == "scratch_neck":
        box = _scratch_neck(cv, g, drng)
    elif defect == "thread_top":
        box = _thread_top(cv, g, drng)
    elif side is not None:
        box = side[1]
        _crushed_crest(cv, g, drng, box)
    elif defect == "manipulated_front":
        box = _mash_end(cv, g, drng)
        if drng.random() < 0.6:
            pivot = g.cut - drng.uniform(0.18, 0.3) * g.length
            angle = math.radians(drng.uniform(3.0, 9.0)) * float(drng.choice([-1.0, 1.0]))
            _bend(cv, g, pivot, angle)
            tip_u, tip_y = pivot + (g.cut - pivot) * math.cos(angle), (g.cut - pivot) * math.sin(angle)
            reach = g.root0 + g.crest_h
            box = _union(box, (pivot, min(0.0, tip_y) - reach, tip_u + 2, max(0.0, tip_y) + reach))
    np.maximum(
        cv.img, 28.0 + 0.25 * cv.img, out=cv.img
    )  # soft floor: stacked shadows never go black (real ≥ ~25)
    if sc >= 0.5:  # optics: soften the outline a touch where a pixel is still close to the real camera's
        cv.alpha = np.asarray(cv2.GaussianBlur(cv.alpha, (0, 0), 0.7), np.float32)

    # Pose: any rotation, any position that keeps the whole part in the frame.
    theta = scene.uniform(0.0, 2.0 * np.pi)
    ct, st = math.cos(theta), math.sin(theta)
    mid = g.cut / 2.0
    reach = g.root0 + g.crest_h
    outline = np.array(
        [
            [0, -g.head_r],
            [0, g.head_r],
            [g.cut, -reach],
            [g.cut, reach],
            [tip_u, tip_y - reach],
            [tip_u, tip_y + reach],
        ]
    )
    rel = np.stack(
        [ct * (outline[:, 0] - mid) - st * outline[:, 1], st * (outline[:, 0] - mid) + ct * outline[:, 1]], 1
    )
    pad = 10 * sc
    lo, hi = pad - rel.min(0), size - pad - rel.max(0)
    centre = np.where(hi > lo, lo + scene.uniform(0, 1, 2) * np.maximum(hi - lo, 0), size / 2.0)
    mat = np.array(
        [
            [ct, -st, centre[0] - ct * (cv.cols(0) + mid) + st * cv.rows(0)],
            [st, ct, centre[1] - st * (cv.cols(0) + mid) - ct * cv.rows(0)],
        ]
    )
    out = _scene(cv, mat, size, scene)

    def to_img(pu: float, py: float) -> tuple[float, float]:
        return (float(centre[0] + ct * (pu - mid) - st * py), float(centre[1] + st * (pu - mid) + ct * py))

    meta: dict[str, Any] = {
        "seed": int(seed),
        "size": size,
        "defect": defect,
        "angle_deg": math.degrees(theta),
        "centre": to_img(mid, 0.0),
        "head_xy": to_img(0.0, 0.0),
        "tip_xy": to_img(tip_u, tip_y),
        "length_px": math.hypot(tip_u, tip_y),
        "nominal_length_px": g.length,
        "head_width_px": 2.0 * g.head_r,
        "thread_phase": g.phase,
        "tilt_deg": math.degrees(math.asin(min(g.face_a / g.head_r, 1.0))),
        "defect_bbox": _image_box(box, to_img, size) if box else None,
    }
    return out, meta


def _image_box(
    box: BBox, to_img: Callable[[float, float], tuple[float, float]], size: int
) -> tuple[int, ...]:
    """The image-axis-aligned box around a canonical box, clipped to the frame."""
    u0, y0, u1, y1 = box
    pts = np.array([to_img(u, y) for u in (u0, u1) for y in (y0, y1)])
    lo = np.clip(np.floor(pts.min(0)), 0, size - 1).astype(int)
    hi = np.clip(np.ceil(pts.max(0)), 0, size - 1).astype(int)
    return (int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1]))


# ------------------------------------------------------------------------------------------------------- output
def image_seed(seed: int, index: int, ng: bool) -> int:
    """Per-image seed from (dataset seed, class, index): stable however many images are drawn."""
    return int(np.random.SeedSequence(seed, spawn_key=(int(ng), index)).generate_state(1)[0])


def write_dataset(out: str | Path, n_ok: int, n_ng: int, seed: int, size: int = 1024) -> list[dict[str, Any]]:
    """Write ``out/OK/ok_NNNNN.png``, ``out/NG/<defect>_NNNNN.png`` (NG cycles through DEFECT_TYPES; NNNNN is the
    NG index) and ``out/labels.csv`` (file, label, defect_type, seed). Same arguments ⇒ byte-identical files.

    Returns the rows of labels.csv; ``render_screw(row["seed"], row["defect_type"] or None, size)`` redraws one.
    """
    root = Path(out)
    (root / "OK").mkdir(parents=True, exist_ok=True)
    (root / "NG").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    jobs = [(i, None) for i in range(n_ok)] + [(j, DEFECT_TYPES[j % len(DEFECT_TYPES)]) for j in range(n_ng)]
    for i, kind in jobs:
        s = image_seed(seed, i, ng=kind is not None)
        name = f"NG/{kind}_{i:05d}.png" if kind else f"OK/ok_{i:05d}.png"
        if not cv2.imwrite(str(root / name), render_screw(s, kind, size)[0], _PNG):
            raise OSError(f"could not write {root / name}")
        rows.append({"file": name, "label": "NG" if kind else "OK", "defect_type": kind or "", "seed": s})
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def contact_sheet(path: str | Path, seed: int = 0, tile: int = 256) -> Path:
    """Render one OK part and one of each defect type at 1024², and write them as a labelled 2×3 grid PNG.

    Defect boxes are outlined so a reader can find the (deliberately modest) defects at thumbnail size.
    """
    tiles = []
    for i, kind in enumerate((None, *DEFECT_TYPES)):
        img, meta = render_screw(image_seed(seed, i, ng=kind is not None), kind, 1024)
        small = cv2.resize(img, (tile, tile), interpolation=cv2.INTER_AREA)
        if meta["defect_bbox"] is not None:
            x0, y0, x1, y1 = (round(v * tile / 1024) for v in meta["defect_bbox"])
            cv2.rectangle(small, (x0 - 2, y0 - 2), (x1 + 2, y1 + 2), 255, 1)
        label = np.full((18, tile), 40, np.uint8)
        cv2.putText(label, kind or "OK", (5, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.45, 255, 1, cv2.LINE_AA)
        tiles.append(np.vstack([label, small]))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(
        str(p), np.vstack([np.hstack(tiles[:3]), np.hstack(tiles[3:])]), [cv2.IMWRITE_PNG_COMPRESSION, 9]
    )
    return p
