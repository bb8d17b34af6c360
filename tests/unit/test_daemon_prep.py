"""Preprocessing-stage failures become the right REJECT at once, never an exception into the batch."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from daemon.decision import Decider
from daemon.ledger import Ledger
from daemon.prep import FramePreprocessor
from daemon.types import Frame, Reason
from engine.package import Decision
from engine.pose import NoPartError, PoseError
from engine.preprocess import Preprocessor, PreprocessParams

DECIDER = Decider(Decision(), "m")


class Raising:
    params = PreprocessParams(input_size=(16, 16))

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def crop(self, gray: np.ndarray, *, pose: Any = None) -> np.ndarray:  # the pose crop: where poses fail
        raise self.exc


def run(pre: Any, frame: Frame) -> tuple[Any, Any]:
    ledger = Ledger(
        max_latency_s=10, expire=lambda j, r: DECIDER.reject(j.frame, r), monotonic=time.monotonic
    )
    seen: list[tuple[str, float]] = []
    stage = FramePreprocessor(
        pre,
        DECIDER,
        ledger,
        max_pixels=1 << 20,
        monotonic=time.monotonic,
        observe_stage=lambda s, t: seen.append((s, t)),
    )
    job = ledger.admit(frame)
    row = np.zeros((1, 16, 16), np.float32)
    stage(job, row)
    item = None if ledger.out.empty() else ledger.out.get()
    return job, (item, row, seen)


def frame(**kw: Any) -> Frame:
    return Frame("cam", 1, "f1", time.monotonic(), time.time(), **kw)


def test_success_fills_the_row_and_times_the_stages() -> None:
    img = (np.arange(32 * 32) % 256).astype(np.uint8).reshape(32, 32)
    pre = Preprocessor(PreprocessParams(input_size=(16, 16)))
    job, (item, row, seen) = run(pre, frame(image=img))
    assert job.ok and item is None
    assert np.array_equal(row, pre(img))
    assert [s for s, _ in seen] == ["decode", "preprocess"]
    # The crop's light for the drift statistics (no pose crop here: the frame; no gauges: no measurements)
    assert job.image.brightness == pytest.approx(img.mean(), abs=1e-9)
    assert job.image.contrast == pytest.approx(img.std(), abs=1e-9) and job.image.measurements is None


@pytest.mark.parametrize(
    "exc, reason",
    [
        (NoPartError("empty tray"), Reason.NO_PART),
        (PoseError("two parts"), Reason.POSE_ERROR),
        (ValueError("odd layout"), Reason.DECODE_ERROR),
        (RuntimeError("bug"), Reason.ENGINE_ERROR),
    ],
)
def test_failures_settle_with_their_reason(exc: Exception, reason: Reason) -> None:
    job, (item, _, _) = run(Raising(exc), frame(image=np.zeros((8, 8), np.uint8)))
    assert not job.ok and item is not None
    assert item.verdict.reason is reason and item.verdict.score is None
    assert str(exc) in item.verdict.detail["error"]


@pytest.mark.parametrize(
    "kw",
    [{"data": b"garbage"}, {"data": b""}, {"image": np.zeros((4, 4), np.float32)}, {}],
    ids=["junk", "empty", "float", "none"],
)
def test_undecodable_input_is_a_decode_error(kw: dict[str, Any]) -> None:
    job, (item, _, _) = run(Preprocessor(PreprocessParams(input_size=(16, 16))), frame(**kw))
    assert item is not None and item.verdict.reason is Reason.DECODE_ERROR and not job.ok


def test_a_frame_settled_while_queued_is_not_processed() -> None:
    ledger = Ledger(
        max_latency_s=10, expire=lambda j, r: DECIDER.reject(j.frame, r), monotonic=time.monotonic
    )
    stage = FramePreprocessor(
        Raising(RuntimeError("must not run")), DECIDER, ledger, max_pixels=1 << 20,  # type: ignore[arg-type]
        monotonic=time.monotonic, observe_stage=lambda s, t: None,
    )  # fmt: skip
    job = ledger.admit(frame(image=np.zeros((8, 8), np.uint8)))
    ledger.settle(job, DECIDER.reject(job.frame, Reason.DEADLINE))
    stage(job, np.zeros((1, 16, 16), np.float32))
    assert ledger.out.qsize() == 1 and not job.ok
