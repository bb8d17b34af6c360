from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from daemon.settings import Backpressure, ConfigError, Settings, load_settings, to_toml
from inspectd.cli import main


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("INSPECTD_"):
            monkeypatch.delenv(key)


def test_defaults_match_the_issue() -> None:
    s = load_settings(None)
    assert s.sources.camera.endpoint == "tcp://127.0.0.1:5555"
    assert s.publisher.endpoint == "tcp://127.0.0.1:5556"
    assert (s.metrics.host, s.metrics.port) == ("127.0.0.1", 9108)
    assert s.sources.camera.backpressure is Backpressure.REJECT_NEWEST
    assert s.sources.folder.backpressure is Backpressure.BLOCK
    # issue 15: a control socket on loopback beside the other two; the package watcher only logs by default
    assert (s.control.enabled, s.control.endpoint) == (True, "tcp://127.0.0.1:5557")
    assert s.model.watch_action == "log"


def test_control_may_listen_on_the_network_only_with_curve(tmp_path: Path) -> None:
    keys = {name: tmp_path / name for name in ("server.key_secret", "cams", "plcs", "operators")}
    security = {
        "server_secret_key": str(keys["server.key_secret"]),
        "camera_clients": str(keys["cams"]),
        "subscriber_clients": str(keys["plcs"]),
    }
    with pytest.raises(ConfigError, match="control.endpoint tcp://10.0.0.5:5557 is reachable"):
        load_settings(None, {"control": {"endpoint": "tcp://10.0.0.5:5557"}, "security": security})
    s = load_settings(
        None,
        {
            "control": {"endpoint": "tcp://10.0.0.5:5557"},
            "security": {**security, "control_clients": str(keys["operators"])},
        },
    )
    assert s.security.control_clients == keys["operators"]
    for local in ("ipc:///run/inspectd/control.sock", "tcp://localhost:5557", "tcp://[::1]:5557"):
        assert load_settings(None, {"control": {"endpoint": local}}).control.endpoint == local


def test_precedence_override_over_env_over_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('line = "l7"\n[batching]\nmax_batch = 4\nmax_wait_ms = 3\n[model]\npath = "/from/toml"\n')
    monkeypatch.setenv("INSPECTD_BATCHING__MAX_BATCH", "16")
    monkeypatch.setenv("INSPECTD_MODEL__PATH", "/from/env")
    s = load_settings(cfg, {"model": {"path": "/from/cli"}})
    assert s.line == "l7"  # toml
    assert s.batching.max_batch == 16  # env beats toml
    assert s.batching.max_wait_ms == 3.0  # toml value kept beside the env one (deep merge)
    assert str(s.model.path) == "/from/cli"  # CLI beats env


