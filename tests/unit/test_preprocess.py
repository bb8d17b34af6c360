from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest

from engine.preprocess import DecodeError, Preprocessor, PreprocessParams, decode, to_gray8
from tests.helpers import drawn_image

# Pinned output of the default preprocessing on drawn_image(): a change here changes what every
# deployed model sees, so it must be deliberate (re-export models, bump the golden value).
GOLDEN_GEOMETRIC_SHA256 = "170229a0d835a725c05d8d204a1103a00789449c21f79169cabd4dca5c9db46a"


def _manual(gray: np.ndarray, p: PreprocessParams) -> np.ndarray:
    clahe = cv2.createCLAHE(clipLimit=p.clahe_clip_limit, tileGridSize=p.clahe_tile_grid)
    small = cv2.resize(clahe.apply(gray), p.input_size[::-1], interpolation=cv2.INTER_AREA)
    return ((small.astype(np.float32) / 255.0 - p.mean) / p.std)[None]


def test_golden_output_is_pinned() -> None:
    pre = Preprocessor(PreprocessParams())
    geo = pre.geometric(drawn_image())
    assert geo.shape == (256, 256) and geo.dtype == np.uint8
    assert hashlib.sha256(geo.tobytes()).hexdigest() == GOLDEN_GEOMETRIC_SHA256


def test_equals_opencv_by_hand() -> None:
    p = PreprocessParams()
    gray = drawn_image()
    out = Preprocessor(p)(gray)
    np.testing.assert_allclose(out, _manual(gray, p), rtol=0, atol=1e-6)


def test_order_is_a_parameter() -> None:
    gray = drawn_image()
    a = Preprocessor(PreprocessParams(order="clahe_then_resize")).geometric(gray)
    b = Preprocessor(PreprocessParams(order="resize_then_clahe")).geometric(gray)
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_batch_fills_preallocated_buffer_in_order() -> None:
    p = PreprocessParams(input_size=(64, 96))
    pre = Preprocessor(p)
    imgs = [drawn_image(256, seed=s) for s in range(3)]
    buf = np.full((5, 1, 64, 96), np.nan, dtype=np.float32)
    view = pre.batch_into(imgs, buf)
    assert view.shape == (3, 1, 64, 96) and np.shares_memory(view, buf)
    for i, img in enumerate(imgs):
        np.testing.assert_array_equal(buf[i], pre(img))
    assert np.isnan(buf[3:]).all()
    with pytest.raises(ValueError, match="cannot hold"):
        pre.batch_into(imgs, np.empty((2, 1, 64, 96), np.float32))


def test_params_roundtrip_and_reject_unknown() -> None:
    p = PreprocessParams(input_size=(128, 64), clahe_tile_grid=(4, 4), interpolation="linear")
    assert PreprocessParams.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="unknown preprocess parameter"):
        PreprocessParams.from_dict({**p.to_dict(), "gamma": 2.2})
    with pytest.raises(ValueError, match="interpolation"):
        PreprocessParams(interpolation="lanczos9")


def test_decode_png_roundtrip_and_formats() -> None:
    gray = drawn_image(128)
    ok, png = cv2.imencode(".png", gray)
    assert ok
    np.testing.assert_array_equal(decode(png.tobytes()), gray)
    # colour and 16-bit are converted deliberately
    bgr = cv2.merge([gray, gray, gray])
    np.testing.assert_array_equal(decode(cv2.imencode(".png", bgr)[1].tobytes()), gray)
    g16 = gray.astype(np.uint16) * 257
    np.testing.assert_array_equal(decode(cv2.imencode(".png", g16)[1].tobytes()), gray)
    bgra = cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)
    np.testing.assert_array_equal(to_gray8(bgra), gray)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "empty"),
        (b"hello, I am a text file", "could not be decoded"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "could not be decoded|declares"),
    ],
)
def test_decode_errors_are_typed(data: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode(data)


def test_truncated_png_is_a_decode_error() -> None:
    png = cv2.imencode(".png", drawn_image(128))[1].tobytes()
    with pytest.raises(DecodeError):
        decode(png[: len(png) // 2])


def test_decompression_bomb_refused_before_allocation() -> None:
    # A valid 1×1 PNG whose IHDR we rewrite to declare 60000×60000.
    png = bytearray(cv2.imencode(".png", np.zeros((1, 1), np.uint8))[1].tobytes())
    png[16:20] = (60000).to_bytes(4, "big")
    png[20:24] = (60000).to_bytes(4, "big")
    with pytest.raises(DecodeError, match="declares 60000×60000"):
        decode(bytes(png), max_pixels=1024 * 1024)


@pytest.mark.realdata
def test_realdata_parity_with_opencv_by_hand(realdata) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("cv2")
    p = PreprocessParams()
    pre = Preprocessor(p)
    for path in (
        sorted((realdata / "good").glob("*.png"))[:3] + sorted((realdata / "not-good").glob("*.png"))[:3]
    ):
        by_hand = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        ours = decode(path.read_bytes())
        np.testing.assert_array_equal(ours, by_hand)
        clahe = cv2.createCLAHE(clipLimit=p.clahe_clip_limit, tileGridSize=p.clahe_tile_grid)
        small = cv2.resize(clahe.apply(by_hand), p.input_size[::-1], interpolation=cv2.INTER_AREA)
        assert np.abs(pre.geometric(ours).astype(int) - small).max() == 0  # the pixels: bit-exact
        assert np.abs(pre(ours) - _manual(by_hand, p)).max() <= 1e-6  # float normalisation: rounding only
