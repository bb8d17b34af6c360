"""Shutdown with frames in flight: every accepted frame gets exactly one verdict, and the process exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from engine.package import load_package
from tests.helpers import tiny_package, wait_until
from tests.integration.daemon_harness import (
    CameraPusher,
    ScriptedBackend,
    VerdictCollector,
    daemon_settings,
    running_app,
)
from tests.integration.reliability_harness import LogLines

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_sigterm_with_frames_in_flight(tmp_path: Path) -> None:
    tiny_package(tmp_path / "pkg", input_size=(64, 64))
    cfg = tmp_path / "inspectd.toml"
    cfg.write_text(
        f"""
line = "sigterm-line"
[model]
path = "{tmp_path / "pkg"}"
[sources.camera]
endpoint = "tcp://127.0.0.1:*"
[publisher]
endpoint = "tcp://127.0.0.1:*"
heartbeat_ms = 50
[control]
endpoint = "tcp://127.0.0.1:*"
[metrics]
port = 0
[batching]
max_batch = 4
queue_size = 1024
preprocess_threads = 1
[deadlines]
max_latency_ms = 20000
shutdown_timeout_s = 20
[logging]
format = "json"
batch_lines = false
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTD_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "inspectd.cli", "serve", "--config", str(cfg)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    logs = LogLines(proc.stderr)  # a full stderr pipe would stall the daemon: read it on a thread
    try:
        ready = logs.wait_for("ready", timeout=60)
        camera = ready["sources"][0]["endpoint"]
        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 255, (384, 384), dtype=np.uint8) for _ in range(8)]
        with VerdictCollector(ready["publisher"], "sigterm-line") as sub, CameraPusher(camera) as cam:
            for i in range(300):
                cam.send(f"p{i:03d}", frames[i % len(frames)])
            # The first verdict: the daemon has accepted some; many are still queued or in inference.
            sub.wait_verdicts(1, timeout=20)
            t_sig = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=30)
            t_exit = time.monotonic() - t_sig
            stopping = logs.wait_for("stopping", timeout=5)
            stopped = logs.wait_for("stopped", timeout=5)
            sub.wait_verdicts(stopped["verdicts"], timeout=5)  # every verdict it published has arrived
            verdicts = list(sub.verdicts)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, "\n".join(logs.raw[-30:])
    assert t_exit < 25
    assert stopping["pending"] > 0, (
        "the signal came too late to find frames in flight; the test proves nothing"
    )
    admitted = stopped["admitted"]
    assert stopped["verdicts"] == admitted == len(verdicts) > 0
    ids = [v["frame_id"] for v in verdicts]
    assert len(set(ids)) == len(ids), "a frame got two verdicts"
    assert [v["seq"] for v in verdicts] == list(range(1, admitted + 1))
    assert all(v["reason"] in ("model", "shutdown") for v in verdicts)


@pytest.mark.timeout(60)
def test_stop_with_a_wedged_backend_fail_safe_rejects_what_is_left(tmp_path: Path) -> None:
    tiny_package(tmp_path / "pkg", input_size=(32, 32))
    backend = ScriptedBackend(load_package(tmp_path / "pkg"), max_batch=2)
    settings = daemon_settings(
        tmp_path / "pkg",
        batching={"max_batch": 2, "max_wait_ms": 0, "queue_size": 16},
        deadlines={"max_latency_ms": 30_000, "shutdown_timeout_s": 0.5},
    )
    gate = threading.Event()
    img = np.zeros((32, 32), np.uint8)
    try:
        with running_app(settings, backend=backend) as app:
            backend.gate = gate
            with (
                VerdictCollector(app.publisher_endpoint, settings.line) as sub,
                CameraPusher(app.camera_endpoint) as cam,
            ):
                for i in range(6):
                    cam.send(f"w{i}", img)
                pipeline = app.pipeline
                assert pipeline is not None
                wait_until(lambda: pipeline.ledger.admitted >= 6, 5, "all 6 frames admitted")
                t0 = time.monotonic()
                app.stop()
                stop_s = time.monotonic() - t0
                verdicts = sub.wait_verdicts(6, timeout=5)
    finally:
        gate.set()  # let the wedged inference thread end
    assert stop_s < 5
    assert sorted(v["frame_id"] for v in verdicts) == [f"w{i}" for i in range(6)]
    assert {v["reason"] for v in verdicts} == {"shutdown"}
    assert all(v["verdict"] == "REJECT" for v in verdicts)
