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

**Completeness** (:func:`check_complete`, part of :meth:`InputPolicy.check_encoded`): a partial image is never
handed to a decoder, because what a decoder makes of a premature end differs between builds (libjpeg fills
the rest of a JPEG with grey and calls it a warning; a JPEG whose header declares more than its data holds
"decodes" to full size). Before decoding, the file's own structure is walked to its end:

- PNG: the chunk sequence from the signature, every chunk's declared length inside the data, at least one
  IDAT, and the IEND chunk ending exactly at the last byte.
- JPEG: every marker segment inside the data, every scan's entropy-coded data followed by a marker, and the
  end-of-image marker (FFD9) after the last scan as the last two bytes: nothing after it, zero padding
  included (a fixed-size buffer or a preallocated file padded with zeros is exactly how a part-written image
  looks, so it is not tolerated). Where the frame size allows a bound, the scans must hold at least the
  fewest bytes that size can be coded in (2 bits per 8×8 block for sequential Huffman, 1 for progressive),
  and with a restart interval every scan must hold all its restart markers: a stream cut short and closed
  with an FFD9 is refused on these two when it is not on the first.
- BMP: the header whole, the file size it declares and its pixel array (rows × padded stride from the pixel
  offset, or the declared size of RLE data) inside the data.
- TIFF/BigTIFF: every strip and tile (offset + byte count) of the first directory, and every out-of-line tag
  value of it, inside the data.

A refusal says "incomplete <FORMAT>: …" (the data ends before the structure does) or "malformed <FORMAT>: …".
The walk is linear in the data (C-speed searches, a bounded number of Python steps per segment/chunk/strip)
and never raises anything but :class:`InputRejected` (tests/unit/test_image_completeness.py).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

FORMATS = ("png", "bmp", "tiff", "jpeg")

# JPEG: an EXIF/ICC preamble before the frame header is normal but bounded; a stream that does not reach its
# SOF within this many bytes/markers is refused rather than walked for seconds on the camera thread.
_JPEG_MAX_SCAN_BYTES = 1 << 20
_JPEG_MAX_MARKERS = 512
# SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC): the markers that carry the frame size.
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_MAGICS = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
)
_TIFF_WIDTH, _TIFF_LENGTH = 256, 257
_TIFF_MAX_ENTRIES = 4096
# Completeness walk (check_complete): bounds on the Python steps a hostile file can make it take.
_JPEG_MAX_SEGMENTS = 4096  # real files have tens (a progressive one: scans + tables, ~30)
_PNG_MAX_CHUNKS = 1 << 16  # libpng writes 8 KiB IDATs: 8192 for 64 MiB; more means a hostile file
_JPEG_FILL = re.compile(rb"[^\xff]")  # the first byte after a run of fill bytes (FF FF …)
# The marker that ends a scan's entropy-coded data: FF followed by anything but a stuffed 00, a restart marker
# (RST0–7, part of the scan) or another fill byte.
_JPEG_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_SEQUENTIAL_HUFFMAN = frozenset({0xC0, 0xC1})  # ≥ 2 bits per block: a DC code and an EOB (or ACs)
_JPEG_PROGRESSIVE_HUFFMAN = frozenset({0xC2})  # ≥ 1 bit per block: the DC-first scans code every block
_TIFF_STRIPS = ((273, 279, "strip"), (324, 325, "tile"))  # (offsets tag, byte counts tag, what)
_TIFF_TYPE_SIZE = {
    1: 1,
    2: 1,
    3: 2,
    4: 4,
    5: 8,
    6: 1,
    7: 1,
    8: 2,
    9: 4,
    10: 8,
    11: 4,
    12: 8,
    13: 4,
    16: 8,
    17: 8,
    18: 8,
}
_TIFF_INT_CODE = {3: "H", 4: "I", 16: "Q"}  # the integer types strip/tile offsets and counts may have


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
    for magic, fmt in _MAGICS:
        if len(head) < len(magic) and magic.startswith(head):
            raise InputRejected(
                f"truncated {fmt} header: {len(head)} bytes of its {len(magic)}-byte signature"
            )
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
        if (
            marker == 0xFF
        ):  # fill bytes: skip the whole run at once (a payload of FF must not cost a loop each)
            m = _JPEG_FILL.search(v, i + 1, n)
            i = (m.start() if m is not None else n) - 1
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


