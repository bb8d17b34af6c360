"""What the daemon agrees to decode: a format allow-list and size limits, judged from the header alone.

OpenCV allocates the full image as soon as it has read a header, so a 400-byte JPEG declaring 30000×30000
pixels costs 1.7 GB before it fails (measured). Everything the sources hand on is therefore sniffed first:
the format is read from the magic bytes (never from a file extension or the camera's ``encoding`` field, which
must agree with it), the declared width × height from the header, and both are held against
``decode.formats``, ``decode.min_side``, ``decode.max_side`` and ``decode.max_pixels``. A refusal is a
:class:`InputRejected` whose message becomes the REJECT ``decode_error`` detail. Only PNG, BMP, TIFF and JPEG
are understood; anything else OpenCV could decode (WebP, PNM, EXR, JPEG 2000, …) is refused, which also keeps
those decoders out of reach of the network.

Sniffing reads at most a bounded prefix and never raises anything but :class:`InputRejected` (property-tested
against arbitrary bytes in tests/unit/test_reliability_image_policy.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

FORMATS = ("png", "bmp", "tiff", "jpeg")

# JPEG: an EXIF/ICC preamble before the frame header is normal but bounded; a stream that does not reach its
# SOF within this many bytes/markers is refused rather than walked for seconds on the camera thread.
_JPEG_MAX_SCAN_BYTES = 1 << 20
_JPEG_MAX_MARKERS = 512
# SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC): the markers that carry the frame size.
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_TIFF_WIDTH, _TIFF_LENGTH = 256, 257
_TIFF_MAX_ENTRIES = 4096


class InputRejected(ValueError):
    """The input is refused before decoding; the message says why (it becomes the verdict's detail)."""


@dataclass(frozen=True, slots=True)
class ImageHeader:
    format: str
    height: int
    width: int


def sniff(data: bytes | memoryview) -> ImageHeader:
    """Format and declared size from the first bytes; :class:`InputRejected` when either cannot be read."""
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    head = bytes(view[:8])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png(view)
    if head.startswith(b"BM"):
        return _bmp(view)
    if head.startswith(b"\xff\xd8\xff"):
        return _jpeg(view)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return _tiff(view)
    if not head:
        raise InputRejected("empty image data (0 bytes)")
    raise InputRejected(f"not a PNG, BMP, TIFF or JPEG image (starts with {head[:4].hex()})")


def _png(v: memoryview) -> ImageHeader:
    if len(v) < 24 or bytes(v[12:16]) != b"IHDR":
        raise InputRejected("truncated or malformed PNG header (no IHDR)")
    w, h = struct.unpack(">II", v[16:24])
    return ImageHeader("png", h, w)


def _bmp(v: memoryview) -> ImageHeader:
    if len(v) < 26:
        raise InputRejected("truncated BMP header")
    (dib,) = struct.unpack("<I", v[14:18])
    if dib == 12:  # OS/2 BITMAPCOREHEADER: 16-bit unsigned sizes
        w, h = struct.unpack("<HH", v[18:22])
    elif 16 <= dib <= 124:
        w, h = struct.unpack("<ii", v[18:26])
        h = abs(h)  # negative height = top-down rows
    else:
        raise InputRejected(f"malformed BMP header (DIB header size {dib})")
    return ImageHeader("bmp", h, w)


def _jpeg(v: memoryview) -> ImageHeader:
    i, n, markers = 2, min(len(v), _JPEG_MAX_SCAN_BYTES), 0
    while i + 4 <= n:
        if v[i] != 0xFF:
            raise InputRejected(f"malformed JPEG: no marker at byte {i}")
        marker = v[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        markers += 1
        if markers > _JPEG_MAX_MARKERS:
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers: no length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            raise InputRejected("malformed JPEG: no frame header (SOF) before the scan")
        (length,) = struct.unpack(">H", v[i + 2 : i + 4])
        if length < 2:
            raise InputRejected(f"malformed JPEG: segment length {length}")
        if marker in _JPEG_SOF:
            if i + 9 > len(v):
                raise InputRejected("truncated JPEG frame header")
            h, w = struct.unpack(">HH", v[i + 5 : i + 9])
            if h == 0:  # height defined later by a DNL marker: legal, but OpenCV cannot check it up front
                raise InputRejected("JPEG without a height in its frame header (DNL) is not supported")
            return ImageHeader("jpeg", h, w)
        i += 2 + length
    raise InputRejected("truncated JPEG or no frame header (SOF) within the first markers")


def _tiff(v: memoryview) -> ImageHeader:
    endian = "<" if bytes(v[:2]) == b"II" else ">"
    big = v[2] == 0x2B or v[3] == 0x2B  # BigTIFF: 8-byte offsets, 20-byte entries
    try:
        if big:
            (offset,) = struct.unpack(endian + "Q", v[8:16])
            (count,) = struct.unpack(endian + "Q", v[offset : offset + 8])
            first, size = offset + 8, 20
        else:
            (offset,) = struct.unpack(endian + "I", v[4:8])
            (count,) = struct.unpack(endian + "H", v[offset : offset + 2])
            first, size = offset + 2, 12
    except struct.error:
        raise InputRejected("truncated TIFF header (first directory out of range)") from None
    if count > _TIFF_MAX_ENTRIES:
        raise InputRejected(f"malformed TIFF: {count} directory entries")
    dims: dict[int, int] = {}
    for k in range(int(count)):
        e = first + k * size
        entry = v[e : e + size]
        if len(entry) < size:
            raise InputRejected("truncated TIFF directory")
        tag, typ = struct.unpack(endian + "HH", entry[:4])
        if tag in (_TIFF_WIDTH, _TIFF_LENGTH):
            value_at = 12 if big else 8
            if typ == 3:  # SHORT
                (val,) = struct.unpack(endian + "H", entry[value_at : value_at + 2])
            elif typ == 4:  # LONG
                (val,) = struct.unpack(endian + "I", entry[value_at : value_at + 4])
            elif typ == 16 and big:  # LONG8
                (val,) = struct.unpack(endian + "Q", entry[value_at : value_at + 8])
            else:
                raise InputRejected(f"malformed TIFF: image size tag of type {typ}")
            dims[tag] = int(val)
    if _TIFF_WIDTH not in dims or _TIFF_LENGTH not in dims:
        raise InputRejected("malformed TIFF: no ImageWidth/ImageLength")
    return ImageHeader("tiff", dims[_TIFF_LENGTH], dims[_TIFF_WIDTH])


class InputPolicy:
    """``decode.*`` applied to untrusted input before anything is decoded (see the module docstring)."""

    def __init__(
        self,
        *,
        formats: tuple[str, ...] | list[str] = FORMATS,
        min_side: int = 16,
        max_side: int = 32768,
        max_pixels: int = 64 * 1024 * 1024,
    ) -> None:
        unknown = set(formats) - set(FORMATS)
        if unknown:
            raise ValueError(f"unknown image format(s) {sorted(unknown)}; known: {list(FORMATS)}")
        self.formats = tuple(formats)
        self.min_side = min_side
        self.max_side = max_side
        self.max_pixels = max_pixels

    @classmethod
    def from_settings(cls, decode: Any) -> InputPolicy:
        return cls(
            formats=tuple(decode.formats),
            min_side=decode.min_side,
            max_side=decode.max_side,
            max_pixels=decode.max_pixels,
        )

    def check_size(self, height: int, width: int, what: str = "image") -> None:
        if height < self.min_side or width < self.min_side:
            raise InputRejected(
                f"{what} is {width}×{height}, below the minimum side of {self.min_side} (decode.min_side)"
            )
        if height > self.max_side or width > self.max_side:
            raise InputRejected(
                f"{what} is {width}×{height}, above the maximum side of {self.max_side} (decode.max_side)"
            )
        if height * width > self.max_pixels:
            raise InputRejected(
                f"{what} declares {width}×{height} pixels, above the limit of {self.max_pixels} "
                "(decode.max_pixels)"
            )

    def check_encoded(self, data: bytes | memoryview, declared: str | None = None) -> ImageHeader:
        """The header of an encoded image, or :class:`InputRejected`. ``declared`` is the camera's claim."""
        header = sniff(data)
        if declared is not None and declared != header.format:
            raise InputRejected(f"payload is a {header.format.upper()} image, the header says {declared!r}")
        if header.format not in self.formats:
            raise InputRejected(
                f"{header.format.upper()} images are not accepted here (decode.formats = {list(self.formats)})"
            )
        self.check_size(header.height, header.width, f"{header.format.upper()} image")
        return header


def limit_opencv_pixels(max_pixels: int) -> bool:
    """Make OpenCV itself refuse images above ``max_pixels`` before allocating them (``imdecode`` checks its
    limit right after reading the header). The second line of defence, for whatever reaches OpenCV without
    passing :func:`sniff` (e.g. a replay folder). OpenCV reads ``OPENCV_IO_MAX_IMAGE_PIXELS`` once, when ``cv2``
    loads, so this only works before the first ``import cv2``; returns False when it is too late. A lower
    value already in the environment is kept.
    """
    import os
    import sys

    if "cv2" in sys.modules:
        return False
    current = os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", "")
    limit = min(max_pixels, int(current)) if current.isdigit() else max_pixels
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(limit)
    return True
