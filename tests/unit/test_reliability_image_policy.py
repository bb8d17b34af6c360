"""The input policy (daemon/image_policy.py) and the decoder behind it, with hypothesis properties.

Properties: the sniffer reads the same size OpenCV decodes for every format/size/depth/channel count it
writes; on arbitrary or mutated bytes the sniffer raises nothing but InputRejected and the decoder nothing but
DecodeError; bombs of every format are refused on their header.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.image_policy import FORMATS, InputPolicy, InputRejected, sniff
from daemon.settings import Settings
from engine.preprocess import DecodeError, decode
from tests.hostile_inputs import (
    BOMBS,
    encode,
    encoded_images,
    gray,
    jpeg_declaring,
    mutated,
    png_declaring,
    unusual_valid,
)

pytestmark = pytest.mark.timeout(120)

SMALL = 1 << 20  # pixel limit for decoding fuzzed bytes in-process: nothing big is ever allocated


@settings(max_examples=120, deadline=None)
@given(encoded_images())
def test_sniffed_size_is_what_opencv_decodes(case: tuple[str, int, int, bytes]) -> None:
    fmt, h, w, data = case
    header = sniff(data)
    assert (header.format, header.height, header.width) == (fmt, h, w)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded is not None and decoded.shape[:2] == (h, w)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.tuples(
            st.sampled_from(
                [b"\x89PNG\r\n\x1a\n", b"BM", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"II+\x00"]
            ),
            st.binary(max_size=300),
        ).map(lambda t: t[0] + t[1]),
    )
)
def test_sniff_raises_only_input_rejected(data: bytes) -> None:
    with contextlib.suppress(InputRejected):
        header = sniff(data)
        assert header.format in FORMATS and header.height >= 0 and header.width >= 0


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(encoded_images()))
def test_decoder_on_mutated_images_returns_gray8_or_decode_error(data: bytes) -> None:
    """What reaches the decoder after the policy: a 2-D uint8 within limits, or DecodeError — nothing else."""
    try:
        InputPolicy(max_pixels=SMALL).check_encoded(data)
    except InputRejected:
        return
    try:
        img = decode(data, max_pixels=SMALL)
    except DecodeError:
        return
    assert img.ndim == 2 and img.dtype == np.uint8 and img.size <= SMALL and img.flags.c_contiguous


@pytest.mark.parametrize("fmt", sorted(BOMBS))
@pytest.mark.parametrize("h, w", [(30000, 30000), (20000, 20000), (60000, 100)])
def test_bombs_are_refused_on_their_header(fmt: str, h: int, w: int) -> None:
    data = BOMBS[fmt](h, w)
    assert len(data) < 2000  # a tiny file...
    assert sniff(data).height == h and sniff(data).width == w  # ...declaring a huge image
    with pytest.raises(InputRejected, match=r"decode\.max_side|decode\.max_pixels"):
        InputPolicy().check_encoded(data)


@pytest.mark.parametrize(
    "data, declared, policy, match",
    [
        (png_declaring(1, 1), None, {}, "below the minimum side of 16"),
        (encode(gray(8, 300), ".png"), None, {}, "300×8, below the minimum side"),
        (jpeg_declaring(64, 64), None, {"formats": ("png", "tiff")}, "JPEG images are not accepted"),
        (encode(gray(), ".jpg"), "png", {}, "payload is a JPEG image, the header says 'png'"),
        (b"", None, {}, "empty image data"),
        (b"hello, this is text\n" * 4, None, {}, "not a PNG, BMP, TIFF or JPEG"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", None, {}, "not a PNG, BMP, TIFF or JPEG"),
        (encode(gray(), ".png")[:20], None, {}, "truncated or malformed PNG"),
        (encode(gray(), ".jpg")[:40], None, {}, "JPEG"),
    ],
)
def test_policy_refusals_say_why(
    data: bytes, declared: str | None, policy: dict[str, object], match: str
) -> None:
    with pytest.raises(InputRejected, match=match):
        InputPolicy(**policy).check_encoded(data, declared=declared)  # type: ignore[arg-type]


@pytest.mark.parametrize("name, data", sorted(unusual_valid().items()))
def test_unusual_but_valid_images_pass_the_default_policy(name: str, data: bytes) -> None:
    header = InputPolicy().check_encoded(data)
    img = decode(data)
    assert img.shape == (header.height, header.width) and img.dtype == np.uint8


def test_policy_comes_from_settings_and_validates_the_bounds() -> None:
    s = Settings.model_validate(
        {"decode": {"formats": ["png"], "min_side": 32, "max_side": 4096, "max_pixels": 1 << 22}}
    )
    p = InputPolicy.from_settings(s.decode)
    assert (p.formats, p.min_side, p.max_side, p.max_pixels) == (("png",), 32, 4096, 1 << 22)
    with pytest.raises(ValueError, match="min_side"):
        Settings.model_validate({"decode": {"min_side": 100, "max_side": 50}})
    with pytest.raises(ValueError, match="formats"):
        Settings.model_validate({"decode": {"formats": ["gif"]}})


@pytest.mark.timeout(120)
@pytest.mark.parametrize("limited", [True, False], ids=["opencv-limit", "control-no-limit"])
def test_opencv_pixel_limit_refuses_a_jpeg_bomb_before_allocating(limited: bool) -> None:
    """The second line of defence (inspectd serve sets it before cv2 loads); the control shows it matters."""
    code = textwrap.dedent(
        f"""
        import resource
        from daemon.image_policy import limit_opencv_pixels
        if {limited}:
            assert limit_opencv_pixels(1 << 22)
        import numpy as np, cv2
        from tests.hostile_inputs import jpeg_declaring
        bomb = jpeg_declaring(12000, 12000)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            out = cv2.imdecode(np.frombuffer(bomb, np.uint8), cv2.IMREAD_UNCHANGED)
            shape = None if out is None else out.shape
        except cv2.error:
            shape = "refused"
        grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
        print(shape, grew)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=100, check=True
    ).stdout.split()
    shape, grew_mib = " ".join(out[:-1]), int(out[-1])
    if limited:
        assert shape == "refused" and grew_mib < 20
    else:  # a 144 Mpx array from a few hundred bytes: exactly what the limit prevents. (How much of it becomes
        # resident depends on how many rows the truncated stream lets libjpeg touch, so RSS is not asserted.)
        assert shape == "(12000, 12000)"