def _tiff_directory(v: memoryview) -> tuple[str, bool, list[memoryview], int]:
    """(byte order, BigTIFF, the first directory's entries, where its next-directory offset lies): sizes and
    completeness both read it."""
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
    entries = []
    for k in range(int(count)):
        e = first + k * size
        entry = v[e : e + size]
        if len(entry) < size:
            raise InputRejected("truncated TIFF directory")
        entries.append(entry)
    return endian, big, entries, first + int(count) * size


def _tiff(v: memoryview) -> ImageHeader:
    endian, big, entries, _ = _tiff_directory(v)
    dims: dict[int, int] = {}
    for entry in entries:
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


# -- completeness ---------------------------------------------------------------------------------------------
def check_complete(data: bytes | memoryview, header: ImageHeader | None = None) -> None:
    """Refuse (:class:`InputRejected`, "incomplete …") an encoded image whose data ends before its structure
    does; see the module docstring for what is walked per format. ``header``: the already sniffed header (else
    sniffed here, which refuses anything but PNG, BMP, TIFF and JPEG)."""
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    if header is None:
        header = sniff(view)
    try:
        if header.format == "png":
            _png_complete(view)
        elif header.format == "jpeg":
            _jpeg_complete(view)
        elif header.format == "bmp":
            _bmp_complete(view, header)
        else:
            _tiff_complete(view)
    except InputRejected:
        raise
    except (struct.error, IndexError, ValueError) as exc:
        # The walk reads nothing without checking the length first; this is the net under that rule.
        raise InputRejected(f"malformed {header.format.upper()}: {exc}") from None


def _png_complete(v: memoryview) -> None:
    n, i, chunks, image_data = len(v), 8, 0, False
    while True:
        if i + 12 > n:
            where = "no IEND chunk" if i == n else f"a chunk header cut off at byte {i}"
            raise InputRejected(f"incomplete PNG: the data ends after {n} bytes with {where} (truncated)")
        length, kind = struct.unpack_from(">I4s", v, i)
        end = i + 12 + length
        if end > n:
            raise InputRejected(
                f"incomplete PNG: the {_chunk_name(kind)} chunk at byte {i} declares {length} bytes, the data "
                f"ends {n - i - 8} bytes into it (truncated)"
            )
        if kind == b"IDAT":
            image_data = True
        elif kind == b"IEND":
            if not image_data:
                raise InputRejected("incomplete PNG: no image data (IDAT) before IEND")
            if end != n:
                raise InputRejected(f"malformed PNG: {n - end} bytes after the IEND chunk")
            return
        chunks += 1
        if chunks > _PNG_MAX_CHUNKS:
            raise InputRejected(f"malformed PNG: more than {_PNG_MAX_CHUNKS} chunks")
        i = end


def _chunk_name(kind: bytes) -> str:
    return kind.decode("ascii") if kind.isalpha() else kind.hex()


