"""Security defaults and key handling: loopback by default, CURVE all-or-nothing, keys written safely."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import zmq.auth

from daemon.security import SecurityError, generate_keys, is_loopback, load_secret_key
from daemon.settings import ConfigError, Settings, load_settings
from inspectd.cli import main

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("INSPECTD_"):
            monkeypatch.delenv(key)


def test_everything_binds_to_loopback_and_curve_is_off_by_default() -> None:
    s = load_settings(None)
    assert is_loopback(s.sources.camera.endpoint) and is_loopback(s.publisher.endpoint)
    assert s.metrics.host == "127.0.0.1"
    assert not s.security.curve


@pytest.mark.parametrize(
    "endpoint, loopback",
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.3.0.1:*", True),
        ("tcp://[::1]:5556", True),
        ("tcp://localhost:5555", True),
        ("ipc:///run/inspectd/cam", True),
        ("tcp://*:5555", False),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://192.168.1.20:5555", False),
        ("tcp://eth0:5555", False),
    ],
)
def test_is_loopback(endpoint: str, loopback: bool) -> None:
    assert is_loopback(endpoint) is loopback


def test_curve_needs_all_three_settings(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[security]\nserver_secret_key = "{tmp_path}/server.key_secret"\n')
    with pytest.raises(ConfigError, match=r"missing security\.camera_clients, security\.subscriber_clients"):
        load_settings(cfg)
    full = Settings.model_validate(
        {
            "security": {
                "server_secret_key": "/k/s.key_secret",
                "camera_clients": "/k/c",
                "subscriber_clients": "/k/p",
            }
        }
    )
    assert full.security.curve


def test_keys_generate_writes_a_private_secret_and_refuses_to_overwrite(tmp_path: Path) -> None:
    public, secret = generate_keys(tmp_path / "keys", "server")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    pub_from_public, none = zmq.auth.load_certificate(public)
    pub_from_secret, sec = load_secret_key(secret)
    assert none is None and sec and pub_from_public == pub_from_secret
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["server.key", "server.key_secret"]
    with pytest.raises(SecurityError, match="exists already"):
        generate_keys(tmp_path / "keys", "server")
    _, again = generate_keys(tmp_path / "keys", "server", force=True)
    assert load_secret_key(again)[1] != sec  # a new pair


def test_keys_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "generate", str(tmp_path), "--name", "cam1"]) == 0
    assert "cam1.key_secret" in capsys.readouterr().out
    assert main(["keys", "generate", str(tmp_path), "--name", "cam1"]) == 1
    assert main(["keys", "generate", str(tmp_path), "--name", "../escape"]) == 1
    assert not (tmp_path.parent / "escape.key").exists()


def test_a_public_key_file_is_not_accepted_as_the_server_secret(tmp_path: Path) -> None:
    public, _ = generate_keys(tmp_path, "server")
    with pytest.raises(SecurityError, match="holds no secret key"):
        load_secret_key(public)
    with pytest.raises(SecurityError, match="does not exist"):
        load_secret_key(tmp_path / "nope.key_secret")
