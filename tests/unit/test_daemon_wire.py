"""Camera header/payload parsing (pure functions) — example cases and hypothesis properties (the schema's
examples, one by one: test_wire_schema.py)."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.wire import (
    ENCODINGS,
    MAX_HEADER_BYTES,
    MAX_SIDE,
    RAW_DTYPES,
    T_CAPTURE_MAX,
    MessageError,
    camera_message,
    encode,
    parse_header,
    parse_message,
)

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
        ([hdr(frame_id="a", encoding="raw", shape=[5000, 5000]), b"x"], "header", "a"),  # above max_pixels
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


# -- type confusion and extreme values, written as JSON text (json.dumps cannot write most of them) ---------

HEADER_KEYS = ("frame_id", "encoding", "shape", "dtype", "t_capture", "label")


def _obj(items: dict[str, str]) -> str:
    return "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in items.items()) + "}"


extreme_numbers = st.one_of(
    st.integers(4301, 6000).map(lambda n: "1" + "0" * (n - 1)),  # beyond the 4300-digit int-string limit
    st.integers(309, 700).map(lambda n: "-" * (n % 2) + "9" * n),  # ints float() overflows on
    st.integers(-(2**80), 2**80).map(str),
    st.sampled_from(
        ["1e999", "-1e999", "1E400", "1e-400", "-0", "0.0", "NaN", "Infinity", "-Infinity", "4102444800.5"]
    ),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
)
scalar_texts = st.one_of(
    extreme_numbers,
    st.sampled_from(["true", "false", "null", '""', '"\\ud800"', '"\\u0000"']),
    st.text(max_size=12).map(json.dumps),
    st.integers(250, 20_000).map(lambda n: '"' + "s" * n + '"'),  # long strings (some above 256 chars)
    st.sampled_from(["raw", "png", "uint8", "uint16", "OK", "NG"]).map(json.dumps),
)
json_texts = st.recursive(
    scalar_texts,
    lambda inner: (
        st.lists(inner, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]")
        | st.dictionaries(st.sampled_from([*HEADER_KEYS, "x"]), inner, max_size=3).map(_obj)
    ),
    max_leaves=6,
)
valid_values = {
    "frame_id": st.text(min_size=1, max_size=8).map(json.dumps),
    "encoding": st.sampled_from(["raw", "png"]).map(json.dumps),
    "shape": st.lists(st.integers(1, 6), min_size=2, max_size=2).map(json.dumps),
    "dtype": st.sampled_from(["uint8", "uint16"]).map(json.dumps),
    "t_capture": st.floats(0, 4e9).map(repr),
    "label": st.sampled_from(["OK", "NG"]).map(json.dumps),
}


def _valid_frame_id(text: str) -> bool:
    """A hostile draw can happen to be a fine frame id (``"0"``): it is then not hostile."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, str) and 0 < len(value) <= 256


@st.composite
def hostile_headers(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """(header bytes, the frame id it names or None): each known key absent, valid, hostile or repeated; plus
    unknown keys with hostile values. The frame id is valid exactly when it is drawn valid and not repeated."""
    pairs: list[tuple[str, str]] = []
    fid: str | None = None
    for key in HEADER_KEYS:
        choice = draw(st.sampled_from(["absent", "valid", "valid", "hostile", "twice"]))
        if choice == "absent":
            continue
        hostile = json_texts.filter(lambda t: not _valid_frame_id(t)) if key == "frame_id" else json_texts
        text = draw(hostile if choice == "hostile" else valid_values[key])
        pairs.append((key, text))
        if key == "frame_id" and choice == "valid":
            fid = json.loads(text)
        if choice == "twice":
            pairs.append((key, draw(json_texts | valid_values[key])))
    pairs.extend((f"meta{i}", t) for i, t in enumerate(draw(st.lists(json_texts, max_size=3))))
    order = draw(st.permutations(range(len(pairs))))
    raw = ("{" + ",".join(f'"{pairs[i][0]}":{pairs[i][1]}' for i in order) + "}").encode()
    return raw, (fid if len(raw) <= MAX_HEADER_BYTES else None)


@settings(max_examples=600, deadline=None)
@given(hostile_headers(), st.binary(max_size=80))
def test_type_confusion_and_extreme_values_raise_message_error_only(
    header: tuple[bytes, str | None], payload: bytes
) -> None:
    """Whatever a known key holds — a 5000-digit int, 1e999, NaN, a list, an object, a bool, a long string — the
    result is a header of exact types within the schema's ranges, or a MessageError that names the part
    whenever the frame id is valid; never ValueError, OverflowError or TypeError."""
    raw, fid = header
    try:
        h, image, data = parse_message([raw, payload], max_pixels=MAXPIX)
    except MessageError as exc:
        assert exc.kind in ("header", "payload")
        if fid is not None:
            assert exc.frame_id == fid
        return
    assert fid is not None and h.frame_id == fid
    assert type(h.encoding) is str and h.encoding in ENCODINGS
    assert h.t_capture is None or (type(h.t_capture) is float and 0 <= h.t_capture <= T_CAPTURE_MAX)
    assert h.label in (None, "OK", "NG")
    if h.encoding == "raw":
        assert h.shape is not None and all(type(v) is int and 0 < v <= MAX_SIDE for v in h.shape)
        assert h.dtype in RAW_DTYPES and image is not None and image.nbytes == len(payload)
    else:
        assert data is not None and bytes(data) == payload


@settings(max_examples=200, deadline=None)
@given(hostile_headers(), st.integers(0, 10_000))
def test_any_part_count_but_two_is_refused_by_name(header: tuple[bytes, str | None], n_parts: int) -> None:
    raw, fid = header
    if n_parts == 2:
        n_parts = 3
    with pytest.raises(MessageError) as exc:
        parse_message([raw] if n_parts else [], max_pixels=MAXPIX, n_parts=n_parts)
    assert exc.value.kind == "multipart" and f"got {n_parts}" in str(exc.value)
    if fid is not None and n_parts:
        assert exc.value.frame_id == fid


def test_encode_refuses_nan() -> None:
    with pytest.raises(ValueError):
        encode({"score": float("nan")})
