"""The replay source: the files of a labelled folder, fed into the running pipeline like a folder source would.

It differs from :class:`~daemon.sources.folder.FolderSource` only in where the files come from (a fixed list,
with the ground truth attached to each frame) and in pacing:

- ``rate=None`` ("max"): as fast as the pipeline decides frames without making them late. A ``block`` source
  alone would keep the whole intake queue full, and every queued frame's deadline runs while it waits: at 1024²
  on a small machine a replay would then measure its own queueing, and turn it into ``deadline`` REJECTs. So a
  credit window bounds the frames in flight, and adapts like TCP's: one more after each verdict published well
  within ``target_latency_s``, half as many (at most once per round trip) after one that took longer.
- ``rate=FPS``: frames on an absolute schedule (no drift), as a camera sends them: the window is fixed and
  large, so only the pipeline's own backpressure (``block``) holds a frame back; frames sent later than one
  period after their time are counted as ``behind``, never dropped.

Nothing is emitted before :meth:`release`, so a subscriber can join first (ZeroMQ's slow-joiner rule).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.clock import SYSTEM_CLOCK, Clock
from daemon.logs import get_logger
from daemon.settings import Backpressure
from daemon.sources import Intake
from daemon.types import Frame, Verdict

log = get_logger(__name__)

_WAIT_S = 0.2  # how often a waiting source re-checks for stop


@dataclass(frozen=True, slots=True)
class ReplayItem:
    path: Path  # the file to read
    frame_id: str  # relative path inside the replayed folder: unique, and the key for --compare
    label: str | None = None  # "OK" | "NG" | None (unlabelled)
    defect_type: str | None = None


class ReplaySource:
    def __init__(
        self,
        items: Sequence[ReplayItem],
        *,
        name: str = "replay",
        rate: float | None = None,
        window: int = 1,
        max_window: int = 16,
        target_latency_s: float | None = None,
        max_file_bytes: int = 64 * 1024 * 1024,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be > 0 frames per second (or None for max), got {rate}")
        if not 1 <= window <= max_window:
            raise ValueError(f"need 1 ≤ window ≤ max_window, got {window}, {max_window}")
        self.name = name
        self.items = list(items)
        self.rate = rate
        self.window = window
        self.max_window = max_window
        self.window_range = (window, window)  # smallest and largest window used, for the report
        self._target_s = target_latency_s  # None: a fixed window
        self._cv = threading.Condition()
        self._in_flight = 0
        self._hold_until = 0  # no further decrease until a frame emitted after the last one comes back
        self._max_file_bytes = max_file_bytes
        self._clock = clock
        self._go = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.emitted = 0
        self.behind = 0  # frames sent later than one period after their scheduled time
        self.t_first: float | None = None  # monotonic time of the first emitted frame

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.name,
            "kind": "replay",
            "files": len(self.items),
            "rate": self.rate or "max",
            "window": self.window,
            "adaptive": self._target_s is not None,
        }

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self, intake: Intake) -> None:
        self._thread = threading.Thread(
            target=self._pump, args=(intake,), name=f"source-{self.name}", daemon=True
        )
        self._thread.start()

    def release(self) -> None:
        """Begin emitting (after the verdict subscriber has joined)."""
        self._go.set()

    def stop(self) -> None:
        self._stop.set()
        self._go.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            if self._thread.is_alive():
                log.error("replay source did not stop in time", source=self.name)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- after each verdict (after-publish thread) --------------------------------------------------------
    def on_verdict(self, verdict: Verdict, frame: Frame, message: dict[str, Any]) -> None:
        if frame.source != self.name:
            return
        with self._cv:
            self._in_flight -= 1
            if self._target_s is not None:
                latency_s = float(message["latency_ms"]) / 1000.0
                if latency_s > self._target_s and frame.seq > self._hold_until:
                    self.window = max(1, self.window // 2)
                    self._hold_until = self.emitted
                elif latency_s < 0.5 * self._target_s and self.window < self.max_window:
                    self.window += 1
                lo, hi = self.window_range
                self.window_range = (min(lo, self.window), max(hi, self.window))
            self._cv.notify()

    def _take_credit(self) -> bool:
        with self._cv:
            if self._in_flight >= self.window:
                self._cv.wait(_WAIT_S)
            if self._in_flight >= self.window:
                return False
            self._in_flight += 1
            return True

    # -- the pump (source thread) ------------------------------------------------------------------------
    def _pump(self, intake: Intake) -> None:
        try:
            self._go.wait()
            period = 1.0 / self.rate if self.rate else 0.0
            t0 = self._clock.monotonic()
            for i, item in enumerate(self.items):
                if self.rate:
                    delay = t0 + i * period - self._clock.monotonic()
                    if delay > 0 and self._stop.wait(delay):
                        return
                    if delay < -period:
                        self.behind += 1
                if not self._wait(self._take_credit):
                    return
                if not self._wait(lambda: intake.wait_for_room(_WAIT_S)):
                    return
                self._emit(item, i + 1, intake)
            # Idle until stopped: the supervisor takes a source thread that ended for a dead one.
            self._stop.wait()
        except Exception:
            log.exception("replay source failed", source=self.name)
            raise

    def _wait(self, attempt: Callable[[], bool]) -> bool:
        while not attempt():
            if self._stop.is_set():
                return False
        return not self._stop.is_set()

    def _emit(self, item: ReplayItem, seq: int, intake: Intake) -> None:
        data, error = self._read(item.path)
        now = self._clock.monotonic()
        if self.t_first is None:
            self.t_first = now
        frame = Frame(
            source=self.name,
            seq=seq,
            frame_id=item.frame_id,
            t_arrival=now,
            t_received=self._clock.wall(),
            data=data,
            label=item.label,
            path=str(item.path),
            defect_type=item.defect_type,
            error=error,
        )
        self.emitted += 1
        intake.submit(frame, Backpressure.BLOCK)

    def _read(self, path: Path) -> tuple[bytes | None, str | None]:
        """An unreadable file is still a part: it becomes REJECT ``decode_error``, as in the folder source."""
        try:
            size = path.stat().st_size
            if size > self._max_file_bytes:
                return None, f"file is {size} bytes, above the limit of {self._max_file_bytes}"
            return path.read_bytes(), None
        except OSError as exc:
            return None, f"cannot read: {exc.strerror or exc}"
