"""The real daemon as a child process: ``inspectd serve --config FILE`` with a generated TOML configuration.

For the benchmark (``inspectd bench``) and the tests that need a process of its own (kill -9, RSS, CPU time,
overload). Same code path as production (``inspectd.cli`` → ``serve``), in its own process, so its CPU time and
peak RSS are its own. The configuration file written here is the whole configuration: ``INSPECTD_*`` variables
are removed from its environment.

Its output (JSON log lines on stderr, stdout merged in) is read on a thread — a full pipe would stall the
daemon — kept in memory and copied to ``WORKDIR/NAME.log``. The ``ready`` line says where the sockets are
bound, so with ephemeral endpoints (``tcp://127.0.0.1:*``, metrics port 0) there is no port race with anyone
else on the machine; waiting for it is waiting on the reader, which also notices at once a daemon that exits
before it is ready.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ClassVar

from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from daemon.metrics import stat_cpu_seconds
from daemon.settings import to_toml

# One scrape: (sample name, its labels) → value.
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class LogLines:
    """A process's output read line by line on a thread: kept (``raw``), parsed on demand (``events``, the JSON
    objects among them), optionally copied to a file, and waited on (:meth:`wait_for`)."""

    def __init__(self, stream: IO[bytes], copy_to: Path | None = None) -> None:
        self.raw: list[str] = []
        self.closed = False  # the stream ended: the process (and whoever shared its output) exited
        self._events: list[dict[str, Any]] = []
        self._parsed = 0  # how many of ``raw`` have been looked at for ``_events``
        self._cv = threading.Condition()
        self._copy_to = copy_to
        self._thread = threading.Thread(target=self._run, args=(stream,), name="log-lines", daemon=True)
        self._thread.start()

    def _run(self, stream: IO[bytes]) -> None:
        copy = open(self._copy_to, "ab", buffering=0) if self._copy_to else None  # noqa: SIM115
        try:
            for line in iter(stream.readline, b""):
                if copy is not None:
                    copy.write(line)
                text = line.decode(errors="replace").rstrip()
                with self._cv:
                    self.raw.append(text)
                    self._cv.notify_all()
        finally:
            if copy is not None:
                copy.close()
            with self._cv:
                self.closed = True
                self._cv.notify_all()

    def _parse(self) -> list[dict[str, Any]]:
        """The JSON objects among the lines read so far (call with the lock held)."""
        for text in self.raw[self._parsed :]:
            if text.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    obj = json.loads(text)
                    if isinstance(obj, dict):
                        self._events.append(obj)
        self._parsed = len(self.raw)
        return self._events

    @property
    def events(self) -> list[dict[str, Any]]:
        with self._cv:
            return list(self._parse())

    def matching(self, event: str) -> list[dict[str, Any]]:
        with self._cv:
            return [e for e in self._parse() if e.get("event") == event]

    def wait_for(self, event: str, timeout: float, **match: Any) -> dict[str, Any]:
        """The first log record ``event`` (with the ``match`` fields), waiting for it up to ``timeout`` s.

        Raises TimeoutError when it did not come in time, EOFError when the output ended without it."""
        end = time.monotonic() + timeout
        i = 0
        with self._cv:
            while True:
                events = self._parse()
                for e in events[i:]:
                    if e.get("event") == event and all(e.get(k) == v for k, v in match.items()):
                        return e
                i = len(events)
                if self.closed:
                    raise EOFError(f"no {event!r} log line: the output ended\n" + self.tail())
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {event!r} log line within {timeout} s:\n" + self.tail())
                self._cv.wait(left)

    def tail(self, n: int = 30) -> str:
        with self._cv:
            return "\n".join(self.raw[-n:])

    def join(self, timeout: float) -> bool:
        """Wait for the end of the output (all of it read); False if it has not ended within ``timeout``."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


