"""The verdict publisher: the only thread that touches the PUB socket and the only place ``seq`` is assigned.

It consumes the ledger's settled queue in order, so ``seq`` runs 1, 2, 3, … per ``boot_id`` without gaps,
and sends a heartbeat on the same topic every ``heartbeat_ms`` so a subscriber can tell a quiet line from a
dead daemon. After each verdict it hands (verdict, frame, message) to the after-publish stage (audit archive,
folder moves, in-process listeners) without waiting for it.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable
from typing import Any

import zmq

from daemon.clock import SYSTEM_CLOCK, Clock
from daemon.ledger import Deferred, Settled
from daemon.logs import get_logger
from daemon.metrics import MetricsSink
from daemon.peers import PeerMonitor, bind_server
from daemon.settings import PublisherSettings
from daemon.threads import StageThread
from daemon.types import Frame, Reason, Verdict
from daemon.wire import encode, heartbeat_message, verdict_message

log = get_logger(__name__)

_SUMMARISED = (Reason.DEADLINE, Reason.OVERLOAD, Reason.SHUTDOWN)
_SUMMARY_IDS = 10

AfterPublish = Callable[[Verdict, Frame, dict[str, Any]], None]


class VerdictPublisher(StageThread):
    def __init__(
        self,
        settings: PublisherSettings,
        ctx: zmq.Context[Any],
        settled: queue.SimpleQueue[Settled | Deferred | None],
        *,
        line: str,
        boot_id: str,
        metrics: MetricsSink,
        ready: Callable[[], bool],
        after_publish: AfterPublish | None = None,
        clock: Clock = SYSTEM_CLOCK,
        secure: Callable[[zmq.Socket[Any], str], None] | None = None,
        monitor: PeerMonitor | None = None,
    ) -> None:
        self.settings = settings
        self._settled = settled
        self.line = line
        self.boot_id = boot_id
        self._topic = line.encode()
        self.metrics = metrics
        self._ready = ready
        self._after = after_publish
        self._clock = clock
        self.seq_last = 0
        self._thread: threading.Thread | None = None
        # Deadline/overload/shutdown rejects can come by the thousand in an overload: one summary line per
        # heartbeat interval instead of a line each (each is still a verdict and a counter).
        self._summary: collections.Counter[str] = collections.Counter()
        self._summary_ids: list[str] = []
        # Created and bound here so a bad/busy endpoint fails start-up synchronously; from start() on the socket
        # belongs to the publisher thread alone (thread start is the memory barrier ZeroMQ asks for).
        self._sock = ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, settings.sndhwm)
        self._sock.setsockopt(zmq.LINGER, settings.linger_ms)
        # CURVE server when configured (daemon.security): only authorised subscribers get verdicts.
        self.endpoint: str = bind_server(
            self._sock, settings.endpoint, "publisher", secure=secure, monitor=monitor
        )

    def start(self) -> None:
        self._spawn(self._run, "publisher")

    def _run(self) -> None:
        interval = self.settings.heartbeat_ms / 1000.0
        mono = self._clock.monotonic
        next_beat = mono()
        try:
            while True:
                now = mono()
                if now >= next_beat:
                    self._heartbeat()
                    next_beat = max(next_beat + interval, now)  # no burst of beats after a stall
                try:
                    item = self._settled.get(timeout=max(0.0, next_beat - mono()))
                except queue.Empty:
                    continue
                if item is None:  # end of stream: every admitted frame has been published
                    self._heartbeat(final=True)
                    return
                if isinstance(item, Deferred):
                    self._deferred(item)
                    continue
                self._publish(item)
        except Exception:
            log.exception("publisher failed")
            raise
        finally:
            self._sock.close(linger=self.settings.linger_ms)

    def _deferred(self, item: Deferred) -> None:
        """Work queued behind verdicts (Ledger.after_published): its failure is logged, never the publisher's."""
        try:
            item.run()
        except Exception:
            log.exception("deferred work after publishing failed")

    def _publish(self, item: Settled) -> None:
        v = item.verdict
        self.seq_last += 1
        t_pub_mono = self._clock.monotonic()
        latency_s = t_pub_mono - v.t_arrival
        msg = verdict_message(
            v,
            line=self.line,
            boot_id=self.boot_id,
            seq=self.seq_last,
            t_published=self._clock.wall(),
            latency_ms=latency_s * 1000.0,
        )
        try:
            payload = encode(msg)
        except ValueError:  # a non-finite number in detail: never let it block the verdict itself
            msg["detail"] = {"error": "detail not serialisable"}
            payload = encode(msg)
        self._sock.send_multipart((self._topic, payload))
        self.metrics.observe_stage("publish", self._clock.monotonic() - item.t_settled)
        self.metrics.observe_verdict(v, latency_s)
        if v.reason in _SUMMARISED:
            self._summary[v.reason.value] += 1
            if len(self._summary_ids) < _SUMMARY_IDS:
                self._summary_ids.append(v.frame_id)
        if self._after is not None:
            self._after(v, item.job.frame, msg)

    def _log_summary(self) -> None:
        if self._summary:
            n = sum(self._summary.values())
            log.warning(
                "fail-safe rejects",
                **self._summary,
                frame_ids=self._summary_ids,
                more=n - len(self._summary_ids),
            )
            self._summary.clear()
            self._summary_ids = []

    def _heartbeat(self, final: bool = False) -> None:
        self._log_summary()
        msg = heartbeat_message(
            line=self.line,
            boot_id=self.boot_id,
            seq_last=self.seq_last,
            t_published=self._clock.wall(),
            ready=False if final else bool(self._ready()),
        )
        self._sock.send_multipart((self._topic, encode(msg)))
