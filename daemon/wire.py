"""The two wire formats, in one place: camera → daemon (PULL) and daemon → line controller (PUB).

Camera message: 2 ZeroMQ frames — (1) a JSON header, (2) the pixel buffer (``encoding: raw``) or the encoded
file bytes. Verdict/heartbeat message: 2 frames — (1) topic = line id, (2) compact JSON. ``docs/daemon.md``
documents both; the parsers here are pure functions (no sockets) so they can be property-tested.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from daemon.types import Verdict
from engine.dataset import CLASS_NAMES

ENCODINGS = ("raw", "png", "bmp", "tiff", "jpeg")
RAW_DTYPES: dict[str, np.dtype[Any]] = {"uint8": np.dtype(np.uint8), "uint16": np.dtype("<u2")}
MAX_FRAME_ID_CHARS = 256
MAX_HEADER_BYTES = 64 * 1024
MESSAGE_PARTS = 2  # header, payload: anything else is refused (kind "multipart")
MAX_SIDE = 1 << 20  # a raw frame side above this is no camera's (``max_pixels`` applies to the product too)
# t_capture: camera wall clock, epoch seconds. 0 (a camera that counts from its own boot) .. 2100-01-01.
T_CAPTURE_MIN = 0.0
T_CAPTURE_MAX = 4_102_444_800.0
KNOWN_KEYS = frozenset({"frame_id", "encoding", "shape", "dtype", "t_capture", "label"})
# JSON integer literals longer than this are never converted to an int (CPython refuses more than 4300 digits
# with a ValueError, and an int above ~1e308 overflows float()): they parse as a _Literal, which no known key
# accepts, so the rest of the header (its frame_id) stays readable.
_MAX_INT_DIGITS = 32
_SHOW_CHARS = 60  # how much of an offending value an error message (a REJECT's detail.error) quotes


class MessageError(ValueError):
    """A malformed camera message. ``frame_id`` is set when the part can still be named (→ REJECT)."""

    def __init__(self, kind: str, message: str, frame_id: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind  # metrics label: multipart | header | payload
        self.frame_id = frame_id


@dataclass(frozen=True, slots=True)
class CameraHeader:
    frame_id: str
    encoding: str
    shape: tuple[int, int] | None = None
    dtype: str | None = None
    t_capture: float | None = None
    label: str | None = None


class _Literal:
    """A JSON number kept as its text: too many digits, not finite as a float, or NaN/Infinity (not JSON)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text if len(self.text) <= 20 else f"{self.text[:12]}…({len(self.text)} characters)"


class _Object(dict[str, Any]):
    """A JSON object; ``duplicates`` names the keys it repeated (the last value would otherwise win silently)."""

    duplicates: frozenset[str] = frozenset()


def _parse_int(text: str) -> int | _Literal:
    return int(text) if len(text) <= _MAX_INT_DIGITS else _Literal(text)


def _parse_float(text: str) -> float | _Literal:
    value = float(text)  # no digit limit for floats: 1e999 is inf, refused below
    return value if math.isfinite(value) else _Literal(text)


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        keys = [k for k, _ in pairs]
        obj.duplicates = frozenset(k for k in obj if keys.count(k) > 1)
    return obj


def _show(value: Any) -> str:
    """``repr(value)``, cut short: an error message never carries a 64 KiB string back to the PLC."""
    text = repr(value)
    return text if len(text) <= _SHOW_CHARS else f"{text[:_SHOW_CHARS]}… ({type(value).__name__})"


def _is_int(value: Any) -> bool:
    return type(value) is int  # not bool (a subclass), not a _Literal


def _buffer(part: Any) -> memoryview:
    """bytes, memoryview or zmq.Frame (``.buffer``) → memoryview, without copying."""
    buf = getattr(part, "buffer", part)
    return buf if isinstance(buf, memoryview) else memoryview(buf)


