"""Replay: every image of a labelled folder through the daemon's own pipeline, verdicts collected for a report.

Nothing here scores images itself. The images enter the real :class:`~daemon.app.App` through a
:class:`~replay.source.ReplaySource` (source → decode/preprocess pool → micro-batcher → backend →
decision → ledger → publisher), built from the same settings file the station runs (``--config``) with only
what a replay must not share with a running daemon changed: an ephemeral verdict endpoint, no camera/folder
sources, no audit archive, metrics off unless asked for. Verdicts are collected twice: by an in-process
listener (which sees the ground truth and the stage timings) and by a real ZeroMQ subscriber, which checks that
what went out on the wire is complete and gapless.

What to replay, with its ground truth, is :mod:`replay.selection`'s; ``inspectd serve`` never imports this
package (an import-graph contract in ``make lint``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from daemon.app import App
from daemon.settings import SecuritySettings, Settings
from daemon.subscriber import VerdictSubscriber
from daemon.types import Frame, Verdict
from replay import ReplayError
from replay.source import ReplayItem, ReplaySource


# -- collecting verdicts -----------------------------------------------------------------------------------
class VerdictRecorder:
    """In-process listener (after-publish thread): one record per verdict, with the frame's ground truth."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self.duplicates: list[str] = []
        self.t_last: float | None = None
        self._cv = threading.Condition()

    def __call__(self, verdict: Verdict, frame: Frame, message: dict[str, Any]) -> None:
        detail = verdict.detail or {}
        rec = {
            "file": verdict.frame_id,
            "label": frame.label,
            "defect_type": frame.defect_type,
            "verdict": verdict.outcome.value,
            "reason": verdict.reason.value,
            "score": verdict.score,
            "latency_ms": message["latency_ms"],
            "seq": message["seq"],
            "timings_ms": {k: round(v, 3) for k, v in verdict.timings_ms.items()},
            "error": detail.get("error"),
            "gauges": detail.get("gauges"),  # out_of_tolerance: the measurements outside their bands
            "rejected_by": detail.get("rejected_by"),
            # what the gauges' margins added to the model's logit, per measurement (None: nothing)
            "margins": detail.get("margins"),
        }
        with self._cv:
            if verdict.frame_id in self.records:
                self.duplicates.append(verdict.frame_id)  # impossible by the ledger; recorded if it happens
            self.records[verdict.frame_id] = rec
            self.t_last = time.monotonic()
            self._cv.notify_all()

    def count(self) -> int:
        with self._cv:
            return len(self.records)

    def wait(self, n: int, timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self._cv:
            while len(self.records) < n:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
            return True


class WireCheck:
    """A real subscriber (:class:`~daemon.subscriber.VerdictSubscriber`: its own thread and its own context, so
    the App can terminate its context while this one still listens): counts the verdicts a line controller
    would have received, and seq gaps (by :class:`~daemon.sequence.SequenceTracker`, the rule every subscriber
    uses)."""

    def __init__(self, endpoint: str, line: str) -> None:
        self.endpoint, self.line = endpoint, line
        self.frame_ids: set[str] = set()
        self._cv = threading.Condition()  # a verdict arrived
        self._sub = VerdictSubscriber(endpoint, line, self._on_message, name="replay-sub")
        self.sequence = self._sub.sequence
        self.heartbeat = self._sub.heartbeat

    @property
    def gaps(self) -> int:
        """Holes in ``seq`` (each a run of verdicts published and not received)."""
        with self._sub.lock:
            return len(self.sequence.gaps)

    def start(self, timeout: float = 10.0) -> None:
        self._sub.start()
        if not self._sub.wait_heartbeat(timeout):  # subscribed: nothing published from now on is missed
            raise ReplayError(f"no heartbeat from the replay's own publisher {self.endpoint} in {timeout} s")

    def stop(self, expect: int, timeout: float = 3.0) -> None:
        """After the App has stopped (everything published and flushed): wait for ``expect`` verdicts."""
        end = time.monotonic() + timeout
        with self._cv:
            while len(self.frame_ids) < expect and self._sub.running and (left := end - time.monotonic()) > 0:
                self._cv.wait(min(left, 0.05))  # 50 ms: also notices a receive thread that ended
        self._sub.stop(5.0)

    def _on_message(self, msg: dict[str, Any], t_arrival: float) -> None:
        if msg["type"] == "verdict":
            with self._cv:
                self.frame_ids.add(msg["frame_id"])
                self._cv.notify_all()


# -- running -----------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    records: list[dict[str, Any]]  # sorted by file
    seconds: float  # first frame read → last verdict received
    wire: dict[str, Any]
    source: dict[str, Any]
    backend: dict[str, str]
    complete: bool
    # The daemon's drift statistics at the end (daemon.drift.DriftMonitor.snapshot): the last
    # metrics.drift_window parts against the package's score reference
    drift: dict[str, Any] = field(default_factory=dict)


def replay_settings(settings: Settings, *, metrics_port: int | None = None) -> Settings:
    """The station's settings, minus what a replay must not share with a daemon running beside it: its own
    loopback verdict socket (no CURVE: only this process subscribes), no sources, no audit archive, metrics
    only on request, and one model for the whole replay (no package watching, no control socket)."""
    return settings.model_copy(
        update={
            "model": settings.model.model_copy(update={"watch_s": 0.0}),
            "security": SecuritySettings(),
            "sources": settings.sources.model_copy(
                update={
                    "camera": settings.sources.camera.model_copy(update={"enabled": False}),
                    "folder": settings.sources.folder.model_copy(update={"enabled": False}),
                }
            ),
            "publisher": settings.publisher.model_copy(
                update={"endpoint": "tcp://127.0.0.1:*", "heartbeat_ms": 100.0}
            ),
            "audit": settings.audit.model_copy(update={"enabled": False}),
            "control": settings.control.model_copy(update={"enabled": False}),
            "metrics": settings.metrics.model_copy(
                update={"enabled": metrics_port is not None, "port": metrics_port or 0}
            ),
        }
    )


def run(
    settings: Settings,
    items: list[ReplayItem],
    *,
    rate: float | None = None,
    window: int | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    stall_s: float = 120.0,
) -> RunResult:
    """Push ``items`` through an App built from ``settings`` (see :func:`replay_settings`) and collect verdicts.

    ``window``: the most frames in flight (default: two batches at max rate, the after-publish queue's size at
    a fixed rate). Returns when every item has its verdict, or when none arrived for ``stall_s``.
    """
    b = settings.batching
    # Credits come back on the after-publish thread; more frames in flight than its queue holds could make it
    # skip one, and that credit would be lost for good.
    limit = settings.audit.queue_size
    if rate is None:
        max_window = min(window or 2 * b.max_batch, limit)
        source = ReplaySource(
            items,
            rate=None,
            window=min(max(1, b.preprocess_threads), max_window),
            max_window=max_window,
            target_latency_s=0.5 * settings.deadlines.max_latency_ms / 1000.0,
            max_file_bytes=settings.sources.folder.max_file_bytes,
        )
    else:
        fixed = min(window or limit, limit)
        source = ReplaySource(
            items,
            rate=rate,
            window=fixed,
            max_window=fixed,
            max_file_bytes=settings.sources.folder.max_file_bytes,
        )
    recorder = VerdictRecorder()
    app = App(settings, sources=[source], listeners=[recorder], registry=CollectorRegistry())
    app.start()
    assert app.pipeline is not None and app.publisher_endpoint is not None
    backend = app.pipeline.worker.backend.describe()
    wire = WireCheck(app.publisher_endpoint, settings.line)
    complete = False
    try:
        wire.start()
        source.release()
        n = len(items)
        t_last_change, last = time.monotonic(), -1
        while not app.stop_requested.is_set():
            done = recorder.wait(n, 0.2)
            count = recorder.count()
            t0 = source.t_first or time.monotonic()
            if progress is not None:
                progress(count, n, time.monotonic() - t0)
            if done:
                complete = True
                break
            if count != last:
                t_last_change, last = time.monotonic(), count
            elif time.monotonic() - t_last_change > stall_s:
                break
    finally:
        source.stop()
        app.stop()
        wire.stop(expect=recorder.count())
    # After the stop: every inference batch has reported to the drift windows (a verdict can reach the recorder
    # just before its batch does).
    drift = app.metrics.drift.snapshot() if app.metrics is not None else {}
    t_first = source.t_first or 0.0
    seconds = (recorder.t_last or t_first) - t_first
    records = sorted(recorder.records.values(), key=lambda r: r["file"])
    return RunResult(
        records=records,
        seconds=seconds,
        wire={
            "received": len(wire.frame_ids),
            "published": len(records),
            "gaps": wire.gaps,
            "duplicates": len(recorder.duplicates),
        },
        source={
            "rate": rate or "max",
            "window": list(source.window_range),
            "adaptive": rate is None,
            "behind_schedule": source.behind,
        },
        backend=backend,
        complete=complete and app.exit_code == 0,
        drift=drift,
    )
