"""``daemon.subscriber``: the one verdict subscriber, against a real PUB socket on loopback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from daemon.subscriber import VerdictSubscriber, receive, subscribe

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
LINE = "line-1"


def verdict(seq: int, line: str = LINE, boot: str = "b1") -> dict[str, Any]:
    return {"type": "verdict", "line": line, "boot_id": boot, "seq": seq, "frame_id": f"f{seq}"}


def heartbeat(seq_last: int, line: str = LINE, boot: str = "b1") -> dict[str, Any]:
    return {"type": "heartbeat", "line": line, "boot_id": boot, "seq_last": seq_last, "ready": True}


class Publisher:
    """The daemon's side, reduced to its wire: a PUB socket on an ephemeral loopback port."""

    def __init__(self, ctx: zmq.Context[Any], **options: Any) -> None:
        self.sock: zmq.Socket[Any] = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        for name, value in options.items():
            setattr(self.sock, name, value)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint: str = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def send(self, msg: dict[str, Any], topic: str | None = None) -> None:
        self.sock.send_multipart([(topic or msg["line"]).encode(), json.dumps(msg).encode()])

    def until_subscribed(self, sub: VerdictSubscriber, seq_last: int = 0, timeout: float = 10.0) -> None:
        """Heartbeats until the subscriber has one (its subscription has reached us: the slow joiner)."""
        end = time.monotonic() + timeout
        while not sub.heartbeat.is_set():
            assert time.monotonic() < end, "the subscriber got no heartbeat"
            self.send(heartbeat(seq_last))
            sub.wait_heartbeat(0.02)


