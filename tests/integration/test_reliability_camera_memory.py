"""Camera memory in bytes (issue 16, finding 2): what ZeroMQ and the camera source may hold, end to end.

``sources.camera.max_message_bytes`` (ZeroMQ's MAXMSGSIZE) bounds one message *part*, and the receive
high-water mark counts *messages*; so the camera section now carries a byte budget
(``rcvhwm × max_message_bytes ≤ max_buffered_bytes``, checked when the configuration is loaded), and the
camera source reads a message part by part, keeping at most its first 2 parts and releasing every further one
at once (the message is then refused: kind ``multipart``, a REJECT when its header names the part).

libzmq delivers a message only when all of its parts have arrived (atomic delivery), so the parts of one
message are in the daemon's memory before it can see the first: that much is libzmq's, 64 bytes per empty
part and ``max_message_bytes`` per full one, bounded for a hostile sender only by the unit's ``MemoryMax=``
(docs/reliability.md). What these tests bound is everything on top of it.

``inspectd serve`` runs as a child process; its peak RSS is read from ``VmHWM`` after resetting it
(``/proc/PID/clear_refs``), so each phase's peak is its own.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from daemon.settings import ConfigError, load_settings
from tests.helpers import tiny_package, wait_until
from tests.integration.daemon_harness import VerdictCollector, daemon_settings
from tests.integration.reliability_harness import RssSampler
from tools.daemon_process import DaemonProcess

pytestmark = pytest.mark.integration

MiB = 1 << 20
MAX_MESSAGE = 1 * MiB  # sources.camera.max_message_bytes: a 1024×1024 8-bit frame exactly
RCVHWM = 8
QUEUE, BATCH, BUFFERS = 8, 4, 2
TINY_PARTS = (
    1_000_000  # one message of empty parts: libzmq holds 64 B each; a list of frames ~250 B more each
)
LIBZMQ_BYTES_PER_PART = 64  # sizeof(zmq_msg_t): what libzmq holds per queued part beyond its data
BIG_PARTS = 32  # parts of MAX_MESSAGE bytes in each many-part message of the flood
SLACK = 48 * MiB  # allocator and interpreter noise on top of what the settings allow


# -- the byte budget in the configuration -----------------------------------------------------------------


def test_the_camera_byte_budget_is_checked_when_the_configuration_is_loaded(tmp_path: Path) -> None:
    camera = load_settings(None).sources.camera
    assert camera.rcvhwm * camera.max_message_bytes <= camera.max_buffered_bytes  # the defaults fit
    cfg = tmp_path / "c.toml"
    cfg.write_text("[sources.camera]\nrcvhwm = 1000\n")  # the old default: 1000 × 64 MiB = 62.5 GiB queued
    with pytest.raises(ConfigError) as exc:
        load_settings(cfg)
    message = str(exc.value)
    for field in ("rcvhwm", "max_message_bytes", "max_buffered_bytes"):
        assert f"sources.camera.{field}" in message, message
    ok = load_settings(None, {"sources": {"camera": {"rcvhwm": 1000, "max_message_bytes": 2 * MiB}}})
    assert ok.sources.camera.rcvhwm == 1000  # 2 GB: within the default budget
    tight = {"rcvhwm": RCVHWM, "max_message_bytes": MAX_MESSAGE, "max_buffered_bytes": RCVHWM * MAX_MESSAGE}
    assert load_settings(None, {"sources": {"camera": tight}}).sources.camera.max_buffered_bytes == 8 * MiB
    with pytest.raises(ConfigError, match="max_buffered_bytes"):
        load_settings(None, {"sources": {"camera": {**tight, "max_buffered_bytes": 8 * MiB - 1}}})


# -- the real daemon, flooded ------------------------------------------------------------------------------


def _reset_peak(d: DaemonProcess) -> int:
    """Reset the daemon's VmHWM to its current RSS (Linux: ``echo 5 > /proc/PID/clear_refs``); that RSS."""
    try:
        Path(f"/proc/{d.pid}/clear_refs").write_text("5")
    except OSError as exc:  # a kernel or sandbox without it: the peak would include start-up's
        pytest.skip(f"cannot reset the daemon's VmHWM: {exc}")
    return d.rss_bytes()


