"""Faults (issue 9, item 3): kill -9 and restart, subscribers that vanish or stall, a package swapped on disk.

The backend raising mid-batch (REJECT engine_error, reset, recovery) is test_daemon_faults.py's
``test_engine_errors_reject_the_batch_reset_the_backend_and_recover``; not repeated here.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from structlog.testing import capture_logs

from daemon.sequence import SequenceTracker
from daemon.settings import PublisherSettings
from daemon.wire import camera_message
from engine.package import load_package
from tests.helpers import tiny_package, wait_until
from tests.hostile_inputs import encode
from tests.integration.daemon_harness import CameraPusher, VerdictCollector, daemon_settings, running_app
from tests.integration.reliability_harness import free_port
from tools.daemon_process import DaemonProcess

pytestmark = pytest.mark.integration
MiB = 1 << 20


class Streamer:
    """A camera that keeps sending at a steady rate, through daemon restarts; records what it got out."""

    def __init__(self, endpoint: str, fps: float, image: np.ndarray) -> None:
        self.sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.fps, self.image = fps, image
        self.sent: list[tuple[str, float]] = []  # (frame id, monotonic time) of sends ZeroMQ took
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Streamer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close(linger=0)

    def _run(self) -> None:
        i, t0 = 0, time.monotonic()
        while not self._stop.is_set():
            delay = t0 + i / self.fps - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # behaviour, not synchronisation: a camera's steady frame rate
            fid = f"k-{i:06d}"
            # NOBLOCK: ZeroMQ queues while the daemon is down (up to SNDHWM) and refuses beyond; a refused part
            # was not sent, and the camera knows it.
            try:
                self.sock.send_multipart(camera_message(fid, self.image), flags=zmq.NOBLOCK)
                self.sent.append((fid, time.monotonic()))
            except zmq.Again:
                pass
            i += 1


@pytest.mark.timeout(180)
def test_kill_9_mid_stream_then_restart(tmp_path: Path) -> None:
    tiny_package(tmp_path / "pkg", input_size=(32, 32))
    cam_ep, pub_ep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    settings = daemon_settings(
        tmp_path / "pkg",
        line="kill9",
        sources={"camera": {"endpoint": cam_ep}},
        # The shipped join grace: while the daemon was down the camera's PUSH queued frames (a connecting ZeroMQ
        # socket keeps its queue across reconnects), and they arrive in a burst the moment the new daemon binds
        # the camera. Without the grace they were decided before the subscriber re-subscribed: it saw the new
        # boot start at seq 57 (once on a loaded CI machine).
        publisher={
            "endpoint": pub_ep,
            "heartbeat_ms": 50,
            "join_grace_ms": PublisherSettings.model_fields["join_grace_ms"].default,
        },
        # A batch waits up to 150 ms for company at 40 fps: a handful of frames are always inside the daemon.
        batching={"max_batch": 8, "max_wait_ms": 150},
        deadlines={"max_latency_ms": 2000},
    )
    img = np.random.default_rng(1).integers(0, 255, (128, 128), dtype=np.uint8)
    with (
        DaemonProcess(settings, tmp_path / "a") as first,
        VerdictCollector(pub_ep, "kill9") as sub,
        Streamer(cam_ep, 40, img) as cam,
    ):
        sub.wait_verdicts(40, timeout=30)
        # A batch was just published; the next one fills for up to 150 ms. Kill once the camera has sent two frames
        # since: they are inside the daemon, undecided.
        t_published = sub.arrivals[39]
        wait_until(
            lambda: sum(t > t_published for _, t in list(cam.sent)) >= 2,
            10,
            "two frames sent since the last batch was published",
        )
        t_kill = time.monotonic()
        first.kill9()
        boot_a = sub.verdicts[0]["boot_id"]
        # Behaviour, not synchronisation: the outage. The camera's sends fail (no peer) or vanish with the dead
        # connection for at least this long, however fast the new daemon starts.
        time.sleep(0.5)
        with DaemonProcess(settings, tmp_path / "b") as second:
            wait_until(
                lambda: sum(v["boot_id"] != boot_a for v in list(sub.verdicts)) >= 40,
                30,
                lambda: f"40 verdicts from the restarted daemon:\n{second.tail()}",
            )
            hb = sub.wait_heartbeat(timeout=5)
            assert second.terminate() == 0, second.tail()
            assert second.logs is not None
            published_b = second.logs.wait_for("stopped", timeout=5)["verdicts"]
        # Everything the second boot published, up to its last (shutdown) verdict, has reached the subscriber.
        wait_until(
            lambda: sum(v["boot_id"] != boot_a for v in list(sub.verdicts)) >= published_b,
            5,
            f"all {published_b} verdicts of the restarted daemon at the subscriber",
        )
        verdicts, sent = list(sub.verdicts), list(cam.sent)
    a = [v for v in verdicts if v["boot_id"] == boot_a]
    b = [v for v in verdicts if v["boot_id"] != boot_a]
    assert len({v["boot_id"] for v in b}) == 1 and hb["boot_id"] == b[0]["boot_id"] != boot_a
    assert [v["seq"] for v in a] == list(range(1, len(a) + 1))  # what reached us before the kill: no hole
    assert [v["seq"] for v in b] == list(range(1, len(b) + 1))  # the new boot starts again at 1
    ids = [v["frame_id"] for v in verdicts]
    assert len(ids) == len(set(ids)), "a frame got a verdict from both boots (or two from one)"
    before_kill = [fid for fid, t in sent if t < t_kill]
    in_flight = set(before_kill) - set(ids)
    assert in_flight, "nothing was in flight at the kill; the test proves nothing"
    print(
        f"\nkill -9: {len(a)} verdicts before, {len(in_flight)} frames in flight lost, {len(b)} after restart"
    )
    # Fail-safe across the crash: a frame sent before the kill got its verdict from the first boot or none at
    # all (the line controller diverts it) — never one from the restarted daemon, never a PASS uninspected.
    assert not set(before_kill) & {v["frame_id"] for v in b}
    assert all(v["reason"] == "model" for v in a)
    assert all(v["verdict"] == "REJECT" for v in b if v["reason"] != "model")  # e.g. shutdown at the end
    gaps = SequenceTracker()
    for v in verdicts:
        gaps.feed(v)
    assert gaps.restarts == 1 and gaps.gaps == []


@pytest.mark.timeout(180)
def test_folder_journal_survives_kill_9_at_least_once(tmp_path: Path) -> None:
    tiny_package(tmp_path / "pkg", input_size=(32, 32))
    folder, staging, journal = tmp_path / "in", tmp_path / "staging", tmp_path / "journal.jsonl"
    folder.mkdir()
    staging.mkdir()
    rng = np.random.default_rng(2)
    names = [f"part-{i:03d}.png" for i in range(60)]
    for name in names:  # 1024² frames: CLAHE at full size makes the daemon take a second or two for all
        (staging / name).write_bytes(encode(rng.integers(0, 255, (1024, 1024), dtype=np.uint8), ".png"))
    pub_ep = f"tcp://127.0.0.1:{free_port()}"
    settings = daemon_settings(
        tmp_path / "pkg",
        line="journal",
        sources={
            "camera": {"enabled": False},
            "folder": {"enabled": True, "path": str(folder), "journal": str(journal), "stable_ms": 100},
        },
        publisher={"endpoint": pub_ep, "heartbeat_ms": 50},
        batching={"max_batch": 1, "max_wait_ms": 0, "queue_size": 2},
        deadlines={"max_latency_ms": 5000},
    )
    with DaemonProcess(settings, tmp_path / "a") as first, VerdictCollector(pub_ep, "journal") as sub:
        for name in names:  # rename in: complete at once, and after the subscription is live
            os.rename(staging / name, folder / name)
        sub.wait_verdicts(10, timeout=60)
        first.kill9()
        published_a = {v["frame_id"] for v in sub.verdicts}
    records = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    journaled_a = {r["name"] for r in records}
    assert journaled_a <= published_a, "the journal records only published verdicts"
    assert 0 < len(published_a) < len(names), "the kill was not mid-way"
    with DaemonProcess(settings, tmp_path / "b") as second:
        boot_b = second.ready["boot_id"]
        expected_b = len(names) - len(journaled_a)
        wait_until(
            lambda: sum(1 for line in journal.read_text().splitlines() if boot_b in line) >= expected_b,
            60,
            lambda: f"{expected_b} journal records of the restarted daemon:\n{second.tail()}",
        )
        # Behaviour, not synchronisation: proving that nothing more is inspected (a file read twice would be).
        time.sleep(0.5)
        assert second.terminate() == 0, second.tail()
        stopped = second.logs.wait_for("stopped", timeout=5) if second.logs else {}
    inspected_b = {
        r["name"] for r in map(json.loads, journal.read_text().splitlines()) if r["boot_id"] == boot_b
    }
    assert stopped["verdicts"] == len(inspected_b)
    assert inspected_b == set(names) - journaled_a  # exactly the files without a recorded verdict
    assert published_a | inspected_b == set(names)  # at least once: no file without a verdict
    duplicates = published_a & inspected_b
    assert duplicates == published_a - journaled_a  # only the publish→journal window is inspected twice
    print(
        f"\njournal kill -9: {len(published_a)} published, {len(journaled_a)} journaled, {len(duplicates)} twice"
    )


@pytest.mark.timeout(60)
def test_subscriber_disconnect_and_reconnect(tmp_path: Path) -> None:
    tiny_package(tmp_path / "pkg", input_size=(32, 32))
    settings = daemon_settings(tmp_path / "pkg")
    img = np.full((64, 64), 100, np.uint8)
    with running_app(settings) as app, CameraPusher(app.camera_endpoint) as cam:
        with VerdictCollector(app.publisher_endpoint, settings.line) as first:
            for i in range(5):
                cam.send(f"a{i}", img)
            first.wait_verdicts(5)
            boot = first.heartbeats[-1]["boot_id"]
        for i in range(5):  # nobody listening: published into the void, not queued
            cam.send(f"b{i}", img)
        wait_until(
            lambda: app.publisher is not None and app.publisher.seq_last >= 10,
            10,
            "the verdicts nobody listened to published",
        )
        with VerdictCollector(app.publisher_endpoint, settings.line) as second:
            hb = second.wait_heartbeat(timeout=5)
            for i in range(5):
                cam.send(f"c{i}", img)
            later = second.wait_verdicts(5)
        ready = app.is_ready() and app.pipeline is not None and app.pipeline.threads_alive()
    assert ready
    assert (hb["boot_id"], hb["seq_last"]) == (boot, 10)  # the resumed stream shows what was missed
    assert [(v["frame_id"], v["seq"]) for v in later] == [(f"c{i}", 11 + i) for i in range(5)]


def _scrape(port: int, name: str) -> float:
    """The sum over every series of ``name`` (the value, for a metric of one series)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        values = [
            float(line.rsplit(" ", 1)[1])
            for line in r.read().decode().splitlines()
            if line.startswith(name + "{") or line.startswith(name + " ")
        ]
    if not values:
        raise KeyError(name)
    return sum(values)


