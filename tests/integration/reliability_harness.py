"""For the tests that run ``inspectd serve`` as a real child process (kill -9, RSS, overload): a free port for
a daemon restarted on the same endpoints, and an RSS sampler.

The process itself is :class:`tools.daemon_process.DaemonProcess` (shared with ``inspectd bench``), given
settings from :func:`daemon_harness.daemon_settings` so they match the in-process tests; its log reader
:class:`~tools.daemon_process.LogLines` serves tests that start a process of their own.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from pathlib import Path

from tools.daemon_process import DaemonProcess, LogLines

__all__ = ["LogLines", "RssSampler", "free_port"]  # LogLines: for tests that start a process of their own


def free_port() -> int:
    """A port that was free a moment ago (for a daemon restarted on the same endpoints), below the kernel's
    ephemeral range. A port from that range can be handed to any outgoing connection as its source port while
    no daemon listens on it, such as a subscriber reconnecting to that very endpoint, which on loopback then
    connects to itself, and the restarted daemon cannot bind it (seen once in CI: "Address already in use")."""
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(max(1024, low - 16384), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below the ephemeral range (from {low})")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


class RssSampler:
    """Samples a process's RSS on a thread: (seconds since start, bytes)."""

    def __init__(self, daemon: DaemonProcess, period_s: float = 0.25) -> None:
        self.daemon = daemon
        self.period_s = period_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.monotonic()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            with contextlib.suppress(OSError, RuntimeError):
                self.samples.append((time.monotonic() - self.t0, self.daemon.rss_bytes()))

    def between(self, t_from: float, t_to: float) -> list[int]:
        return [b for t, b in self.samples if t_from <= t < t_to]
