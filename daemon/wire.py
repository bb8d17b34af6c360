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


def _buffer(part: Any) -> memoryview:
    """bytes, memoryview or zmq.Frame (``.buffer``) → memoryview, without copying."""
    buf = getattr(part, "buffer", part)
    return buf if isinstance(buf, memoryview) else memoryview(buf)


def parse_header(raw: bytes | memoryview) -> CameraHeader:
    """Validate the JSON header. Unknown keys are ignored (cameras may add metadata); known keys are strict."""
    if len(raw) > MAX_HEADER_BYTES:
        raise MessageError("header", f"header is {len(raw)} bytes, above {MAX_HEADER_BYTES}")
    try:
        h = json.loads(bytes(raw))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise MessageError("header", f"header is not JSON: {exc}") from None
    if not isinstance(h, dict):
        raise MessageError("header", f"header must be a JSON object, got {type(h).__name__}")
    fid = h.get("frame_id")
    if not isinstance(fid, str) or not 0 < len(fid) <= MAX_FRAME_ID_CHARS:
        raise MessageError("header", f"frame_id must be a string of 1..{MAX_FRAME_ID_CHARS} characters")

    def bad(msg: str) -> MessageError:
        return MessageError("header", msg, frame_id=fid)

    enc = h.get("encoding")
    if enc not in ENCODINGS:
        raise bad(f"encoding must be one of {list(ENCODINGS)}, got {enc!r}")
    t_capture = h.get("t_capture")
    if t_capture is not None:
        if (
            isinstance(t_capture, bool)
            or not isinstance(t_capture, int | float)
            or not math.isfinite(t_capture)
        ):
            raise bad(f"t_capture must be a finite number (epoch seconds), got {t_capture!r}")
        t_capture = float(t_capture)
    label = h.get("label")
    if label is not None and label not in CLASS_NAMES:
        raise bad(f"label must be one of {list(CLASS_NAMES)} or absent, got {label!r}")
    shape: tuple[int, int] | None = None
    dtype: str | None = None
    if enc == "raw":
        s = h.get("shape")
        if (
            not isinstance(s, list)
            or len(s) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in s)
        ):
            raise bad(f"raw frames need shape [height, width] of positive integers, got {s!r}")
        shape = (s[0], s[1])
        dtype = h.get("dtype", "uint8")
        if dtype not in RAW_DTYPES:
            raise bad(f"dtype must be one of {list(RAW_DTYPES)}, got {dtype!r}")
    return CameraHeader(fid, enc, shape, dtype, t_capture, label)


def parse_message(
    parts: Sequence[Any], *, max_pixels: int
) -> tuple[CameraHeader, np.ndarray | None, memoryview | None]:
    """Camera message → (header, raw image or None, encoded bytes or None), zero-copy.

    A raw payload becomes a read-only numpy view on the message buffer; its byte length must equal
    shape × itemsize exactly (a disagreement means a torn or mislabelled frame, never guessed at).
    """
    if len(parts) != 2:
        fid = None
        if parts:
            try:
                fid = parse_header(_buffer(parts[0])).frame_id
            except MessageError as exc:
                fid = exc.frame_id
        raise MessageError("multipart", f"expected 2 message frames (header, payload), got {len(parts)}", fid)
    header = parse_header(_buffer(parts[0]))
    payload = _buffer(parts[1])
    if header.encoding != "raw":
        if payload.nbytes == 0:
            raise MessageError("payload", "empty payload", header.frame_id)
        return header, None, payload
    assert header.shape is not None and header.dtype is not None
    h, w = header.shape
    if h * w > max_pixels:
        raise MessageError(
            "payload", f"raw frame {w}×{h} is above the limit of {max_pixels} pixels", header.frame_id
        )
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
