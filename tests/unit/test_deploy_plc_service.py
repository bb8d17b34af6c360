"""systemd/inspectd-plc-bridge.service and systemd/plc-bridge.toml: the PLC bridge as a station runs it.

systemd-analyze checks syntax and exposure; the rest checks the contract between the files: the unit runs the
verb with the example file, the example is valid and points at the daemon's example (same line, its publisher
endpoint, a heartbeat timeout of a few of its heartbeats), and a bad configuration fails the start (exit 2,
which the unit does not restart) naming the key.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.settings import load_settings
from inspectd.cli import main
from plc.settings import load_plc_settings
from tests.deploy_support import (
    REPO,
    SHIPPED_ENTRY_POINT,
    assert_exposure_at_most,
    assert_unit_verifies,
)
from tests.unit.test_deploy_service import (
    EXAMPLE_TOML,
    MAX_EXPOSURE,
    _seconds,
    unit_entries,
)

UNIT = REPO / "systemd" / "inspectd-plc-bridge.service"
EXAMPLE = REPO / "systemd" / "plc-bridge.toml"


def values(section: str, key: str) -> list[str]:
    return [v for s, k, v in unit_entries(UNIT.read_text(encoding="utf-8")) if s == section and k == key]


def value(section: str, key: str) -> str:
    found = values(section, key)
    assert len(found) == 1, f"[{section}] {key}= set {len(found)} times"
    return found[0]


def test_unit_runs_the_bridge_with_the_example_config_as_a_restartable_notify_service() -> None:
    assert value("Service", "ExecStart") == (
        f"{SHIPPED_ENTRY_POINT} plc-bridge --config /etc/inspectd/{EXAMPLE.name}"
    )
    assert value("Service", "Type") == "notify" and _seconds(value("Service", "WatchdogSec")) > 0
    assert value("Service", "Restart") == "on-failure"
    assert (
        value("Service", "RestartPreventExitStatus") == "2"
    )  # a configuration error: restarting cannot help
    assert value("Service", "User") not in ("", "root", "0")
    # Port 502, and no other privilege.
    assert value("Service", "AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert value("Service", "CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    # The daemon's restart is reported by the bridge, never a reason to stop it: ordering only.
    assert "inspectd.service" in value("Unit", "After").split()
    for key in ("Requires", "BindsTo", "PartOf"):
        assert not values("Unit", key), key
    assert {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"} <= set(
        value("Service", "RestrictAddressFamilies").split()
    )


@pytest.mark.timeout(60)
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    assert_unit_verifies(UNIT, tmp_path)


@pytest.mark.timeout(60)
def test_systemd_security_exposure_is_low() -> None:
    assert_exposure_at_most(UNIT, MAX_EXPOSURE)


def test_example_config_is_valid_and_follows_the_daemons_example() -> None:
    plc = load_plc_settings(EXAMPLE)  # raises ConfigError naming any unknown or invalid key
    daemon = load_settings(EXAMPLE_TOML)
    assert plc.line == daemon.line
    assert plc.subscriber.endpoint == daemon.publisher.endpoint
    assert (
        2 * daemon.publisher.heartbeat_ms
        <= plc.subscriber.heartbeat_timeout_ms
        <= 10 * daemon.publisher.heartbeat_ms
    )
    assert plc.metrics.port != daemon.metrics.port
    assert plc.modbus.port == 502 and plc.opcua.enabled and plc.modbus.enabled
    # The systemd watchdog must outlast the bridge's own silence detection by far (it is fed every tick).
    assert _seconds(value("Service", "WatchdogSec")) > plc.subscriber.heartbeat_timeout_ms / 1000


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ("[modbus]\nport = 70000\n", "modbus.port"),
        ("[modbus]\nslotz = 3\n", "modbus.slotz: unknown key"),
        (
            "[handshake]\nbuffer_size = 4\n[modbus]\nslots = 8\n",
            "modbus.slots (8) must be ≤ handshake.buffer_size",
        ),
        ('[opcua]\ncertificate = "/x.der"\n', "opcua.private_key, opcua.trusted_clients"),
        ('[opcua]\nendpoint = "http://x:1"\n', "opcua.endpoint"),
        ('[subscriber]\nendpoint = "tcp://localhost"\n', "subscriber.endpoint"),
        ("[subscriber]\nheartbeat_timeout_ms = 0\n", "subscriber.heartbeat_timeout_ms"),
        ('line = "a b"\n', "line"),
        ("[opcua]\nenabled = false\n[modbus]\nenabled = false\n", "would serve no PLC"),
    ],
)
def test_bad_config_fails_the_start_naming_the_field(
    tmp_path: Path, toml: str, named: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INSPECTD_PLC_MODBUS__PORT", raising=False)
    config = tmp_path / "bridge.toml"
    config.write_text(toml, encoding="utf-8")
    assert main(["plc-bridge", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert named in err and str(config) in err, err


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSPECTD_PLC_MODBUS__PORT", "1502")
    monkeypatch.setenv("INSPECTD_PLC_HANDSHAKE__BUFFER_SIZE", "64")
    s = load_plc_settings(EXAMPLE)
    assert s.modbus.port == 1502 and s.handshake.buffer_size == 64


def test_check_config_prints_a_file_the_bridge_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plc-bridge", "--check-config", "--config", str(EXAMPLE)]) == 0
    printed = tmp_path / "printed.toml"
    printed.write_text(capsys.readouterr().out, encoding="utf-8")
    assert load_plc_settings(printed) == load_plc_settings(EXAMPLE)
