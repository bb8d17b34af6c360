"""The one preprocessing definition: decode → CLAHE → resize → normalise → float32 NCHW.

Training, export checks, the parity gate and the daemon all call this module; its parameters are one frozen
dataclass that travels inside ``model.json``. Nothing here is retyped anywhere else.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import cv2
import numpy as np

INTERPOLATIONS: dict[str, int] = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
}
ORDERS = ("clahe_then_resize", "resize_then_clahe")

# Large enough for any line camera we know; a decompression bomb declares far more.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024


class DecodeError(ValueError):
    """An image that cannot be turned into an 8-bit gray array (corrupt, empty, unsupported, too large)."""

    reason = "decode_error"


@dataclass(frozen=True, slots=True)
class PreprocessParams:
    """Everything that decides what the network sees. Serialised verbatim into ``model.json``."""

    input_size: tuple[int, int] = (256, 256)  # (height, width) of the network input
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: tuple[int, int] = (8, 8)
    interpolation: str = "area"
    order: str = "clahe_then_resize"  # the assignment's recipe: CLAHE at full resolution, then resize
    mean: float = 0.5  # applied to pixel / 255
    std: float = 0.25
    # Optional pose-normalised crop before CLAHE (engine.pose parameters, as a dict); None = whole frame.
    pose: dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        h, w = self.input_size
        if h < 8 or w < 8:
            raise ValueError(f"preprocess.input_size must be at least 8×8, got {self.input_size}")
        if self.clahe_clip_limit < 0:
            raise ValueError(f"preprocess.clahe_clip_limit must be ≥ 0, got {self.clahe_clip_limit}")
        if min(self.clahe_tile_grid) < 1:
            raise ValueError(f"preprocess.clahe_tile_grid must be ≥ 1, got {self.clahe_tile_grid}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"preprocess.interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        if self.order not in ORDERS:
            raise ValueError(f"preprocess.order must be one of {ORDERS}, got {self.order!r}")
        if self.std <= 0:
            raise ValueError(f"preprocess.std must be > 0, got {self.std}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["clahe_tile_grid"] = list(self.clahe_tile_grid)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown preprocess parameter(s) {unknown}; this inspectd understands {sorted(known)}"
            )
        kw = dict(d)
        for key in ("input_size", "clahe_tile_grid"):
            if key in kw:
                kw[key] = tuple(int(v) for v in kw[key])
        return cls(**kw)


def decode(
    data: bytes | bytearray | memoryview | np.ndarray, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Encoded image bytes (PNG, BMP, TIFF, JPEG, …) → 2-D uint8 gray array.

    Colour is converted to gray; 16-bit is scaled linearly to 8 bits (0..65535 → 0..255) because the
    camera's full range maps onto the model's. The declared size is checked against ``max_pixels`` before
    the pixels are allocated, so a tiny file declaring a huge image is refused cheaply.
    """
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
    if buf.size == 0:
        raise DecodeError("empty image data (0 bytes)")
    declared = _declared_size(buf)
    if declared is not None and declared[0] * declared[1] > max_pixels:
        raise DecodeError(
            f"image declares {declared[1]}×{declared[0]} pixels, above the limit of {max_pixels} pixels"
        )
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # OpenCV raises on some malformed headers instead of returning None
        raise DecodeError(f"image could not be decoded: {exc.msg if hasattr(exc, 'msg') else exc}") from None
    if img is None:
        raise DecodeError("image could not be decoded (corrupt, truncated or not an image)")
    return to_gray8(img, max_pixels=max_pixels)


