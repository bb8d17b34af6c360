"""The real daemon as a subprocess: ``inspectd serve --config FILE`` with a generated TOML config.

Same code path as production (``inspectd.cli`` → ``serve``), its own process, so its CPU time and peak RSS are
its own. Every endpoint is ephemeral (``tcp://127.0.0.1:*``, metrics port 0); the bound addresses are read from
the daemon's ``ready`` log line, so there is no port race with anyone else on the machine. ``INSPECTD_*``
variables are removed from its environment: the config file written here is the whole configuration.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from daemon.settings import Settings, to_toml

EPHEMERAL = "tcp://127.0.0.1:*"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def bench_settings(model_dir: Path, overrides: dict[str, Any]) -> Settings:
    """Production defaults, plus: ephemeral endpoints, JSON logs, and the benchmark's tuning overrides."""
    base: dict[str, Any] = {
        "model": {"path": str(model_dir)},
        "sources": {"camera": {"endpoint": EPHEMERAL}},
        "publisher": {"endpoint": EPHEMERAL},
        "metrics": {"port": 0},
        "logging": {"format": "json"},
    }
    return Settings(**_merge(base, overrides))


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class DaemonProcess:
    """``with DaemonProcess(settings, workdir) as d:`` — started and ready inside, SIGTERMed on exit."""

    def __init__(
        self,
        settings: Settings,
        workdir: Path,
        *,
        name: str = "daemon",
        ready_timeout_s: float = 180.0,
        prefix: Sequence[str] = (),
    ):
        """``prefix``: a command the daemon runs under, e.g. ``py-spy record -o FILE --`` to profile it."""
        self.settings = settings
        self.prefix = list(prefix)
        self.workdir = workdir
        self.name = name
        self.ready_timeout_s = ready_timeout_s
        self.config_path = workdir / f"{name}.toml"
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, Any] = {}
        self.exit_code: int | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def __enter__(self) -> DaemonProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        self.config_path.write_text(to_toml(self.settings), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTD_")}
        cmd = [*self.prefix, *self.command(), "serve", "--config", str(self.config_path)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.ready = self._wait_ready()

    @staticmethod
    def command() -> list[str]:
        """``inspectd`` itself, run by this interpreter (the venv's, wherever it lives)."""
        return [sys.executable, "-m", "inspectd.cli"]

    def _wait_ready(self) -> dict[str, Any]:
        assert self.proc is not None
        end = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < end:
            for rec in self.log_records():
                if rec.get("event") == "ready":
                    return rec
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before ready:\n{self.log_tail()}"
                )
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"{self.name} not ready within {self.ready_timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None or self.exit_code is not None:
            return self.exit_code
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)  # the daemon itself; a profiler prefix exits with it
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.exit_code = self.proc.returncode
        return self.exit_code

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
        text = Path(f"/proc/{self.pid}/stat").read_text()
        fields = text[text.rindex(")") + 2 :].split()  # the command name may contain spaces
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def memory(self) -> dict[str, float]:
        """Peak (VmHWM) and current (VmRSS) resident set in MB, and the thread count."""
        out: dict[str, float] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
            elif key == "Threads":
                out[key] = int(value)
        return out

    # -- its log -----------------------------------------------------------------------------------------------
    def log_records(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""
