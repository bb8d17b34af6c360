"""Overload: the camera pushes at twice the daemon's measured capacity (issue 9, item 1).

``inspectd serve`` runs as a child process (its own cores' worth of GIL, its own RSS). Phases, all on one
daemon and one subscriber:

1. capacity: closed loop, at most K frames outstanding, so the pipeline is always busy and never refuses —
   model verdicts per second is the capacity C of this machine, now;
2. baseline: 0.3 C, open loop — normal latency;
3. burst: 2 C for ``burst_s`` (10 s here, 60 s in the ``slow`` soak), RSS sampled every 0.25 s;
4. recovery: 0.3 C again.

Then: every frame sent has exactly one verdict, seq 1..N contiguous; the excess is REJECT ``overload``; the
frames accepted make their deadline; memory stays flat; latency is back to normal within a few seconds.

Sizing: under overload the queue and every batch buffer are full, so an accepted frame waits about
``(queue_size + buffers × max_batch) / goodput``, and goodput under overload is lower than capacity (refusing
costs CPU too: measured 0.4–1.2 × capacity here). 8 + 2 × 4 = 16 frames keeps that well inside the 250 ms
deadline even at a third of capacity (docs/reliability.md).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import tiny_package
from tests.integration.daemon_harness import CameraPusher, VerdictCollector, daemon_settings
from tests.integration.reliability_harness import RssSampler
from tools.daemon_process import DaemonProcess

pytestmark = pytest.mark.integration

MiB = 1 << 20
FRAME = 256  # raw uint8 frames: CLAHE at 256² keeps preprocessing, not the test process, the bottleneck
DEADLINE_MS = 250.0
QUEUE = 8
BATCH, BUFFERS = 4, 2
RCVHWM = 100
OUTSTANDING = QUEUE + BUFFERS * BATCH  # closed loop: the queue and every batch buffer full, yet no refusal
MIN_CAPACITY = 4 * OUTSTANDING / (DEADLINE_MS / 1000.0)  # a full pipeline costs ≤ 1/4 of the deadline


@dataclasses.dataclass
class Sent:
    ids: list[str] = dataclasses.field(default_factory=list)
    times: list[float] = dataclasses.field(default_factory=list)


def _pace(
    cam: CameraPusher,
    pool: list[np.ndarray],
    sent: Sent,
    prefix: str,
    rate: float,
    seconds: float,
    catch_up: bool = True,
) -> float:
    """Open loop on an absolute schedule; returns the rate achieved.

    ``catch_up=False`` for the phases below capacity: when this process falls behind its schedule by more than two
    frames (its own garbage collector, which took 25–68 ms here, or the OS), the schedule moves on instead of sending
    the debt back to back. A 60 ms stall of the sender at 600 frames/s is otherwise a 36-frame burst, which an
    8-frame queue rightly refuses: measured here, 3 runs in 8 had 2–29 baseline frames refused that way, and 0 in 8
    once the schedule moved on.
    """
    n = int(rate * seconds)
    t0 = time.monotonic()
    for i in range(n):
        delay = t0 + i / rate - time.monotonic()
        if not catch_up and delay < -2.0 / rate:
            t0 -= delay  # resume the rate from now: the phase stays an open loop at `rate`, without a burst
        elif delay > 0:
            time.sleep(delay)  # behaviour, not synchronisation: the sending rate under test
        fid = f"{prefix}-{i:06d}"
        cam.send(fid, pool[i % len(pool)])
        sent.ids.append(fid)
        sent.times.append(time.monotonic())
    return n / max(1e-9, time.monotonic() - t0)


def _closed_loop(
    cam: CameraPusher, sub: VerdictCollector, pool: list[np.ndarray], sent: Sent, seconds: float
) -> float:
    """At most OUTSTANDING frames without a verdict: returns model verdicts/s over the last 2/3 of the run."""
    base = len(sub.verdicts)
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < seconds:
        if i >= OUTSTANDING:
            sub.wait_verdicts(base + i - OUTSTANDING + 1, timeout=30)
        fid = f"cap-{i:06d}"
        cam.send(fid, pool[i % len(pool)])
        sent.ids.append(fid)
        sent.times.append(time.monotonic())
        i += 1
    sub.wait_verdicts(base + i, timeout=30)
    window_start = t0 + seconds / 3
    decided = [
        t
        for v, t in zip(sub.verdicts[base:], sub.arrivals[base:], strict=True)
        if v["reason"] == "model" and window_start <= t <= t0 + seconds
    ]
    return len(decided) / (t0 + seconds - window_start)


def run_overload(tmp_path: Path, burst_s: float, recovery_s: float = 4.0) -> dict[str, Any]:
    tiny_package(tmp_path / "pkg", input_size=(64, 64))
    settings = daemon_settings(
        tmp_path / "pkg",
        line="overload",
        # rcvhwm bounds what ZeroMQ holds before the daemon reads it: memory (rcvhwm × frame size) and time that
        # the daemon's latency does not see (the clock starts when a frame is read).
        sources={
            "camera": {"endpoint": "tcp://127.0.0.1:*", "backpressure": "reject_newest", "rcvhwm": RCVHWM}
        },
        batching={
            "max_batch": BATCH,
            "buffers": BUFFERS,
            "max_wait_ms": 2,
            "queue_size": QUEUE,
            "preprocess_threads": 1,
        },
        deadlines={"max_latency_ms": DEADLINE_MS},
        publisher={"endpoint": "tcp://127.0.0.1:*", "heartbeat_ms": 200},
        model={"path": str(tmp_path / "pkg"), "intra_op_threads": 1, "watch_s": 0},
    )
    rng = np.random.default_rng(0)
    pool = [rng.integers(0, 255, (FRAME, FRAME), dtype=np.uint8) for _ in range(8)]
    sent = Sent()
    marks: dict[str, float] = {}
    with (
        DaemonProcess(settings, tmp_path / "run") as daemon,
        VerdictCollector(daemon.publisher_endpoint, settings.line) as sub,
        CameraPusher(daemon.camera_endpoint) as cam,
    ):
        capacity = _closed_loop(cam, sub, pool, sent, seconds=3.0)
        assert capacity >= MIN_CAPACITY, f"capacity {capacity:.0f}/s is too low for a {QUEUE}-frame queue"
        with RssSampler(daemon) as rss:
            marks["baseline"] = time.monotonic() - rss.t0
            _pace(cam, pool, sent, "base", 0.3 * capacity, 2.0, catch_up=False)
            marks["burst"] = time.monotonic() - rss.t0
            burst_rate = _pace(cam, pool, sent, "burst", 2.0 * capacity, burst_s)
            marks["recovery"] = time.monotonic() - rss.t0
            t_burst_end = time.monotonic()
            _pace(cam, pool, sent, "rec", 0.3 * capacity, recovery_s, catch_up=False)
            verdicts = sub.wait_verdicts(len(sent.ids), timeout=30)
            marks["end"] = time.monotonic() - rss.t0
        rc = daemon.terminate()
        assert rc == 0, daemon.tail()
        # Everything the daemon ever published (its "stopped" line counts it) reaches the subscriber: anything
        # extra, such as a second verdict for some frame, is among it.
        assert daemon.logs is not None
        sub.wait_verdicts(daemon.logs.wait_for("stopped", timeout=10)["verdicts"], timeout=10)
        verdicts, arrivals = list(sub.verdicts), list(sub.arrivals)
    send_time = dict(zip(sent.ids, sent.times, strict=True))
    return {
        "capacity": capacity,
        "burst_rate": burst_rate,
        "verdicts": verdicts,
        "arrivals": dict(zip((v["frame_id"] for v in verdicts), arrivals, strict=True)),
        "sent": sent,
        "send_time": send_time,
        "t_burst_end": t_burst_end,
        "rss": rss,
        "marks": marks,
        "settings": settings,
    }


def check_overload(r: dict[str, Any]) -> dict[str, float]:
    verdicts: list[dict[str, Any]] = r["verdicts"]
    sent: Sent = r["sent"]
    capacity: float = r["capacity"]
    # Exactly one verdict per frame, in an unbroken sequence.
    assert [v["seq"] for v in verdicts] == list(range(1, len(verdicts) + 1))
    assert sorted(v["frame_id"] for v in verdicts) == sorted(sent.ids)
    assert len({v["boot_id"] for v in verdicts}) == 1
    by_phase: dict[str, list[dict[str, Any]]] = {}
    for v in verdicts:
        by_phase.setdefault(v["frame_id"].split("-")[0], []).append(v)
    assert all(
        v["verdict"] == "REJECT" for v in verdicts if v["reason"] != "model"
    )  # never a PASS uninspected
    assert {v["reason"] for v in verdicts} <= {"model", "overload", "deadline"}
    # The burst was a real 2× overload, and its excess was refused as overload.
    burst = by_phase["burst"]
    assert r["burst_rate"] >= 1.7 * capacity, f"sent {r['burst_rate']:.0f}/s, capacity {capacity:.0f}/s"
    refused = [v for v in burst if v["reason"] == "overload"]
    accepted = [v for v in burst if v["reason"] == "model"]
    assert len(refused) >= 0.25 * len(burst), f"{len(refused)} of {len(burst)} refused"
    assert all(v["detail"]["policy"] == "reject_newest" for v in refused)
    # Overload is refused promptly (at the door), and what is accepted is decided in time.
    deadline_rejects = [v for v in verdicts if v["reason"] == "deadline"]
    assert len(deadline_rejects) <= 0.01 * len(burst), f"{len(deadline_rejects)} deadline rejects"
    # The deadline is enforced when a frame is decided; publication follows within a few ms, but a shared,
    # loaded 2-core CI box can stall a thread for tens of ms — hence p99 within the deadline, max near it.
    model_lat = np.array([v["latency_ms"] for v in accepted])
    assert np.percentile(model_lat, 99) < DEADLINE_MS and model_lat.max() < 1.5 * DEADLINE_MS
    # Camera send → subscriber receipt, including time in ZeroMQ's queues (bounded by rcvhwm): what a PLC sees.
    e2e_ms = np.array(
        [(r["arrivals"][v["frame_id"]] - r["send_time"][v["frame_id"]]) * 1000 for v in accepted]
    )
    burst_s = len(burst) / r["burst_rate"]
    goodput = len(accepted) / burst_s
    # Refusing costs CPU too (every excess frame is read, admitted, refused and published), and on 2 cores the
    # test's own sender and subscriber compete: measured 0.4–1.2 × capacity. A floor, against a collapse.
    assert goodput >= 0.25 * capacity, f"goodput {goodput:.0f}/s under overload vs capacity {capacity:.0f}/s"
    # Memory: bounded during the burst and not growing through it. The bound is on the peak; the trend is on
    # medians, because the peak has transient spikes (frames waiting a few hundred ms for a publisher thread
    # that two busy cores starve: measured +8 to +28 MiB, in either third) while a leak moves the median. A
    # 100 B/frame leak over the last two thirds of a 60 s burst is ~9 MiB here: caught.
    rss: RssSampler = r["rss"]
    m = r["marks"]
    before = max(rss.between(m["baseline"], m["burst"]))
    during = rss.between(m["burst"], m["recovery"])
    third = max(1, len(during) // 3)
    growth = float(np.median(during[-third:]) - np.median(during[:third]))
    assert max(during) - before < 64 * MiB, f"RSS grew {(max(during) - before) / MiB:.1f} MiB in the burst"
    assert growth < 8 * MiB, (
        f"RSS still growing: median +{growth / MiB:.1f} MiB from the first to the last third"
    )
    # Recovery: from some point after the burst, every frame is a model verdict at normal latency.
    base_lat = np.array([v["latency_ms"] for v in by_phase["base"]])
    assert {v["reason"] for v in by_phase["base"]} == {"model"}
    normal_ms = max(3 * float(np.percentile(base_lat, 95)), float(np.percentile(base_lat, 95)) + 20.0)
    rec = sorted(by_phase["rec"], key=lambda v: r["send_time"][v["frame_id"]])
    last_bad = max(
        (i for i, v in enumerate(rec) if v["reason"] != "model" or v["latency_ms"] > normal_ms), default=-1
    )
    recovered_at = r["send_time"][rec[last_bad + 1]["frame_id"]] if last_bad + 1 < len(rec) else float("inf")
    recovery_s = max(0.0, recovered_at - r["t_burst_end"])
    assert recovery_s < 3.0, f"latency back under {normal_ms:.0f} ms only {recovery_s:.2f} s after the burst"
    numbers = {
        "capacity_per_s": round(capacity, 1),
        "burst_rate_per_s": round(r["burst_rate"], 1),
        "burst_frames": len(burst),
        "overload_fraction": round(len(refused) / len(burst), 3),
        "goodput_per_s": round(goodput, 1),
        "deadline_rejects": len(deadline_rejects),
        "burst_accepted_latency_p50_ms": round(float(np.percentile(model_lat, 50)), 1),
        "burst_accepted_latency_p99_ms": round(float(np.percentile(model_lat, 99)), 1),
        "burst_accepted_latency_max_ms": round(float(model_lat.max()), 1),
        "burst_accepted_send_to_receipt_p99_ms": round(float(np.percentile(e2e_ms, 99)), 1),
        "baseline_p95_ms": round(float(np.percentile(base_lat, 95)), 1),
        "rss_before_mib": round(before / MiB, 1),
        "rss_burst_max_mib": round(max(during) / MiB, 1),
        "rss_median_growth_first_to_last_third_mib": round(growth / MiB, 1),
        "recovery_s": round(recovery_s, 2),
    }
    print("\noverload numbers:", numbers)
    return numbers


@pytest.mark.timeout(180)
def test_overload_2x_capacity_10s(tmp_path: Path) -> None:
    check_overload(run_overload(tmp_path, burst_s=10.0))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_overload_2x_capacity_60s_soak(tmp_path: Path) -> None:
    check_overload(run_overload(tmp_path, burst_s=60.0))
