"""Hostile, broken and unusual images for the reliability tests, built in memory (nothing copied from anywhere).

Bombs are real encoder output whose header is then patched to declare a huge size: a few hundred bytes that
would make OpenCV allocate gigabytes if it were ever handed them.
"""

from __future__ import annotations

import struct

import cv2
import numpy as np


def encode(img: np.ndarray, ext: str, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, img, params or [])
    assert ok, ext
    return buf.tobytes()


def gray(h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = 120 + 60 * np.sin(x / 7.0) * np.cos(y / 11.0) + rng.normal(0, 5, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


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
