"""The line controller's side of the verdict wire: one SUB socket, its messages decoded and accounted for.

The daemon publishes (``daemon.publisher``, the format in ``daemon.wire``); every inspectd *client* of that
stream receives it through this module: replay's wire check, the benchmark's load client, the tests'
collector (all :class:`VerdictSubscriber`) and ``inspectd watch`` (a foreground loop on :func:`subscribe` and
:func:`receive`). Gaps and restarts are :class:`~daemon.sequence.SequenceTracker`'s rule. The daemon itself
never imports this module; it needs pyzmq and the standard library only.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import zmq

from daemon.sequence import SequenceTracker

__all__ = ["OnMessage", "Received", "VerdictSubscriber", "receive", "subscribe"]

POLL_MS = 50  # how often the receive thread looks at its stop event
OnMessage = Callable[[dict[str, Any], float], None]  # (decoded message, time.monotonic() at arrival)
SocketOptions = Mapping[int, int | bytes]


class Received(NamedTuple):
    topic: bytes  # the first frame: the line id
    msg: dict[str, Any]  # the second frame, decoded: a verdict or a heartbeat (or a kind added later)
    t_arrival: float  # time.monotonic() right after it was read


def subscribe(
    ctx: zmq.Context[Any], endpoint: str, line: str, options: SocketOptions | None = None
) -> zmq.Socket[Any]:
    """A SUB socket (LINGER 0) connected to ``endpoint`` and subscribed to ``line`` (ZeroMQ matches a prefix;
    ``""`` is every line). ``options`` are set before connecting: ``zmq.RCVHWM``, or the CURVE client keys
    (``zmq.CURVE_SERVERKEY``, ``zmq.CURVE_PUBLICKEY``, ``zmq.CURVE_SECRETKEY``) for a daemon with CURVE."""
    sock: zmq.Socket[Any] = ctx.socket(zmq.SUB)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        for option, value in (options or {}).items():
            sock.setsockopt(option, value)
        sock.setsockopt(zmq.SUBSCRIBE, line.encode())
        sock.connect(endpoint)
    except BaseException:
        sock.close()
        raise
    return sock


def receive(sock: zmq.Socket[Any], timeout_ms: int) -> Received | None:
    """The next message of ``sock`` (topic, decoded JSON, arrival time), or None if none came in time."""
    if not sock.poll(timeout_ms):
        return None
    topic, payload = sock.recv_multipart()
    t_arrival = time.monotonic()
    msg: dict[str, Any] = json.loads(payload)
    return Received(topic, msg, t_arrival)


class VerdictSubscriber:
    """A SUB socket on its own thread and its own ``zmq.Context`` (so it outlives the context of an App in the
    same process), following one line.

    Every message is fed to ``sequence`` (under ``lock``; read its totals under it too while running), then
    handed to ``on_message(msg, t_arrival)`` on the subscriber's thread; ``heartbeat`` is set at the first
    heartbeat (then the subscription has reached the publisher: nothing published from then on is missed to
    ZeroMQ's slow-joiner rule). An exception in ``on_message`` ends the thread (and reaches
    ``threading.excepthook``). ``check_topic``: every message's topic and ``line`` field must be this
    subscriber's line exactly (a subscription to ``line-1`` also receives ``line-10``); a mismatch raises
    ``ValueError`` on the thread. ``ctx``: use that context instead of an own one (then it is not terminated).
    """

    def __init__(
        self,
        endpoint: str,
        line: str,
        on_message: OnMessage | None = None,
        *,
        options: SocketOptions | None = None,
        check_topic: bool = False,
        name: str = "verdict-sub",
        ctx: zmq.Context[Any] | None = None,
    ) -> None:
        self.endpoint, self.line = endpoint, line
        self.sequence = SequenceTracker()
        self.lock = threading.Lock()
        self.heartbeat = threading.Event()
        self._on_message = on_message
        self._options = dict(options or {})
        self._check_topic = check_topic
        self._given_ctx = ctx
        self._ctx: zmq.Context[Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self) -> VerdictSubscriber:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """The receive thread is alive (started, not stopped, not ended by an exception)."""
        return self._thread.is_alive()

    def start(self) -> None:
        """Connect and receive on the thread; returns at once (see :meth:`wait_heartbeat`)."""
        self._ctx = self._given_ctx or zmq.Context()
        self._thread.start()

    def wait_heartbeat(self, timeout: float | None = None) -> bool:
        """True once a heartbeat has arrived; False if none did within ``timeout`` seconds."""
        return self.heartbeat.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop receiving: join the thread (up to ``timeout``), its socket closed; terminate the own context."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)
        ctx, self._ctx = self._ctx, None
        if ctx is not None and ctx is not self._given_ctx:
            ctx.term()

    def _run(self) -> None:
        assert self._ctx is not None
        sock = subscribe(self._ctx, self.endpoint, self.line, self._options)
        try:
            while not self._stop.is_set():
                got = receive(sock, POLL_MS)
                if got is None:
                    continue
                msg = got.msg
                if self._check_topic and not got.topic.decode() == msg.get("line") == self.line:
                    raise ValueError(
                        f"message of line {msg.get('line')!r} under topic {got.topic!r} "
                        f"on a subscription to {self.line!r}"
                    )
                with self.lock:
                    self.sequence.feed(msg)
                if self._on_message is not None:
                    self._on_message(msg, got.t_arrival)
                if msg["type"] == "heartbeat":
                    self.heartbeat.set()
        finally:
            sock.close()
