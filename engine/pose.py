"""Pose of one screw in a frame, its gauge measurements, and the pose-normalised crop.

``estimate_pose`` finds the part on a downscaled copy (speed), then measures it on a full-resolution strip
sampled along its axis (precision: the 0.25-scale silhouette loses the thin tip and is quantised to 4 px).
``normalise`` turns the part so that its axis is horizontal with the head on the LEFT, by a rotation only: a
mirror flip would reverse the thread's handedness, which is a property of the part, not of its pose.

Conventions: image coordinates, x to the right, y down, pixel centres at integers, angles in degrees from
+x towards +y (clockwise on screen). numpy + OpenCV only, no torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import cv2
import numpy as np

FILLS = ("median", "replicate")


class PoseError(ValueError):
    """The frame does not show exactly one whole, plausibly sized part (reason ``pose_error``)."""

    reason: str = "pose_error"


class NoPartError(PoseError):
    """Nothing dark enough and large enough to be a part is in the frame (reason ``no_part``)."""

    reason = "no_part"


@dataclass(frozen=True, slots=True)
class PoseParams:
    """Everything that decides the pose, the measurements and the crop. Serialised into ``model.json``."""

    work_scale: float = 0.25  # segmentation runs on a copy this size
    blur_ksize: int = 5  # Gaussian blur at work scale (odd); smooths thread texture and sensor noise
    threshold_cap: float = 0.65  # threshold ≤ this × background median: plain Otsu also takes the cast shadow
    close_ksize: int = 5  # morphological close at work scale (odd): bridges highlights on the metal
    min_blob_area_px: float = 400.0  # full-res px²; darker blobs smaller than this are dust, not parts
    second_object_frac: float = 0.1  # another blob ≥ this × the part's area means a second object
    border_margin_px: float = 4.0  # silhouette nearer the frame edge than this: the part is cut off
    min_length_px: float = 700.0  # plausible part length (real screws 850–938 px)
    max_length_px: float = 990.0
    max_width_px: float = 360.0  # widest plausible cross-section (heads ≈ 259 px); two touching parts exceed it
    min_head_tip_ratio: float = 1.3  # head/tip width below this: the ends can't be told apart (real ≥ 2.3)
    end_fraction: float = 0.15  # the head/tip widths are taken over this fraction of the length at each end
    profile_bins: int = 64  # width profile along the axis, head → tip
    straightness_window_px: float = 61.0  # medial axis smoothed over ≈ one thread pitch before judging bends
    crop_width: int = 1000  # normalised crop (full-res px): fits 850–990 px parts with the head at the left
    crop_height: int = 320  # heads ≈ 259 px wide plus margin
    fill: str = "median"  # outside the frame: "median" (background level) or "replicate" (edge pixels)

    def __post_init__(self) -> None:
        if not 0.05 <= self.work_scale <= 1.0:
            raise ValueError(f"pose.work_scale must be in [0.05, 1], got {self.work_scale}")
        for name in ("blur_ksize", "close_ksize"):
            k = getattr(self, name)
            if k < 1 or k % 2 == 0:
                raise ValueError(f"pose.{name} must be an odd integer ≥ 1, got {k}")
        if not 0.0 < self.threshold_cap <= 1.0:
            raise ValueError(f"pose.threshold_cap must be in (0, 1], got {self.threshold_cap}")
        if not 0.0 < self.min_length_px < self.max_length_px:
            raise ValueError(f"pose needs 0 < min_length_px < max_length_px, got {self.min_length_px}, "
                             f"{self.max_length_px}")
        if self.max_length_px > self.crop_width:
            raise ValueError(f"pose.max_length_px {self.max_length_px} exceeds crop_width {self.crop_width}: "
                             "a plausible part would be cut by the crop")
        if self.max_width_px > self.crop_height:
            raise ValueError(f"pose.max_width_px {self.max_width_px} exceeds crop_height {self.crop_height}")
        if not 0.02 <= self.end_fraction <= 0.45:
            raise ValueError(f"pose.end_fraction must be in [0.02, 0.45], got {self.end_fraction}")
        if self.profile_bins < 1 or self.crop_width < 8 or self.crop_height < 8:
            raise ValueError("pose.profile_bins must be ≥ 1 and the crop at least 8×8")
        if self.fill not in FILLS:
            raise ValueError(f"pose.fill must be one of {FILLS}, got {self.fill!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PoseParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown pose parameter(s) {unknown}; this inspectd understands {sorted(known)}")
        return cls(**d)


@dataclass(frozen=True, slots=True)
class Measurements:
    """Gauge measurements in full-res px, taken at full resolution perpendicular to / along the axis."""

    length_px: float  # extent along the axis, head face to tip point
    head_width_px: float  # largest perpendicular width over the head-end ``end_fraction`` of the length
    tip_width_px: float  # the same over the tip end
    width_profile: tuple[float, ...]  # mean perpendicular width in ``profile_bins`` equal bins, head → tip
    straightness_px: float  # max distance of the smoothed medial axis from the principal axis
    area_px2: float  # silhouette area, holes filled

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["width_profile"] = list(self.width_profile)
        return d


@dataclass(frozen=True, slots=True)
class Pose:
    """Where the part lies. ``angle_deg`` is the direction from head to tip; ``normalise`` turns it to 0°."""

    centre: tuple[float, float]  # (x, y): on the axis, midway between head face and tip (the crop centre)
    angle_deg: float  # head → tip direction, (-180, 180]
    axis_deg: float  # the undirected principal axis, [-90, 90)
    head_side: Literal["pos", "neg"]  # the head lies towards +axis_deg ("pos") or the opposite ("neg")
    head_xy: tuple[float, float]  # axis point at the head face
    tip_xy: tuple[float, float]  # axis point at the tip
    centroid: tuple[float, float]  # silhouette centroid (the heavy head pulls it ~75 px head-wards of centre)
    background: float  # median gray level of the frame (used as fill)
    threshold: float  # the gray level that separated part from background
    measurements: Measurements

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "measurements"}
        for key in ("centre", "head_xy", "tip_xy", "centroid"):
            d[key] = list(d[key])
        d["measurements"] = self.measurements.to_dict()
        return d


def _fail(msg: str) -> PoseError:
    return PoseError(f"pose_error: {msg}")


def _segment(gray: np.ndarray, p: PoseParams) -> tuple[np.ndarray, float, float, float, float]:
    """The part's outer contour in full-res coordinates, plus background median, threshold and work scale."""
    h, w = gray.shape
    small = cv2.resize(gray, None, fx=p.work_scale, fy=p.work_scale, interpolation=cv2.INTER_AREA)
    if p.blur_ksize > 1:
        small = cv2.GaussianBlur(small, (p.blur_ksize, p.blur_ksize), 0)
    sh, sw = small.shape
    sx, sy = sw / w, sh / h  # exact per-axis scale (sizes that don't divide evenly)
    hist = np.bincount(small.ravel(), minlength=256)
    background = float(np.searchsorted(np.cumsum(hist), small.size / 2))
    otsu, _ = cv2.threshold(small, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    thr = min(float(otsu), p.threshold_cap * background)
    mask = (small < thr).astype(np.uint8)
    if p.close_ksize > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (p.close_ksize, p.close_ksize))
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    px_area = 1.0 / (sx * sy)  # full-res px² per work px
    areas = stats[1:, cv2.CC_STAT_AREA].astype(np.float64) * px_area
    big = np.flatnonzero(areas >= p.min_blob_area_px)
    if big.size == 0:
        raise NoPartError(
            f"no_part: nothing darker than {thr:.0f} (background {background:.0f}) larger than "
            f"{p.min_blob_area_px:.0f} px² in the frame"
        )
    order = big[np.argsort(areas[big])[::-1]]
    part = int(order[0])
    others = [float(areas[i]) for i in order[1:] if areas[i] >= p.second_object_frac * areas[part]]
    if others:
        raise _fail(
            f"{1 + len(others)} large dark objects in the frame (areas {areas[part]:.0f}, "
            f"{', '.join(f'{a:.0f}' for a in others)} px²); expected exactly one part"
        )
    x, y, bw, bh = (int(v) for v in stats[part + 1, :4])
    m = max(1, math.ceil(p.border_margin_px * min(sx, sy)))
    if x < m or y < m or x + bw > sw - m or y + bh > sh - m:
        raise _fail(f"the part touches the frame border (bbox x={x / sx:.0f} y={y / sy:.0f} "
                    f"w={bw / sx:.0f} h={bh / sy:.0f} px); it may be cut off")
    roi = (labels[y : y + bh, x : x + bw] == part + 1).astype(np.uint8)
    # The outer contour ignores holes (highlights on the metal) for free: its moments are the filled region's.
    contours, _ = cv2.findContours(roi, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cnt = max(contours, key=len).reshape(-1, 2).astype(np.float64) + (x, y)
    cnt = (cnt + 0.5) / (sx, sy) - 0.5  # work px centres → full-res coordinates
    return cnt, background, thr, sx, sy


def _run_around(has: np.ndarray, centre: int, max_gap: int) -> tuple[int, int]:
    """First and last index of the run of True around ``centre``, bridging gaps ≤ max_gap (dust beyond the tip)."""
    idx = np.flatnonzero(has)
    if idx.size == 0:
        raise _fail("the part vanished at full resolution")
    breaks = np.flatnonzero(np.diff(idx) > max_gap + 1)
    starts = np.concatenate(([0], breaks + 1))
    ends = np.concatenate((breaks, [idx.size - 1]))
    k = int(np.clip(np.searchsorted(idx[ends], centre), 0, len(starts) - 1))
    return int(idx[starts[k]]), int(idx[ends[k]])


def estimate_pose(gray: np.ndarray, params: PoseParams = PoseParams()) -> Pose:  # noqa: B008 (frozen)
    """Pose and measurements of the one part in a 2-D uint8 frame (dark part on a light background).

    Raises ``NoPartError`` when nothing is found and ``PoseError`` when the frame shows more than one large
    object, a part cut by the border, or an implausible size or shape.
    """
    if not isinstance(gray, np.ndarray) or gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"estimate_pose needs a 2-D uint8 array, got {getattr(gray, 'shape', type(gray))} "
                         f"{getattr(gray, 'dtype', '')}")
    p = params
    cnt, background, thr, sx, sy = _segment(gray, p)
    m = cv2.moments(cnt.astype(np.float32))
    if m["m00"] <= 0:
        raise _fail("degenerate silhouette")
    c = np.array([m["m10"] / m["m00"], m["m01"] / m["m00"]])
    theta = 0.5 * math.atan2(2.0 * m["mu11"], m["mu20"] - m["mu02"])
    u = np.array([math.cos(theta), math.sin(theta)])
    v = np.array([-u[1], u[0]])
    d = cnt - c
    pa, qa = d @ u, d @ v
    coarse_len, coarse_wid = float(pa.max() - pa.min()), float(qa.max() - qa.min())
    if coarse_len > 1.5 * p.max_length_px or coarse_wid > 1.5 * p.max_width_px:
        raise _fail(f"implausible size: about {coarse_len:.0f} × {coarse_wid:.0f} px")

    # Full-res strip: row i ↔ position along the axis, column j ↔ across it (rows make the per-position
    # scans contiguous). Generous padding along the axis: the blurred work copy loses the thin tip.
    pad_p = 6.0 / min(sx, sy) + 8.0
    pad_q = 2.0 / min(sx, sy) + 4.0
    p0, q0 = float(pa.min()) - pad_p, float(qa.min()) - pad_q
    n_p = int(math.ceil(coarse_len + 2 * pad_p)) + 1
    n_q = int(math.ceil(coarse_wid + 2 * pad_q)) + 1
    origin = c + p0 * u + q0 * v
    inv = np.array([[v[0], u[0], origin[0]], [v[1], u[1], origin[1]]])
    strip = cv2.warpAffine(gray, inv, (n_q, n_p), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=255)
    strip = cv2.GaussianBlur(strip, (3, 3), 0)  # against single-pixel noise at the edge
    fg = strip < thr
    has = fg.any(axis=1)
    lo, hi = _run_around(has, int(round(-p0)), max_gap=int(2.0 / min(sx, sy)))
    fg = fg[lo : hi + 1]
    first = fg.argmax(axis=1)
    last = n_q - 1 - fg[:, ::-1].argmax(axis=1)
    occupied = fg.any(axis=1)
    width = np.where(occupied, last - first + 1, 0).astype(np.float64)
    mid = np.where(occupied, (first + last) / 2.0, np.nan)
    n = hi - lo + 1
    length = float(n)

    # Head end: the larger perpendicular width over the last end_fraction of the length.
    k = max(1, int(round(p.end_fraction * n)))
    w_lo, w_hi = float(width[:k].max()), float(width[-k:].max())
    head_low = w_lo >= w_hi
    head_w, tip_w = (w_lo, w_hi) if head_low else (w_hi, w_lo)
    if length < p.min_length_px or length > p.max_length_px or head_w > p.max_width_px:
        raise _fail(f"implausible size: {length:.0f} px long, {head_w:.0f} px wide (expected "
                    f"{p.min_length_px:.0f}–{p.max_length_px:.0f} long, ≤ {p.max_width_px:.0f} wide)")
    if head_w < p.min_head_tip_ratio * max(tip_w, 1.0):
        raise _fail(f"cannot tell head from tip: end widths {head_w:.0f} and {tip_w:.0f} px")

    # Principal axis at full res: width-weighted line through the medial axis (≈ the silhouette's moments).
    rows = np.arange(n, dtype=np.float64)
    ok = occupied
    wts = width[ok]
    r_c = float(np.average(rows[ok], weights=wts))
    m_c = float(np.average(mid[ok], weights=wts))
    slope = float(np.sum(wts * (rows[ok] - r_c) * (mid[ok] - m_c)) / np.sum(wts * (rows[ok] - r_c) ** 2))
    # Threads put the medial axis on a zigzag (crests alternate sides): smooth over a pitch before judging.
    win = max(1, int(round(p.straightness_window_px)))
    filled_mid = np.interp(rows, rows[ok], mid[ok])
    kern = np.ones(win) / win
    smooth = np.convolve(np.pad(filled_mid, win // 2, mode="edge"), kern, mode="valid")[:n]
    straightness = float(np.max(np.abs(smooth - (m_c + slope * (rows - r_c)))))

    area = float(width.sum())
    bins = (rows * p.profile_bins // n).astype(np.intp)
    profile = np.bincount(bins, weights=width, minlength=p.profile_bins) / np.maximum(
        np.bincount(bins, minlength=p.profile_bins), 1
    )
    if not head_low:
        profile = profile[::-1]

    # Back to the frame: strip (row r, col q) ↔ origin + (lo + r) u + q v.
    def frame(r: float, col: float) -> np.ndarray:
        return origin + (lo + r) * u + col * v

    axis_dir = u + slope * v
    axis_dir /= np.linalg.norm(axis_dir)
    mid_r = (n - 1) / 2.0
    centre = frame(mid_r, m_c + slope * (mid_r - r_c))
    end_lo = centre - (n / 2.0) * axis_dir  # the faces lie half a pixel beyond the outermost pixel centres
    end_hi = centre + (n / 2.0) * axis_dir
    head, tip = (end_lo, end_hi) if head_low else (end_hi, end_lo)
    centroid = frame(r_c, m_c)
    axis_deg = math.degrees(math.atan2(axis_dir[1], axis_dir[0]))
    if axis_deg >= 90.0:
        axis_deg -= 180.0
    elif axis_deg < -90.0:
        axis_deg += 180.0
    h2t = tip - head
    angle = math.degrees(math.atan2(h2t[1], h2t[0]))
    head_side: Literal["pos", "neg"] = "pos" if math.cos(math.radians(angle - axis_deg)) < 0 else "neg"
    meas = Measurements(
        length_px=length,
        head_width_px=head_w,
        tip_width_px=tip_w,
        width_profile=tuple(float(x) for x in profile),
        straightness_px=straightness,
        area_px2=area,
    )
    return Pose(
        centre=(float(centre[0]), float(centre[1])),
        angle_deg=angle if angle > -180.0 else 180.0,
        axis_deg=axis_deg,
        head_side=head_side,
        head_xy=(float(head[0]), float(head[1])),
        tip_xy=(float(tip[0]), float(tip[1])),
        centroid=(float(centroid[0]), float(centroid[1])),
        background=background,
        threshold=thr,
        measurements=meas,
    )


def crop_matrix(pose: Pose, params: PoseParams = PoseParams()) -> np.ndarray:  # noqa: B008 (frozen)
    """2×3 affine map frame → crop: a pure rotation (det +1) putting the head left and the centre mid-crop."""
    a = math.radians(pose.angle_deg)
    ca, sa = math.cos(a), math.sin(a)
    cx, cy = pose.centre
    ox, oy = (params.crop_width - 1) / 2.0, (params.crop_height - 1) / 2.0
    # Rotate the head→tip direction onto +x; y stays "down" (a rotation, never a reflection).
    return np.array([[ca, sa, ox - ca * cx - sa * cy], [-sa, ca, oy + sa * cx - ca * cy]])


def normalise(gray: np.ndarray, pose: Pose, params: PoseParams = PoseParams()) -> np.ndarray:  # noqa: B008
    """The fixed (crop_height, crop_width) uint8 window around the part, axis horizontal, head on the LEFT."""
    if params.fill == "median":
        border, value = cv2.BORDER_CONSTANT, float(round(pose.background))
    else:
        border, value = cv2.BORDER_REPLICATE, 0.0
    return cv2.warpAffine(gray, crop_matrix(pose, params), (params.crop_width, params.crop_height),
                          flags=cv2.INTER_LINEAR, borderMode=border, borderValue=value)
