"""Issue 16, finding 9: the metrics server's connections time out. A client that connects and sends nothing (or
trickles its request) is dropped after the connection's time limit instead of holding a server thread and a file
descriptor for ever; scrapes go on meanwhile."""

from __future__ import annotations

import select
import socket
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from daemon.metrics import CONNECTION_TIMEOUT_S, Metrics, MetricsServer
from tests.helpers import tiny_package
from tests.integration.daemon_harness import ScriptedBackend, daemon_settings, running_app

pytestmark = pytest.mark.integration

TIMEOUT_S = 0.5


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        return str(resp.read().decode())


def _closed_by_server(sock: socket.socket, within_s: float) -> float:
    """Seconds until the server closed ``sock`` (EOF or reset); fails if it is still open after ``within_s``."""
    t0 = time.monotonic()
    sock.settimeout(within_s)
    try:
        while sock.recv(4096):
            pass  # a 408 or an error page before the close is allowed
    except TimeoutError:
        pytest.fail(f"the server kept an idle connection open for {within_s} s")
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


@pytest.fixture
def server() -> MetricsServer:
    registry = CollectorRegistry()
    Metrics(registry, "L1", process_collector=False)
    srv = MetricsServer(registry, "127.0.0.1", 0, ready=lambda: True, timeout_s=TIMEOUT_S)
    srv.start()
    yield srv  # type: ignore[misc]
    srv.stop()


@pytest.mark.timeout(30)
def test_an_idle_client_is_dropped_and_scrapes_go_on_meanwhile(server: MetricsServer) -> None:
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(3)]
    try:
        t0 = time.monotonic()
        for _ in range(3):  # while the idle clients hold their connections
            assert "inspectd_verdicts_total" in _scrape(server.port)
        assert time.monotonic() - t0 < TIMEOUT_S + 2.0
        waited = [_closed_by_server(s, within_s=TIMEOUT_S + 5.0) for s in idle]
    finally:
        for s in idle:
            s.close()
    assert max(waited) < TIMEOUT_S + 3.0
    assert "inspectd_verdicts_total" in _scrape(server.port)  # and the server is still fine afterwards


@pytest.mark.timeout(30)
def test_a_client_trickling_its_request_is_dropped_at_the_connection_limit(server: MetricsServer) -> None:
    """Each byte comes well within the per-read timeout, but the whole request never arrives in time: the limit
    is on the connection, not on each read (a socket timeout alone would keep this client for 25 s)."""
    request = b"GET /metrics HTTP/1.0\r\nX-Slow: " + b"a" * 500 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        t0 = time.monotonic()
        closed_after = None
        for i in range(len(request)):
            try:
                sock.sendall(request[i : i + 1])
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - t0
                break
            readable, _, _ = select.select([sock], [], [], TIMEOUT_S / 10)  # one byte every 50 ms
            if readable:
                try:
                    data = sock.recv(4096)
                except ConnectionResetError:
                    data = b""
                assert b"200" not in data, "the trickled request was answered"
                if not data:
                    closed_after = time.monotonic() - t0
                    break
            if time.monotonic() - t0 > TIMEOUT_S + 4.0:
                break
    assert closed_after is not None, "a client trickling its request kept its connection"
    assert TIMEOUT_S * 0.9 <= closed_after < TIMEOUT_S + 3.0


@pytest.mark.timeout(60)
def test_the_daemons_metrics_server_has_the_default_connection_limit(tmp_path: object) -> None:
    from pathlib import Path

    from engine.package import load_package

    d = Path(str(tmp_path)) / "pkg"
    tiny_package(d, input_size=(16, 16))
    settings = daemon_settings(d)
    with running_app(settings, backend=ScriptedBackend(load_package(d), max_batch=8)) as app:
        assert app.metrics_server is not None and app.metrics_server.timeout_s == CONNECTION_TIMEOUT_S == 5.0
        assert "inspectd_ready" in _scrape(app.metrics_server.port)


def test_a_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="timeout_s must be > 0, got 0"):
        MetricsServer(CollectorRegistry(), "127.0.0.1", 0, ready=lambda: True, timeout_s=0)
