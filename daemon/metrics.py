"""Prometheus metrics on a registry passed in, and the HTTP endpoint that serves them with health probes.

Naming follows Prometheus conventions: ``inspectd_`` prefix, base units (seconds), ``_total`` counters,
histograms for latency. Every label value that can occur is created at start, so rates and ratios exist
(as 0) before the first event and dashboards never show "no data" for a healthy idle line. No per-part
labels: a frame id never becomes a label value. NG rate over any window is derivable in PromQL; of the inspected
parts (what ``inspectd_ng_ratio`` and the alerts count: station faults are not a quality problem)
``sum(rate(inspectd_verdicts_total{verdict="REJECT", reason=~"model|grey_zone|out_of_tolerance"}[5m]))
/ sum(rate(inspectd_verdicts_total{reason=~"model|grey_zone|out_of_tolerance"}[5m]))``. The drift gauges are
:class:`daemon.drift.DriftMonitor`'s, registered here.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from daemon.drift import DriftMonitor, PartImage
from daemon.models import DISAGREEMENT_KINDS
from daemon.types import Outcome, Reason, Verdict
from engine.drift import logit
from engine.package import Decision

# The *_created series serve no dashboard or alert here; they only add scrape volume.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated

STAGES = ("decode", "preprocess", "queue", "infer", "publish")
# Arrival → verdict published. The line budget is tens to hundreds of ms; 1 ms … 2 s brackets it.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.0,
)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# NG probability of the parts the model scored: a coarse grid over [0, 1], refined around the operating point
# (score_buckets) so that the share of parts near the threshold is read off the histogram, not guessed.
SCORE_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
SCORE_STEPS = (-2.0, -1.0, -0.5, 0.5, 1.0, 2.0)  # logit steps from the threshold that get a bucket edge
# Per connection of the metrics server: a scrape answers in milliseconds; an idle client is dropped after this.
CONNECTION_TIMEOUT_S = 5.0
# Oversized messages are dropped by libzmq as a disconnect: they show in inspectd_peer_events_total.
MESSAGE_ERROR_KINDS = ("multipart", "header", "unattributed")
# The model lifecycle (daemon/lifecycle.py) and shadow scoring (daemon/shadow.py).
MODEL_ROLES = ("production", "candidate", "previous")
LOAD_RESULTS = ("loaded", "refused")
SWITCH_ACTIONS = ("promote", "rollback")
# |candidate − production| NG probability of a shadowed frame: most are near 0, a retrained model's reach 0.1+.
SCORE_DIFF_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


def _verdict_label_pairs() -> list[tuple[str, str]]:
    # A PASS is only ever the model's (or the gauges') decision; anything else is a REJECT.
    return [(Outcome.PASS.value, Reason.MODEL.value)] + [(Outcome.REJECT.value, r.value) for r in Reason]


def score_buckets(decision: Decision | None) -> tuple[float, ...]:
    """The ``inspectd_score`` bucket edges for an operating point: :data:`SCORE_BUCKETS`, the threshold and the
    grey zone's edges exactly (so the PASS share is a bucket), and the probabilities a few logit steps either
    side of the threshold (a shift towards it shows before parts cross it)."""
    edges = set(SCORE_BUCKETS)
    if decision is not None:
        t = decision.threshold
        edges |= {t, *decision.bounds}
        if 0.0 < t < 1.0:
            edges |= {round(1.0 / (1.0 + math.exp(-(logit(t) + step))), 6) for step in SCORE_STEPS}
    return tuple(sorted(e for e in edges if 0.0 < e <= 1.0))


class MetricsSink(Protocol):
    """What the pipeline stages report: exactly the calls the pipeline (daemon/pipeline.py), the inference
    workers (daemon/inference.py) and the publisher (daemon/publisher.py) make. :class:`Metrics` is one (mypy
    checks it below); a test may hand in a recording double instead. Implementations must be thread-safe:
    every stage thread calls them."""

    def frame_received(self, source: str) -> None: ...

    def message_error(self, kind: str) -> None: ...

    def observe_stage(self, stage: str, seconds: float) -> None: ...

    def observe_batch(self, size: int) -> None: ...

    def late_result(self, n: int) -> None: ...

    def observe_verdict(self, v: Verdict, latency_s: float) -> None: ...

    def observe_parts(self, logits: Sequence[float], images: Sequence[PartImage]) -> None: ...

    # shadow scoring (daemon/shadow.py): offered by the inference workers, the rest by the shadow thread
    def shadow_offered(self, n: int) -> None: ...

    def shadow_scored(self, diffs: Sequence[float]) -> None: ...

    def shadow_disagreements(self, kinds: Sequence[str]) -> None: ...

    def shadow_errors(self, n: int) -> None: ...

    def shadow_share(self, share: float) -> None: ...


class Metrics:
    """All of inspectd's metrics for one line. Thread-safe (prometheus-client metrics are)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        line: str,
        *,
        sources: Iterable[str] = ("camera",),
        queues: Iterable[str] = ("intake", "batch", "publish"),
        ng_window: int = 500,
        process_collector: bool = True,
        decision: Decision | None = None,
        drift: DriftMonitor | None = None,
    ) -> None:
        if ng_window < 1:
            raise ValueError(f"ng_window must be ≥ 1, got {ng_window}")
        self.registry = registry
        self.line = line
        r = registry
        self.frames_received = Counter(
            "inspectd_frames_received", "Frames received, per source.", ["line", "source"], registry=r
        )
        self.verdicts = Counter(
            "inspectd_verdicts",
            "Verdicts published, by verdict and reason.",
            ["line", "verdict", "reason"],
            registry=r,
        )
        self.latency = Histogram(
            "inspectd_latency_seconds",
            "Frame arrival to verdict published.",
            ["line"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "inspectd_stage_seconds", "Time per pipeline stage, per frame.", ["line", "stage"], buckets=STAGE_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "inspectd_batch_size", "Frames per inference batch.", ["line"], buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "inspectd_queue_depth", "Frames waiting, per queue.", ["line", "queue"], registry=r
        )
        self.ng_ratio = Gauge(
            "inspectd_ng_ratio",
            "Fraction of REJECT among the last N inspected verdicts (reasons model, grey_zone, "
            "out_of_tolerance; N = ng_window). Station faults (deadline, overload, decode_error, ...) are not in it.",
            ["line"],
            registry=r,
        )
        self.threshold = Gauge(
            "inspectd_decision_threshold",
            "The model package's decision threshold on the NG probability (score >= threshold: REJECT).",
            ["line"],
            registry=r,
        )
        self.score = Histogram(
            "inspectd_score",
            "NG probability of the parts the model scored, per published verdict that carries a score.",
            ["line"],
            buckets=score_buckets(decision),
            registry=r,
        )
        self.model_info = Info(
            "inspectd_model",
            "The model packages loaded, by role: production (decides every part), candidate (loaded beside it, "
            "maybe shadowing), previous (the rollback target).",
            ["line", "role"],
            registry=r,
        )
        self.model_loads = Counter(
            "inspectd_model_loads",
            "Model packages loaded beside production while serving, by result (loaded: an eligible candidate; "
            "refused: bad package, sha256, input or warm-up; it never served).",
            ["line", "result"],
            registry=r,
        )
        self.model_switches = Counter(
            "inspectd_model_switches",
            "Production changed between two batches, by action (promote, rollback).",
            ["line", "action"],
            registry=r,
        )
        self.shadow_offered_frames = Counter(
            "inspectd_shadow_offered_frames",
            "Frames production scored while a candidate shadowed it (the candidate scored a share of them).",
            ["line"],
            registry=r,
        )
        self.shadow_frames = Counter(
            "inspectd_shadow_frames", "Frames the shadowing candidate scored.", ["line"], registry=r
        )
        self.shadow_disagreement = Counter(
            "inspectd_shadow_disagreements",
            "Shadowed frames on which the candidate disagreed with production, by kind: pass_reject / "
            "reject_pass (production's verdict → the candidate's), score (same verdict, NG probabilities further "
            "apart than shadow.score_tolerance).",
            ["line", "kind"],
            registry=r,
        )
        self.shadow_error = Counter(
            "inspectd_shadow_errors",
            "Shadowed frames the candidate could not score (its backend failed, or an implausible logit).",
            ["line"],
            registry=r,
        )
        self.shadow_score_difference = Histogram(
            "inspectd_shadow_score_difference",
            "|candidate - production| NG probability per shadowed frame.",
            ["line"],
            buckets=SCORE_DIFF_BUCKETS,
            registry=r,
        )
        self.shadow_sampled_ratio = Gauge(
            "inspectd_shadow_sampled_ratio",
            "Share of the frames offered to the current candidate that it scored (1: every frame; below 1: "
            "shadow scoring falls behind and samples); NaN before a candidate shadows.",
            ["line"],
            registry=r,
        )
        self.ready = Gauge("inspectd_ready", "1 when the backend is warmed up and the pipeline progresses.", ["line"],
                           registry=r)  # fmt: skip
        self.last_verdict = Gauge(
            "inspectd_last_verdict_timestamp_seconds", "Wall-clock time of the last verdict published.", ["line"],
            registry=r,
        )  # fmt: skip
        self.deadline_misses = Counter(
            "inspectd_deadline_misses", "Frames not decided by their deadline (published as REJECT deadline).",
            ["line"], registry=r,
        )  # fmt: skip
        self.late_results = Counter(
            "inspectd_late_results", "Model results that came after their frame's deadline; the verdict is REJECT deadline either way.",
            ["line"], registry=r,
        )  # fmt: skip
        self.message_errors = Counter(
            "inspectd_message_errors", "Malformed messages that could not be attributed to a part.", ["line", "kind"],
            registry=r,
        )  # fmt: skip
        if process_collector:
            ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, open fds
            if ThreadCpuCollector.available():
                r.register(ThreadCpuCollector(line))  # the same CPU seconds, by the thread that spent them
        # Without a package (tests, a sink built early) every drift gauge still exists, as NaN / "no reference".
        # Registered through a forwarder: a promote or rollback hands the drift windows to the new production's
        # monitor (set_drift) without a scrape ever seeing the gauges missing.
        self.drift = drift if drift is not None else DriftMonitor(line)
        r.register(_Forward(lambda: self.drift))

        for source in sources:
            self.frames_received.labels(line, source)
        for verdict, reason in _verdict_label_pairs():
            self.verdicts.labels(line, verdict, reason)
        for stage in STAGES:
            self.stage.labels(line, stage)
        for queue in queues:
            self.queue_depth.labels(line, queue).set(0)
        for kind in MESSAGE_ERROR_KINDS:
            self.message_errors.labels(line, kind)
        for result in LOAD_RESULTS:
            self.model_loads.labels(line, result)
        for action in SWITCH_ACTIONS:
            self.model_switches.labels(line, action)
        for kind in DISAGREEMENT_KINDS:
            self.shadow_disagreement.labels(line, kind)
        self.shadow_offered_frames.labels(line)
        self.shadow_frames.labels(line)
        self.shadow_error.labels(line)
        self.shadow_score_difference.labels(line)
        self.shadow_sampled_ratio.labels(line).set(math.nan)
        self.latency.labels(line)
        self.score.labels(line)
        self.threshold.labels(line).set(decision.threshold if decision is not None else math.nan)
        self.batch_size.labels(line)
        self.deadline_misses.labels(line)
        self.late_results.labels(line)
        self.ready.labels(line).set(0)
        self.ng_ratio.labels(line).set(0)
        self.last_verdict.labels(line).set(0)

        self._window: collections.deque[bool] = collections.deque(maxlen=ng_window)
        self._rejects_in_window = 0
        self._lock = threading.Lock()

    def frame_received(self, source: str) -> None:
        self.frames_received.labels(self.line, source).inc()

    def observe_verdict(self, v: Verdict, latency_s: float) -> None:
        self.verdicts.labels(self.line, v.outcome.value, v.reason.value).inc()
        self.latency.labels(self.line).observe(latency_s)
        self.last_verdict.labels(self.line).set(time.time())
        if v.reason is Reason.DEADLINE:
            self.deadline_misses.labels(self.line).inc()
        if v.score is not None:
            self.score.labels(self.line).observe(v.score)
        if not v.inspected:  # a station fault says nothing about the parts: not in the NG ratio
            return
        rejected = v.outcome is Outcome.REJECT
        with self._lock:  # the window is a running count, O(1) per verdict
            if len(self._window) == self._window.maxlen:
                self._rejects_in_window -= self._window[0]
            self._window.append(rejected)
            self._rejects_in_window += rejected
            ratio = self._rejects_in_window / len(self._window)
        self.ng_ratio.labels(self.line).set(ratio)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage.labels(self.line, stage).observe(seconds)

    def observe_parts(self, logits: Sequence[float], images: Sequence[PartImage]) -> None:
        """One inference batch for the drift windows: the logits of the parts the model decided, and the crop
        statistics of the batch's parts."""
        self.drift.observe(logits, images)

    def observe_batch(self, size: int) -> None:
        self.batch_size.labels(self.line).observe(size)

    def set_queue_depth(self, queue: str, depth: int) -> None:
        self.queue_depth.labels(self.line, queue).set(depth)

    def late_result(self, n: int = 1) -> None:
        self.late_results.labels(self.line).inc(n)

    def message_error(self, kind: str) -> None:
        self.message_errors.labels(self.line, kind).inc()

    def set_ready(self, ready: bool) -> None:
        self.ready.labels(self.line).set(1 if ready else 0)

    def set_model_info(self, labels: dict[str, str], role: str = "production") -> None:
        self.model_info.labels(self.line, role).info({k: str(v) for k, v in labels.items()})

    def clear_model_info(self, role: str) -> None:
        """No model in ``role`` (a candidate dropped, a previous model unloaded)."""
        with contextlib.suppress(KeyError):
            self.model_info.remove(self.line, role)

    def set_production(self, decision: Decision, drift: DriftMonitor | None) -> None:
        """A promote or rollback: the operating point and drift windows of the new production model."""
        self.threshold.labels(self.line).set(decision.threshold)
        if drift is not None:
            self.drift = drift

    def model_loaded(self, ok: bool) -> None:
        self.model_loads.labels(self.line, "loaded" if ok else "refused").inc()

    def model_switched(self, action: str) -> None:
        self.model_switches.labels(self.line, action).inc()

    # -- shadow scoring ------------------------------------------------------------------------------------
    def shadow_offered(self, n: int) -> None:
        self.shadow_offered_frames.labels(self.line).inc(n)

    def shadow_scored(self, diffs: Sequence[float]) -> None:
        self.shadow_frames.labels(self.line).inc(len(diffs))
        hist = self.shadow_score_difference.labels(self.line)
        for d in diffs:
            hist.observe(d)

    def shadow_disagreements(self, kinds: Sequence[str]) -> None:
        for kind in kinds:
            self.shadow_disagreement.labels(self.line, kind).inc()

    def shadow_errors(self, n: int) -> None:
        self.shadow_error.labels(self.line).inc(n)

    def shadow_share(self, share: float) -> None:
        self.shadow_sampled_ratio.labels(self.line).set(share)


if TYPE_CHECKING:  # mypy proves that the Prometheus metrics are what the stages report to
    _METRICS_ARE_A_SINK: type[MetricsSink] = Metrics


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_NUMBERED = re.compile(r"[-_]\d+$")  # inference-1, preprocess_0 → one role per pool


def thread_role(name: str) -> str:
    """The label a thread's CPU time is counted under: its name without a pool's number."""
    return _NUMBERED.sub("", name)


def stat_cpu_seconds(stat: str | Path) -> float:
    """user + system CPU seconds from a Linux ``/proc/…/stat`` file (a process's: every thread, ended ones too;
    or one task's). Raises OSError when it cannot be read."""
    text = Path(stat).read_text()
    fields = text[text.rindex(")") + 2 :].split()  # the command name may contain spaces or parentheses
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _task_cpu_s(tid: int | str) -> float | None:
    """CPU seconds of one task of this process, None when it is gone."""
    try:
        return stat_cpu_seconds(f"/proc/self/task/{tid}/stat")
    except OSError:
        return None


class ThreadCpuCollector:
    """``inspectd_thread_cpu_seconds_total{thread}``: the process's CPU time by the thread that spent it, read
    from /proc at scrape time only (nothing on the frame path). Python threads are counted under their role
    (``inference``, ``preprocess``, ``batcher``, ``source-camera``, ``publisher``…, pools summed); ``other`` is
    the rest of the process total: native library threads (ZeroMQ's I/O thread, ONNX Runtime's pools when it
    runs them) and threads that have ended. Per frame, ``rate(…[1m]) / rate(inspectd_frames_received_total[1m])``
    is each stage's core-seconds per frame: where a saturated station's CPU goes."""

    def __init__(self, line: str) -> None:
        self._line = line

    @staticmethod
    def available() -> bool:
        return Path("/proc/self/task").is_dir() and _task_cpu_s(threading.get_native_id()) is not None

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "inspectd_thread_cpu_seconds",
            "CPU time (user + system) by the daemon thread that spent it; other = native library threads "
            "and ended threads.",
            labels=["line", "thread"],
        )
        total = _task_cpu_s("..")  # /proc/self/task/../stat = /proc/self/stat: every thread, ended ones too
        by_role: dict[str, float] = collections.defaultdict(float)
        for t in threading.enumerate():
            if t.native_id is not None and (s := _task_cpu_s(t.native_id)) is not None:
                by_role[thread_role(t.name)] += s
        if total is not None:
            by_role["other"] = max(0.0, total - sum(by_role.values()))
        for role, seconds in sorted(by_role.items()):
            family.add_metric([self._line, role], seconds)
        yield family


