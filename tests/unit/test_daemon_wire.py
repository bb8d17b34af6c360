"""Camera header/payload parsing (pure functions) — example cases and hypothesis properties."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.wire import MessageError, camera_message, encode, parse_header, parse_message

MAXPIX = 1 << 20


def hdr(**kw: object) -> bytes:
    return json.dumps(kw).encode()


def test_raw_round_trip_is_zero_copy() -> None:
    img = (np.arange(12 * 10) % 251).astype(np.uint8).reshape(12, 10)
    parts = camera_message("p1", img, label="NG", t_capture=5.0)
    header, image, data = parse_message(parts, max_pixels=MAXPIX)
    assert (header.frame_id, header.label, header.t_capture, data) == ("p1", "NG", 5.0, None)
    assert image is not None and np.array_equal(image, img)
    payload = parts[1]
    assert isinstance(payload, memoryview) and np.shares_memory(image, np.frombuffer(payload, np.uint8))


def test_uint16_is_little_endian() -> None:
    img = np.array([[1, 256], [65535, 0]], np.uint16)
    _, image, _ = parse_message(camera_message("p", img), max_pixels=MAXPIX)
    assert image is not None and image.dtype == np.dtype("<u2") and image.tolist() == img.tolist()


def test_encoded_payload_passes_through() -> None:
    _header, image, data = parse_message(
        [hdr(frame_id="a", encoding="png"), b"\x89PNG..."], max_pixels=MAXPIX
    )
    assert image is None and data is not None and bytes(data) == b"\x89PNG..."


@pytest.mark.parametrize(
    "parts, kind, fid",
    [
        ([b"not json", b"x"], "header", None),
        ([hdr(encoding="raw"), b"x"], "header", None),
        ([b"[1,2]", b"x"], "header", None),
        ([hdr(frame_id="", encoding="png"), b"x"], "header", None),
        ([hdr(frame_id="a" * 300, encoding="png"), b"x"], "header", None),
        ([hdr(frame_id="a", encoding="gif"), b"x"], "header", "a"),
        ([hdr(frame_id="a", encoding="raw", shape=[2]), b"x"], "header", "a"),
        ([hdr(frame_id="a", encoding="raw", shape=[2, True]), b"xx"], "header", "a"),
        ([hdr(frame_id="a", encoding="raw", shape=[2, 2], dtype="float32"), b"x" * 16], "header", "a"),
        ([hdr(frame_id="a", encoding="raw", shape=[2, 2]), b"xxx"], "payload", "a"),
        ([hdr(frame_id="a", encoding="raw", shape=[2, 2], dtype="uint16"), b"xxxx"], "payload", "a"),
        ([hdr(frame_id="a", encoding="raw", shape=[5000, 5000]), b"x"], "payload", "a"),
        ([hdr(frame_id="a", encoding="png"), b""], "payload", "a"),
        ([hdr(frame_id="a", encoding="png", t_capture="now"), b"x"], "header", "a"),
        ([hdr(frame_id="a", encoding="png", label="maybe"), b"x"], "header", "a"),
        ([hdr(frame_id="a", encoding="png")], "multipart", "a"),
        ([hdr(frame_id="a", encoding="png"), b"x", b"y"], "multipart", "a"),
        ([b"junk"], "multipart", None),
    ],
)
def test_malformed_messages_are_attributed_when_possible(
    parts: list[bytes], kind: str, fid: str | None
) -> None:
    with pytest.raises(MessageError) as exc:
        parse_message(parts, max_pixels=MAXPIX)
    assert exc.value.kind == kind and exc.value.frame_id == fid


def test_unknown_header_keys_are_ignored() -> None:
    h = parse_header(hdr(frame_id="a", encoding="bmp", exposure_us=100))
    assert h.encoding == "bmp"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=64))
def test_arbitrary_bytes_never_crash(header: bytes, payload: bytes) -> None:
    with contextlib.suppress(MessageError):
        parse_message([header, payload], max_pixels=MAXPIX)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "frame_id": json_values | st.text(min_size=1, max_size=8),
            "encoding": json_values | st.sampled_from(["raw", "png"]),
            "shape": json_values | st.lists(st.integers(-2, 6), min_size=2, max_size=2),
            "dtype": json_values | st.sampled_from(["uint8", "uint16"]),
            "t_capture": json_values,
            "label": json_values | st.sampled_from(["OK", "NG"]),
        },
    ),
    st.binary(max_size=80),
)
def test_structured_headers_parse_or_raise_message_error(header: dict[str, object], payload: bytes) -> None:
    """Valid → an image whose byte size equals the payload; invalid → MessageError; never anything else."""
    try:
        h, image, data = parse_message([json.dumps(header).encode(), payload], max_pixels=MAXPIX)
    except MessageError as exc:
        if isinstance(header.get("frame_id"), str) and 0 < len(header["frame_id"]) <= 256:  # type: ignore[arg-type]
            assert exc.frame_id == header["frame_id"]
        return
    assert h.frame_id == header["frame_id"]
    if h.encoding == "raw":
        assert image is not None and image.nbytes == len(payload) and image.ndim == 2
    else:
        assert data is not None and bytes(data) == payload


def test_encode_refuses_nan() -> None:
    with pytest.raises(ValueError):
        encode({"score": float("nan")})
