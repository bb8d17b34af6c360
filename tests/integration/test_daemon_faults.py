"""Fail-safe paths with a Backend test double: deadline, overload, engine errors. None silent."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from daemon.app import App
from daemon.settings import Backpressure
from engine.package import ModelPackage
from tests.helpers import wait_until
from tests.integration.daemon_harness import (
    CameraPusher,
    ScriptedBackend,
    VerdictCollector,
    daemon_settings,
    running_app,
)

pytestmark = pytest.mark.integration

IMG = np.full((64, 64), 128, np.uint8)


@pytest.mark.timeout(60)
def test_slow_backend_gets_deadline_rejects_at_the_deadline(package: ModelPackage) -> None:
    backend = ScriptedBackend(package, max_batch=4)
    settings = daemon_settings(
        package.directory, deadlines={"max_latency_ms": 100}, batching={"max_batch": 4, "max_wait_ms": 1}
    )
    with running_app(settings, backend=backend) as app:
        backend.delay_s = 0.4  # after warm-up: every batch now takes 4 × the latency budget
        with (
            VerdictCollector(app.publisher_endpoint, settings.line) as sub,
            CameraPusher(app.camera_endpoint) as cam,
        ):
            for i in range(3):
                cam.send(f"slow-{i}", IMG)
                # Behaviour, not synchronisation: frames arrive apart, as from a camera, each with its own deadline.
                time.sleep(0.03)
            verdicts = sub.wait_verdicts(3, timeout=10)
            # Stopping drains the pipeline: it returns once the slow batches have finished and their results were
            # discarded or (wrongly) published; every verdict published by then has a seq, so wait for them all.
            app.stop()
            assert app.publisher is not None
            published = app.publisher.seq_last
            sub.wait_verdicts(published, timeout=10)
            late = app.registry.get_sample_value("inspectd_late_results_total", {"line": settings.line})
            misses = app.registry.get_sample_value("inspectd_deadline_misses_total", {"line": settings.line})
            all_verdicts = list(sub.verdicts)
    assert [v["frame_id"] for v in all_verdicts] == ["slow-0", "slow-1", "slow-2"]
    for v in verdicts:
        assert (v["verdict"], v["reason"], v["score"]) == ("REJECT", "deadline", None)
        lag_ms = v["latency_ms"] - 100.0
        assert 0.0 <= lag_ms < 15.0, f"deadline verdict published {lag_ms:.1f} ms after the deadline"
    assert misses == 3
    assert late is not None and late >= 1  # at least the first batch finished after its frame's deadline


def _send_then_burst(cam: CameraPusher, app: App, backend: ScriptedBackend, n: int) -> None:
    pipeline = app.pipeline
    assert pipeline is not None
    calls = backend.calls  # the warm-up's
    cam.send("f00", IMG)
    cam.send("f01", IMG)
    wait_until(
        lambda: backend.calls > calls and pipeline.batcher.batches >= 2,
        10,
        "f00 in inference and f01 batched behind it (every buffer busy)",
    )
    for i in range(2, n):
        cam.send(f"f{i:02d}", IMG)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "policy, overloaded",
    [
        (Backpressure.REJECT_NEWEST, [f"f{i:02d}" for i in range(4, 10)]),
        (Backpressure.REJECT_OLDEST, [f"f{i:02d}" for i in range(2, 8)]),
    ],
)
def test_queue_overflow_rejects_by_policy(
    package: ModelPackage, policy: Backpressure, overloaded: list[str]
) -> None:
    backend = ScriptedBackend(package, max_batch=1)
    settings = daemon_settings(
        package.directory,
        sources={"camera": {"endpoint": "tcp://127.0.0.1:*", "backpressure": policy.value}},
        batching={"max_batch": 1, "buffers": 2, "queue_size": 2, "max_wait_ms": 0},
        deadlines={"max_latency_ms": 10_000},
    )
    with running_app(settings, backend=backend) as app:
        backend.gate = threading.Event()  # inference blocks until released
        with (
            VerdictCollector(app.publisher_endpoint, settings.line) as sub,
            CameraPusher(app.camera_endpoint) as cam,
        ):
            _send_then_burst(cam, app, backend, 10)
            early = sub.wait_verdicts(6, timeout=10)  # published while inference is still blocked
            backend.gate.set()
            verdicts = sub.wait_verdicts(10, timeout=10)
            depth_metric = app.registry.get_sample_value(
                "inspectd_verdicts_total", {"line": settings.line, "verdict": "REJECT", "reason": "overload"}
            )
    assert sorted(v["frame_id"] for v in early) == overloaded
    assert all((v["verdict"], v["reason"]) == ("REJECT", "overload") for v in early)
    assert all(v["detail"]["policy"] == policy.value for v in early)
    assert sorted(v["frame_id"] for v in verdicts) == [f"f{i:02d}" for i in range(10)]
    assert [v["seq"] for v in verdicts] == list(range(1, 11))
    assert {v["frame_id"] for v in verdicts if v["reason"] == "model"} == {
        f"f{i:02d}" for i in range(10)
    } - set(overloaded)
    assert depth_metric == 6


def _readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


@pytest.mark.timeout(60)
def test_engine_errors_reject_the_batch_reset_the_backend_and_recover(package: ModelPackage) -> None:
    backend = ScriptedBackend(package, max_batch=2)
    settings = daemon_settings(
        package.directory,
        batching={"max_batch": 2, "max_wait_ms": 0},
        deadlines={"engine_failures_not_ready": 2},
    )
    with running_app(settings, backend=backend) as app:
        assert app.metrics_port is not None and _readyz(app.metrics_port) == 200
        with (
            VerdictCollector(app.publisher_endpoint, settings.line) as sub,
            CameraPusher(app.camera_endpoint) as cam,
        ):
            backend.fail_batches = 2
            cam.send("e1", IMG)
            sub.wait_verdicts(1)
            cam.send("e2", IMG)
            sub.wait_verdicts(2)
            assert sub.wait_heartbeat(timeout=5, ready=False)["ready"] is False
            assert _readyz(app.metrics_port) == 503
            cam.send("ok", IMG)
            verdicts = sub.wait_verdicts(3)
            assert sub.wait_heartbeat(timeout=5, ready=True)["ready"] is True
            assert _readyz(app.metrics_port) == 200
    assert [(v["frame_id"], v["reason"]) for v in verdicts] == [
        ("e1", "engine_error"),
        ("e2", "engine_error"),
        ("ok", "model"),
    ]
    assert "scripted failure" in verdicts[0]["detail"]["error"]
    assert backend.entered == 3 and backend.exited == 3  # initial + two re-creations; exited at shutdown too
