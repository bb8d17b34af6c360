"""The bridge's configuration: its own TOML file (default ``/etc/inspectd/plc-bridge.toml``), read once at start.

The daemon's style (``daemon.settings``): one root :class:`PlcSettings` with a section per concern, every
section forbids unknown keys, validators only validate (files are read at start, not here). Sources, highest
priority first: CLI flags → ``INSPECTD_PLC_*`` environment variables (nested with ``__``, e.g.
``INSPECTD_PLC_MODBUS__PORT=1502``) → the TOML file → defaults. A bad value fails the start (exit 2) with a
message naming the key; ``inspectd plc-bridge --check-config`` prints the effective configuration.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    SettingsConfigDict,
)

from daemon.settings import ConfigError, LineSettings, load_toml_settings

__all__ = ["DEFAULT_CONFIG", "ConfigError", "PlcSettings", "load_plc_settings"]

DEFAULT_CONFIG = Path("/etc/inspectd/plc-bridge.toml")
_ZMQ_ENDPOINT = re.compile(r"^(tcp://(\*|[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\]):(\d{1,5})|ipc://.+|inproc://.+)$")
_OPCUA_ENDPOINT = re.compile(
    r"^opc\.tcp://([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\]):(\d{1,5})(/[A-Za-z0-9._~/\-]*)?$"
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SubscriberSettings(_Section):
    """The daemon's verdict stream (its ``publisher`` section)."""

    endpoint: str = (
        "tcp://127.0.0.1:5556"  # the daemon's publisher.endpoint (a fixed port: the bridge reconnects)
    )
    # No message (verdict or heartbeat) for this long: the daemon is down, fault DAEMON_SILENT. A few of the
    # daemon's publisher.heartbeat_ms (1000 by default).
    heartbeat_timeout_ms: float = Field(default=3000.0, gt=0)
    rcvhwm: int = Field(default=100_000, ge=1)  # messages ZeroMQ may queue for the bridge
    # CURVE, when the daemon has it (security.subscriber_clients): the daemon's public key file and this
    # bridge's secret key file (``inspectd keys generate``). Both or neither.
    server_public_key: Path | None = None
    client_secret_key: Path | None = None

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if not _ZMQ_ENDPOINT.match(v):
            raise ValueError(f"{v!r} is not a ZeroMQ endpoint to connect to (tcp://HOST:PORT, ipc://PATH)")
        return v

    @model_validator(mode="after")
    def _curve_pair(self) -> SubscriberSettings:
        if (self.server_public_key is None) != (self.client_secret_key is None):
            raise ValueError(
                "CURVE needs both subscriber.server_public_key and subscriber.client_secret_key, or neither"
            )
        return self


class HandshakeSettings(_Section):
    # Verdicts a PLC may leave unacknowledged, per protocol; one more is dropped and raises the OVERFLOW fault.
    # Size it for the longest pause of the PLC: parts per second × seconds.
    buffer_size: int = Field(default=32, ge=1, le=65535)


class OpcUaSettings(_Section):
    enabled: bool = True
    endpoint: str = "opc.tcp://127.0.0.1:4840/inspectd"  # bind address and the URL clients are given
    namespace: str = Field(default="urn:inspectd:plc", min_length=1)
    # Basic256Sha256 (Sign & Encrypt) with certificates: all three set, or none (then no security, anonymous:
    # keep the endpoint on loopback or a closed network). With them, only clients whose certificate is in
    # trusted_clients (DER or PEM files) get a session, identified by that certificate; anonymous is refused.
    certificate: Path | None = None  # the bridge's certificate (DER or PEM)
    private_key: Path | None = None  # its private key (PEM)
    trusted_clients: Path | None = None  # directory of client certificates allowed in

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        m = _OPCUA_ENDPOINT.match(v)
        if not m or int(m.group(2)) > 65535:
            raise ValueError(f"{v!r} is not an OPC UA endpoint (opc.tcp://HOST:PORT[/PATH])")
        return v

    @model_validator(mode="after")
    def _all_or_nothing(self) -> OpcUaSettings:
        given = {k: getattr(self, k) is not None for k in ("certificate", "private_key", "trusted_clients")}
        if any(given.values()) and not all(given.values()):
            missing = [f"opcua.{k}" for k, v in given.items() if not v]
            raise ValueError(f"OPC UA security needs all three of its keys; missing {', '.join(missing)}")
        return self

    @property
    def secured(self) -> bool:
        return self.certificate is not None


class ModbusSettings(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"  # the address to listen on (the PLC network's, on a station)
    port: int = Field(default=502, ge=0, le=65535)  # 502: the unit grants CAP_NET_BIND_SERVICE; 0 = ephemeral
    # Result slots in the register map (the oldest unacknowledged verdicts); at most handshake.buffer_size.
    # 13 slots keep the whole map within one read of 125 registers.
    slots: int = Field(default=8, ge=1, le=64)


class MetricsSettings(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=9118, ge=0, le=65535)  # the daemon's is 9108; 0 = ephemeral (tests)


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "console"] = "auto"  # auto: console on a terminal, JSON otherwise

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v


class PlcSettings(LineSettings):
    model_config = SettingsConfigDict(
        env_prefix="INSPECTD_PLC_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    subscriber: SubscriberSettings = SubscriberSettings()
    handshake: HandshakeSettings = HandshakeSettings()
    opcua: OpcUaSettings = OpcUaSettings()
    modbus: ModbusSettings = ModbusSettings()
    metrics: MetricsSettings = MetricsSettings()
    logging: LoggingSettings = LoggingSettings()

    @model_validator(mode="after")
    def _consistent(self) -> PlcSettings:
        if not (self.opcua.enabled or self.modbus.enabled):
            raise ValueError("opcua.enabled and modbus.enabled are both false: the bridge would serve no PLC")
        if self.modbus.enabled and self.modbus.slots > self.handshake.buffer_size:
            raise ValueError(
                f"modbus.slots ({self.modbus.slots}) must be ≤ handshake.buffer_size "
                f"({self.handshake.buffer_size}): a slot shows a buffered verdict"
            )
        return self


def load_plc_settings(config: Path | None = None, overrides: dict[str, Any] | None = None) -> PlcSettings:
    """The effective settings; :class:`ConfigError` listing every problem by key. Without ``config`` the
    default file is read when it exists."""
    path = config if config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    return load_toml_settings(PlcSettings, path, overrides)
