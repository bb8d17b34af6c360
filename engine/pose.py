"""Pose of one screw in a frame, its gauge measurements, and the pose-normalised crop.

``estimate_pose`` finds the part on a downscaled copy (speed), then measures its outline at full resolution
inside the part's bounding box (precision: on the 0.25-scale copy the length is off by −9…+3 px, because the
blur eats the thin tip and pixels are 4 px; at full resolution a part's length repeats to 0.2 px s.d. over
rotations of its photo).
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
ANCHORS = ("centre", "head")


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
    min_length_px: float = 700.0  # plausible part length (real screws 852–942 px)
    max_length_px: float = 990.0
    max_width_px: float = (
        310.0  # widest plausible cross-section (heads ≈ 285 px); e.g. two parts side by side
    )
    min_head_tip_ratio: float = 1.3  # head/tip width below this: the ends can't be told apart (real ≥ 2.3)
    end_fraction: float = 0.15  # the head/tip widths are taken over this fraction of the length at each end
    profile_bins: int = 64  # width profile along the axis, head → tip
    straightness_window_px: float = 61.0  # medial axis smoothed over ≈ one thread pitch before judging bends
    crop_width: int = 1000  # normalised crop (full-res px): fits 850–990 px parts with the head at the left
    crop_height: int = 320  # heads ≈ 285 px wide (as measured here) plus margin
    fill: str = "median"  # outside the frame: "median" (background level) or "replicate" (edge pixels)
    # Where the crop is pinned: "centre" (the part's mid-point mid-crop: each end moves by half the length
    # variation) or "head" (the head face ``head_margin_px`` from the left edge: head, neck and shank line up
    # across parts whatever their length, and only the tip end moves).
    anchor: str = "centre"
    head_margin_px: float = 10.0
    # Thread-crest dip (``crest_dip_px``): both flanks' outlines are read along the axis over this fraction of
    # the length from the head face (the threaded part, run-in and point excluded) from a strip of
    # ±``crop_height``/2 px across the axis. A flank's edge is the outermost step darker inwards by at least
    # ``crest_edge_step`` gray levels over 2 px within ``crest_search_px`` inside the silhouette: on the flank
    # that lies in the part's own cast shadow the silhouette's threshold takes in the shadow, the step does not.
    crest_region: tuple[float, float] = (0.47, 0.92)
    crest_edge_step: float = 8.0
    crest_search_px: int = 45
    crest_median_px: int = 11  # median along the axis (odd): removes narrow outward spikes (dust, shadow)
    crest_pitch_px: tuple[float, float] = (50.0, 90.0)  # the thread pitch is searched in this range

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
            raise ValueError(
                f"pose needs 0 < min_length_px < max_length_px, got {self.min_length_px}, "
                f"{self.max_length_px}"
            )
        if self.max_length_px > self.crop_width:
            raise ValueError(
                f"pose.max_length_px {self.max_length_px} exceeds crop_width {self.crop_width}: "
                "a plausible part would be cut by the crop"
            )
        if self.max_width_px > self.crop_height:
            raise ValueError(f"pose.max_width_px {self.max_width_px} exceeds crop_height {self.crop_height}")
        if not 0.02 <= self.end_fraction <= 0.45:
            raise ValueError(f"pose.end_fraction must be in [0.02, 0.45], got {self.end_fraction}")
        if self.profile_bins < 1 or self.crop_width < 8 or self.crop_height < 8:
            raise ValueError("pose.profile_bins must be ≥ 1 and the crop at least 8×8")
        if self.fill not in FILLS:
            raise ValueError(f"pose.fill must be one of {FILLS}, got {self.fill!r}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"pose.anchor must be one of {ANCHORS}, got {self.anchor!r}")
        if self.anchor == "head" and not 0.0 <= self.head_margin_px <= self.crop_width - self.max_length_px:
            raise ValueError(
                f"pose.head_margin_px {self.head_margin_px} must be in [0, crop_width − max_length_px = "
                f"{self.crop_width - self.max_length_px:g}]: a plausible part would be cut by the crop"
            )

        lo, hi = self.crest_region
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"pose.crest_region must satisfy 0 ≤ start < end ≤ 1, got {self.crest_region}")
        if not self.crest_edge_step > 0.0 or self.crest_search_px < 1:
            raise ValueError("pose.crest_edge_step must be > 0 and pose.crest_search_px ≥ 1")
        if self.crest_median_px < 1 or self.crest_median_px % 2 == 0:
            raise ValueError(f"pose.crest_median_px must be an odd integer ≥ 1, got {self.crest_median_px}")
        if not 2.0 <= self.crest_pitch_px[0] < self.crest_pitch_px[1]:
            raise ValueError(f"pose.crest_pitch_px must satisfy 2 ≤ low < high, got {self.crest_pitch_px}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("crest_region", "crest_pitch_px"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PoseParams:
        """Missing keys take their defaults (a package written before a parameter existed still loads)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown pose parameter(s) {unknown}; this inspectd understands {sorted(known)}"
            )
        d = dict(d)
        for k in ("crest_region", "crest_pitch_px"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
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
    # Largest amount by which a thread crest tip falls short of the line through its two neighbours on the same
    # flank (``_crest_dip``); NaN where it was not measured (measurements from before it existed, too few crests).
    crest_dip_px: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["width_profile"] = list(self.width_profile)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurements:
        """The inverse of :meth:`to_dict` (training caches measurements beside the crops as JSON). Dicts written
        before ``crest_dip_px`` existed load with it NaN (not measured)."""
        known = {f.name for f in fields(cls)}
        optional = {"crest_dip_px"}
        if not known - optional <= set(d) <= known:
            raise ValueError(f"measurements need exactly the keys {sorted(known)}, got {sorted(d)}")
        return cls(
            crest_dip_px=float(d.get("crest_dip_px", math.nan)),
            length_px=float(d["length_px"]),
            head_width_px=float(d["head_width_px"]),
            tip_width_px=float(d["tip_width_px"]),
            width_profile=tuple(float(v) for v in d["width_profile"]),
            straightness_px=float(d["straightness_px"]),
            area_px2=float(d["area_px2"]),
        )


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


def _below(img: np.ndarray, thr: float) -> np.ndarray:
    """uint8 mask (0/1) of pixels darker than ``thr`` (integer pixels: v < thr ⟺ v ≤ ceil(thr) − 1)."""
    return cv2.threshold(img, math.ceil(thr) - 1, 1, cv2.THRESH_BINARY_INV)[1]


def _downscale(gray: np.ndarray, scale: float) -> np.ndarray:
    # Repeated 2× INTER_AREA is ~8× faster in OpenCV than one 4× INTER_AREA, and the same average.
    img = gray
    while scale <= 0.5 + 1e-9:
        img = cv2.resize(
            img, ((img.shape[1] + 1) // 2, (img.shape[0] + 1) // 2), interpolation=cv2.INTER_AREA
        )
        scale *= 2.0
    if scale < 1.0 - 1e-9:
        img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return img


@dataclass(frozen=True, slots=True)
class _Coarse:
    contour: np.ndarray  # (N, 2) outer contour of the part, full-res coordinates
    mask: np.ndarray  # filled part mask at work scale, uint8 0/1
    background: float
    threshold: float
    sx: float  # work px per full-res px, per axis
    sy: float


def _segment(gray: np.ndarray, p: PoseParams) -> _Coarse:
    """Find the one part on the work-scale copy; raise when there is none, more than one, or it is cut off."""
    h, w = gray.shape
    small = _downscale(gray, p.work_scale)
    if p.blur_ksize > 1:
        small = cv2.GaussianBlur(small, (p.blur_ksize, p.blur_ksize), 0)
    sh, sw = small.shape
    sx, sy = sw / w, sh / h  # exact per-axis scale (sizes that don't divide evenly)
    hist = cv2.calcHist([small], [0], None, [256], [0, 256]).ravel()
    background = float(np.searchsorted(np.cumsum(hist), small.size / 2))
    otsu, _ = cv2.threshold(small, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    thr = min(float(otsu), p.threshold_cap * background)
    mask = _below(small, thr)
    if p.close_ksize > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (p.close_ksize, p.close_ksize))
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    # Outer contours, not connected components: 10× cheaper here, and they ignore holes (highlights).
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    px_area = 1.0 / (sx * sy)  # full-res px² per work px
    # Pixel count of a blob ≈ polygon area through the boundary pixel centres + half the boundary + 1.
    areas = [(cv2.contourArea(c) + len(c) / 2.0 + 1.0) * px_area for c in contours]
    big = sorted((i for i, a in enumerate(areas) if a >= p.min_blob_area_px), key=lambda i: -areas[i])
    if not big:
        raise NoPartError(
            f"no_part: nothing darker than {thr:.0f} (background {background:.0f}) larger than "
            f"{p.min_blob_area_px:.0f} px² in the frame"
        )
    part = big[0]
    others = [areas[i] for i in big[1:] if areas[i] >= p.second_object_frac * areas[part]]
    if others:
        raise _fail(
            f"{1 + len(others)} large dark objects in the frame (areas {areas[part]:.0f}, "
            f"{', '.join(f'{a:.0f}' for a in others)} px²); expected exactly one part"
        )
    x, y, bw, bh = cv2.boundingRect(contours[part])
    m = max(1, math.ceil(p.border_margin_px * min(sx, sy)))
    if x < m or y < m or x + bw > sw - m or y + bh > sh - m:
        raise _fail(
            f"the part touches the frame border (bbox x={x / sx:.0f} y={y / sy:.0f} w={bw / sx:.0f} "
            f"h={bh / sy:.0f} px); it may be cut off"
        )
    filled = np.zeros_like(mask)
    cv2.drawContours(filled, contours, part, 1, thickness=cv2.FILLED)
    cnt = contours[part].reshape(-1, 2).astype(np.float64)
    cnt = (cnt + 0.5) / (sx, sy) - 0.5  # work px centres → full-res coordinates
    return _Coarse(cnt, filled, background, thr, sx, sy)


def _fine_outline(gray: np.ndarray, co: _Coarse, merge_pieces: bool) -> np.ndarray:
    """The part's outer boundary pixels at full resolution, (N, 2) float64 (x, y).

    The largest outer contour is the part; with ``merge_pieces`` every contour whose mean point lies in the
    coarse silhouette is added too (a highlight across the thin tip can split a piece of the part off).
    """
    h, w = gray.shape
    pad = 3.0 / min(co.sx, co.sy) + 4.0  # the blurred work copy loses up to ~10 px of the thin tip
    x0, y0 = (max(0, int(v - pad)) for v in co.contour.min(axis=0))
    x1, y1 = (int(v + pad) + 1 for v in co.contour.max(axis=0))
    roi = cv2.GaussianBlur(gray[y0 : min(y1, h), x0 : min(x1, w)], (3, 3), 0)  # single-pixel noise at edges
    contours, _ = cv2.findContours(_below(roi, co.threshold), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        raise _fail("the part vanished at full resolution")
    main = max(range(len(contours)), key=lambda i: len(contours[i]))
    keep = [contours[main]]
    if merge_pieces:
        near = cv2.dilate(co.mask, np.ones((3, 3), np.uint8))  # thin pieces lie at the coarse mask's edge
        mh, mw = near.shape
        for i, c in enumerate(contours):
            cx, cy = c.reshape(-1, 2).mean(axis=0)
            sx_i = min(int((cx + x0 + 0.5) * co.sx), mw - 1)
            sy_i = min(int((cy + y0 + 0.5) * co.sy), mh - 1)
            if i != main and near[sy_i, sx_i]:
                keep.append(c)
    # Neighbouring boundary pixels can be 1.41 px apart along a diagonal axis; the midpoints between them
    # (within each closed contour) make sure every 1-px position along the axis sees both edges of the part.
    parts = [c.reshape(-1, 2).astype(np.float64) for c in keep]
    pts = np.concatenate(parts + [(c + np.roll(c, 1, axis=0)) / 2.0 for c in parts])
    pts += (x0, y0)
    return pts


def _envelope(
    pts: np.ndarray, c: np.ndarray, u: np.ndarray, v: np.ndarray
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Outline → (extent p_min, p_max along u; qmin and qmax across, per 1-px position from p_min)."""
    d = pts - c
    pa, qa = d @ u, d @ v
    p_min = float(pa.min())
    idx = np.rint(pa - p_min).astype(np.intp)
    n = int(idx.max()) + 1
    qmin, qmax = np.full(n, np.inf), np.full(n, -np.inf)
    np.minimum.at(qmin, idx, qa)  # unbuffered per-position min/max: 3× faster than sort + reduceat
    np.maximum.at(qmax, idx, qa)
    empty = np.isinf(qmin)
    qmin[empty] = qmax[empty] = np.nan
    return p_min, float(pa.max()), qmin, qmax


def _median1d(x: np.ndarray, k: int) -> np.ndarray:
    if k <= 1 or len(x) < k:
        return x
    padded = np.pad(x, k // 2, mode="edge")
    out: np.ndarray = np.median(np.lib.stride_tricks.sliding_window_view(padded, k), axis=1)
    return out


def _crest_tips(prof: np.ndarray, pitch_range: tuple[float, float]) -> np.ndarray:
    """Heights of the crest tips along one flank profile (distance of the edge from the axis, 1 px per step).

    The pitch is the autocorrelation's peak in ``pitch_range`` (parabolic sub-pixel), the phase the maximum of the
    profile folded at that pitch; each crest's height is the profile's maximum within ± pitch/4 of its predicted
    place, so a crushed crest still gets a height (its stub's, or the root's) instead of vanishing.
    """
    n = len(prof)
    lo, hi = math.floor(pitch_range[0]), math.ceil(pitch_range[1])
    if n < 2 * hi:
        return np.empty(0)
    q = prof - prof.mean()
    full = np.correlate(q, q, "full")[n - 1 :]  # lag 0, 1, …
    ac = full[lo : hi + 1] / (n - np.arange(lo, hi + 1))
    j = int(np.argmax(ac))
    pitch = float(lo + j)
    if 0 < j < len(ac) - 1:
        curv = ac[j - 1] - 2.0 * ac[j] + ac[j + 1]
        if curv < 0:
            pitch += 0.5 * (ac[j - 1] - ac[j + 1]) / curv
    nb = max(1, round(pitch))
    bins = np.minimum((np.arange(n) % pitch / pitch * nb).astype(np.intp), nb - 1)
    fold = np.bincount(bins, weights=prof, minlength=nb) / np.maximum(np.bincount(bins, minlength=nb), 1)
    smooth = np.convolve(np.concatenate([fold[-3:], fold, fold[:3]]), np.ones(7) / 7.0, "valid")
    x0 = (int(np.argmax(smooth)) + 0.5) * pitch / nb
    centres = np.arange(x0, n, pitch)
    lo_i = np.rint(centres - pitch / 4.0).astype(np.intp)
    hi_i = np.rint(centres + pitch / 4.0).astype(np.intp) + 1
    keep = (lo_i >= 0) & (hi_i <= n)
    if not keep.any():
        return np.empty(0)
    # Windows a pitch apart and half a pitch wide never overlap: one reduceat over [lo, hi) pairs.
    bounds = np.stack([lo_i[keep], hi_i[keep]], axis=1).ravel()
    return np.maximum.reduceat(np.append(prof, -np.inf), bounds)[::2]


def _crest_dip(
    gray: np.ndarray, head: np.ndarray, angle_deg: float, length: float, threshold: float, p: PoseParams
) -> float:
    """``crest_dip_px``: the largest amount, in px, by which a thread crest tip falls short of the mean of its two
    neighbours on the same flank (a crest crushed, bent over or broken off), over both flanks; NaN when a flank
    shows fewer than 3 crests.

    A strip along the threaded part (``crest_region``), ±crop_height/2 across the axis, is cut from the frame by
    a rotation (head left, as ``normalise``); per column and flank the edge is the outermost inward darkening step
    (≥ ``crest_edge_step`` over 2 px) within ``crest_search_px`` inside the outermost pixel below the silhouette's
    threshold. The profiles are median-filtered along the axis, and the crest tips read at the thread pitch.
    """
    a = math.radians(angle_deg)
    ca, sa = math.cos(a), math.sin(a)
    s0 = math.floor(p.crest_region[0] * length)
    n = max(1, math.floor(p.crest_region[1] * length) - s0)
    h = p.crop_height
    cy = (h - 1) / 2.0
    hx, hy = float(head[0]), float(head[1])
    # Row i = the cross-section s0 + i px from the head face, column j = j − cy px across the axis (as the crop's
    # rows: the upper flank at small j). Rows, not columns, so that every per-section scan runs along memory.
    m = np.array([[-sa, ca, sa * hx - ca * hy + cy], [ca, sa, -(ca * hx + sa * hy) - s0]])
    strip = cv2.warpAffine(gray, m, (h, n), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    # Gaussian σ = 1 px, then the central difference across the axis: > 0 where it gets darker towards +j.
    gauss = cv2.getGaussianKernel(9, 1.0)
    step = cv2.sepFilter2D(strip, cv2.CV_32F, np.convolve(gauss.ravel(), [1.0, 0.0, -1.0]), gauss)
    dark = _below(strip, threshold)
    seen = dark.any(axis=1)
    top = np.argmax(dark, axis=1)
    bot = h - 1 - np.argmax(dark[:, ::-1], axis=1)
    reach = np.arange(-2, p.crest_search_px + 1)
    rows = np.arange(n)[:, None]
    dip = -math.inf
    for outer, sign in ((top, 1), (bot, -1)):
        cols = np.clip(outer[:, None] + sign * reach, 0, h - 1)  # outermost first
        hit = sign * step[rows, cols] > p.crest_edge_step
        edge = np.where(hit.any(axis=1), cols[np.arange(n), np.argmax(hit, axis=1)], outer)
        dist = np.where(seen, sign * (cy - edge), 0.0)
        tips = _crest_tips(_median1d(dist, p.crest_median_px), p.crest_pitch_px)
        if len(tips) < 3:
            return math.nan
        dip = max(dip, float(np.max(0.5 * (tips[:-2] + tips[2:]) - tips[1:-1])))
    return dip


def estimate_pose(gray: np.ndarray, params: PoseParams = PoseParams()) -> Pose:
    """Pose and measurements of the one part in a 2-D uint8 frame (dark part on a light background).

    Raises ``NoPartError`` when nothing is found and ``PoseError`` when the frame shows more than one large
    object, a part cut by the border, or an implausible size or shape.
    """
    if not isinstance(gray, np.ndarray) or gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(
            f"estimate_pose needs a 2-D uint8 array, got {getattr(gray, 'shape', type(gray))} "
            f"{getattr(gray, 'dtype', '')}"
        )
    p = params
    co = _segment(gray, p)
    m = cv2.moments(co.contour.astype(np.float32))
    if m["m00"] <= 0:
        raise _fail("degenerate silhouette")
    c = np.array([m["m10"] / m["m00"], m["m01"] / m["m00"]])
    theta = 0.5 * math.atan2(2.0 * m["mu11"], m["mu20"] - m["mu02"])
    u = np.array([math.cos(theta), math.sin(theta)])
    v = np.array([-u[1], u[0]])
    pc = (co.contour - c) @ u
    coarse_len = float(pc.max() - pc.min())
    if coarse_len > 1.5 * p.max_length_px:
        raise _fail(f"implausible size: about {coarse_len:.0f} px long")

    p_min, p_max, qmin, qmax = _envelope(_fine_outline(gray, co, merge_pieces=False), c, u, v)
    tol = 1.5 / min(co.sx, co.sy)  # fine ends lie beyond the coarse ones, never this far inside
    if p_min > pc.min() + tol or p_max < pc.max() - tol:
        p_min, p_max, qmin, qmax = _envelope(_fine_outline(gray, co, merge_pieces=True), c, u, v)
    occupied = ~np.isnan(qmin)
    n = len(qmin)
    width = np.where(occupied, qmax - qmin + 1.0, 0.0)  # + 1: the boundary pixels' own extent
    mid = (qmin + qmax) / 2.0
    length = p_max - p_min + 1.0  # outermost boundary pixel centres, plus half a pixel at each end

    # Head end: the larger perpendicular width over the last end_fraction of the length.
    k = max(1, round(p.end_fraction * n))
    w_lo, w_hi = float(width[:k].max()), float(width[-k:].max())
    head_low = w_lo >= w_hi
    head_w, tip_w = (w_lo, w_hi) if head_low else (w_hi, w_lo)
    widest = float(width.max())
    if length < p.min_length_px or length > p.max_length_px or widest > p.max_width_px:
        raise _fail(
            f"implausible size: {length:.0f} px long, {widest:.0f} px wide (expected "
            f"{p.min_length_px:.0f}–{p.max_length_px:.0f} long, ≤ {p.max_width_px:.0f} wide)"
        )
    if head_w < p.min_head_tip_ratio * max(tip_w, 1.0):
        raise _fail(f"cannot tell head from tip: end widths {head_w:.0f} and {tip_w:.0f} px")

    # Principal axis at full res: width-weighted line through the medial axis (≈ the silhouette's moments).
    pos = np.arange(n, dtype=np.float64)
    wts, ps, ms = width[occupied], pos[occupied], mid[occupied]
    r_c = float(np.dot(wts, ps) / wts.sum())
    m_c = float(np.dot(wts, ms) / wts.sum())
    slope = float(np.dot(wts * (ps - r_c), ms - m_c) / np.dot(wts, (ps - r_c) ** 2))
    # Distance of each 1-px position from the head face (the datum of the part).
    from_head = pos + 0.5 if head_low else (p_max - p_min + 0.5) - pos
    # Threads put the medial axis on a zigzag (crests alternate sides): smooth over a pitch before judging.
    # The first half-window at the head is left out: there the slightly tilted face fills a position only
    # partly, so its midpoint says nothing about bending (the tip's point, in contrast, is where bends show).
    win = max(1, round(p.straightness_window_px) // 2 * 2 + 1)
    valid = occupied & (from_head >= win / 2)
    kern = np.ones(win)
    den = np.convolve(valid.astype(np.float64), kern, "same")
    smooth = np.convolve(np.where(valid, mid, 0.0), kern, "same") / np.maximum(den, 1.0)
    dev = np.abs(smooth - (m_c + slope * (pos - r_c)))[valid]
    straightness = float(dev.max()) if dev.size else 0.0

    # Profile bins, each 1/profile_bins of the length, counted from the head face.
    bins = np.clip((from_head * (p.profile_bins / length)).astype(np.intp), 0, p.profile_bins - 1)
    profile = np.bincount(bins, weights=width, minlength=p.profile_bins) / np.maximum(
        np.bincount(bins, minlength=p.profile_bins), 1
    )

    def frame(r: float, q: float) -> np.ndarray:  # envelope position (r, q) → frame (x, y)
        return c + (p_min + r) * u + q * v

    axis_dir = u + slope * v
    axis_dir /= np.linalg.norm(axis_dir)
    mid_r = (p_max - p_min) / 2.0
    centre = frame(mid_r, m_c + slope * (mid_r - r_c))
    end_lo, end_hi = centre - (length / 2.0) * axis_dir, centre + (length / 2.0) * axis_dir
    head, tip = (end_lo, end_hi) if head_low else (end_hi, end_lo)
    centroid = frame(r_c, m_c)
    axis_deg = math.degrees(math.atan2(axis_dir[1], axis_dir[0]))
    axis_deg = (axis_deg + 90.0) % 180.0 - 90.0
    h2t = tip - head
    angle = math.degrees(math.atan2(h2t[1], h2t[0]))
    head_side: Literal["pos", "neg"] = "pos" if math.cos(math.radians(angle - axis_deg)) < 0 else "neg"
    meas = Measurements(
        length_px=length,
        head_width_px=head_w,
        tip_width_px=tip_w,
        width_profile=tuple(float(x) for x in profile),
        straightness_px=straightness,
        area_px2=float(width.sum()),
        crest_dip_px=_crest_dip(gray, head, angle, length, co.threshold, p),
    )
    return Pose(
        centre=(float(centre[0]), float(centre[1])),
        angle_deg=angle if angle > -180.0 else 180.0,
        axis_deg=axis_deg,
        head_side=head_side,
        head_xy=(float(head[0]), float(head[1])),
        tip_xy=(float(tip[0]), float(tip[1])),
        centroid=(float(centroid[0]), float(centroid[1])),
        background=co.background,
        threshold=co.threshold,
        measurements=meas,
    )


def crop_matrix(pose: Pose, params: PoseParams = PoseParams()) -> np.ndarray:
    """2×3 affine map frame → crop: a pure rotation (det +1) putting the head left and the part's centre (or,
    with ``anchor="head"``, its head face) at a fixed place on the crop's mid-line."""
    a = math.radians(pose.angle_deg)
    ca, sa = math.cos(a), math.sin(a)
    oy = (params.crop_height - 1) / 2.0
    if params.anchor == "head":
        (cx, cy), ox = pose.head_xy, params.head_margin_px
    else:
        (cx, cy), ox = pose.centre, (params.crop_width - 1) / 2.0
    # Rotate the head→tip direction onto +x; y stays "down" (a rotation, never a reflection).
    return np.array([[ca, sa, ox - ca * cx - sa * cy], [-sa, ca, oy + sa * cx - ca * cy]])


def normalise(gray: np.ndarray, pose: Pose, params: PoseParams = PoseParams()) -> np.ndarray:
    """The fixed (crop_height, crop_width) uint8 window around the part, axis horizontal, head on the LEFT."""
    if params.fill == "median":
        border, value = cv2.BORDER_CONSTANT, float(round(pose.background))
    else:
        border, value = cv2.BORDER_REPLICATE, 0.0
    return cv2.warpAffine(
        gray,
        crop_matrix(pose, params),
        (params.crop_width, params.crop_height),
        flags=cv2.INTER_LINEAR,
        borderMode=border,
        borderValue=value,
    )