class _Forward:
    """A collector that collects whatever collector ``current`` returns at scrape time."""

    def __init__(self, current: Callable[[], DriftMonitor]) -> None:
        self._current = current

    def collect(self) -> Iterator[Metric]:
        yield from self._current().collect()


class MetricsServer:
    """``/metrics`` (Prometheus text), ``/healthz`` (process alive) and ``/readyz`` (ready to inspect).

    A small ThreadingHTTPServer in its own thread: scrapes never touch the pipeline threads. Each connection
    (one request: HTTP/1.0, no keep-alive) has ``timeout_s`` in all to send its request, and every socket
    operation times out after that too, so a client that connects and sends nothing, or trickles its headers,
    is dropped instead of holding a thread (and a file descriptor) for ever.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str = "127.0.0.1",
        port: int = 9108,
        *,
        ready: Callable[[], bool],
        timeout_s: float = CONNECTION_TIMEOUT_S,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self._registry = registry
        self._ready = ready
        self.timeout_s = timeout_s
        handler = self._handler_class()
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        registry, ready, timeout_s = self._registry, self._ready, self.timeout_s

        class Handler(BaseHTTPRequestHandler):
            server_version = "inspectd"
            sys_version = ""
            timeout = timeout_s  # StreamRequestHandler.setup() puts it on the connection's socket

            def setup(self) -> None:
                super().setup()
                # The socket timeout bounds each read; this bounds the whole request (a slow trickle).
                self.rfile = _RequestReader(self.rfile, self.connection, time.monotonic() + timeout_s)  # type: ignore[assignment]

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(HTTPStatus.OK, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(HTTPStatus.OK, b"ok\n")
                elif path == "/readyz":
                    ok = bool(ready())
                    self._send(
                        HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE,
                        b"ready\n" if ok else b"not ready\n",
                    )
                else:
                    self._send(HTTPStatus.NOT_FOUND, b"not found\n")

            def _send(
                self, status: HTTPStatus, body: bytes, ctype: str = "text/plain; charset=utf-8"
            ) -> None:
                self.connection.settimeout(timeout_s)  # the answer gets its own time, whatever reading took
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(
                self, format: str, *args: Any
            ) -> None:  # scrapes every 15 s: not worth a log line
                return

        return Handler


class _RequestReader:
    """The request stream of one connection, read against one deadline for the whole request.

    Before each read the socket's timeout is set to the time left, so the request line and headers together
    must arrive within the connection's ``timeout_s``; past it a read raises TimeoutError, which
    ``BaseHTTPRequestHandler`` answers by closing the connection.
    """

    def __init__(self, raw: Any, sock: socket.socket, deadline: float) -> None:
        self._raw = raw
        self._sock = sock
        self._deadline = deadline

    def _arm(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request not received within the connection's time limit")
        self._sock.settimeout(left)

    def readline(self, limit: int = -1) -> bytes:
        self._arm()
        line: bytes = self._raw.readline(limit)
        return line

    def read(self, n: int = -1) -> bytes:
        self._arm()
        data: bytes = self._raw.read(n)
        return data

    def close(self) -> None:
        self._raw.close()

    @property
    def closed(self) -> bool:
        return bool(self._raw.closed)
