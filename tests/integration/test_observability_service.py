"""inspectd runs the way systemd/inspectd.service runs it: the shipped example config, overrides from the
environment (as EnvironmentFile= gives them), the sd_notify protocol of Type=notify with WatchdogSec=, JSON
log lines on a non-terminal stdout (the journal), and a clean exit on SIGTERM within TimeoutStopSec=.

systemd itself is not needed: the test plays its part, receiving the notify datagrams on a socket of its own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.deploy_support import REPO, require_tool
from tests.helpers import tiny_package
from tests.integration.daemon_harness import EPHEMERAL

pytestmark = pytest.mark.integration

EXAMPLE_TOML = REPO / "systemd" / "inspectd.toml"
UNIT = REPO / "systemd" / "inspectd.service"


def _unit_seconds(key: str) -> float:
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        if line.startswith(f"{key}="):
            value = line.split("=", 1)[1]
            return (
                float(value.removesuffix("min")) * 60 if value.endswith("min") else float(value.rstrip("s"))
            )
    raise AssertionError(f"{key}= not in the unit")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


class NotifySocket:
    """systemd's side of sd_notify: a datagram socket whose messages the test reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, state: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
        """Until a datagram carrying ``state`` came; fails at once if ``proc`` (the daemon) exits first."""
        end = time.monotonic() + timeout
        while not any(state in m.splitlines() for m in self.messages):
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {state} within {timeout} s; got {self.messages}")
            if proc is not None and proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                raise AssertionError(f"the daemon exited ({proc.returncode}) before {state}: {out[-2000:]}")
            self.sock.settimeout(min(remaining, 0.5))
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def drain(self) -> None:
        self.sock.setblocking(False)
        try:
            while True:
                self.messages.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)

    def count(self, state: str) -> int:
        return sum(state in m.splitlines() for m in self.messages)

    def wait_count(self, state: str, n: int, timeout: float) -> None:
        """Until ``n`` datagrams carrying ``state`` have come in total (each received as it arrives)."""
        end = time.monotonic() + timeout
        while self.count(state) < n:
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{self.count(state)} of {n} {state} within {timeout} s: {self.messages[-5:]}"
                )
            self.sock.settimeout(remaining)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def close(self) -> None:
        self.sock.close()


@pytest.mark.timeout(90)
def test_serve_speaks_sd_notify_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    entry_point = require_tool("inspectd")  # the console script, as ExecStart= names it
    tiny_package(tmp_path / "model")
    metrics_port = _free_port()
    watchdog_s = 1.0
    env = {
        **os.environ,
        # What the unit's Environment= and an EnvironmentFile= would set, pointed at this test's resources.
        "PYTHONUNBUFFERED": "1",
        "INSPECTD_MODEL__BACKEND": "onnxruntime",  # the example is for a GPU station; this runner has a CPU
        "INSPECTD_AUDIT__PATH": str(tmp_path / "audit"),
        "INSPECTD_SOURCES__CAMERA__ENDPOINT": EPHEMERAL,
        "INSPECTD_PUBLISHER__ENDPOINT": EPHEMERAL,
        "INSPECTD_CONTROL__ENDPOINT": EPHEMERAL,  # the example's is an ipc path under the unit's /run/inspectd
        "INSPECTD_METRICS__PORT": str(metrics_port),
        "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
        "WATCHDOG_USEC": str(int(watchdog_s * 1e6)),
    }
    env.pop("WATCHDOG_PID", None)
    notify = NotifySocket(tmp_path / "notify.sock")
    # The example's TensorRT options would be refused by name on ONNX Runtime: the CPU copy goes without them.
    config = tmp_path / "inspectd.toml"
    example = EXAMPLE_TOML.read_text(encoding="utf-8")
    config.write_text(re.sub(r"(?m)^options = .*$", "", example), encoding="utf-8")
    assert config.read_text(encoding="utf-8") != example
    cmd = [entry_point, "serve", "--config", str(config), "--model", str(tmp_path / "model")]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    try:
        notify.wait_for("READY=1", timeout=_unit_seconds("TimeoutStartSec"), proc=proc)
        assert _ready(metrics_port) == 200  # READY=1 means ready: /readyz agrees at once
        # WATCHDOG=1 keeps coming, more often than WatchdogSec= (systemd advises every half interval): at least
        # four within two intervals.
        notify.drain()
        n0 = notify.count("WATCHDOG=1")
        notify.wait_count("WATCHDOG=1", n0 + 4, timeout=2 * watchdog_s)
        t_stop = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1", timeout=5)
        code = proc.wait(timeout=_unit_seconds("TimeoutStopSec"))
        stop_s = time.monotonic() - t_stop
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        notify.close()
    out = proc.stdout.read().decode() if proc.stdout else ""
    assert code == 0, out[-3000:]
    assert stop_s < _unit_seconds("TimeoutStopSec")
    # Off a terminal every line is a JSON object carrying the line id and boot id (journald, log shippers).
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert records and all(r.get("line") == "line-1" and r.get("boot_id") for r in records), out[-3000:]
    assert {"ready", "stopped"} <= {r.get("event") for r in records}


@pytest.mark.timeout(60)
def test_example_config_passes_check_config(tmp_path: Path) -> None:
    # The example must be valid for `inspectd check-config`, which also loads the model package it names;
    # --model points that at a real package here, everything else is the file as shipped.
    tiny_package(tmp_path / "model")
    cmd = [sys.executable, "-m", "inspectd.cli", "check-config", "--config", str(EXAMPLE_TOML)]
    out = subprocess.run(
        [*cmd, "--model", str(tmp_path / "model")], capture_output=True, text=True, timeout=50
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert 'backend = "tensorrt"' in out.stdout  # it printed the effective config of the example
    # Without a real package the same file is refused, naming the key: the check is not a rubber stamp.
    missing = subprocess.run(cmd, capture_output=True, text=True, timeout=50)
    assert missing.returncode != 0 and "model.path" in missing.stderr


@pytest.mark.timeout(60)
def test_config_error_exits_with_the_status_the_unit_does_not_restart(tmp_path: Path) -> None:
    # RestartPreventExitStatus=2 in the unit: a typo in the config fails once, loudly, instead of burning
    # through the start limit. That holds only while `serve` really exits 2 on a configuration error.
    prevent = [
        ln.split("=", 1)[1]
        for ln in UNIT.read_text(encoding="utf-8").splitlines()
        if ln.startswith("RestartPreventExitStatus=")
    ]
    assert prevent == ["2"]
    bad = tmp_path / "inspectd.toml"
    typo = EXAMPLE_TOML.read_text(encoding="utf-8").replace("\nport = 9108", "\nprot = 9108")
    bad.write_text(typo, encoding="utf-8")
    out = subprocess.run(
        [sys.executable, "-m", "inspectd.cli", "serve", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert out.returncode == 2 and "metrics.prot: unknown key" in out.stderr, out.stdout + out.stderr
