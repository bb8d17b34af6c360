"""The camera header schema (daemon/wire.py), example by example: every header that parses as JSON but breaks
the schema is a MessageError — naming its part whenever the frame id itself is valid — and never another
exception (issue 16: a 5000-digit t_capture, 1e999, ``"dtype": []`` … used to escape as ValueError,
OverflowError or TypeError and end the camera thread). Property tests over the same space: test_daemon_wire.py
and test_reliability_fuzz.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from daemon.wire import (
    MAX_FRAME_ID_CHARS,
    MAX_SIDE,
    T_CAPTURE_MAX,
    MessageError,
    camera_message,
    parse_header,
    parse_message,
)
from tests.hostile_inputs import (
    HOSTILE_HEADERS,
    HUGE_INT,
    TOLERATED_HEADERS,
    UNNAMED_HEADERS,
    encode,
    gray,
    header_text,
)

MAXPIX = 1 << 20
PNG = encode(gray(), ".png")
MAX_ERROR_CHARS = 200  # a REJECT's detail.error quotes the offending value, briefly


def hdr(**kw: object) -> bytes:
    return json.dumps(kw).encode()


@pytest.mark.parametrize("fid", sorted(HOSTILE_HEADERS))
def test_a_header_that_names_its_part_is_rejected_with_a_reason(fid: str) -> None:
    with pytest.raises(MessageError) as exc:
        parse_message([HOSTILE_HEADERS[fid], PNG], max_pixels=MAXPIX)
    assert (exc.value.kind, exc.value.frame_id) == ("header", fid)
    assert 0 < len(str(exc.value)) <= MAX_ERROR_CHARS, str(exc.value)


@pytest.mark.parametrize("name", sorted(UNNAMED_HEADERS))
def test_a_header_that_names_no_part_is_refused_without_a_frame_id(name: str) -> None:
    with pytest.raises(MessageError) as exc:
        parse_message([UNNAMED_HEADERS[name], PNG], max_pixels=MAXPIX)
    assert (exc.value.kind, exc.value.frame_id) == ("header", None)
    assert len(str(exc.value)) <= MAX_ERROR_CHARS, str(exc.value)


@pytest.mark.parametrize("fid", sorted(TOLERATED_HEADERS))
def test_extreme_values_in_unknown_keys_are_ignored(fid: str) -> None:
    header, image, data = parse_message([TOLERATED_HEADERS[fid], PNG], max_pixels=MAXPIX)
    assert (header.frame_id, header.encoding, image) == (fid, "png", None)
    assert data is not None and bytes(data) == PNG


@pytest.mark.parametrize(
    "key, value",
    [
        (k, v)
        for k in ("encoding", "shape", "dtype", "t_capture", "label")
        for v in (
            "[]",
            "{}",
            "[[[]]]",
            '{"a": {"b": []}}',
            "true",
            "false",
            HUGE_INT,
            "-" + HUGE_INT,
            "1e999",
            "-1e999",
            "NaN",
            "Infinity",
            "1e-400",
            '"' + "s" * 10_000 + '"',
            '"\\ud800"',
        )
        if (k, v) != ("t_capture", "1e-400")  # 0.0: a valid (if early) capture time
    ],
)
def test_type_confusion_in_any_known_key_is_refused_and_attributed(key: str, value: str) -> None:
    pairs = [("encoding", '"raw"'), ("shape", "[4, 4]"), ("dtype", '"uint8"'), ("t_capture", "1.5")]
    pairs = [(k, value if k == key else v) for k, v in pairs]
    if key == "label":
        pairs.append(("label", value))
    raw = header_text(("frame_id", '"part-1"'), *pairs)
    with pytest.raises(MessageError) as exc:
        parse_message([raw, bytes(16)], max_pixels=MAXPIX)
    assert (exc.value.kind, exc.value.frame_id) == ("header", "part-1"), str(exc.value)


def test_the_schemas_boundaries_are_accepted() -> None:
    fid = "é" * MAX_FRAME_ID_CHARS  # characters, not bytes
    h = parse_header(header_text(("frame_id", json.dumps(fid)), ("encoding", '"png"'), ("t_capture", "0")))
    assert (h.frame_id, h.t_capture) == (fid, 0.0) and isinstance(h.t_capture, float)
    h = parse_header(hdr(frame_id="a", encoding="jpeg", t_capture=T_CAPTURE_MAX, label=None))
    assert (h.t_capture, h.label) == (T_CAPTURE_MAX, None)
    h = parse_header(hdr(frame_id="a", encoding="raw", shape=[1, MAX_SIDE]))
    assert (h.shape, h.dtype) == ((1, MAX_SIDE), "uint8")  # dtype defaults to uint8
    h = parse_header(hdr(frame_id="a", encoding="raw", shape=[3, 5], dtype="uint16", label="NG"))
    assert (h.shape, h.dtype, h.label) == ((3, 5), "uint16", "NG")
    for bad in (
        hdr(frame_id="a" * (MAX_FRAME_ID_CHARS + 1), encoding="png"),
        hdr(frame_id="a", encoding="png", t_capture=T_CAPTURE_MAX + 1),
        hdr(frame_id="a", encoding="raw", shape=[1, MAX_SIDE + 1]),
        hdr(frame_id="a", encoding="raw", shape=[0, 4]),
    ):
        with pytest.raises(MessageError):
            parse_header(bad)


def test_the_pixel_limit_is_part_of_the_header_schema() -> None:
    raw = hdr(frame_id="big", encoding="raw", shape=[2048, 1024])
    assert parse_header(raw).shape == (2048, 1024)  # no limit given: only the side bound
    with pytest.raises(MessageError) as exc:
        parse_header(raw, max_pixels=MAXPIX)
    assert (exc.value.kind, exc.value.frame_id) == ("header", "big")
    assert f"limit of {MAXPIX} pixels" in str(exc.value)
    with pytest.raises(MessageError) as exc:  # refused on the header, before the payload is looked at
        parse_message([raw, b""], max_pixels=MAXPIX)
    assert exc.value.kind == "header"


def test_only_utf8_json_is_a_header() -> None:
    text = '{"frame_id": "a", "encoding": "png"}'
    assert parse_header(text.encode()).frame_id == "a"
    for raw in (text.encode("utf-16"), text.encode("utf-32"), b"\xef\xbb\xbf" + text.encode()):
        with pytest.raises(MessageError) as exc:  # json.loads(bytes) would have guessed UTF-16/32
            parse_header(raw)
        assert exc.value.frame_id is None


def test_a_long_message_keeps_only_its_header_and_is_refused_by_name() -> None:
    header = camera_message("many", np.zeros((4, 4), np.uint8))[0]
    with pytest.raises(MessageError) as exc:
        parse_message([header], max_pixels=MAXPIX, n_parts=100_000)
    assert (exc.value.kind, exc.value.frame_id) == ("multipart", "many")
    assert "got 100000" in str(exc.value)
    with pytest.raises(MessageError) as exc:  # the receiver kept 2 of 3: still refused
        parse_message([header, bytes(16)], max_pixels=MAXPIX, n_parts=3)
    assert exc.value.kind == "multipart"
    with pytest.raises(MessageError) as exc:
        parse_message([b"[]"], max_pixels=MAXPIX, n_parts=7)
    assert (exc.value.kind, exc.value.frame_id) == ("multipart", None)