def _load_json(raw: bytes | memoryview) -> Any:
    nbytes = raw.nbytes if isinstance(raw, memoryview) else len(raw)
    if nbytes > MAX_HEADER_BYTES:
        raise MessageError("header", f"header is {nbytes} bytes, above {MAX_HEADER_BYTES}")
    try:
        return json.loads(
            bytes(raw).decode("utf-8"),  # UTF-8 only (json.loads would also guess UTF-16/32 from bytes)
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_Literal,
            object_pairs_hook=_object,
        )
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError; nesting too deep
        text = str(exc)
        text = text if len(text) <= _SHOW_CHARS else text[:_SHOW_CHARS] + "…"
        raise MessageError("header", f"header is not JSON: {text}") from None


def parse_header(raw: bytes | memoryview, *, max_pixels: int | None = None) -> CameraHeader:
    """Validate the JSON header against the camera header schema (docs/daemon.md), the one place it is checked.

    Unknown keys are ignored (cameras may add metadata); known keys are strict: exact JSON types (a bool is not
    a number, a number is not a string), ranges and lengths, each at most once. Every way a header can be
    wrong raises :class:`MessageError`, carrying the frame id whenever that much of the header was valid.
    ``max_pixels`` (the configured ``decode.max_pixels``) bounds a raw frame's ``shape``.
    """
    h = _load_json(raw)
    if not isinstance(h, _Object):
        raise MessageError("header", f"header must be a JSON object, got {type(h).__name__}")
    if "frame_id" in h.duplicates:
        raise MessageError("header", "frame_id appears more than once: the part cannot be named")
    fid = h.get("frame_id")
    if not isinstance(fid, str) or not 0 < len(fid) <= MAX_FRAME_ID_CHARS:
        raise MessageError(
            "header",
            f"frame_id must be a string of 1..{MAX_FRAME_ID_CHARS} characters, got {_show(fid)}",
        )

    def bad(msg: str) -> MessageError:
        return MessageError("header", msg, frame_id=fid)

    repeated = sorted(h.duplicates & KNOWN_KEYS)
    if repeated:
        raise bad(f"header keys {repeated} appear more than once")
    enc = h.get("encoding")
    if not isinstance(enc, str) or enc not in ENCODINGS:
        raise bad(f"encoding must be one of {list(ENCODINGS)}, got {_show(enc)}")
    t_capture = h.get("t_capture")
    if t_capture is not None:
        if not (_is_int(t_capture) or type(t_capture) is float) or not (
            T_CAPTURE_MIN <= t_capture <= T_CAPTURE_MAX  # exact for ints of any size: no float() overflow
        ):
            raise bad(
                f"t_capture must be a number of epoch seconds in [{T_CAPTURE_MIN:.0f}, {T_CAPTURE_MAX:.0f}],"
                f" got {_show(t_capture)}"
            )
        t_capture = float(t_capture)
    label = h.get("label")
    if label is not None and (not isinstance(label, str) or label not in CLASS_NAMES):
        raise bad(f"label must be one of {list(CLASS_NAMES)} or absent, got {_show(label)}")
    shape: tuple[int, int] | None = None
    dtype: str | None = None
    if enc == "raw":
        s = h.get("shape")
        if not isinstance(s, list) or len(s) != 2 or not all(_is_int(v) and 0 < v <= MAX_SIDE for v in s):
            raise bad(f"raw frames need shape [height, width] of integers in 1..{MAX_SIDE}, got {_show(s)}")
        shape = (s[0], s[1])
        if max_pixels is not None and s[0] * s[1] > max_pixels:
            raise bad(f"raw frame {s[1]}×{s[0]} is above the limit of {max_pixels} pixels")
        dtype = h.get("dtype", "uint8")
        if not isinstance(dtype, str) or dtype not in RAW_DTYPES:
            raise bad(f"dtype must be one of {list(RAW_DTYPES)}, got {_show(dtype)}")
    return CameraHeader(fid, enc, shape, dtype, t_capture, label)


def multipart_error(first: Any | None, n_parts: int) -> MessageError:
    """The error for a message of ``n_parts`` ≠ 2 frames, attributed to the frame id in ``first`` if any."""
    fid = None
    if first is not None:
        try:
            fid = parse_header(_buffer(first)).frame_id
        except MessageError as exc:
            fid = exc.frame_id
    return MessageError(
        "multipart", f"expected {MESSAGE_PARTS} message frames (header, payload), got {n_parts}", fid
    )


