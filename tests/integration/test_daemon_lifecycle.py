"""systemd notify over a real datagram socket: READY after warm-up, WATCHDOG only while progressing, STOPPING."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from daemon.systemd_notify import SystemdNotifier
from engine.package import load_package
from tests.helpers import tiny_package
from tests.integration.daemon_harness import CameraPusher, ScriptedBackend, daemon_settings, running_app

pytestmark = pytest.mark.integration


class NotifyListener:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
            except TimeoutError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

    def states(self, since: float = 0.0) -> list[str]:
        return [m.split("\n")[0] for t, m in list(self.messages) if t >= since]


@pytest.mark.timeout(60)
def test_ready_watchdog_only_while_progressing_and_stopping(tmp_path: Path) -> None:
    tiny_package(tmp_path / "pkg", input_size=(32, 32))
    backend = ScriptedBackend(load_package(tmp_path / "pkg"), max_batch=1)
    listener = NotifyListener(tmp_path / "notify")
    env = {
        "NOTIFY_SOCKET": str(tmp_path / "notify"),
        "WATCHDOG_USEC": "2000000",
        "WATCHDOG_PID": str(os.getpid()),
    }
    settings = daemon_settings(
        tmp_path / "pkg",
        batching={"max_batch": 1, "max_wait_ms": 0},
        deadlines={"stall_s": 0.6, "max_latency_ms": 60_000},
    )
    gate = threading.Event()
    try:
        with running_app(settings, backend=backend, notifier=SystemdNotifier(env)) as app:
            time.sleep(0.8)
            assert listener.states()[0] == "READY=1"
            assert listener.states().count("WATCHDOG=1") >= 2  # idle but healthy: pinging
            backend.gate = gate
            with CameraPusher(app.camera_endpoint) as cam:
                cam.send("stuck", np.zeros((32, 32), np.uint8))
            time.sleep(1.2)  # > stall_s: the inference stage is wedged with work waiting
            t_wedged = time.monotonic()
            time.sleep(0.8)
            assert "WATCHDOG=1" not in listener.states(since=t_wedged), "pinged systemd while wedged"
            assert not app.is_ready()
            gate.set()
            time.sleep(0.8)
            assert "WATCHDOG=1" in listener.states(since=time.monotonic() - 0.5)
            assert app.is_ready()
        assert listener.states()[-1] == "STOPPING=1"
    finally:
        gate.set()
        listener.close()