class DaemonProcess:
    """``with DaemonProcess(settings, workdir) as d:`` — started and ready inside; on leaving, stopped with
    SIGTERM (it drains; the exit code is kept), or killed when the block raised.

    ``verb``: the ``inspectd`` command run with ``--config FILE`` (a subclass may run another long-lived verb
    with its own settings model and ``ready`` line: the PLC bridge's tests do)."""

    verb: ClassVar[str] = "serve"

    def __init__(
        self,
        settings: BaseModel,
        workdir: Path,
        *,
        name: str | None = None,
        ready_timeout_s: float = 180.0,
        prefix: Sequence[str] = (),
        cwd: Path | None = None,
    ) -> None:
        """``name``: of its config and log files in ``workdir`` (default: unique per instance). ``prefix``: a
        command the daemon runs under, e.g. ``py-spy record -o FILE --`` to profile it. ``cwd``: its working
        directory (default: this one)."""
        self.settings = settings
        self.workdir = workdir
        self.name = name or f"inspectd-{time.monotonic_ns()}"
        self.ready_timeout_s = ready_timeout_s
        self.prefix = list(prefix)
        self.cwd = cwd
        self.config_path = workdir / f"{self.name}.toml"
        self.log_path = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: LogLines | None = None
        self.ready: dict[str, Any] = {}
        self.exit_code: int | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def __enter__(self) -> DaemonProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.kill9()  # the run failed: nothing to drain for
        else:
            self.stop()

    @staticmethod
    def command() -> list[str]:
        """``inspectd`` itself, run by this interpreter (the venv's, wherever it lives)."""
        return [sys.executable, "-m", "inspectd.cli"]

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(to_toml(self.settings), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTD_")}
        cmd = [*self.prefix, *self.command(), self.verb, "--config", str(self.config_path)]
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.proc.stdout is not None
        self.logs = LogLines(self.proc.stdout, copy_to=self.log_path)
        try:
            self.ready = self.logs.wait_for("ready", timeout=self.ready_timeout_s)
        except EOFError:
            code = self.proc.wait(10)
            self._finish()
            raise RuntimeError(f"{self.name} exited with {code} before ready:\n{self.tail()}") from None
        except TimeoutError:
            self.stop()
            raise TimeoutError(
                f"{self.name} not ready within {self.ready_timeout_s:.0f} s:\n{self.tail()}"
            ) from None

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for the exit (subprocess.TimeoutExpired if it takes longer): the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)  # the daemon itself; a profiler prefix exits with it
        code = self.proc.wait(timeout)
        self._finish()
        return code

    def stop(self, timeout: float = 60.0) -> int | None:
        """A clean stop where it comes in ``timeout`` s, else a kill; the exit code (None: never started)."""
        if self.proc is None or self.exit_code is not None:
            return self.exit_code
        try:
            self.terminate(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
        return self.exit_code

    def kill9(self) -> None:
        """SIGKILL (no drain, no last heartbeat) and reap it."""
        if self.proc is None or self.exit_code is not None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            if self.pid != self.proc.pid:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()  # the prefix command too
        self.proc.wait(10)
        self._finish()

    def _finish(self) -> None:
        assert self.proc is not None
        self.exit_code = self.proc.returncode
        if self.logs is not None:
            self.logs.join(10)  # every line it wrote is read (and in the log file)

    # -- where it listens --------------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        """The daemon's own pid (from its ready line: under a ``prefix`` the child is the prefix command)."""
        assert self.proc is not None
        return int(self.ready.get("pid") or self.proc.pid)

    @property
    def publisher_endpoint(self) -> str:
        return str(self.ready["publisher"])

    @property
    def camera_endpoint(self) -> str:
        for src in self.ready.get("sources", []):
            if src.get("kind") == "camera":
                return str(src["endpoint"])
        raise RuntimeError(f"{self.name} has no camera source: {self.ready}")

    # -- what it costs -----------------------------------------------------------------------------------------
    def cpu_seconds(self) -> float:
        """user + system CPU time of every thread of the daemon so far (/proc/PID/stat utime + stime)."""
        return stat_cpu_seconds(f"/proc/{self.pid}/stat")

    def scrape(self, timeout: float = 2.0) -> Samples:
        """Every sample of one real scrape of its metrics endpoint, by (name, labels); empty when it serves no
        metrics or cannot be reached."""
        port = self.ready.get("metrics_port")
        if not port:
            return {}
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as resp:
                text = resp.read().decode()
        except OSError:
            return {}
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    @staticmethod
    def thread_cpu(samples: Samples) -> dict[str, float]:
        """CPU seconds by the thread that spent them (``inspectd_thread_cpu_seconds_total``) in a scrape."""
        return {
            dict(labels)["thread"]: value
            for (name, labels), value in samples.items()
            if name == "inspectd_thread_cpu_seconds_total"
        }

    def _status(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            out[key] = value.strip()
        return out

    def memory(self) -> dict[str, float]:
        """Peak (VmHWM) and current (VmRSS) resident set in MB, and the thread count."""
        status = self._status()
        out: dict[str, float] = {}
        for key in ("VmHWM", "VmRSS"):
            if key in status:
                out[key] = round(int(status[key].split()[0]) / 1024, 1)
        if "Threads" in status:
            out["Threads"] = int(status["Threads"])
        return out

    def rss_bytes(self) -> int:
        """The current resident set (VmRSS) in bytes."""
        value = self._status().get("VmRSS")
        if value is None:
            raise RuntimeError(f"{self.name}: no VmRSS (exited?)")
        return int(value.split()[0]) * 1024

    # -- its log -----------------------------------------------------------------------------------------------
    def log_records(self) -> list[dict[str, Any]]:
        """Its JSON log records so far (all of them once it has exited)."""
        return self.logs.events if self.logs is not None else []

    def tail(self, n: int = 30) -> str:
        """The last ``n`` lines of its output."""
        return self.logs.tail(n) if self.logs is not None else ""
