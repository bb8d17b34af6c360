"""The five defect types, copied from the real ones: local surface damage drawn onto a good part's canvas, and the
manipulated front, which is geometric (cut 8–15 % short, ragged, often bent).

A defect draws only from its own generator, so a part with a defect shows the same part in the same pose and light
as its OK twin. :func:`plan_defect` runs before the part is drawn (what changes its geometry or its thread),
:func:`draw_defect` after (the damage on the drawn part); together they consume the defect's generator in a fixed
order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np
from numpy.typing import NDArray

from tools.synth.part import Canvas, CrestDamage, Geom

DEFECT_TYPES: tuple[str, ...] = (
    "manipulated_front",
    "scratch_head",
    "scratch_neck",
    "thread_side",
    "thread_top",
)

BBox = tuple[float, float, float, float]  # u0, y0, u1, y1 in canonical pixels


@dataclass(frozen=True)
class DefectPlan:
    """What a defect changes before the part is drawn: the geometry (a cut front) and one crushed crest."""

    geom: Geom
    crest: CrestDamage | None = None  # for draw_screw
    crest_box: BBox | None = None


def plan_defect(g: Geom, defect: str | None, rng: np.random.Generator) -> DefectPlan:
    """Cut the front short (manipulated_front) or pick the crest to crush (thread_side); other types: unchanged."""
    if defect == "manipulated_front":
        g = replace(g, cut=g.length * (1.0 - rng.uniform(0.08, 0.15)))
    if defect == "thread_side":
        crest, box = _side_damage(g, rng)
        return DefectPlan(g, crest, box)
    return DefectPlan(g)


def draw_defect(
    cv: Canvas, plan: DefectPlan, defect: str | None, rng: np.random.Generator
) -> tuple[BBox | None, tuple[float, float]]:
    """Draw the defect's damage on the part; returns its canonical box (None for OK parts) and the tip's (u, y),
    which a bent front moves off the axis."""
    g = plan.geom
    box: BBox | None = None
    tip_u, tip_y = g.cut, 0.0
    if defect == "scratch_head":
        box = _scratch_head(cv, g, rng)
    elif defect == "scratch_neck":
        box = _scratch_neck(cv, g, rng)
    elif defect == "thread_top":
        box = _thread_top(cv, g, rng)
    elif plan.crest_box is not None:
        box = plan.crest_box
        _crushed_crest(cv, g, rng, box)
    elif defect == "manipulated_front":
        box = _mash_end(cv, g, rng)
        if rng.random() < 0.6:
            pivot = g.cut - rng.uniform(0.18, 0.3) * g.length
            angle = math.radians(rng.uniform(3.0, 9.0)) * float(rng.choice([-1.0, 1.0]))
            _bend(cv, g, pivot, angle)
            tip_u, tip_y = pivot + (g.cut - pivot) * math.cos(angle), (g.cut - pivot) * math.sin(angle)
            reach = g.root0 + g.crest_h
            box = _union(box, (pivot, min(0.0, tip_y) - reach, tip_u + 2, max(0.0, tip_y) + reach))
    return box, (tip_u, tip_y)


def _polygon(
    rng: np.random.Generator, cu: float, cy: float, ru: float, ry: float, k: int = 6
) -> NDArray[np.float64]:
    """A random, roughly convex polygon around (cu, cy) with radii ru, ry."""
    ang = np.sort(rng.uniform(0, 2 * np.pi, k))
    rad = rng.uniform(0.55, 1.0, k)
    return np.stack([cu + ru * rad * np.cos(ang), cy + ry * rad * np.sin(ang)], axis=1)


def _facet(
    cv: Canvas,
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


def _scratch(cv: Canvas, rng: np.random.Generator, cu: float, cy: float, length: float, width: float) -> BBox:
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


def _scratch_head(cv: Canvas, g: Geom, rng: np.random.Generator) -> BBox:
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


def _scratch_neck(cv: Canvas, g: Geom, rng: np.random.Generator) -> BBox:
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


def _thread_top(cv: Canvas, g: Geom, rng: np.random.Generator) -> BBox:
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


def _side_damage(g: Geom, rng: np.random.Generator) -> tuple[CrestDamage, BBox]:
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


def _crushed_crest(cv: Canvas, g: Geom, rng: np.random.Generator, box: BBox) -> None:
    """Torn, bright metal where the crushed crest meets the root, partly sticking out past the silhouette."""
    u0, y0, u1, _ = box
    side = -1.0 if y0 < 0 else 1.0
    cu = (u0 + u1) / 2 + rng.uniform(-0.1, 0.1) * g.pitch
    root = float(cv.r[round(cv.cols(cu))])
    cy = side * (root + rng.uniform(0.0, 0.3) * g.crest_h)
    pts = _polygon(rng, cu, cy, rng.uniform(0.2, 0.32) * g.pitch, rng.uniform(0.3, 0.5) * g.crest_h, 8)
    _facet(cv, pts, rng, rng.uniform(130, 190), burr=True)


def _mash_end(cv: Canvas, g: Geom, rng: np.random.Generator) -> BBox:
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


def _bend(cv: Canvas, g: Geom, pivot: float, angle: float) -> None:
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