def parse_message(
    parts: Sequence[Any], *, max_pixels: int, n_parts: int | None = None
) -> tuple[CameraHeader, np.ndarray | None, memoryview | None]:
    """Camera message → (header, raw image or None, encoded bytes or None), zero-copy.

    ``n_parts``: how many frames the message had, when the receiver kept only the first of a longer one
    (``parts`` then holds what it kept). A raw payload becomes a read-only numpy view on the message buffer;
    its byte length must equal shape × itemsize exactly (a disagreement means a torn or mislabelled frame,
    never guessed at).
    """
    n = len(parts) if n_parts is None else n_parts
    if n != MESSAGE_PARTS or len(parts) != MESSAGE_PARTS:
        raise multipart_error(parts[0] if parts else None, n)
    header = parse_header(_buffer(parts[0]), max_pixels=max_pixels)
    payload = _buffer(parts[1])
    if header.encoding != "raw":
        if payload.nbytes == 0:
            raise MessageError("payload", "empty payload", header.frame_id)
        return header, None, payload
    assert header.shape is not None and header.dtype is not None
    h, w = header.shape
    dt = RAW_DTYPES[header.dtype]
    expected = h * w * dt.itemsize
    if payload.nbytes != expected:
        raise MessageError(
            "payload",
            f"raw payload is {payload.nbytes} bytes, header says {h}×{w} {header.dtype} = {expected} bytes",
            header.frame_id,
        )
    return header, np.frombuffer(payload, dtype=dt).reshape(h, w), None


def camera_message(
    frame_id: str,
    payload: np.ndarray | bytes,
    *,
    encoding: str = "raw",
    label: str | None = None,
    t_capture: float | None = None,
) -> list[bytes | memoryview]:
    """Build a camera message (what ``inspectd camera`` and the tests send). Raw arrays are sent without copy."""
    header: dict[str, Any] = {"frame_id": frame_id, "encoding": encoding}
    if encoding == "raw":
        if not isinstance(payload, np.ndarray) or payload.ndim != 2:
            raise ValueError("raw encoding needs a 2-D numpy array")
        if payload.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"raw dtype must be uint8 or uint16, got {payload.dtype}")
        arr = np.ascontiguousarray(payload, dtype=payload.dtype.newbyteorder("<"))
        header["shape"] = [int(arr.shape[0]), int(arr.shape[1])]
        header["dtype"] = "uint8" if arr.dtype == np.uint8 else "uint16"
        body: bytes | memoryview = arr.data.cast("B")
    else:
        body = payload.tobytes() if isinstance(payload, np.ndarray) else bytes(payload)
    if t_capture is not None:
        header["t_capture"] = t_capture
    if label is not None:
        header["label"] = label
    return [json.dumps(header, separators=(",", ":")).encode(), body]


def verdict_message(
    v: Verdict, *, line: str, boot_id: str, seq: int, t_published: float, latency_ms: float
) -> dict[str, Any]:
    """The verdict record. Field set and meaning are a contract with the PLC gateway: add, never change."""
    return {
        "type": "verdict",
        "line": line,
        "boot_id": boot_id,
        "seq": seq,
        "frame_id": v.frame_id,
        "verdict": v.outcome.value,
        "reason": v.reason.value,
        "score": v.score,
        "threshold": v.threshold,
        "model": v.model,
        "t_capture": v.t_capture,
        "t_published": t_published,
        "latency_ms": round(latency_ms, 3),
        "detail": v.detail,
    }


def heartbeat_message(
    *, line: str, boot_id: str, seq_last: int, t_published: float, ready: bool
) -> dict[str, Any]:
    return {
        "type": "heartbeat",
        "line": line,
        "boot_id": boot_id,
        "seq_last": seq_last,
        "t_published": t_published,
        "ready": ready,
    }


def encode(message: dict[str, Any]) -> bytes:
    # allow_nan=False: a NaN score must never reach a PLC parser as a bare NaN token.
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
