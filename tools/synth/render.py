"""``render_screw``: one synthetic screw, from its seed to the image and its metadata.

The steps, each drawing from its own generator (``np.random.SeedSequence(seed)`` split into three: the part, its
defect and the scene): the part's geometry (``part``), what the defect changes before the part is drawn, the part
shaded in its canonical frame, the defect's damage (``defects``), the camera's optics, the pose, and the frame
around it (``scene``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from tools.synth.defects import DEFECT_TYPES, BBox, draw_defect, plan_defect
from tools.synth.part import Canvas, Geom, draw_screw, geometry
from tools.synth.raster import REF
from tools.synth.scene import compose


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
    sc = size / REF
    plan = plan_defect(geometry(part, sc), defect, drng)
    g = plan.geom
    cv = draw_screw(g, part, plan.crest)
    box, (tip_u, tip_y) = draw_defect(cv, plan, defect, drng)
    _optics(cv, sc)
    pose = _place(g, cv, tip_u, tip_y, size, sc, scene)
    out = compose(cv, pose.mat, size, scene)

    to_img = pose.to_img
    meta: dict[str, Any] = {
        "seed": int(seed),
        "size": size,
        "defect": defect,
        "angle_deg": math.degrees(pose.theta),
        "centre": to_img(pose.mid, 0.0),
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


def _optics(cv: Canvas, sc: float) -> None:
    """A soft floor (stacked shadows never go black: real ≥ ~25) and, where a pixel is still close to the real
    camera's, an outline softened a touch."""
    np.maximum(cv.img, 28.0 + 0.25 * cv.img, out=cv.img)
    if sc >= 0.5:
        cv.alpha = np.asarray(cv2.GaussianBlur(cv.alpha, (0, 0), 0.7), np.float32)


@dataclass(frozen=True)
class _Pose:
    """Where the canonical frame lands in the image: turned by ``theta`` about the axis' midpoint (u = ``mid``),
    which lies at ``centre``; ``mat`` maps canvas pixels to image pixels."""

    theta: float
    centre: NDArray[np.float64]
    mid: float
    mat: NDArray[np.float64]

    def to_img(self, pu: float, py: float) -> tuple[float, float]:
        ct, st, centre, mid = math.cos(self.theta), math.sin(self.theta), self.centre, self.mid
        return (float(centre[0] + ct * (pu - mid) - st * py), float(centre[1] + st * (pu - mid) + ct * py))


def _place(
    g: Geom, cv: Canvas, tip_u: float, tip_y: float, size: int, sc: float, rng: np.random.Generator
) -> _Pose:
    """Any rotation, any position that keeps the whole part in the frame."""
    theta = rng.uniform(0.0, 2.0 * np.pi)
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
    centre = np.where(hi > lo, lo + rng.uniform(0, 1, 2) * np.maximum(hi - lo, 0), size / 2.0)
    mat = np.array(
        [
            [ct, -st, centre[0] - ct * (cv.cols(0) + mid) + st * cv.rows(0)],
            [st, ct, centre[1] - st * (cv.cols(0) + mid) - ct * cv.rows(0)],
        ]
    )
    return _Pose(float(theta), centre, mid, mat)


def _image_box(
    box: BBox, to_img: Callable[[float, float], tuple[float, float]], size: int
) -> tuple[int, ...]:
    """The image-axis-aligned box around a canonical box, clipped to the frame."""
    u0, y0, u1, y1 = box
    pts = np.array([to_img(u, y) for u in (u0, u1) for y in (y0, y1)])
    lo = np.clip(np.floor(pts.min(0)), 0, size - 1).astype(int)
    hi = np.clip(np.ceil(pts.max(0)), 0, size - 1).astype(int)
    return (int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1]))
