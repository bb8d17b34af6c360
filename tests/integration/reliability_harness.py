"""``inspectd serve`` as a real child process, for the tests that need one: kill -9, RSS, overload.

The config is written from :func:`daemon_harness.daemon_settings` (so it matches the in-process tests) with
``to_toml``; JSON log lines are read on a thread (a full stderr pipe would stall the daemon) and the ``ready``
line tells where the sockets are bound.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from daemon.settings import Settings, to_toml

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A port that was free a moment ago (for a daemon restarted on the same endpoints)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LogLines:
    """Reads a daemon's JSON log lines on a thread (a full stderr pipe would stall the daemon)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: IO[bytes]) -> None:
        for line in iter(stream.readline, b""):
            text = line.decode(errors="replace").rstrip()
            with self._cv:
                self.raw.append(text)
                with contextlib.suppress(json.JSONDecodeError):
                    self.events.append(json.loads(text))
                self._cv.notify_all()

    def wait_for(self, event: str, timeout: float, **match: Any) -> dict[str, Any]:
        end = time.monotonic() + timeout
        with self._cv:
            while True:
                for e in self.events:
                    if e.get("event") == event and all(e.get(k) == v for k, v in match.items()):
                        return e
                if not self._cv.wait(max(0.0, end - time.monotonic())) and time.monotonic() >= end:
                    raise TimeoutError(
                        f"no {event!r} log line within {timeout} s:\n" + "\n".join(self.raw[-30:])
                    )

    def matching(self, event: str) -> list[dict[str, Any]]:
        with self._cv:
            return [e for e in self.events if e.get("event") == event]


class DaemonProcess:
    """One run of ``inspectd serve --config``; use as a context manager (killed on exit if still running)."""

    def __init__(self, settings: Settings, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / f"inspectd-{time.monotonic_ns()}.toml"
        self.config.write_text(to_toml(settings))
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: LogLines | None = None
        self.ready: dict[str, Any] = {}

    def __enter__(self) -> DaemonProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTD_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inspectd.cli", "serve", "--config", str(self.config)],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stderr is not None
        self.logs = LogLines(self.proc.stderr)
        self.ready = self.logs.wait_for("ready", timeout=90)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def camera_endpoint(self) -> str:
        return str(next(s["endpoint"] for s in self.ready["sources"] if s["kind"] == "camera"))

    @property
    def publisher_endpoint(self) -> str:
        return str(self.ready["publisher"])

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.logs.raw[-n:]) if self.logs else ""


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