@pytest.mark.timeout(120)
def test_publisher_memory_is_bounded_without_or_with_a_stalled_subscriber(tmp_path: Path) -> None:
    tiny_package(tmp_path / "pkg", input_size=(32, 32))
    settings = daemon_settings(
        tmp_path / "pkg", line="hwm", publisher={"endpoint": "tcp://127.0.0.1:*", "sndhwm": 100}
    )
    n = 10_000
    fid = "x" * 200  # fat verdicts (~600 B): 10 000 of them would be visible if they piled up
    broken = [json.dumps({"frame_id": fid, "encoding": "png"}).encode(), b"definitely not a png"]

    def push_and_wait(daemon: DaemonProcess, total: int) -> None:
        with CameraPusher(daemon.camera_endpoint) as cam:
            for _ in range(n):
                cam.send_parts(broken)
        port = int(daemon.ready["metrics_port"])
        # Every frame received and its verdict published (after that the daemon holds nothing of them).
        wait_until(
            lambda: (
                _scrape(port, "inspectd_frames_received_total") >= total
                and _scrape(port, "inspectd_verdicts_total") >= total
            ),
            60,
            f"{total} frames received and their verdicts published",
            poll_s=0.1,
        )

    with DaemonProcess(settings, tmp_path / "run") as daemon:
        rss0 = daemon.rss_bytes()
        push_and_wait(daemon, n)  # nobody subscribed: ZeroMQ drops at once
        rss1 = daemon.rss_bytes()
        stalled: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.SUB)
        stalled.setsockopt(zmq.RCVHWM, 10)
        stalled.setsockopt(zmq.RCVBUF, 4096)
        stalled.setsockopt(zmq.SUBSCRIBE, b"hwm")
        stalled.connect(daemon.publisher_endpoint)
        assert stalled.poll(5000), "no heartbeat"
        first = json.loads(stalled.recv_multipart()[1])
        push_and_wait(daemon, 2 * n)  # subscribed but not reading: at most sndhwm queued, the rest dropped
        rss2 = daemon.rss_bytes()
        seqs = []
        end = (
            time.monotonic() + 30
        )  # bounded: a stream that never shows the end fails here, with what it showed
        while time.monotonic() < end and stalled.poll(
            5000
        ):  # what was kept for us, up to a heartbeat at the end
            msg = json.loads(stalled.recv_multipart()[1])
            seqs.append(msg["seq"] if msg["type"] == "verdict" else msg["seq_last"])
            if msg["type"] == "heartbeat" and msg["seq_last"] >= 2 * n:
                break
        else:
            pytest.fail(
                f"no heartbeat with seq_last >= {2 * n} within 30 s: {len(seqs)} messages, "
                f"last seq {seqs[-5:]}; daemon log tail: {daemon.tail()}"
            )
        stalled.close(linger=0)
        assert daemon.terminate() == 0
    print(
        f"\nRSS MiB: start {rss0 / MiB:.1f}, after {n} unsubscribed {rss1 / MiB:.1f}, stalled {rss2 / MiB:.1f}"
    )
    assert rss1 - rss0 < 20 * MiB and rss2 - rss0 < 30 * MiB
    received = len(seqs)
    # What it does get is what the kernel's socket buffers held (a few MB on loopback) plus sndhwm; the rest
    # was dropped by ZeroMQ instead of piling up in the daemon.
    assert received < 0.8 * n, f"a stalled subscriber got {received} of {n}: queued instead of dropped"
    assert max(seqs) >= first["seq_last"] + n  # the stream went on; the subscriber sees the gap in seq
    assert any(b - a > 1 for a, b in itertools.pairwise(seqs))