def to_gray8(img: np.ndarray, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Any decoded/raw array (H×W, H×W×1/3/4; uint8 or uint16) → contiguous 2-D uint8."""
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3:
        code = {3: cv2.COLOR_BGR2GRAY, 4: cv2.COLOR_BGRA2GRAY}.get(img.shape[2])
        if code is None:
            raise DecodeError(f"unsupported channel count {img.shape[2]}")
        img = cv2.cvtColor(img, code)
    if img.ndim != 2:
        raise DecodeError(f"unsupported image shape {img.shape}")
    if img.shape[0] * img.shape[1] > max_pixels:
        raise DecodeError(f"image is {img.shape[1]}×{img.shape[0]}, above the limit of {max_pixels} pixels")
    if img.dtype == np.uint16:
        # Exact linear map 0..65535 → 0..255 with rounding (65535 / 257 = 255).
        img = ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise DecodeError(f"unsupported pixel type {img.dtype} (expected 8- or 16-bit)")
    return np.ascontiguousarray(img)


def _declared_size(buf: np.ndarray) -> tuple[int, int] | None:
    """(height, width) from a PNG or BMP header without decoding; None when the format is not sniffed."""
    head = buf[:32].tobytes()
    if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) >= 24 and head[12:16] == b"IHDR":
        return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")
    if head.startswith(b"BM") and len(head) >= 26:
        w = int.from_bytes(head[18:22], "little", signed=True)
        h = int.from_bytes(head[22:26], "little", signed=True)
        return abs(h), abs(w)
    return None


class Preprocessor:
    """Applies one :class:`PreprocessParams` to gray uint8 images, writing into a preallocated NCHW batch.

    OpenCV's CLAHE object carries state, so each thread gets its own; calls from a thread pool are safe.
    cv2 releases the GIL inside CLAHE/resize, so a few threads scale on a few cores.
    """

    def __init__(self, params: PreprocessParams) -> None:
        self.params = params
        self._interp = INTERPOLATIONS[params.interpolation]
        self._scale = np.float32(1.0 / (255.0 * params.std))
        self._offset = np.float32(params.mean / params.std)
        self._local = threading.local()
        self._pose: Any = None
        if params.pose is not None:
            import engine.pose as pose_mod  # numpy + OpenCV only; imported only when a model asks for it

            self._pose = (pose_mod, pose_mod.PoseParams.from_dict(params.pose))

    def _clahe(self) -> Any:
        clahe = getattr(self._local, "clahe", None)
        if clahe is None:
            clahe = cv2.createCLAHE(
                clipLimit=self.params.clahe_clip_limit, tileGridSize=tuple(self.params.clahe_tile_grid)
            )
            self._local.clahe = clahe
        return clahe

    def geometric(self, gray: np.ndarray, *, pose: Any = None) -> np.ndarray:
        """The deterministic uint8 part: (pose crop) → CLAHE/resize in the configured order → (H, W) uint8.

        Training caches this and applies augmentation after it; the daemon goes straight on to normalise.
        ``pose``: an ``engine.pose.Pose`` the caller already estimated (the daemon's gauges), so it is not
        estimated twice; ignored without a pose crop.
        """
        return self.equalised(self.crop(gray, pose=pose))

    def crop(self, gray: np.ndarray, *, pose: Any = None) -> np.ndarray:
        """The pose-normalised crop (the frame itself without a pose crop): what the camera saw of the part,
        before CLAHE evens out its light. The daemon measures brightness and contrast here (drift)."""
        if gray.ndim != 2 or gray.dtype != np.uint8:
            raise ValueError(f"expected a 2-D uint8 gray image, got shape {gray.shape} dtype {gray.dtype}")
        if self._pose is not None:
            pose_mod, pose_params = self._pose
            if pose is None:
                pose = pose_mod.estimate_pose(gray, pose_params)
            gray = pose_mod.normalise(gray, pose, pose_params)
        return gray

    def equalised(self, crop: np.ndarray) -> np.ndarray:
        """:meth:`crop`'s output → CLAHE and resize in the configured order → (H, W) uint8."""
        h, w = self.params.input_size
        out: np.ndarray
        if self.params.order == "clahe_then_resize":
            out = cv2.resize(self._clahe().apply(crop), (w, h), interpolation=self._interp)
        else:
            out = self._clahe().apply(cv2.resize(crop, (w, h), interpolation=self._interp))
        return out

    def normalise_into(self, img8: np.ndarray, out: np.ndarray) -> None:
        """uint8 (H, W) → float32 (H, W) view ``out``: (x/255 − mean)/std, without temporaries beyond one."""
        np.multiply(img8, self._scale, out=out, casting="unsafe")
        out -= self._offset

    def __call__(self, gray: np.ndarray, out: np.ndarray | None = None, *, pose: Any = None) -> np.ndarray:
        """One image → float32 (1, H, W); written into ``out`` when given (``pose``: see ``geometric``)."""
        return self.from_crop(self.crop(gray, pose=pose), out)

    def from_crop(self, crop: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """:meth:`crop`'s output → float32 (1, H, W), into ``out`` when given: the rest of :meth:`__call__`."""
        h, w = self.params.input_size
        if out is None:
            out = np.empty((1, h, w), dtype=np.float32)
        self.normalise_into(self.equalised(crop), out[0])
        return out

    def batch_into(self, images: Sequence[np.ndarray], out: np.ndarray) -> np.ndarray:
        """Fill ``out[:len(images)]`` (a preallocated float32 (N, 1, H, W) array); returns that view."""
        n = len(images)
        if out.ndim != 4 or out.shape[0] < n or out.shape[1:] != (1, *self.params.input_size):
            raise ValueError(f"batch buffer {out.shape} cannot hold {n} × (1, {self.params.input_size})")
        if out.dtype != np.float32:
            raise ValueError(f"batch buffer must be float32, got {out.dtype}")
        for i, img in enumerate(images):
            self(img, out[i])
        return out[:n]

    def batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Convenience: allocate and fill a float32 (N, 1, H, W) batch."""
        out = np.empty((len(images), 1, *self.params.input_size), dtype=np.float32)
        return self.batch_into(images, out)


def load_gray(path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a file with the same decoder the daemon uses for bytes from the wire."""
    with open(path, "rb") as fh:
        return decode(fh.read(), max_pixels=max_pixels)


def device_preprocessor(params: PreprocessParams, device: str) -> Any:
    """The batched preprocessing of :mod:`engine.preprocess_torch` on ``device`` ("cuda", "cuda:N"; "cpu" for
    tests), imported only here and only when asked for: torch is no dependency of the CPU daemon. ValueError
    saying what is missing (torch, CUDA, the device)."""
    try:
        module = importlib.import_module("engine.preprocess_torch")
    except ImportError as exc:
        raise ValueError(
            f"preprocessing on {device!r} needs torch, which is not importable here: {exc}"
        ) from None
    try:
        return module.TorchPreprocessor(params, device)
    except RuntimeError as exc:  # torch.device() refuses a malformed name with RuntimeError too
        raise ValueError(str(exc)) from None