def _peak(d: DaemonProcess) -> int:
    return int(d._status()["VmHWM"].split()[0]) * 1024


def _metric(d: DaemonProcess, name: str, **labels: str) -> float:
    port = d.ready["metrics_port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and ",".join(sorted(m.group(1).split(","))) == want:
            return float(m.group(2))
    return 0.0


def _multipart_errors(d: DaemonProcess) -> float:
    return _metric(d, "inspectd_message_errors_total", line=d.settings.line, kind="multipart")


def _pusher(ctx: zmq.Context[Any], endpoint: str) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.setsockopt(zmq.SNDTIMEO, 60_000)
    sock.connect(endpoint)
    return sock


def _header(fid: str | None, encoding: str = "png", **extra: Any) -> bytes:
    body = {"encoding": encoding, **extra} | ({"frame_id": fid} if fid else {})
    return json.dumps(body).encode()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("camera-memory")
    tiny_package(work / "pkg", input_size=(32, 32))
    settings = daemon_settings(
        work / "pkg",
        line="camera-memory",
        sources={
            "camera": {
                "endpoint": "tcp://127.0.0.1:*",
                "backpressure": "reject_newest",
                "max_message_bytes": MAX_MESSAGE,
                "rcvhwm": RCVHWM,
                "max_buffered_bytes": RCVHWM * MAX_MESSAGE,
            }
        },
        batching={"max_batch": BATCH, "buffers": BUFFERS, "queue_size": QUEUE, "preprocess_threads": 1},
        publisher={"endpoint": "tcp://127.0.0.1:*", "heartbeat_ms": 200},
        model={"path": str(work / "pkg"), "intra_op_threads": 1, "watch_s": 0},
    )
    with DaemonProcess(settings, work, name="camera-memory") as d:
        yield d


def _decides_a_good_frame(d: DaemonProcess, sub: VerdictCollector, ctx: zmq.Context[Any], fid: str) -> None:
    n = len(sub.verdicts)
    sock = _pusher(ctx, d.camera_endpoint)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (64, 64), dtype=np.uint8)
    sock.send_multipart([_header(fid, "raw", shape=[64, 64]), image.tobytes()])
    sub.wait_verdicts(n + 1, timeout=30)
    sock.close()
    assert sub.by_frame_id()[fid]["reason"] == "model"


@pytest.mark.timeout(180)
def test_a_million_part_message_costs_libzmq_s_share_and_no_more(daemon: DaemonProcess) -> None:
    """One message of 1 000 000 empty parts after its header: libzmq holds it whole (≈ 61 MiB of message
    structs) before the daemon sees it; the daemon then reads it part by part and refuses it by name. Receiving
    it whole (``recv_multipart``, as before) added ≈ 190 MB of frame objects on top."""
    d = daemon
    ctx = zmq.Context()
    try:
        with VerdictCollector(d.publisher_endpoint, d.settings.line, ctx=ctx) as sub:
            _decides_a_good_frame(d, sub, ctx, "before-tiny-parts")
            base = _reset_peak(d)
            sock = _pusher(ctx, d.camera_endpoint)
            sock.send(_header("tiny-parts"), zmq.SNDMORE)
            for _ in range(TINY_PARTS - 1):
                sock.send(b"", zmq.SNDMORE)
            sock.send(b"")
            sub.wait_verdicts(2, timeout=90)
            growth = _peak(d) - base
            sock.close()
            v = sub.by_frame_id()["tiny-parts"]
            assert (v["verdict"], v["reason"]) == ("REJECT", "decode_error")
            assert f"got {TINY_PARTS + 1}" in v["detail"]["error"]
            _decides_a_good_frame(d, sub, ctx, "after-tiny-parts")
    finally:
        ctx.term()
    bound = TINY_PARTS * LIBZMQ_BYTES_PER_PART + SLACK
    print(f"1M-part message: peak RSS +{growth / MiB:.1f} MiB (bound {bound / MiB:.0f} MiB)")
    assert growth <= bound, f"+{growth / MiB:.1f} MiB"


