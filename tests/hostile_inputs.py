"""Hostile, broken and unusual images for the reliability tests, built in memory (nothing copied from anywhere).

Bombs are real encoder output whose header is then patched to declare a huge size: a few hundred bytes that
would make OpenCV allocate gigabytes if it were ever handed them.
"""

from __future__ import annotations

import struct

import cv2
import numpy as np
from hypothesis import strategies as st

from daemon.image_policy import FORMATS

EXT = {"png": ".png", "bmp": ".bmp", "tiff": ".tif", "jpeg": ".jpg"}


def encode(img: np.ndarray, ext: str, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, img, params or [])
    assert ok, ext
    return buf.tobytes()


def gray(h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = 120 + 60 * np.sin(x / 7.0) * np.cos(y / 11.0) + rng.normal(0, 5, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


@st.composite
def encoded_images(
    draw: st.DrawFn, *, min_side: int = 1, max_side: int = 96, writer_options: bool = False
) -> tuple[str, int, int, bytes]:
    """(format, height, width, bytes): a real encoding of random pixels in a format the policy accepts, with
    every channel count and depth the format takes; with ``writer_options`` also the encoder settings that
    change the file's structure (progressive JPEG, restart intervals, PNG levels, TIFF compression)."""
    fmt = draw(st.sampled_from(FORMATS))
    h, w = draw(st.integers(min_side, max_side)), draw(st.integers(min_side, max_side))
    channels = draw(st.sampled_from([1, 3, 4] if fmt in ("png", "tiff", "bmp") else [1, 3]))
    depth16 = fmt in ("png", "tiff") and draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = np.uint16 if depth16 else np.uint8
    img = rng.integers(0, np.iinfo(dtype).max, (h, w, channels) if channels > 1 else (h, w), dtype=dtype)
    params: list[int] = []
    if writer_options and fmt == "jpeg":
        params = [
            cv2.IMWRITE_JPEG_PROGRESSIVE,
            int(draw(st.booleans())),
            cv2.IMWRITE_JPEG_RST_INTERVAL,
            draw(st.sampled_from([0, 0, 1, 3])),
        ]
    elif writer_options and fmt == "png":
        params = [cv2.IMWRITE_PNG_COMPRESSION, draw(st.integers(0, 9))]
    elif writer_options and fmt == "tiff":
        params = [cv2.IMWRITE_TIFF_COMPRESSION, draw(st.sampled_from([1, 5, 32946]))]
    return fmt, h, w, encode(img, EXT[fmt], params)


@st.composite
def mutated(draw: st.DrawFn, images: st.SearchStrategy[tuple[str, int, int, bytes]]) -> bytes:
    """One of ``images`` with up to 8 bytes changed, and cut short half the time."""
    _, _, _, data = draw(images)
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        if not buf:
            break
        i = draw(st.integers(0, len(buf) - 1))
        buf[i] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(buf)))
    return bytes(buf[: cut if draw(st.booleans()) else len(buf)])


def png_declaring(h: int, w: int) -> bytes:
    data = bytearray(encode(gray(8, 8), ".png"))
    data[16:24] = struct.pack(">II", w, h)  # IHDR width, height (CRC now wrong: never read that far)
    return bytes(data)


def bmp_declaring(h: int, w: int) -> bytes:
    data = bytearray(encode(gray(8, 8), ".bmp"))
    data[18:26] = struct.pack("<ii", w, h)
    return bytes(data)


def jpeg_declaring(h: int, w: int) -> bytes:
    data = bytearray(encode(np.full((16, 16), 128, np.uint8), ".jpg"))
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5 : i + 9] = struct.pack(">HH", h, w)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF in OpenCV's JPEG")


def tiff_declaring(h: int, w: int) -> bytes:
    data = bytearray(encode(np.full((16, 16), 128, np.uint8), ".tif"))
    endian = "<" if data[:2] == b"II" else ">"
    (offset,) = struct.unpack(endian + "I", data[4:8])
    (count,) = struct.unpack(endian + "H", data[offset : offset + 2])
    for k in range(count):
        e = offset + 2 + 12 * k
        (tag,) = struct.unpack(endian + "H", data[e : e + 2])
        if tag in (256, 257):
            data[e + 2 : e + 4] = struct.pack(endian + "H", 4)  # LONG, so sizes above 65535 fit
            data[e + 8 : e + 12] = struct.pack(endian + "I", w if tag == 256 else h)
    return bytes(data)


BOMBS = {"png": png_declaring, "bmp": bmp_declaring, "jpeg": jpeg_declaring, "tiff": tiff_declaring}


def unusual_valid() -> dict[str, bytes]:
    """Valid images a line camera does not normally send; the daemon inspects them (converted to 8-bit gray)."""
    g = gray(128, 128, seed=3)
    bgr = cv2.merge([g, np.roll(g, 5, axis=1), 255 - g])
    bgra = cv2.merge([*cv2.split(bgr), np.full_like(g, 200)])
    return {
        "gray16.png": encode(g.astype(np.uint16) * 257 + 100, ".png"),
        "rgb.png": encode(bgr, ".png"),
        "rgba.png": encode(bgra, ".png"),
        "gray.jpg": encode(g, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95]),
        "rgb.jpg": encode(bgr, ".jpg"),
        "gray.tif": encode(g, ".tif"),
        "gray16.tif": encode(g.astype(np.uint16) * 257, ".tif"),
        "rgb.bmp": encode(bgr, ".bmp"),
        "vga.png": encode(gray(480, 640, seed=4), ".png"),
    }


