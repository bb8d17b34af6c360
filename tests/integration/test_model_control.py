"""Issue 15, the control channel and the other ways a model arrives (real App in-process, real ZeroMQ, real ONNX
Runtime): CURVE on the control socket answers operator keys only; an ipc:// control socket found through the
config file, its file group-only; malformed requests answered with their error; the package watcher loading a
new package as a shadowing candidate once its copy is complete; a gauges-only change (new bands, same network)
swapping between two batches under a model id of its own."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from daemon.control import ControlClient, ControlError, ControlRefused
from daemon.settings import to_toml
from engine.gauges import Band, GaugeSet
from engine.package import Decision, ModelPackage, load_package, write_meta
from engine.pose import PoseParams, estimate_pose
from tests.helpers import tiny_package, wait_until
from tests.integration.daemon_harness import (
    CameraPusher,
    VerdictCollector,
    curve_keys,
    daemon_settings,
    running_app,
)
from tests.integration.model_support import model_cli
from tools.synth import render_screw
from training.gauge_fit import learn_bands

pytestmark = pytest.mark.integration

IMG = np.full((64, 64), 90, np.uint8)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return curve_keys(tmp_path_factory.mktemp("keys"))


@pytest.mark.timeout(90)
def test_control_over_curve_answers_operator_keys_only(
    package: ModelPackage, keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    settings = daemon_settings(
        package.directory,
        security={
            "server_secret_key": str(keys["server_secret"]),
            "camera_clients": str(keys["cameras"]),
            "subscriber_clients": str(keys["subscribers"]),
            "control_clients": str(keys["operators"]),
        },
    )
    with running_app(settings) as app:
        endpoint = app.control_endpoint
        assert endpoint is not None

        def client(secret: str | None, timeout_s: float = 1.5) -> ControlClient:
            if secret is None:
                return ControlClient(endpoint, timeout_s=timeout_s)
            return ControlClient(
                endpoint,
                timeout_s=timeout_s,
                server_public_key=keys["server_public"],
                client_secret_key=keys[secret],
            )

        assert client("operator", 10).status()["state"] == "serving"
        # An unknown key, a key allowed on the camera socket only, and no CURVE at all: never an answer.
        for secret in ("intruder", "cam", None):
            with pytest.raises(ControlError, match="no answer") as refused:
                client(secret).status()
            assert not isinstance(refused.value, ControlRefused)
        # The CLI: an operator key works, the intruder's does not (exit 3: no answer).
        args = ["--server-key", str(keys["server_public"]), "--timeout", "1.5"]
        assert model_cli("status", *args, "--key", str(keys["operator"]), endpoint=endpoint) == 0
        assert "state       serving" in capsys.readouterr().out
        assert model_cli("status", *args, "--key", str(keys["intruder"]), endpoint=endpoint) == 3
        assert "no answer" in capsys.readouterr().err

        def events(event: str) -> float:
            return (
                app.registry.get_sample_value(
                    "inspectd_peer_events_total", {"line": settings.line, "socket": "control", "event": event}
                )
                or 0
            )

        wait_until(lambda: events("auth_failed") >= 3, 10, "refused control clients counted")
        assert events("handshake_failed") >= 1  # the plain client
        assert client("operator", 10).status()["production"]["model"] == package.meta.model_id


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a Unix socket path is limited to ~107 bytes."""
    d = Path(tempfile.mkdtemp(prefix="ictl-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.timeout(60)
def test_control_over_ipc_is_found_through_the_config_and_open_to_the_group_only(
    package: ModelPackage, short_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = short_dir / "control.sock"
    settings = daemon_settings(package.directory, control={"endpoint": f"ipc://{sock}"})
    config = tmp_path / "inspectd.toml"
    config.write_text(to_toml(settings), encoding="utf-8")
    with running_app(settings) as app:
        assert app.control_endpoint == f"ipc://{sock}"
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
        capsys.readouterr()
        assert model_cli_config("status", "--json", config=config) == 0
        out = capsys.readouterr().out  # the in-process daemon logs to the same stream
        status, _ = json.JSONDecoder().raw_decode(out[out.index("{\n") :])
        assert status["state"] == "serving" and status["production"]["model"] == package.meta.model_id


def test_a_control_endpoint_that_cannot_be_bound_fails_start_up_naming_it(
    package: ModelPackage, tmp_path: Path
) -> None:
    from daemon.app import App, StartupError

    endpoint = f"ipc://{tmp_path}/no-such-dir/control.sock"
    with pytest.raises(
        StartupError, match=r"^control\.endpoint ipc://.*/no-such-dir/control\.sock: cannot bind"
    ):
        App(daemon_settings(package.directory, control={"endpoint": endpoint})).start()


def model_cli_config(*args: str, config: Path) -> int:
    from inspectd.cli import main

    return main(["model", *args, "--config", str(config)])


@pytest.mark.timeout(60)
def test_malformed_requests_are_answered_with_their_error(package: ModelPackage) -> None:
    with running_app(daemon_settings(package.directory)) as app:
        endpoint = app.control_endpoint
        assert endpoint is not None
        ctx = zmq.Context.instance()
        for raw, message in (
            (b"reboot now", "a request is a JSON object"),
            (b"[1, 2]", "a JSON object with"),
        ):
            s = ctx.socket(zmq.REQ)
            s.linger = 0
            s.connect(endpoint)
            s.send(raw)
            assert s.poll(10_000)
            reply = json.loads(s.recv())
            s.close()
            assert reply["ok"] is False and message in reply["error"], reply
        client = ControlClient(endpoint)
        for command, args, message in (
            ("reboot", {}, "unknown command 'reboot'"),
            ("promote", {"force": True}, "promote: unknown argument(s) ['force']"),
            ("load", {"path": "models/v2"}, "load: path must be an absolute directory path"),
            ("load", {"path": "/models/v2", "shadow": "yes"}, "load: shadow must be true or false"),
            ("drop", {"role": "production"}, "cannot drop 'production'"),
        ):
            with pytest.raises(ControlRefused) as refused:
                client.request(command, **args)
            assert message in str(refused.value), (command, refused.value)
        assert client.status()["state"] == "serving"  # still answering, nothing changed
        assert app.pipeline is not None and app.pipeline.threads_alive()


@pytest.mark.timeout(90)
def test_the_watcher_loads_a_complete_new_package_as_a_shadowing_candidate(tmp_path: Path) -> None:
    pkg, other = tmp_path / "pkg", tmp_path / "other"
    tiny_package(pkg, input_size=(32, 32), seed=0)
    tiny_package(other, input_size=(32, 32), seed=9, name="other")
    served, new = load_package(pkg).meta.model_id, load_package(other).meta.model_id
    settings = daemon_settings(
        pkg, model={"path": str(pkg), "intra_op_threads": 1, "watch_s": 0.05, "watch_action": "shadow"}
    )

    def sample(app: Any, name: str, **labels: str) -> float:
        return app.registry.get_sample_value(name, {"line": settings.line, **labels}) or 0.0

    with (
        running_app(settings) as app,
        VerdictCollector(app.publisher_endpoint, settings.line) as sub,
        CameraPusher(app.camera_endpoint) as cam,
    ):
        client = ControlClient(app.control_endpoint or "")
        shutil.copyfile(other / "model.onnx", pkg / "model.onnx")  # a copy half done: ONNX only
        wait_until(lambda: sample(app, "inspectd_model_package_changed") == 1, 10, "the half copy seen")
        assert client.status()["candidate"] is None  # an inconsistent package is not even tried
        assert sample(app, "inspectd_model_loads_total", result="refused") == 0
        shutil.copyfile(other / "model.json", pkg / "model.json")  # now a consistent, different package
        wait_until(
            lambda: (client.status()["candidate"] or {}).get("model") == new, 30, "the candidate loaded"
        )
        status = client.status()
        assert status["state"] == "shadow" and status["candidate"]["origin"] == "watcher"
        assert status["production"]["model"] == served  # never promoted by the watcher
        for i in range(6):
            cam.send(f"f{i}", IMG)
        assert {v["model"] for v in sub.wait_verdicts(6)} == {served}
        wait_until(lambda: client.status()["shadow"]["scored"] >= 6, 20, "the candidate shadowing")
        record = client.request("promote")
        cam.send("after", IMG)
        after = sub.wait_verdicts(7)[6]
        # Production is what is on disk now: the watcher says the package is the served one.
        wait_until(lambda: sample(app, "inspectd_model_package_changed") == 0, 10, "the package served")
    assert record["first_seq"] == 7 and after["model"] == new
    assert sample(app, "inspectd_model_loads_total", result="loaded") == 1


@pytest.mark.timeout(90)
def test_a_gauges_only_change_swaps_between_two_batches_under_its_own_model_id(tmp_path: Path) -> None:
    ok = [render_screw(400 + i)[0] for i in range(10)]
    params = PoseParams()
    lengths = [estimate_pose(img, params).measurements.length_px for img in ok]
    base, tight = tmp_path / "base", tmp_path / "tight"
    tiny_package(base, input_size=(64, 64), seed=3)
    measured = [estimate_pose(img, params).measurements for img in ok]
    wide = GaugeSet(bands=learn_bands(measured), pose=params.to_dict(), n_ok=len(ok))
    # threshold 1.0: the model passes every part, so a REJECT is the gauges'
    meta = dataclasses.replace(
        load_package(base).meta, decision=Decision(threshold=1.0), gauges=wide.to_dict()
    )
    write_meta(base, meta)
    shutil.copytree(base, tight)
    cut = float(np.median(lengths))  # the new band rejects the shorter half of these parts
    bands = tuple(Band("length_px", cut, b.high) if b.name == "length_px" else b for b in wide.bands)
    write_meta(tight, dataclasses.replace(meta, gauges=dataclasses.replace(wide, bands=bands).to_dict()))
    a, b = load_package(base), load_package(tight)
    assert a.meta.model_id == b.meta.model_id  # same name, same network: only model.json differs
    b_id = f"{a.meta.model_id}+{hashlib.sha256((tight / 'model.json').read_bytes()).hexdigest()[:8]}"
    settings = daemon_settings(base, batching={"max_batch": 4})
    with (
        running_app(settings) as app,
        VerdictCollector(app.publisher_endpoint, settings.line) as sub,
        CameraPusher(app.camera_endpoint) as cam,
    ):
        client = ControlClient(app.control_endpoint or "")
        for i, img in enumerate(ok):
            cam.send(f"before-{i}", img)
        sub.wait_verdicts(len(ok), timeout=30)
        assert client.load(tight)["model"] == b_id
        record = client.request("promote")
        for i, img in enumerate(ok):
            cam.send(f"after-{i}", img)
        verdicts = sub.wait_verdicts(2 * len(ok), timeout=30)
    assert record["first_seq"] == len(ok) + 1 and record["to"] == b_id
    by_id = {v["frame_id"]: v for v in verdicts}
    for i, length in enumerate(lengths):
        before, after = by_id[f"before-{i}"], by_id[f"after-{i}"]
        assert (before["model"], before["verdict"], before["reason"]) == (a.meta.model_id, "PASS", "model")
        assert after["model"] == b_id
        if length < cut:
            assert (after["verdict"], after["reason"]) == ("REJECT", "out_of_tolerance"), after
            assert after["detail"]["gauges"][0]["name"] == "length_px"
        else:
            assert (after["verdict"], after["reason"]) == ("PASS", "model"), after
    assert any(length < cut for length in lengths) and any(length >= cut for length in lengths)
