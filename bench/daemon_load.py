"""Load on the real daemon over loopback ZeroMQ: the line camera's PUSH and the line controller's SUB.

Two ways to drive it:

- **closed loop** (saturation): at most W frames are outstanding (sent, verdict not yet seen); each verdict
  lets the next frame go. The daemon is never idle yet its intake queue never overflows, so the throughput is
  what it sustains, not what it refuses (an open-loop flood would measure ``overload`` rejects). W is fixed, or
  adapted so that frames are not queued into their deadline (see :meth:`LoadClient.closed_loop`).
- **open loop** (latency at a line rate): frames leave on an absolute schedule, whatever the daemon does,
  as a camera triggers them; latency = send → verdict received, on the same monotonic clock.

Only *inspected* verdicts (``model``, ``grey_zone``, ``out_of_tolerance``) count as throughput; fail-safe
rejects (``deadline``, ``overload``, …) are counted separately. CPU time of the daemon comes from /proc over
exactly the measured interval; this process's own CPU (the load generator) is reported beside it, because on
a 2-core machine it shares the cores with the daemon.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from daemon.subscriber import VerdictSubscriber
from daemon.wire import camera_message
from engine.stats import percentiles
from tools.daemon_process import DaemonProcess, Samples

INSPECTED = frozenset({"model", "grey_zone", "out_of_tolerance"})
PERCENTILE_KEYS = ("p50", "p95", "p99", "max", "n")  # latency_ms and daemon_latency_ms in bench.json
Payload = np.ndarray | bytes

SAT_SUFFIX = "pct_sat"  # the name of the rate at a fraction of the measured saturation: "80pct_sat"


def line_rates(fps: Sequence[float], sat_fraction: float, saturation_img_s: float) -> list[tuple[str, float]]:
    """The open-loop phases, (name, fps): each fixed rate ("5fps"), then ``sat_fraction`` of the saturation
    measured before ("80pct_sat") when both are positive."""
    rates = [(f"{r:g}fps", float(r)) for r in fps]
    if saturation_img_s > 0 and sat_fraction > 0:
        rates.append((f"{round(100 * sat_fraction)}{SAT_SUFFIX}", sat_fraction * saturation_img_s))
    return rates


def sat_percent(name: str) -> str | None:
    """The percentage of saturation a rate named by :func:`line_rates` runs at ("80"), or None for a fixed rate."""
    return name[: -len(SAT_SUFFIX)] if name.endswith(SAT_SUFFIX) else None


@dataclass(slots=True)
class _Phase:
    prefix: str
    t_send: dict[str, float] = field(default_factory=dict)
    t_recv: dict[str, float] = field(default_factory=dict)
    reason: dict[str, str] = field(default_factory=dict)
    daemon_ms: dict[str, float] = field(default_factory=dict)
    done: threading.Condition = field(default_factory=threading.Condition)


class LoadClient:
    """PUSH to the daemon's camera endpoint, SUB to its verdicts (a :class:`VerdictSubscriber`: one thread)."""

    def __init__(self, daemon: DaemonProcess, line: str) -> None:
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.setsockopt(zmq.SNDTIMEO, 10_000)
        self._push.connect(daemon.camera_endpoint)
        self._phase: _Phase | None = None
        self._lock = threading.Lock()
        self._sub = VerdictSubscriber(
            daemon.publisher_endpoint,
            line,
            self._receive,
            options={zmq.RCVHWM: 0},  # never drop a verdict on our side
            name="bench-sub",
        )

    def __enter__(self) -> LoadClient:
        self._sub.start()
        if not self._sub.wait_heartbeat(30):  # subscribed: nothing published from now on is missed
            raise TimeoutError("no heartbeat from the daemon within 30 s")
        return self

    def __exit__(self, *exc: object) -> None:
        self._sub.stop(5)
        self._push.close(linger=0)
        self._ctx.term()

    def _receive(self, msg: dict[str, Any], t: float) -> None:
        """On the subscriber's thread: a verdict of the current phase is recorded in it."""
        if msg["type"] != "verdict":
            return
        with self._lock:
            phase = self._phase
        if phase is None or not msg["frame_id"].startswith(phase.prefix):
            return
        fid = msg["frame_id"]
        with phase.done:
            phase.t_recv[fid] = t
            phase.reason[fid] = msg["reason"]
            phase.daemon_ms[fid] = float(msg["latency_ms"])
            phase.done.notify_all()

    def _begin(self, prefix: str) -> _Phase:
        phase = _Phase(prefix)
        with self._lock:
            self._phase = phase
        return phase

    def _send(self, phase: _Phase, i: int, payload: Payload, encoding: str) -> None:
        fid = f"{phase.prefix}{i:07d}"
        msg = camera_message(fid, payload, encoding=encoding, t_capture=time.time())
        phase.t_send[fid] = time.monotonic()
        self._push.send_multipart(msg, copy=False)

    def _finish(self, phase: _Phase, timeout: float) -> None:
        """Wait for the verdicts of everything sent (bounded: a verdict always comes, by the deadline)."""
        end = time.monotonic() + timeout
        with phase.done:
            while len(phase.t_recv) < len(phase.t_send) and time.monotonic() < end:
                phase.done.wait(0.1)
        with self._lock:
            self._phase = None

    # -- the two drivers -------------------------------------------------------------------------------------
    def closed_loop(
        self,
        name: str,
        payloads: Sequence[Payload],
        encoding: str,
        *,
        seconds: float,
        window: int,
        max_window: int,
        target_latency_s: float,
        warmup_s: float,
        drain_s: float,
        daemon: DaemonProcess,
    ) -> dict[str, Any]:
        """``window`` > 0: that many frames outstanding. 0: adaptive — Little's law (outstanding = rate ×
        latency) re-applied every 0.25 s to keep the send → verdict latency near ``target_latency_s``: as many
        frames in flight as keep the daemon busy, not so many that they queue into their deadline."""
        phase = self._begin(f"{name}-")
        t0 = time.monotonic()
        t_measure = t0 + warmup_s
        t_end = t_measure + seconds
        cpu0 = cpu_bench0 = 0.0
        scrape0: Samples = {}
        measuring = False
        w = float(window or 1)
        windows: list[float] = []
        next_adapt = t0 + 0.25
        for i, payload in zip(itertools.count(), itertools.cycle(payloads)):
            if not self._wait_room(phase, round(w), timeout=10.0):
                break  # ten seconds without a verdict: the daemon is stuck; report what happened
            now = time.monotonic()
            if not measuring and now >= t_measure:
                measuring, t_measure = True, now
                cpu0, cpu_bench0 = daemon.cpu_seconds(), time.process_time()
                scrape0 = daemon.scrape()
            if now >= t_end:
                break
            if not window and now >= next_adapt:
                w = _little(phase, now, w, target_latency_s, max_window)
                next_adapt = now + 0.25
            if measuring:
                windows.append(w)
            self._send(phase, i, payload, encoding)
        t_stop = time.monotonic()
        cpu = daemon.cpu_seconds() - cpu0 if measuring else 0.0
        cpu_bench = time.process_time() - cpu_bench0 if measuring else 0.0
        scrape1 = daemon.scrape() if measuring else {}
        self._finish(phase, drain_s)
        wall = t_stop - t_measure
        # Throughput: inspected verdicts that arrived inside the measured interval.
        inspected = sum(
            1
            for fid, t in phase.t_recv.items()
            if t_measure <= t <= t_stop and phase.reason[fid] in INSPECTED
        )
        out = _summary(phase, encoding)
        ok = measuring and wall > 0
        out.update(
            window=window or "adaptive",
            mean_outstanding=round(sum(windows) / len(windows), 2) if windows else None,
            seconds=round(wall, 2),
            img_s=round(inspected / wall, 2) if ok else 0.0,
            daemon_cores=round(cpu / wall, 2) if ok else 0.0,
            daemon_core_ms_per_img=round(1000 * cpu / inspected, 2) if inspected else None,
            loadgen_cores=round(cpu_bench / wall, 2) if ok else 0.0,
            thread_core_ms_per_img=_per_img(
                daemon.thread_cpu(scrape0), daemon.thread_cpu(scrape1), inspected
            ),
            batches=_batch_mix(scrape0, scrape1),
            gc=_gc(scrape0, scrape1),
        )
        return out

    def _wait_room(self, phase: _Phase, window: int, timeout: float) -> bool:
        end = time.monotonic() + timeout
        with phase.done:
            while len(phase.t_send) - len(phase.t_recv) >= max(1, window):
                if time.monotonic() >= end:
                    return False
                phase.done.wait(0.05)
        return True

    def open_loop(
        self,
        name: str,
        payloads: Sequence[Payload],
        encoding: str,
        *,
        fps: float,
        seconds: float,
        drain_s: float,
        daemon: DaemonProcess,
    ) -> dict[str, Any]:
        phase = self._begin(f"{name}-")
        count = max(1, round(fps * seconds))
        period = 1.0 / fps
        scrape0 = daemon.scrape()
        cpu0 = daemon.cpu_seconds()
        t0 = time.monotonic()
        behind = 0
        for i, payload in zip(range(count), itertools.cycle(payloads)):
            delay = t0 + i * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -period:
                behind += 1  # this process could not keep the schedule (a loaded machine): reported
            self._send(phase, i, payload, encoding)
        wall = time.monotonic() - t0
        cpu = daemon.cpu_seconds() - cpu0
        self._finish(phase, drain_s)
        out = _summary(phase, encoding)
        scrape1 = daemon.scrape()
        out.update(
            stage_ms=_stage_ms(scrape0, scrape1),
            gc=_gc(scrape0, scrape1),
            fps=round(fps, 2),
            sent_fps=round(len(phase.t_send) / wall, 2) if wall > 0 else 0.0,
            sender_behind=behind,
            daemon_cores=round(cpu / wall, 2) if wall > 0 else 0.0,
        )
        return out

    @property
    def seq_gaps(self) -> int:
        """Holes in the verdicts' ``seq`` (each a run of lost verdicts), by
        :class:`~daemon.sequence.SequenceTracker`'s rule."""
        with self._sub.lock:
            return len(self._sub.sequence.gaps)