# -- camera headers: JSON that parses, with values that must not -------------------------------------------

HUGE_INT = "1" + "0" * 5000  # beyond CPython's 4300-digit int-string limit: a ValueError inside json.loads
BIG_INT = "9" * 400  # an int json.loads returns, but float() of it overflows (OverflowError)


def header_text(*pairs: tuple[str, str]) -> bytes:
    """A JSON object from (key, JSON text of the value) pairs, written by hand: ``json.dumps`` cannot write a
    5000-digit integer, NaN-free infinities or a repeated key."""
    return ("{" + ",".join(f'"{k}":{v}' for k, v in pairs) + "}").encode()


def _named(fid: str, *pairs: tuple[str, str]) -> bytes:
    return header_text(("frame_id", f'"{fid}"'), *pairs)


_PNG = ("encoding", '"png"')
_RAW = ("encoding", '"raw"')
_SHAPE = ("shape", "[64, 64]")

# frame id → a header that names its part but breaks the schema in one known key: REJECT decode_error.
HOSTILE_HEADERS: dict[str, bytes] = {
    "t-capture-5000-digits": _named("t-capture-5000-digits", _PNG, ("t_capture", HUGE_INT)),
    "t-capture-400-digits": _named("t-capture-400-digits", _PNG, ("t_capture", BIG_INT)),
    "t-capture-1e999": _named("t-capture-1e999", _PNG, ("t_capture", "1e999")),
    "t-capture-minus-infinity": _named("t-capture-minus-infinity", _PNG, ("t_capture", "-Infinity")),
    "t-capture-nan": _named("t-capture-nan", _PNG, ("t_capture", "NaN")),
    "t-capture-true": _named("t-capture-true", _PNG, ("t_capture", "true")),
    "t-capture-negative": _named("t-capture-negative", _PNG, ("t_capture", "-1")),
    "t-capture-year-2200": _named("t-capture-year-2200", _PNG, ("t_capture", "7258118400")),
    "t-capture-list": _named("t-capture-list", _PNG, ("t_capture", "[1700000000]")),
    "t-capture-string": _named("t-capture-string", _PNG, ("t_capture", '"1700000000"')),
    "encoding-list": _named("encoding-list", ("encoding", "[]")),
    "encoding-object": _named("encoding-object", ("encoding", '{"png": 1}')),
    "encoding-number": _named("encoding-number", ("encoding", HUGE_INT)),
    "label-object": _named("label-object", _PNG, ("label", "{}")),
    "label-list": _named("label-list", _PNG, ("label", '["OK"]')),
    "label-true": _named("label-true", _PNG, ("label", "true")),
    "dtype-list": _named("dtype-list", _RAW, _SHAPE, ("dtype", "[]")),
    "dtype-object": _named("dtype-object", _RAW, _SHAPE, ("dtype", "{}")),
    "dtype-null": _named("dtype-null", _RAW, _SHAPE, ("dtype", "null")),
    "dtype-number": _named("dtype-number", _RAW, _SHAPE, ("dtype", "8")),
    "shape-5000-digits": _named("shape-5000-digits", _RAW, ("shape", f"[{HUGE_INT}, 64]")),
    "shape-400-digits": _named("shape-400-digits", _RAW, ("shape", f"[64, {BIG_INT}]")),
    "shape-2-pow-40": _named("shape-2-pow-40", _RAW, ("shape", f"[{2**40}, {2**40}]")),
    "shape-1e999": _named("shape-1e999", _RAW, ("shape", "[1e999, 64]")),
    "shape-floats": _named("shape-floats", _RAW, ("shape", "[64.0, 64.0]")),
    "shape-bools": _named("shape-bools", _RAW, ("shape", "[true, true]")),
    "shape-nested": _named("shape-nested", _RAW, ("shape", "[[64], [64]]")),
    "shape-negative": _named("shape-negative", _RAW, ("shape", "[-64, 64]")),
    "shape-object": _named("shape-object", _RAW, ("shape", '{"h": 64, "w": 64}')),
    "label-twice": _named("label-twice", _PNG, ("label", '"OK"'), ("label", '"NG"')),
}

# Headers whose part cannot be named: counted (inspectd_message_errors_total{kind="header"}), logged, no verdict.
UNNAMED_HEADERS: dict[str, bytes] = {
    "frame-id-number": header_text(("frame_id", "123"), _PNG),
    "frame-id-5000-digits": header_text(("frame_id", HUGE_INT), _PNG),
    "frame-id-1e999": header_text(("frame_id", "1e999"), _PNG),
    "frame-id-list": header_text(("frame_id", '["a"]'), _PNG),
    "frame-id-object": header_text(("frame_id", '{"id": "a"}'), _PNG),
    "frame-id-true": header_text(("frame_id", "true"), _PNG),
    "frame-id-too-long": header_text(("frame_id", '"' + "x" * 300 + '"'), _PNG),
    "frame-id-twice": header_text(("frame_id", '"a"'), ("frame_id", '"b"'), _PNG),
    "nested-too-deep": header_text(("frame_id", '"deep"'), _PNG, ("meta", "[" * 5000 + "]" * 5000)),
}

# frame id → hostile values only in keys the daemon does not know (camera metadata): ignored, inspected.
TOLERATED_HEADERS: dict[str, bytes] = {
    "metadata-extreme": _named(
        "metadata-extreme",
        _PNG,
        ("exposure_us", HUGE_INT),
        ("gain", "1e999"),
        ("offset", "NaN"),
        ("roi", '[[1, 2], {"x": []}]'),
        ("note", '"' + "n" * 2000 + '"'),
    ),
}
