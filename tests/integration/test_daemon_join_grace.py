"""After a restart, subscribers re-subscribe before the daemon reads its first frame (``publisher.join_grace_ms``).

A camera's PUSH keeps its queue while the daemon is down, so the frames arrive in a burst the moment the new
daemon binds. Without the grace the burst could be decided and published before a line controller's SUB had
reconnected: ZeroMQ drops verdicts for a subscriber that has not (re-)subscribed yet, and the controller saw the
new boot start at seq 57 instead of 1 (once, on a loaded CI machine)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.types import Frame, Verdict
from tests.helpers import tiny_package
from tests.integration.daemon_harness import CameraPusher, VerdictCollector, daemon_settings, running_app
from tests.integration.reliability_harness import free_port

pytestmark = pytest.mark.integration

GRACE_MS = 400.0


@pytest.mark.timeout(60)
def test_no_frame_is_read_before_the_join_grace_and_a_waiting_subscriber_sees_seq_1(tmp_path: Path) -> None:
    tiny_package(tmp_path / "pkg", input_size=(32, 32))
    cam_ep, pub_ep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    settings = daemon_settings(
        tmp_path / "pkg",
        line="grace",
        sources={"camera": {"endpoint": cam_ep}},
        publisher={"endpoint": pub_ep, "join_grace_ms": GRACE_MS},
    )
    arrivals: list[float] = []

    def listener(verdict: Verdict, frame: Frame, message: dict[str, Any]) -> None:
        arrivals.append(frame.t_arrival)

    img = np.full((64, 64), 128, np.uint8)
    with CameraPusher(cam_ep) as cam:
        for i in range(20):  # queued in the camera's socket: no daemon is listening yet (as after a crash)
            cam.send(f"q-{i:02d}", img)
        sub = VerdictCollector(pub_ep, "grace")
        sub.start()  # connected before the daemon exists, like a line controller through a restart
        try:
            with running_app(settings, listeners=[listener]) as app:
                got = sub.wait_verdicts(20, timeout=20)
                t_bound = app._t_publisher_bound
        finally:
            sub.__exit__(None, None, None)
    assert min(arrivals) - t_bound >= GRACE_MS / 1000.0  # nothing was read inside the grace
    assert [v["seq"] for v in got] == list(range(1, 21))  # so the subscriber missed nothing of the new boot


@pytest.mark.timeout(60)
def test_an_ephemeral_publisher_port_skips_the_grace(tmp_path: Path) -> None:
    """Replay, the demo, the bench: a port chosen at bind time has no subscriber from a previous run."""
    tiny_package(tmp_path / "pkg", input_size=(32, 32))
    settings = daemon_settings(tmp_path / "pkg", line="grace", publisher={"join_grace_ms": 60_000.0})
    with running_app(settings) as app:  # would take a minute to start if it waited
        assert app.publisher_endpoint is not None and not app.publisher_endpoint.endswith(":*")
