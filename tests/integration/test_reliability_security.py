"""Security with real sockets (issue 9, item 4): CURVE on both sockets, and what the metrics endpoint shows.

Key pairs come from ``generate_keys`` (what ``inspectd keys generate`` writes). An authorised camera and an
authorised subscriber work; a client with an unknown key, a plain-TCP client, and a camera key used to
subscribe are all refused, at the handshake, and counted.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from daemon.security import configure_client
from daemon.wire import camera_message
from engine.package import ModelPackage
from tests.helpers import wait_until
from tests.integration.daemon_harness import curve_keys, daemon_settings, running_app

pytestmark = pytest.mark.integration

IMG = np.full((64, 64), 90, np.uint8)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return curve_keys(tmp_path_factory.mktemp("keys"))


def curve_settings(package: ModelPackage, keys: dict[str, Path], **extra: Any) -> Any:
    return daemon_settings(
        package.directory,
        security={
            "server_secret_key": str(keys["server_secret"]),
            "camera_clients": str(keys["cameras"]),
            "subscriber_clients": str(keys["subscribers"]),
        },
        **extra,
    )


def client(
    ctx: zmq.Context[Any], kind: int, endpoint: str, keys: dict[str, Path], secret: str | None
) -> zmq.Socket[Any]:
    sock = ctx.socket(kind)
    sock.linger = 0
    if secret is not None:
        configure_client(sock, server_public_key=keys["server_public"], client_secret_key=keys[secret])
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    return sock


def received(sock: zmq.Socket[Any], seconds: float) -> list[dict[str, Any]]:
    """Everything ``sock`` receives in ``seconds`` (a window in which something must, or must not, arrive)."""
    out, end = [], time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if sock.poll(int(left * 1000) + 1):
            out.append(json.loads(sock.recv_multipart()[1]))
    return out


def first_heartbeat(sock: zmq.Socket[Any], timeout: float) -> dict[str, Any] | None:
    """The first heartbeat ``sock`` receives (verdicts before it are skipped), or None after ``timeout``."""
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        if sock.poll(int(left * 1000) + 1):
            msg: dict[str, Any] = json.loads(sock.recv_multipart()[1])
            if msg["type"] == "heartbeat":
                return msg
    return None


def peer_events(app: Any, line: str, socket: str, event: str) -> float:
    return app.registry.get_sample_value(
        "inspectd_peer_events_total", {"line": line, "socket": socket, "event": event}
    )


@pytest.mark.timeout(60)
def test_curve_admits_authorised_clients_and_refuses_everyone_else(
    package: ModelPackage, keys: dict[str, Path]
) -> None:
    settings = curve_settings(package, keys)
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        with running_app(settings) as app:
            assert app.publisher_endpoint and app.camera_endpoint
            plc = client(ctx, zmq.SUB, app.publisher_endpoint, keys, "plc")
            subs = {
                name: client(ctx, zmq.SUB, app.publisher_endpoint, keys, secret)
                for name, secret in (("intruder", "intruder"), ("plain", None), ("camera-key", "cam"))
            }
            assert first_heartbeat(plc, 5.0) is not None, "authorised subscriber got nothing"
            cams = {
                name: client(ctx, zmq.PUSH, app.camera_endpoint, keys, secret)
                for name, secret in (
                    ("cam", "cam"),
                    ("intruder", "intruder"),
                    ("plain", None),
                    ("plc-key", "plc"),
                )
            }
            for name, cam in cams.items():
                with contextlib.suppress(zmq.Again):  # a refused PUSH never gets a peer: don't block on it
                    cam.send_multipart(camera_message(f"from-{name}", IMG), flags=zmq.NOBLOCK)
            got = [m for m in received(plc, 2.0) if m["type"] == "verdict"]
            refused_subs = {name: received(s, 0.2) for name, s in subs.items()}
            frames = app.registry.get_sample_value(
                "inspectd_frames_received_total", {"line": settings.line, "source": "camera"}
            )
            counts = {
                (sock, ev): peer_events(app, settings.line, sock, ev)
                for sock in ("camera", "publisher")
                for ev in ("connected", "auth_failed", "handshake_failed")
            }
            for s in [plc, *subs.values(), *cams.values()]:
                s.close(linger=0)
    finally:
        ctx.destroy(linger=0)  # closes whatever an assertion left open; term() would wait for it
    assert [m["frame_id"] for m in got] == ["from-cam"] and got[0]["reason"] == "model"
    assert frames == 1  # nothing from a refused camera was ever admitted
    assert refused_subs == {"intruder": [], "plain": [], "camera-key": []}
    assert counts[("camera", "connected")] >= 1 and counts[("publisher", "connected")] >= 1
    assert counts[("camera", "auth_failed")] >= 2  # the unknown key and the subscriber's key
    assert counts[("publisher", "auth_failed")] >= 2  # the unknown key and the camera's key
    assert counts[("camera", "handshake_failed")] >= 1 and counts[("publisher", "handshake_failed")] >= 1


@pytest.mark.timeout(60)
def test_curve_start_up_errors_name_the_setting(
    package: ModelPackage, keys: dict[str, Path], tmp_path: Path
) -> None:
    from daemon.app import App, StartupError

    bad = curve_settings(package, keys).model_copy(
        update={
            "security": curve_settings(package, keys).security.model_copy(
                update={"camera_clients": tmp_path / "no"}
            )
        }
    )
    with pytest.raises(StartupError, match="security.camera_clients"):
        App(bad).start()


def _verdicts_counted(app: Any) -> float:
    return sum(
        s.value
        for metric in app.registry.collect()
        if metric.name == "inspectd_verdicts"
        for s in metric.samples
        if s.name == "inspectd_verdicts_total"
    )


@pytest.mark.timeout(60)
def test_metrics_expose_nothing_sensitive(
    package: ModelPackage, keys: dict[str, Path], tmp_path: Path
) -> None:
    audit, folder = tmp_path / "audit-archive", tmp_path / "watched"
    folder.mkdir()
    settings = curve_settings(
        package,
        keys,
        audit={"enabled": True, "path": str(audit)},
        sources={
            "camera": {"endpoint": "tcp://127.0.0.1:*"},
            "folder": {"enabled": True, "path": str(folder), "journal": str(tmp_path / "journal.jsonl")},
        },
    )
    secret_z85 = keys["server_secret"].read_text().split('secret-key = "')[1].split('"')[0]
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        with running_app(settings) as app:
            assert app.camera_endpoint and app.metrics_port
            cam = client(ctx, zmq.PUSH, app.camera_endpoint, keys, "cam")
            cam.send_multipart(camera_message("SECRET-PART-ID-../../etc", IMG))
            (folder / "customer-order-4711.png").write_bytes(b"not an image")
            # Both frames through: admitted, decided and their verdicts published (and counted).
            wait_until(
                lambda: _verdicts_counted(app) >= 2, 10, "the camera's and the folder's verdicts counted"
            )
            base = f"http://127.0.0.1:{app.metrics_port}"
            with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
                body = r.read().decode()
                server_header = r.headers.get("Server", "")
            statuses = {}
            for method, path in (
                ("GET", "/"),
                ("GET", "/debug"),
                ("POST", "/metrics"),
                ("GET", "/../etc/passwd"),
            ):
                req = urllib.request.Request(base + path, method=method)
                try:
                    with urllib.request.urlopen(req, timeout=5) as r:
                        statuses[(method, path)] = r.status
                except urllib.error.HTTPError as e:
                    statuses[(method, path)] = e.code
            cam.close(linger=0)
    finally:
        ctx.destroy(linger=0)  # closes whatever an assertion left open; term() would wait for it
    assert "inspectd_verdicts_total" in body  # the scrape itself worked
    for sensitive in (
        secret_z85,
        str(keys["server_secret"].parent),
        str(package.directory),
        str(audit),
        str(folder),
        "journal",
        "SECRET-PART-ID",
        "customer-order",
    ):
        assert sensitive not in body, f"/metrics exposes {sensitive!r}"
    assert statuses == {
        ("GET", "/"): 404,
        ("GET", "/debug"): 404,
        ("POST", "/metrics"): 501,
        ("GET", "/../etc/passwd"): 404,
    }
    assert "Python" not in server_header


@pytest.mark.timeout(60)
def test_a_plaintext_endpoint_off_loopback_is_warned_about(package: ModelPackage) -> None:
    from structlog.testing import capture_logs

    exposed = daemon_settings(package.directory, publisher={"endpoint": "tcp://0.0.0.0:*"})
    loopback = daemon_settings(package.directory)
    with capture_logs() as logs, running_app(exposed):
        pass
    with capture_logs() as quiet, running_app(loopback):
        pass
    warned = [e for e in logs if e["event"].startswith("endpoints reachable from the network without CURVE")]
    assert len(warned) == 1 and warned[0]["endpoints"] == ["tcp://0.0.0.0:*"]
    assert not [e for e in quiet if e["event"].startswith("endpoints reachable")]
