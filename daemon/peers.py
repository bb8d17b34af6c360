"""Who connects to the daemon's sockets: a ZeroMQ socket monitor, counted and logged.

libzmq handles connections below the application: a refused CURVE client, a peer that sent a message above
``MAXMSGSIZE`` (libzmq drops the connection), a camera that went away. The monitor makes those visible:
``inspectd_peer_events_total{socket, event}`` with ``event`` one of

- ``connected``: handshake completed (with CURVE: an authorised client),
- ``disconnected``: a peer's connection ended — the camera stopped or was cut off, *or* libzmq dropped it for an
  oversized message (libzmq 4.3 reports both the same way, measured; a camera that reconnects at once after a
  ``disconnected`` is the signature of the latter),
- ``auth_failed``: the ZAP handler refused the client's key,
- ``handshake_failed``: protocol or security mechanism mismatch (e.g. a plain-TCP client on a CURVE socket).

Monitor sockets are created on the monitored socket's thread before it is handed over (``watch``), then read
by this one thread. Log lines are rate-limited per (socket, event): a port scan must not flood the journal.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import zmq
from prometheus_client import CollectorRegistry, Counter
from zmq.utils.monitor import recv_monitor_message

from daemon.logs import get_logger

log = get_logger(__name__)

EVENTS: dict[int, str] = {
    int(zmq.EVENT_HANDSHAKE_SUCCEEDED): "connected",
    int(zmq.EVENT_DISCONNECTED): "disconnected",
    int(zmq.EVENT_HANDSHAKE_FAILED_AUTH): "auth_failed",
    int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL): "handshake_failed",
    int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL): "handshake_failed",
}
_MASK = 0
for _e in EVENTS:
    _MASK |= _e
_LOG_BURST = 5  # log lines per (socket, event) per window; the counter counts everything
_LOG_WINDOW_S = 10.0


class PeerMonitor:
    def __init__(self, registry: CollectorRegistry, line: str, *, sockets: tuple[str, ...]) -> None:
        self.line = line
        self.events = Counter(
            "inspectd_peer_events",
            "Connection events on the daemon's ZeroMQ sockets (see docs/reliability.md).",
            ["line", "socket", "event"],
            registry=registry,
        )
        for name in sockets:
            for event in set(EVENTS.values()):
                self.events.labels(line, name, event)
        self._monitors: dict[zmq.Socket[Any], str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._window: dict[tuple[str, str], tuple[float, int]] = {}

    def watch(self, sock: zmq.Socket[Any], name: str) -> None:
        """Call on the thread that owns ``sock``, before it binds and before :meth:`start`."""
        if self._thread is not None:
            raise RuntimeError("PeerMonitor.watch after start")
        self._monitors[sock.get_monitor_socket(_MASK)] = name

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="peer-monitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> bool:
        """Ends the thread, which closes the monitor sockets (needed before the context can terminate)."""
        self._stop.set()
        if self._thread is None:
            for mon in self._monitors:
                mon.close(linger=0)
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        poller = zmq.Poller()
        for mon in self._monitors:
            poller.register(mon, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                for mon, _ in poller.poll(100):
                    msg = recv_monitor_message(mon)
                    if msg["event"] == zmq.EVENT_MONITOR_STOPPED:
                        poller.unregister(mon)
                        continue
                    self._record(self._monitors[mon], int(msg["event"]), msg["value"])
        except Exception:
            log.exception("peer monitor failed")  # not critical: counting stops, verdicts go on
        finally:
            for mon in self._monitors:
                mon.close(linger=0)

    def _record(self, name: str, event_id: int, value: int) -> None:
        event = EVENTS.get(event_id)
        if event is None:
            return
        self.events.labels(self.line, name, event).inc()
        now = time.monotonic()
        start, n = self._window.get((name, event), (now, 0))
        if now - start > _LOG_WINDOW_S:
            if n > _LOG_BURST:
                log.warning("peer events suppressed", socket=name, peer_event=event, count=n - _LOG_BURST)
            start, n = now, 0
        self._window[(name, event)] = (start, n + 1)
        if n >= _LOG_BURST:
            return
        if event in ("auth_failed", "handshake_failed"):
            log.warning("peer refused", socket=name, peer_event=event, zmq_value=value)
        elif event == "disconnected" and name == "camera":
            log.warning(
                "camera connection closed (camera stopped, network cut, or a message above "
                "sources.camera.max_message_bytes)",
                socket=name,
            )
        else:
            log.info("peer event", socket=name, peer_event=event)


def bind_server(
    sock: zmq.Socket[Any],
    endpoint: str,
    role: str,
    *,
    secure: Callable[[zmq.Socket[Any], str], None] | None = None,
    monitor: PeerMonitor | None = None,
) -> str:
    """Make ``sock`` the daemon's ``role`` server: CURVE first when configured (daemon.security), so no peer is
    ever accepted unauthenticated; watched for peer events; bound. Returns the bound endpoint (an ephemeral
    ``tcp://127.0.0.1:*`` resolved); a failed bind closes the socket and raises."""
    if secure is not None:
        secure(sock, role)
    if monitor is not None:
        monitor.watch(sock, role)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError:
        sock.close(linger=0)
        raise
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)