def _jpeg_complete(v: memoryview) -> None:
    n, i, segments = len(v), 2, 0
    # (SOF marker, height, width, {component id: (horizontal, vertical sampling)}) of the frame header
    frame: tuple[int, int, int, dict[int, tuple[int, int]]] | None = None
    restart_interval = 0
    scan_bytes = 0
    while True:
        if i + 2 > n:
            raise InputRejected(
                f"incomplete JPEG: the data ends after {n} bytes without an end-of-image marker (truncated)"
            )
        if v[i] != 0xFF:
            raise InputRejected(f"malformed JPEG: no marker at byte {i}")
        marker = v[i + 1]
        if marker == 0xFF:  # fill bytes
            m = _JPEG_FILL.search(v, i + 1, n)
            i = (m.start() if m is not None else n) - 1
            continue
        if marker == 0xD9:  # EOI
            if i + 2 != n:
                raise InputRejected(f"malformed JPEG: {n - i - 2} bytes after the end-of-image marker")
            break
        segments += 1
        if segments > _JPEG_MAX_SEGMENTS:
            raise InputRejected(f"malformed JPEG: more than {_JPEG_MAX_SEGMENTS} segments")
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, a stray RST: no length
            i += 2
            continue
        if marker == 0xD8:
            raise InputRejected(f"malformed JPEG: a second start-of-image marker at byte {i}")
        if i + 4 > n:
            raise InputRejected(f"incomplete JPEG: a segment header cut off at byte {i} (truncated)")
        (length,) = struct.unpack_from(">H", v, i + 2)
        end = i + 2 + length
        if length < 2:
            raise InputRejected(f"malformed JPEG: segment length {length} at byte {i}")
        if end > n:
            raise InputRejected(
                f"incomplete JPEG: the FF{marker:02X} segment at byte {i} declares {length} bytes, the data ends "
                f"{n - i - 2} bytes into it (truncated)"
            )
        if marker in _JPEG_SOF and frame is None and length >= 8:
            h, w, nf = struct.unpack_from(">HHB", v, i + 5)
            comps = {}
            for c in range(min(nf, (length - 8) // 3)):
                cid, hv = v[i + 10 + 3 * c], v[i + 11 + 3 * c]
                comps[cid] = (max(hv >> 4, 1), max(hv & 15, 1))
            frame = (marker, h, w, comps)
        elif marker == 0xDD and length >= 4:  # DRI
            (restart_interval,) = struct.unpack_from(">H", v, i + 4)
        i = end
        if marker == 0xDA:  # SOS: entropy-coded data up to the next marker that is not part of it
            m = _JPEG_SCAN_END.search(v, i, n)
            if m is None:
                raise InputRejected(
                    f"incomplete JPEG: the scan at byte {i} runs to the end of the data without an end-of-image "
                    "marker (truncated)"
                )
            j = m.start()
            scan_bytes += j - i
            if restart_interval and frame is not None:
                _jpeg_restarts(v, i, j, end - length - 2, restart_interval, frame)
            i = j
    if frame is None:
        raise InputRejected("malformed JPEG: no frame header (SOF)")
    if scan_bytes == 0:
        raise InputRejected("incomplete JPEG: no image data (scan) before the end-of-image marker")
    sof, h, w, comps = frame
    per_block = 4 if sof in _JPEG_SEQUENTIAL_HUFFMAN else 8 if sof in _JPEG_PROGRESSIVE_HUFFMAN else 0
    if per_block and comps:
        need = -(-sum(_jpeg_blocks(h, w, comps, cid) for cid in comps) // per_block)
        if scan_bytes < need:
            raise InputRejected(
                f"incomplete JPEG: {w}×{h} needs at least {need} bytes of image data, the scans hold "
                f"{scan_bytes} (truncated, or a header declaring more than the data holds)"
            )


def _jpeg_blocks(h: int, w: int, comps: dict[int, tuple[int, int]], cid: int) -> int:
    """8×8 blocks of one component (without the padding to whole MCUs: a lower bound)."""
    hmax = max(c[0] for c in comps.values())
    vmax = max(c[1] for c in comps.values())
    hs, vs = comps[cid]
    cw, ch = -(-w * hs // hmax), -(-h * vs // vmax)
    return (-(-cw // 8)) * (-(-ch // 8))


def _jpeg_restarts(
    v: memoryview,
    start: int,
    stop: int,
    sos: int,
    interval: int,
    frame: tuple[int, int, int, dict[int, tuple[int, int]]],
) -> None:
    """A scan with a restart interval holds ceil(MCUs / interval) − 1 restart markers; fewer means it was cut."""
    _, h, w, comps = frame
    length, ns = struct.unpack_from(">HB", v, sos + 2)
    if length < 6 + 2 * ns:
        return  # malformed scan header: the decoder refuses it; nothing to count against
    ids = [v[sos + 5 + 2 * k] for k in range(ns)]
    if not ids or any(cid not in comps for cid in ids):
        return  # malformed scan header: the decoder refuses it; nothing to count against
    if len(ids) == 1:  # non-interleaved: one block per MCU
        mcus = _jpeg_blocks(h, w, comps, ids[0])
    else:
        hmax = max(c[0] for c in comps.values())
        vmax = max(c[1] for c in comps.values())
        mcus = (-(-w // (8 * hmax))) * (-(-h // (8 * vmax)))
    expected = -(-mcus // interval) - 1
    if expected <= 0:
        return
    scan = np.frombuffer(v, np.uint8, stop - start, start)
    found = int(np.count_nonzero((scan[:-1] == 0xFF) & ((scan[1:] & 0xF8) == 0xD0)))  # FF D0 … FF D7
    if found < expected:
        raise InputRejected(
            f"incomplete JPEG: the scan at byte {start} holds {found} of its {expected} restart markers "
            "(truncated)"
        )


def _bmp_complete(v: memoryview, header: ImageHeader) -> None:
    n = len(v)
    file_size, _, pixel_offset, dib = struct.unpack_from("<I4sII", v, 2)
    if 14 + dib > n:
        raise InputRejected(f"incomplete BMP: the {dib}-byte header is cut off at {n} bytes (truncated)")
    if file_size > n:
        raise InputRejected(
            f"incomplete BMP: the header declares {file_size} bytes, the data has {n} (truncated)"
        )
    if dib == 12:
        (bpp,) = struct.unpack_from("<H", v, 24)
        compression, image_size = 0, 0
    else:
        (bpp,) = struct.unpack_from("<H", v, 28)
        compression = struct.unpack_from("<I", v, 30)[0] if dib >= 20 else 0
        image_size = struct.unpack_from("<I", v, 34)[0] if dib >= 24 else 0
    if compression in (0, 3, 6):  # BI_RGB, BI_BITFIELDS, BI_ALPHABITFIELDS: rows of padded pixels
        if bpp == 0 or header.width <= 0:
            raise InputRejected(f"malformed BMP: {header.width} pixels wide, {bpp} bits per pixel")
        stride = (header.width * bpp + 31) // 32 * 4
        need, what = pixel_offset + stride * header.height, "pixel array"
    elif compression in (1, 2):  # BI_RLE8, BI_RLE4: only the declared size says where the data ends
        if image_size == 0:
            raise InputRejected(
                "malformed BMP: RLE data without its size (cannot be checked for completeness)"
            )
        need, what = pixel_offset + image_size, "RLE data"
    else:
        raise InputRejected(f"malformed BMP: compression {compression} is not supported")
    if need > n:
        raise InputRejected(f"incomplete BMP: its {what} ends at byte {need}, the data has {n} (truncated)")


def _tiff_complete(v: memoryview) -> None:
    n = len(v)
    endian, big, entries, next_at = _tiff_directory(v)
    inline, value_at = (8, 12) if big else (4, 8)
    if next_at + inline > n:
        raise InputRejected(
            f"incomplete TIFF: the directory's last bytes are cut off at {n} bytes (truncated)"
        )
    tables: dict[int, tuple[int, ...]] = {}
    for entry in entries:
        tag, typ = struct.unpack(endian + "HH", entry[:4])
        (count,) = struct.unpack(endian + ("Q" if big else "I"), entry[4 : 4 + (8 if big else 4)])
        total = count * _TIFF_TYPE_SIZE.get(typ, 1)
        if total <= inline:
            where, raw = "inline", entry[value_at : value_at + total]
        else:
            (offset,) = struct.unpack(endian + ("Q" if big else "I"), entry[value_at : value_at + inline])
            if offset + total > n:
                raise InputRejected(
                    f"incomplete TIFF: the values of tag {tag} (bytes {offset}–{offset + total}) lie beyond "
                    f"the end of the data at {n} bytes (truncated)"
                )
            where, raw = "table", v[offset : offset + total]
        if any(tag in pair[:2] for pair in _TIFF_STRIPS):
            code = _TIFF_INT_CODE.get(typ)
            if code is None:
                raise InputRejected(f"malformed TIFF: tag {tag} of type {typ} ({where})")
            tables[tag] = struct.unpack(f"{endian}{int(count)}{code}", raw)
    found = False
    for offsets_tag, counts_tag, what in _TIFF_STRIPS:
        offsets, counts = tables.get(offsets_tag), tables.get(counts_tag)
        if offsets is None and counts is None:
            continue
        if offsets is None or counts is None or len(offsets) != len(counts):
            raise InputRejected(
                f"malformed TIFF: {what} offsets and byte counts do not match (cannot be checked for completeness)"
            )
        found = True
        for k, (offset, size) in enumerate(zip(offsets, counts, strict=True)):
            if offset + size > n:
                raise InputRejected(
                    f"incomplete TIFF: {what} {k} (bytes {offset}–{offset + size}) lies beyond the end of the "
                    f"data at {n} bytes (truncated)"
                )
    if not found:
        raise InputRejected("malformed TIFF: no strip or tile offsets (cannot be checked for completeness)")


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
        """The header of a whole encoded image within the limits, or :class:`InputRejected`. ``declared`` is the
        camera's claim."""
        header = sniff(data)
        if declared is not None and declared != header.format:
            raise InputRejected(f"payload is a {header.format.upper()} image, the header says {declared!r}")
        if header.format not in self.formats:
            raise InputRejected(
                f"{header.format.upper()} images are not accepted here (decode.formats = {list(self.formats)})"
            )
        self.check_size(header.height, header.width, f"{header.format.upper()} image")
        check_complete(data, header)  # after the size: a bomb is named as one, not as a short file
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