class Inbox:
    """An ``on_message`` callback that keeps what it was handed, and on which thread."""

    def __init__(self) -> None:
        self.messages: list[tuple[dict[str, Any], float]] = []
        self.threads: set[str] = set()
        self._cv = threading.Condition()

    def __call__(self, msg: dict[str, Any], t_arrival: float) -> None:
        with self._cv:
            self.messages.append((msg, t_arrival))
            self.threads.add(threading.current_thread().name)
            self._cv.notify_all()

    def verdicts(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        with self._cv:
            assert self._cv.wait_for(lambda: len(self.seqs()) >= n, timeout), (
                f"{self.seqs()}: not {n} verdicts"
            )
            return [m for m, _ in self.messages if m["type"] == "verdict"]

    def seqs(self) -> list[int]:
        return [m["seq"] for m, _ in self.messages if m["type"] == "verdict"]


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    c: zmq.Context[Any] = zmq.Context()
    yield c
    c.destroy(linger=0)


@pytest.fixture
def publisher(ctx: zmq.Context[Any]) -> Iterator[Callable[..., Publisher]]:
    """``publisher(**socket_attributes)``: a Publisher, closed after the test."""
    made: list[Publisher] = []

    def make(**options: Any) -> Publisher:
        made.append(Publisher(ctx, **options))
        return made[-1]

    yield make
    for pub in made:
        pub.sock.close(linger=0)


def free_endpoint() -> str:
    """A loopback port that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_receives_verdicts_and_heartbeats_and_tracks_a_gap(publisher: Callable[..., Publisher]) -> None:
    pub = publisher()
    inbox = Inbox()
    sub = VerdictSubscriber(pub.endpoint, LINE, inbox, name="test-sub")
    sub.start()
    try:
        pub.until_subscribed(sub)
        t0 = time.monotonic()
        for seq in (1, 2, 4, 5):  # 3 was lost on the way
            pub.send(verdict(seq))
        got = inbox.verdicts(4)
        pub.send(heartbeat(7))  # 6 and 7 lost right before a quiet period: noticed at the heartbeat
        end = time.monotonic() + 10
        while len(sub.sequence.gaps) < 2 and time.monotonic() < end:
            time.sleep(0.01)
    finally:
        sub.stop()
    assert [v["frame_id"] for v in got] == ["f1", "f2", "f4", "f5"]
    with sub.lock:
        assert sub.sequence.gaps == [(3, 3), (6, 7)] and sub.sequence.seen == 4
    assert sub.sequence.boot_id == "b1" and sub.sequence.restarts == 0
    arrivals = [t for m, t in inbox.messages if m["type"] == "verdict"]
    assert arrivals == sorted(arrivals) and t0 <= arrivals[0] <= time.monotonic()  # the monotonic clock
    assert any(m["type"] == "heartbeat" for m, _ in inbox.messages)  # heartbeats are handed on too
    assert inbox.threads == {"test-sub"}  # the callback runs on the subscriber's thread


def test_the_sequence_is_fed_before_the_callback(publisher: Callable[..., Publisher]) -> None:
    pub = publisher()
    seen: list[int] = []

    def on_message(msg: dict[str, Any], t_arrival: float) -> None:
        if msg["type"] == "verdict":
            with sub.lock:
                seen.append(sub.sequence.seen)

    with VerdictSubscriber(pub.endpoint, LINE, on_message) as sub:
        pub.until_subscribed(sub)
        for seq in (1, 2, 3):
            pub.send(verdict(seq))
        end = time.monotonic() + 10
        while len(seen) < 3 and time.monotonic() < end:
            time.sleep(0.01)
    assert seen == [1, 2, 3]


def test_stops_cleanly_and_terminates_its_own_context(publisher: Callable[..., Publisher]) -> None:
    pub = publisher()
    sub = VerdictSubscriber(pub.endpoint, LINE)  # no callback: the tracker alone
    with sub:
        pub.until_subscribed(sub)
        assert sub.running
        own = sub._ctx
    assert not sub.running and own is not None and own.closed
    sub.stop()  # twice is harmless
    VerdictSubscriber(pub.endpoint, LINE).stop()  # never started: nothing to stop


def test_a_given_context_is_left_to_its_owner(
    ctx: zmq.Context[Any], publisher: Callable[..., Publisher]
) -> None:
    pub = publisher()
    with VerdictSubscriber(pub.endpoint, LINE, ctx=ctx) as sub:
        pub.until_subscribed(sub)
    assert not sub.running and not ctx.closed


def test_wait_heartbeat_times_out_false_without_a_publisher() -> None:
    with VerdictSubscriber(free_endpoint(), LINE) as sub:
        t0 = time.monotonic()
        assert sub.wait_heartbeat(0.3) is False
        assert time.monotonic() - t0 >= 0.3
        assert sub.running  # still connecting: a daemon that starts later is picked up
    assert not sub.running


def test_subscribes_to_its_line_only(publisher: Callable[..., Publisher]) -> None:
    pub = publisher()
    inbox = Inbox()
    with VerdictSubscriber(pub.endpoint, LINE, inbox) as sub:
        pub.until_subscribed(sub)
        pub.send(verdict(1, line="line-2"))
        pub.send(verdict(1))
        got = inbox.verdicts(1)
    assert [v["line"] for v in got] == [LINE]


def test_check_topic_refuses_a_message_of_another_line(
    publisher: Callable[..., Publisher], monkeypatch: pytest.MonkeyPatch
) -> None:
    errors: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    pub = publisher()
    inbox = Inbox()
    with VerdictSubscriber(pub.endpoint, LINE, inbox, check_topic=True) as sub:
        pub.until_subscribed(sub)
        pub.send(verdict(1))
        inbox.verdicts(1)
        pub.send(verdict(1, line="line-10"))  # "line-1" is a prefix of it: ZeroMQ delivers it
        end = time.monotonic() + 10
        while sub.running and time.monotonic() < end:
            time.sleep(0.01)
        assert not sub.running  # the thread ended on it
    assert len(errors) == 1 and isinstance(errors[0], ValueError) and "line-10" in str(errors[0])
    assert inbox.seqs() == [1]


def test_without_check_topic_a_prefix_subscription_gets_every_matching_line(
    publisher: Callable[..., Publisher],
) -> None:
    pub = publisher()
    inbox = Inbox()
    with VerdictSubscriber(pub.endpoint, LINE, inbox) as sub:
        pub.until_subscribed(sub)
        pub.send(verdict(1, line="line-10"))
        got = inbox.verdicts(1)
    assert got[0]["line"] == "line-10"


def test_socket_options_are_set_before_connecting(publisher: Callable[..., Publisher]) -> None:
    """CURVE client keys go in ``options``: with them the handshake succeeds, without them nothing arrives."""
    if not zmq.has("curve"):
        pytest.skip("libzmq without CURVE")
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    pub = publisher(curve_server=True, curve_secretkey=server_secret)  # no ZAP handler: any client key
    keys: dict[int, int | bytes] = {
        zmq.CURVE_SERVERKEY: server_public,
        zmq.CURVE_PUBLICKEY: client_public,
        zmq.CURVE_SECRETKEY: client_secret,
        zmq.RCVHWM: 0,
    }
    inbox = Inbox()
    with (
        VerdictSubscriber(pub.endpoint, LINE, inbox, options=keys) as sub,
        VerdictSubscriber(pub.endpoint, LINE) as plain,
    ):
        pub.until_subscribed(sub)
        pub.send(verdict(1))
        assert [v["seq"] for v in inbox.verdicts(1)] == [1]
        for _ in range(5):
            pub.send(heartbeat(1))
        assert plain.wait_heartbeat(0.3) is False  # refused at the handshake
    assert plain.sequence.seen == 0 and plain.sequence.boot_id is None


def test_foreground_receive_decodes_and_times_out(
    ctx: zmq.Context[Any], publisher: Callable[..., Publisher]
) -> None:
    """What ``inspectd watch`` loops on: the same socket set-up and receive step, without a thread."""
    pub = publisher()
    sock = subscribe(ctx, pub.endpoint, LINE)
    try:
        assert receive(sock, 50) is None
        end = time.monotonic() + 10
        got = None
        while got is None:
            assert time.monotonic() < end, "nothing received"
            pub.send(heartbeat(0))
            got = receive(sock, 20)
        t = time.monotonic()
        assert got.topic == LINE.encode() and got.msg == heartbeat(0) and got.t_arrival <= t
        assert sock.getsockopt(zmq.LINGER) == 0
    finally:
        sock.close()


def test_daemon_subscriber_needs_only_pyzmq_and_the_standard_library() -> None:
    """A PLC gateway can use it with pyzmq alone: beside pyzmq it loads the stdlib and daemon.sequence only."""
    code = (
        "import json, sys, zmq\n"
        "before = set(sys.modules)\n"
        "import daemon.subscriber\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    added = [m for m in json.loads(out.stdout) if m.split(".")[0] not in sys.stdlib_module_names]
    assert sorted(added) == ["daemon", "daemon.sequence", "daemon.subscriber"]
