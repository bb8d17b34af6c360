"""The replay source's credit window: never more frames in flight than the window, and the window adapts to
the published latency (grows while verdicts are fast, halves once per round trip when one is slow)."""

from __future__ import annotations

import itertools
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.settings import Backpressure
from daemon.types import Frame, Outcome, Reason, Verdict
from replay.source import ReplayItem, ReplaySource
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(30)


class Intake:
    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.lock = threading.Lock()

    def submit(self, frame: Frame, policy: Backpressure) -> None:
        assert policy is Backpressure.BLOCK
        with self.lock:
            self.frames.append(frame)

    def wait_for_room(self, timeout: float) -> bool:
        return True

    def message_error(self, kind: str) -> None:
        raise AssertionError(kind)


def items(tmp_path: Path, n: int) -> list[ReplayItem]:
    out = []
    for i in range(n):
        p = tmp_path / f"{i}.png"
        p.write_bytes(b"not decoded here")
        out.append(ReplayItem(p, p.name, "OK"))
    return out


def verdict_for(frame: Frame, latency_ms: float) -> tuple[Verdict, Frame, dict[str, Any]]:
    v = Verdict(
        frame.frame_id, frame.source, Outcome.PASS, Reason.MODEL, 0.1, 0.5, "m", None, frame.t_arrival
    )
    return v, frame, {"latency_ms": latency_ms}


def waiting_in(thread: threading.Thread, function: str) -> bool:
    """True while ``thread`` waits inside ``threading`` (a Condition, an Event) called from ``function``."""
    top = sys._current_frames().get(thread.ident) if thread.ident is not None else None
    frame = top
    while frame is not None and frame.f_code.co_filename == threading.__file__:
        frame = frame.f_back
    return frame is not None and frame is not top and frame.f_code.co_name == function


def pump(src: ReplaySource) -> threading.Thread:
    return next(t for t in threading.enumerate() if t.name == f"source-{src.name}")


def test_frames_in_flight_never_exceed_the_window_and_the_window_adapts(tmp_path: Path) -> None:
    src = ReplaySource(items(tmp_path, 20), window=2, max_window=4, target_latency_s=0.1)
    intake = Intake()
    answered = 0

    def settle(latency_ms: float) -> None:
        nonlocal answered
        src.on_verdict(*verdict_for(intake.frames[answered], latency_ms))
        answered += 1

    def in_flight_is(window: int) -> None:
        # ... and no more follow: the source waits for credit (a verdict) with these frames out.
        wait_until(
            lambda: len(intake.frames) >= answered + window and waiting_in(pump(src), "_take_credit"),
            5,
            f"{window} frames in flight and the source waiting for credit",
        )
        assert (len(intake.frames) - answered, src.window) == (window, window)

    src.start(intake)
    wait_until(lambda: waiting_in(pump(src), "_pump"), 5, "the source waiting for its release")
    assert intake.frames == []  # nothing before release (the subscriber joins first)
    src.release()
    try:
        in_flight_is(2)
        settle(10.0)  # fast (< half the target): one more
        in_flight_is(3)
        settle(10.0)
        settle(10.0)
        in_flight_is(4)  # the maximum
        settle(500.0)  # slow: halve once …
        settle(500.0)  # … and not again for a frame sent before that decision
        in_flight_is(2)
        settle(70.0)  # between half the target and the target: unchanged
        in_flight_is(2)
        assert src.window_range == (2, 4)
    finally:
        src.stop()
    assert [f.seq for f in intake.frames] == list(range(1, len(intake.frames) + 1))
    assert intake.frames[0].label == "OK" and intake.frames[0].data == b"not decoded here"


def test_a_fixed_rate_keeps_its_schedule(tmp_path: Path) -> None:
    src = ReplaySource(items(tmp_path, 5), rate=50.0, window=10, max_window=10)
    intake = Intake()
    src.start(intake)
    t0 = time.monotonic()
    src.release()
    try:
        wait_until(lambda: len(intake.frames) == 5, 5, "all 5 frames")
    finally:
        src.stop()
    t = [f.t_arrival - t0 for f in intake.frames]
    assert all(b - a >= 0.015 for a, b in itertools.pairwise(t))  # 20 ms apart, never a burst