@pytest.mark.parametrize(
    "toml, key",
    [
        ("[batching]\nmax_bach = 4\n", "batching.max_bach: unknown key"),
        ("colour = 1\n", "colour: unknown key"),
        ("[sources.camera]\nbackpressure = 'drop'\n", "sources.camera.backpressure"),
        ("[sources.folder]\nenabled = true\n", "sources.folder.path is required"),
        ("[publisher]\nendpoint = 'localhost:1'\n", "is not a ZeroMQ endpoint"),
        ("line = 'a b'\n", "line id 'a b'"),
        ("[batching]\nmax_batch = 0\n", "batching.max_batch"),
        ("[metrics]\ndrift_window = 50\n", "metrics: Value error, metrics.drift_min_parts"),
        # issue 15: the control socket changes the model, so it never listens on the network without CURVE
        ("[control]\nendpoint = 'tcp://0.0.0.0:5557'\n", "control.endpoint tcp://0.0.0.0:5557 is reachable"),
        (
            "[control]\nendpoint = 'tcp://127.0.0.1:5556'\n",
            "control.endpoint and publisher.endpoint are both",
        ),
        ("[security]\ncontrol_clients = '/etc/inspectd/operators'\n", "security.control_clients needs CURVE"),
        ("[model]\nwatch_action = 'promote'\n", "model.watch_action"),
        ("[shadow]\nscore_tolerance = 0\n", "shadow.score_tolerance"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, toml: str, key: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(")):
        load_settings(cfg)


def test_unknown_nested_env_key_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSPECTD_BATCHING__FOO", "1")
    with pytest.raises(ConfigError, match="batching.foo: unknown key"):
        load_settings(None)


def test_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[batching\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_settings(bad)


def test_effective_config_round_trips_through_toml(tmp_path: Path) -> None:
    s = load_settings(None, {"model": {"path": "/m", "options": {"providers": "x"}}, "line": "l2"})
    text = to_toml(s)
    tomllib.loads(text)
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    assert load_settings(cfg) == s


def test_check_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.helpers import tiny_package

    tiny_package(tmp_path / "pkg", input_size=(16, 16))
    assert main(["check-config", "--model", str(tmp_path / "pkg")]) == 0
    out = capsys.readouterr().out
    assert tomllib.loads(out)["model"]["path"] == str(tmp_path / "pkg")
    assert main(["check-config", "--model", str(tmp_path / "missing")]) == 1
    assert "model.path" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[batching]\nnope = 1\n")
    assert main(["check-config", "--config", str(bad)]) == 2
    assert "batching.nope: unknown key" in capsys.readouterr().err


def test_settings_are_frozen() -> None:
    from pydantic import ValidationError

    s = Settings()
    with pytest.raises(
        ValidationError, match=r"(?s)line\n  Instance is frozen \[type=frozen_instance"
    ) as exc:
        s.line = "x"
    assert [e["type"] for e in exc.value.errors()] == ["frozen_instance"]
    assert s.line == Settings().line  # and the value did not change


@pytest.mark.parametrize(
    "backend, options, message",
    [
        ("onnxruntime", "intra_op_thread = 2", "model.options.intra_op_thread: unknown option 'intra_op_thread' for the onnxruntime backend (did you mean 'intra_op_threads'?); its options are: cuda_device_id, device, disabled_optimizers, intra_op_threads, io_binding, model_file, providers"),
        ("tensorrt", 'precison = "fp16"', "model.options.precison: unknown option 'precison' for the tensorrt backend (did you mean 'precision'?); its options are: allow_ungated, device, engine_file, opt_batch, precision, rebuild, warmup_batch_sizes, workspace_mb"),
        ("torch", 'devise = "cpu"', "model.options.devise: unknown option 'devise' for the torch backend (did you mean 'device'?); its options are: batch_buckets, cuda_graphs, device, precision, threads, weights"),
        ("tensorrt", 'opt_batch = "eight"', "model.options.opt_batch: option 'opt_batch' of the tensorrt backend: Input should be a valid integer"),
        ("onnxruntime", 'device = "tpu"', "model.options.device: option 'device' of the onnxruntime backend: onnxruntime device must be 'cpu' or 'cuda', got 'tpu'"),
        ("torch", 'precision = "fp16"', "model.options.precision: option 'precision' of the torch backend: fp16 is only supported on CUDA"),
    ],
)  # fmt: skip
def test_backend_options_are_checked_when_loaded(
    tmp_path: Path, backend: str, options: str, message: str
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\nbackend = "{backend}"\noptions = {{ {options} }}\n')
    with pytest.raises(ConfigError) as exc:
        load_settings(cfg)
    assert f"\n  {message}" in str(exc.value)


def test_backend_options_are_typed_and_environment_strings_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.backends.onnxruntime import OnnxRuntimeOptions
    from engine.backends.tensorrt import TensorRTOptions

    monkeypatch.setenv("INSPECTD_MODEL__OPTIONS__OPT_BATCH", "4")
    monkeypatch.setenv("INSPECTD_MODEL__OPTIONS__REBUILD", "false")
    s = load_settings(None, {"model": {"backend": "tensorrt"}})
    assert s.model.options == {"opt_batch": "4", "rebuild": "false"}  # as configured: check-config prints it
    assert s.model.backend_options() == TensorRTOptions(opt_batch=4, rebuild=False)
    monkeypatch.delenv("INSPECTD_MODEL__OPTIONS__OPT_BATCH")
    monkeypatch.delenv("INSPECTD_MODEL__OPTIONS__REBUILD")
    # ONNX Runtime's intra_op_threads comes from model.intra_op_threads unless its options set it.
    assert load_settings(None).model.backend_options() == OnnxRuntimeOptions(intra_op_threads=1)
    s = load_settings(None, {"model": {"intra_op_threads": 3, "options": {"model_file": "model.int8.onnx"}}})
    assert s.model.backend_options() == OnnxRuntimeOptions(intra_op_threads=3, model_file="model.int8.onnx")
    s = load_settings(None, {"model": {"intra_op_threads": 3, "options": {"intra_op_threads": 2}}})
    assert s.model.backend_options() == OnnxRuntimeOptions(intra_op_threads=2)


def test_checking_backend_options_loads_no_runtime_and_no_opencv() -> None:
    """The options types live in the backend modules; importing those for a check must not load onnxruntime,
    torch or tensorrt, nor OpenCV (whose pixel limit serve sets after loading the settings)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from daemon.settings import load_settings\n"
        "for kind in ('onnxruntime', 'tensorrt', 'torch'):\n"
        "    load_settings(None, {'model': {'backend': kind, 'options': {'device': 0 if kind == 'tensorrt' else 'cpu'}}})\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('cv2', 'onnxruntime', 'torch', 'tensorrt'))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_check_config_names_a_misspelt_backend_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.helpers import tiny_package

    tiny_package(tmp_path / "pkg", input_size=(16, 16))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\npath = "{tmp_path / "pkg"}"\noptions = {{ io_bindings = true }}\n')
    assert main(["check-config", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "model.options.io_bindings: unknown option 'io_bindings' for the onnxruntime backend" in err
    assert "(did you mean 'io_binding'?)" in err


def test_options_that_bypassed_loading_fail_start_up_as_a_configuration_error(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from daemon.app import App
    from tests.helpers import tiny_package

    tiny_package(tmp_path / "pkg", input_size=(16, 16))
    s = load_settings(
        None,
        {
            "model": {"path": str(tmp_path / "pkg")},
            "sources": {"camera": {"endpoint": "tcp://127.0.0.1:*"}},
            "publisher": {"endpoint": "tcp://127.0.0.1:*"},
            "control": {"endpoint": "tcp://127.0.0.1:*"},
            "metrics": {"enabled": False},
        },
    )
    bad = s.model_copy(update={"model": s.model.model_copy(update={"options": {"treads": 2}})})  # unvalidated
    with pytest.raises(
        ConfigError, match=r"^model\.options\.treads: unknown option 'treads' for the onnxruntime"
    ):
        App(bad, registry=CollectorRegistry()).start()
