"""Serve the daemon's verdicts to PLCs: an OPC UA server and a Modbus TCP server with a result handshake.

A separate process (systemd/inspectd-plc-bridge.service) that subscribes to the daemon's verdict stream like
any subscriber. Configuration: its own TOML file (systemd/plc-bridge.toml; INSPECTD_PLC_* variables override
it). Exit codes: 0 after a clean stop (SIGTERM/SIGINT), 1 when start-up fails (a port in use) or the
subscriber dies, 2 on a configuration error (or without the ``plc`` extra). docs/plc.md has the address
space, the register map and the handshake.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import signal
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="TOML config file (default: /etc/inspectd/plc-bridge.toml when present)"
    )
    parser.add_argument(
        "--check-config", action="store_true", help="validate the configuration, print it as TOML and exit"
    )
    parser.add_argument("--log-format", choices=("auto", "json", "console"), help="overrides logging.format")


def run(args: argparse.Namespace) -> int:
    from daemon.settings import ConfigError, to_toml
    from plc.settings import load_plc_settings

    overrides: dict[str, Any] = {}
    if args.log_format is not None:
        overrides["logging"] = {"format": args.log_format}
    try:
        settings = load_plc_settings(args.config, overrides)
    except ConfigError as exc:
        print(f"inspectd plc-bridge: {exc}", file=sys.stderr)
        return 2
    missing = [
        f"{module} ({key}.enabled)"
        for module, key, on in (
            ("asyncua", "opcua", settings.opcua.enabled),
            ("pymodbus", "modbus", settings.modbus.enabled),
        )
        if on and importlib.util.find_spec(module) is None
    ]
    if missing:
        print(
            f"inspectd plc-bridge: not installed: {', '.join(missing)}; pip install 'inspectd[plc]'",
            file=sys.stderr,
        )
        return 2
    if args.check_config:
        print(to_toml(settings), end="")
        return 0

    from daemon.logs import configure_logging, get_logger
    from plc.bridge import PlcBridge

    configure_logging(level=settings.logging.level, fmt=settings.logging.format, line=settings.line)
    log = get_logger("inspectd.plc")

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)  # only sets the event; run() stops in order
        try:
            return await PlcBridge(settings).run(stop)
        except ConfigError as exc:  # a key file that cannot be read: found only at start
            log.error("start-up failed: configuration error", error=str(exc))
            return 2
        except (OSError, RuntimeError) as exc:  # a port in use, an address not on this host
            log.error("start-up failed", error=f"{type(exc).__name__}: {exc}")
            return 1

    return asyncio.run(main())