@pytest.mark.timeout(60)
def test_model_package_replaced_on_disk_is_detected_and_served_unchanged(tmp_path: Path) -> None:
    pkg, other = tmp_path / "pkg", tmp_path / "other"
    tiny_package(pkg, input_size=(32, 32), seed=0)
    tiny_package(other, input_size=(32, 32), seed=9, name="other")
    original = {n: (pkg / n).read_bytes() for n in ("model.onnx", "model.json")}
    served = load_package(pkg).meta.model_id
    settings = daemon_settings(pkg, model={"path": str(pkg), "intra_op_threads": 1, "watch_s": 0.05})
    img = np.full((64, 64), 77, np.uint8)

    def gauge(app: Any) -> float:
        return app.registry.get_sample_value("inspectd_model_package_changed", {"line": settings.line})

    def wait_gauge(app: Any, value: float) -> None:
        wait_until(lambda: gauge(app) == value, 10, f"inspectd_model_package_changed to become {value}")

    with (
        capture_logs() as logs,
        running_app(settings) as app,
        VerdictCollector(app.publisher_endpoint, settings.line) as sub,
        CameraPusher(app.camera_endpoint) as cam,
    ):
        cam.send("before", img)
        before = sub.wait_verdicts(1)[0]
        assert gauge(app) == 0
        shutil.copyfile(other / "model.onnx", pkg / "model.onnx")  # a copy half done: ONNX only
        wait_gauge(app, 1)  # the half-done copy has been seen
        shutil.copyfile(other / "model.json", pkg / "model.json")  # now a consistent, different package
        changes = {"line": settings.line}
        wait_until(
            lambda: (
                (app.registry.get_sample_value("inspectd_model_package_changes_total", changes) or 0) >= 2
            ),
            10,
            "the consistent new package seen as a second change",
        )
        cam.send("after", img)
        after = sub.wait_verdicts(2)[1]
        for name, data in original.items():  # put the served package back
            (pkg / name).write_bytes(data)
        wait_gauge(app, 0)
        alive = app.pipeline is not None and app.pipeline.threads_alive() and app.is_ready()
    assert alive
    assert before["model"] == after["model"] == served and after["score"] == before["score"]
    changed = [e for e in logs if e["event"].startswith("model package changed on disk")]
    assert [e["on_disk"]["state"] for e in changed] == [
        "model.onnx does not match model.json (incomplete?)",
        "consistent",
    ]
    assert all(e["serving"] == served for e in changed)
    assert any(e["event"] == "model package on disk is the served one again" for e in logs)
