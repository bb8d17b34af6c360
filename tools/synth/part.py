"""A good screw in its own canonical frame: the part-to-part geometry, the silhouette profile, and the shading.

u runs along the axis from the head face (0) to the tip, y across it (down positive), both in pixels. The
silhouette is a radius profile r(u), the thread a helix seen slightly from above (the screw lies on its head rim
and thread crests, so its axis is tilted a few degrees). Every step is a vectorised numpy expression on a canvas
just large enough for the part; ``tools.synth.scene`` then places it in a frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from tools.synth.raster import F32, centred_frac, lut, noise_lut, random_bytes

CrestDamage = tuple[int, int, float, float]  # side ±1, crest index, crush factor, bend: one crest crushed


@dataclass(frozen=True)
class Geom:
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


def geometry(rng: np.random.Generator, sc: float) -> Geom:
    """Draw the part-to-part and pose variation of an OK screw (dimensions measured on screws-300)."""
    length = 921.0 * sc * (1.0 + rng.uniform(-0.018, 0.018))
    head_r = 139.0 * sc * (1.0 + rng.uniform(-0.015, 0.015))
    neck_r = 53.0 * sc * (1.0 + rng.uniform(-0.02, 0.02))
    return Geom(
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


def _profiles(g: Geom, u: F32) -> tuple[F32, F32, F32]:
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


@dataclass
class Canvas:
    """The screw drawn in its canonical frame: intensity, coverage and the coordinates that go with them."""

    img: F32
    alpha: F32
    u: F32  # (W,) axial coordinate of each column
    y: F32  # (H,) cross coordinate of each row
    r: F32  # (W,) silhouette radius without fins
    margin: float
    sc: float

    def rows(self, y: float) -> float:
        return float(y + (self.img.shape[0] - 1) / 2.0)

    def cols(self, u: float) -> float:
        return u + self.margin


def draw_screw(g: Geom, rng: np.random.Generator, side_damage: CrestDamage | None) -> Canvas:
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
        img[rows, cols] = lut(yy / shade_r[cols], -1.0, 1.0, metal) + tone[cols]
    _draw_face(img, g, u, y, rng)
    _draw_thread(img, alpha, g, u, y, r, fin, side_damage)
    _add_texture(img, rng, sc)
    return Canvas(img, alpha, u, y, r, float(m), sc)


def _draw_face(img: F32, g: Geom, u: F32, y: F32, rng: np.random.Generator) -> None:
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
    g: Geom,
    u: F32,
    y: F32,
    r: F32,
    fin: F32,
    side_damage: CrestDamage | None,
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
    dd = centred_frac(t) * g.pitch
    q = np.linspace(-0.5, 0.5, 256, dtype=np.float32) * g.pitch
    profile = (
        40.0 * np.exp(-(((q + 2.0 * s) / (2.5 * s)) ** 2))  # lit crest edge
        - 62.0 * np.exp(-(((q - 8.0 * s) / (7.5 * s)) ** 2))  # shadowed flank towards the tip
        - 15.0 * np.exp(-(((q + 12.0 * s) / (5.0 * s)) ** 2))  # groove before the crest
    ).astype(np.float32)
    face = (height / g.crest_h) * lut(dd, -0.5 * g.pitch, 0.5 * g.pitch, profile)
    ring = min(int(12 * s) + 2, c1 - c0)  # a shallow shoulder ring where the thread starts
    shoulder = (base + g.phase * g.pitch - g.bulge * bow)[:, :ring]
    face[:, :ring] -= 22.0 * np.exp(-((shoulder / (2.5 * s)) ** 2))
    rel = np.clip(e / np.maximum(height, 1e-3), 0.0, 1.0)
    taper = (g.fin_half * (1.0 - np.linspace(0.0, 1.0, 256)) ** 0.6).astype(np.float32)
    half = np.where(e < height, lut(rel, 0.0, 1.0, taper), -1.0)
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
    grain = cv2.LUT(random_bytes(rng, (h, w)), noise_lut(8.0))
    k = int(1500 * sc * sc) + 5
    grain[rng.integers(0, h, k), rng.integers(0, w, k)] = rng.uniform(-90.0, -30.0, k).astype(np.float32)
    img += cv2.GaussianBlur(grain, (0, 0), max(0.8 * sc, 0.5))
