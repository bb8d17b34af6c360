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
    s = Settings()
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises its own ValidationError type
        s.line = "x"
