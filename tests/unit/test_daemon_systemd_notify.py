from __future__ import annotations

import os
import socket
from pathlib import Path

from daemon.systemd_notify import SystemdNotifier


def test_no_socket_is_a_noop() -> None:
    n = SystemdNotifier({})
    assert not n.enabled and not n.ready() and n.watchdog_interval_s is None


def test_datagrams_reach_the_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.settimeout(2)
        n = SystemdNotifier(
            {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
        )
        assert n.watchdog_interval_s == 4.0
        assert n.ready()
        assert server.recv(1024) == b"READY=1\nSTATUS=inspecting"
        n.watchdog()
        assert server.recv(1024) == b"WATCHDOG=1"
        n.stopping()
        assert server.recv(1024).startswith(b"STOPPING=1")


def test_abstract_namespace_address() -> None:
    name = f"inspectd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(2)
        assert SystemdNotifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert server.recv(64) == b"WATCHDOG=1"


def test_watchdog_for_another_pid_is_ignored_and_a_dead_socket_is_not_fatal(tmp_path: Path) -> None:
    n = SystemdNotifier(
        {"NOTIFY_SOCKET": str(tmp_path / "gone"), "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}
    )
    assert n.watchdog_interval_s is None
    assert not n.ready()