@pytest.mark.timeout(240)
def test_a_flood_of_many_part_and_maximum_size_messages_stays_within_the_budget(
    daemon: DaemonProcess,
) -> None:
    """Three connections at once: many-part messages of maximum-size parts (named and unnamed), and raw frames
    of exactly ``max_message_bytes``. Peak RSS stays within what the settings allow — per connection
    ``rcvhwm`` + 1 whole messages in libzmq, plus the frames the pipeline may hold — and every named message
    gets exactly one verdict; afterwards the daemon decides a good frame."""
    d = daemon
    named, unnamed, max_size = 12, 6, 150
    big = bytes(MAX_MESSAGE)
    frame = np.full((1024, 1024), 128, np.uint8)  # 1 MiB: exactly max_message_bytes
    ctx = zmq.Context()
    errors: list[BaseException] = []

    def many_parts() -> None:
        sock = _pusher(ctx, d.camera_endpoint)
        for i in range(named + unnamed):
            fid = f"many-{i:02d}" if i < named else None
            sock.send_multipart([_header(fid), *([big] * BIG_PARTS)], copy=False)
        sock.close()

    def maximum_size() -> None:
        sock = _pusher(ctx, d.camera_endpoint)
        for i in range(max_size):
            sock.send_multipart([_header(f"max-{i:03d}", "raw", shape=[1024, 1024]), frame], copy=False)
        sock.close()

    def run(target: Any) -> None:
        try:
            target()
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    try:
        with VerdictCollector(d.publisher_endpoint, d.settings.line, ctx=ctx) as sub:
            _decides_a_good_frame(d, sub, ctx, "before-flood")
            n0 = len(sub.verdicts)
            multipart0 = _multipart_errors(d)
            base = _reset_peak(d)
            t0 = time.monotonic()
            with RssSampler(d, period_s=0.1) as rss:
                senders = [threading.Thread(target=run, args=(f,)) for f in (many_parts, maximum_size)]
                for t in senders:
                    t.start()
                for t in senders:
                    t.join(120)
                sub.wait_verdicts(n0 + named + max_size, timeout=60)

                multipart = wait_until(
                    lambda: (n := _multipart_errors(d)) >= multipart0 + unnamed and n,
                    60,
                    "the unnamed many-part messages to be counted",
                )
            growth = _peak(d) - base
            seconds = time.monotonic() - t0
            verdicts = sub.verdicts[n0:]
            _decides_a_good_frame(d, sub, ctx, "after-flood")
    finally:
        ctx.term()
    assert not errors, errors
    ids = [v["frame_id"] for v in verdicts]
    assert sorted(ids) == sorted(
        [f"many-{i:02d}" for i in range(named)] + [f"max-{i:03d}" for i in range(max_size)]
    )
    for v in verdicts:
        if v["frame_id"].startswith("many-"):
            assert (v["verdict"], v["reason"]) == ("REJECT", "decode_error")
            assert f"got {BIG_PARTS + 1}" in v["detail"]["error"]
        else:
            assert v["reason"] in ("model", "overload"), v  # decided, or refused at the door
    assert multipart - multipart0 == unnamed
    settings = d.settings
    camera, batching = settings.sources.camera, settings.batching
    in_libzmq = (camera.rcvhwm + 1) * ((BIG_PARTS + 1) * MAX_MESSAGE + 2 * MAX_MESSAGE)  # 2 connections
    in_pipeline = (batching.queue_size + batching.buffers * batching.max_batch) * camera.max_message_bytes
    bound = in_libzmq + in_pipeline + SLACK
    sent = (named + unnamed) * BIG_PARTS * MAX_MESSAGE + max_size * MAX_MESSAGE
    sampled = max((b for _, b in rss.samples), default=base) - base
    print(
        f"flood: {sent / MiB:.0f} MiB in {seconds:.1f} s; peak RSS +{growth / MiB:.1f} MiB "
        f"(bound {bound / MiB:.0f} MiB; sampled every 0.1 s: +{sampled / MiB:.1f} MiB)"
    )
    assert growth <= bound, f"+{growth / MiB:.1f} MiB"
