"""systemd notify over a real datagram socket: READY after warm-up, WATCHDOG only while progressing, STOPPING."""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from daemon.systemd_notify import SystemdNotifier
from engine.package import load_package
from tests.helpers import tiny_package, wait_until
from tests.integration.daemon_harness import CameraPusher, ScriptedBackend, daemon_settings, running_app

pytestmark = pytest.mark.integration


class NotifyListener:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._marks = itertools.count(1)
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

    def mark(self) -> int:
        """Send a marker datagram to this socket and wait until it is read; returns its index in ``messages``.
        One socket is one queue: every datagram sent before the marker was sent is read before it."""
        token = f"MARK-{next(self._marks)}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(token.encode(), str(self.path))
        wait_until(
            lambda: any(m == token for _, m in list(self.messages)), 5, f"the marker {token} read back"
        )
        return next(i for i, (_, m) in enumerate(list(self.messages)) if m == token)

    def states_after(self, mark: int) -> list[str]:
        return [m.split("\n")[0] for _, m in list(self.messages)[mark + 1 :]]


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
            # Idle but healthy: pinging.
            wait_until(lambda: listener.states().count("WATCHDOG=1") >= 2, 5, "two WATCHDOG=1 while idle")
            assert listener.states()[0] == "READY=1"
            backend.gate = gate
            with CameraPusher(app.camera_endpoint) as cam:
                cam.send("stuck", np.zeros((32, 32), np.uint8))
            # Longer than stall_s the inference stage is wedged with work waiting: readiness drops ...
            wait_until(lambda: not app.is_ready(), 10, "readiness to drop while inference is wedged")
            wedged = listener.mark()  # every ping sent before readiness dropped has been read by now
            # ... and the pings stop. Behaviour, not synchronisation: no WATCHDOG=1 for three supervisor rounds.
            time.sleep(0.8)
            assert "WATCHDOG=1" not in listener.states_after(wedged), "pinged systemd while wedged"
            assert not app.is_ready()
            released = listener.mark()
            gate.set()
            wait_until(
                lambda: "WATCHDOG=1" in listener.states_after(released), 5, "WATCHDOG=1 again once unwedged"
            )
            wait_until(app.is_ready, 5, "ready again once unwedged")
        assert listener.states()[-1] == "STOPPING=1"
    finally:
        gate.set()
        listener.close()