def _per_img(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    """Core-ms per inspected frame spent by each daemon thread between two scrapes (largest first)."""
    if not n or not after:
        return {}
    spent = {k: 1000.0 * (v - before.get(k, 0.0)) / n for k, v in after.items()}
    return {k: round(v, 2) for k, v in sorted(spent.items(), key=lambda kv: -kv[1]) if v > 0}


def _delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    """How much the samples of ``name`` (those carrying ``labels``, summed) grew between two scrapes."""
    return sum(
        v - before.get((n, ls), 0.0)
        for (n, ls), v in after.items()
        if n == name and labels.items() <= dict(ls).items()
    )


def _batch_mix(before: Samples, after: Samples) -> dict[str, float]:
    """How full the inference batches were between two scrapes (``inspectd_batch_size``): the mean, and the
    share of batches of 1 and of at most 2 frames."""
    n = _delta(before, after, "inspectd_batch_size_count")
    if not n:
        return {}
    out = {"mean": round(_delta(before, after, "inspectd_batch_size_sum") / n, 2)}
    for le in (1, 2):
        out[f"share_le{le}"] = round(
            _delta(before, after, "inspectd_batch_size_bucket", le=f"{le:.1f}") / n, 3
        )
    return out


def _gc(before: Samples, after: Samples) -> dict[str, dict[str, float]]:
    """The daemon's cyclic garbage collections between two scrapes (``inspectd_gc_pause_seconds``), by
    generation: how many, their total ms, and the bound on the longest (the smallest bucket edge that holds them
    all, ms)."""
    out: dict[str, dict[str, float]] = {}
    for gen in ("0", "1", "2"):
        n = _delta(before, after, "inspectd_gc_pause_seconds_count", generation=gen)
        if not n:
            continue
        cumulative = {
            float(dict(ls)["le"]): v - before.get((name, ls), 0.0)
            for (name, ls), v in after.items()
            if name == "inspectd_gc_pause_seconds_bucket" and dict(ls).get("generation") == gen
        }
        longest = min((edge for edge, c in cumulative.items() if c >= n), default=float("inf"))
        out[gen] = {
            "count": n,
            "total_ms": round(
                1000.0 * _delta(before, after, "inspectd_gc_pause_seconds_sum", generation=gen), 2
            ),
            "max_ms_le": round(1000.0 * longest, 3),
        }
    return out


def _stage_ms(before: Samples, after: Samples) -> dict[str, float]:
    """Mean ms per frame in each pipeline stage between two scrapes (``inspectd_stage_seconds``: decode,
    preprocess, queue, infer, publish) and of the daemon's arrival → published latency; ``other`` is the
    latency no stage accounts for (hand-offs between threads, the ledger, the decision)."""
    out: dict[str, float] = {}
    for (name, labels), _ in after.items():
        stage = dict(labels).get("stage")
        if name != "inspectd_stage_seconds_count" or stage is None or stage in out:
            continue
        n = _delta(before, after, name, stage=stage)
        if n:
            out[stage] = 1000.0 * _delta(before, after, "inspectd_stage_seconds_sum", stage=stage) / n
    n = _delta(before, after, "inspectd_latency_seconds_count")
    if not n:
        return {}
    out["latency"] = 1000.0 * _delta(before, after, "inspectd_latency_seconds_sum") / n
    # publish is measured from settling to sending, inside the latency; the rest is the frame's own path.
    out["other"] = out["latency"] - sum(v for k, v in out.items() if k != "latency")
    return {k: round(v, 2) for k, v in out.items()}


def _little(phase: _Phase, now: float, w: float, target_s: float, max_window: int) -> float:
    """The next window: verdict rate × target latency over the last second (smoothed; at least 1)."""
    with phase.done:
        recent = [t for t in phase.t_recv.values() if t >= now - 1.0]
        if not recent:
            return w
        span = max(0.25, min(1.0, now - min(phase.t_send.values())))
    rate = len(recent) / span
    return min(float(max_window), max(1.0, 0.5 * w + 0.5 * rate * target_s))


def _summary(phase: _Phase, encoding: str) -> dict[str, Any]:
    latencies = [1000.0 * (phase.t_recv[f] - t) for f, t in phase.t_send.items() if f in phase.t_recv]
    reasons = collections.Counter(phase.reason.values())
    return {
        "encoding": encoding,
        "sent": len(phase.t_send),
        "verdicts": len(phase.t_recv),
        "missing": len(phase.t_send) - len(phase.t_recv),
        "reasons": dict(sorted(reasons.items())),
        "deadline_misses": reasons.get("deadline", 0),
        "overload": reasons.get("overload", 0),
        "latency_ms": percentiles(latencies, PERCENTILE_KEYS, digits=2),
        "daemon_latency_ms": percentiles(phase.daemon_ms.values(), PERCENTILE_KEYS, digits=2),
    }
