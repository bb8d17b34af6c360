"""Change the model of a running daemon, without a restart: load a candidate, shadow it, promote it, roll back.

  inspectd model load DIR [--shadow]         verify, check against production's input, warm up: a candidate
  inspectd model status [--json]             production, candidate, previous, state, shadow tallies
  inspectd model shadow on|off               the candidate scores production's frames (never the PLC's)
  inspectd model promote                     the candidate decides from the next batch on
  inspectd model rollback                    the previous model decides again, the same way
  inspectd model drop [previous|candidate]   unload it (previous: no rollback after this)

The daemon is found at control.endpoint of the configuration (--config, default /etc/inspectd/inspectd.toml
when present) or at --endpoint. With security.control_clients it is a CURVE server: pass --key (an operator's
NAME.key_secret whose NAME.key is in that directory); the daemon's public key comes from --server-key, or from
security.server_secret_key when this user may read it. Exit status: 0 done, 1 refused by the daemon (the reason
is printed), 2 bad arguments or configuration, 3 no answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from daemon.control import ControlClient

EXIT_REFUSED, EXIT_CONFIG, EXIT_NO_ANSWER = 1, 2, 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        help="the daemon's TOML config (default: /etc/inspectd/inspectd.toml when present)",
    )
    common.add_argument("--endpoint", help="the daemon's control endpoint (overrides control.endpoint)")
    common.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for each answer (default 10)"
    )
    common.add_argument("--key", type=Path, help="this operator's CURVE secret key (NAME.key_secret)")
    common.add_argument("--server-key", type=Path, help="the daemon's CURVE public key (server.key)")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    load = sub.add_parser("load", parents=[common], help="load a model package as the candidate")
    load.add_argument("directory", type=Path, metavar="DIR", help="the package (model.onnx + model.json)")
    load.add_argument("--shadow", action="store_true", help="shadow-score production's frames once loaded")
    load.add_argument(
        "--wait", type=float, default=600.0, help="seconds to wait for the load and warm-up (default 600)"
    )
    status = sub.add_parser(
        "status", parents=[common], help="production, candidate, previous and shadow tallies"
    )
    status.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    shadow = sub.add_parser("shadow", parents=[common], help="start or stop shadow scoring of the candidate")
    shadow.add_argument("state", choices=("on", "off"))
    sub.add_parser("promote", parents=[common], help="make the candidate production, between two batches")
    sub.add_parser("rollback", parents=[common], help="make the previous model production again")
    drop = sub.add_parser("drop", parents=[common], help="unload the previous model (or the candidate)")
    drop.add_argument("role", nargs="?", default="previous", choices=("previous", "candidate"))


class _Usage(Exception):
    """Bad arguments or configuration (exit 2)."""


def client_for(args: argparse.Namespace) -> ControlClient:
    """A ControlClient for the daemon that ``args`` (--config, --endpoint, keys) point at."""
    from daemon.control import ControlClient
    from daemon.settings import ConfigError, load_settings

    needed = args.endpoint is None or (args.key is not None and args.server_key is None)
    try:
        settings = load_settings(args.config) if needed else None
    except ConfigError as exc:
        raise _Usage(str(exc)) from None
    endpoint = args.endpoint or (settings.control.endpoint if settings is not None else None)
    if settings is not None and not settings.control.enabled and args.endpoint is None:
        raise _Usage("the configuration has control.enabled = false: the daemon has no control socket")
    if endpoint is None or endpoint.endswith(":*"):
        raise _Usage(
            f"control endpoint {endpoint!r} is ephemeral: pass --endpoint (the daemon's ready line says it)"
        )
    server_key, key = args.server_key, args.key
    if key is None and settings is not None and settings.security.control_clients is not None:
        raise _Usage(
            "the daemon's control socket uses CURVE (security.control_clients): pass --key NAME.key_secret"
        )
    if key is not None and server_key is None:
        server_key = settings.security.server_secret_key if settings is not None else None
        if server_key is None:
            raise _Usage("--key needs the daemon's public key: pass --server-key server.key")
    try:
        return ControlClient(
            endpoint, timeout_s=args.timeout, server_public_key=server_key, client_secret_key=key
        )
    except ValueError as exc:
        raise _Usage(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from daemon.control import ControlError, ControlRefused

    try:
        client = client_for(args)
        return _ACTIONS[args.action](client, args)
    except _Usage as exc:
        print(f"inspectd model: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ControlRefused as exc:
        print(f"inspectd model {args.action}: refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except (ControlError, OSError) as exc:
        print(f"inspectd model {args.action}: {exc}", file=sys.stderr)
        return EXIT_NO_ANSWER


def _load(client: ControlClient, args: argparse.Namespace) -> int:
    record = client.load(args.directory, shadow=args.shadow, wait_s=args.wait)
    shadow = ", shadow scoring on" if record.get("shadow") else ""
    print(f"loaded {record['model']} as the candidate{shadow} ({record['seconds']} s)")
    return 0


def _status(client: ControlClient, args: argparse.Namespace) -> int:
    status = client.status()
    print(json.dumps(status, indent=2) if args.json else describe(status))
    return 0


def _shadow(client: ControlClient, args: argparse.Namespace) -> int:
    reply = client.request("shadow", on=args.state == "on")
    print(f"shadow scoring {args.state} for {reply['candidate']}")
    return 0


def _promote(client: ControlClient, args: argparse.Namespace) -> int:
    r = client.request("promote")
    print(f"promoted {r['to']} (was {r['from']}, kept as previous); it decides from seq {r['first_seq']} on")
    return 0


def _rollback(client: ControlClient, args: argparse.Namespace) -> int:
    r = client.request("rollback")
    print(f"rolled back to {r['to']} (from {r['from']}); it decides from seq {r['first_seq']} on")
    return 0


def _drop(client: ControlClient, args: argparse.Namespace) -> int:
    r = client.request("drop", role=args.role)
    print(f"dropped the {r['dropped']} model {r['model']}")
    return 0


_ACTIONS = {
    "load": _load,
    "status": _status,
    "shadow": _shadow,
    "promote": _promote,
    "rollback": _rollback,
    "drop": _drop,
}


def describe(status: dict[str, Any]) -> str:
    """``inspectd model status`` for a person."""

    def model(m: dict[str, Any] | None) -> str:
        if m is None:
            return "—"
        grey = f", grey zone {m['grey_zone']}" if m.get("grey_zone") else ""
        gauges = f", gauges {','.join(m['gauges'])}" if m.get("gauges") else ""
        return (
            f"{m['model']}  threshold {m['threshold']:g}{grey}{gauges}  "
            f"({m['backend'].get('backend')} {m['backend'].get('precision')}; {m['path']}; "
            f"loaded {m['loaded_at']} by {m['origin']})"
        )

    lines = [
        f"state       {status['state']}",
        f"production  {model(status['production'])}",
        f"candidate   {model(status['candidate'])}",
        f"previous    {model(status['previous'])}",
    ]
    shadow = status.get("shadow")
    if shadow is not None:
        share = shadow["sampled_share"]
        d = shadow["disagreements"]
        core = shadow["core_ms_per_frame"]
        lines.append(
            f"shadow      {'on' if shadow['active'] else 'off'}: {shadow['scored']} of {shadow['offered']} frames "
            f"scored ({'—' if share is None else f'{100 * share:.1f} %'}); disagreements: "
            f"PASS→REJECT {d['pass_reject']}, REJECT→PASS {d['reject_pass']}, "
            f"score (> {shadow['score_tolerance']:g}) {d['score']}; errors {shadow['errors']}"
            + (f"; {core} core-ms per frame" if core is not None else "")
        )
    load = status.get("load") or {}
    if load.get("in_progress"):
        lines.append(f"loading     {load['in_progress']['path']} (since {load['in_progress']['since']})")
    last = load.get("last")
    if last:
        outcome = (
            f"loaded {last.get('model')}"
            if last.get("result") == "loaded"
            else f"refused: {last.get('error')}"
        )
        lines.append(f"last load   {last['path']}: {outcome}")
    for s in status.get("switches", [])[-3:]:
        lines.append(f"switch      {s['at']} {s['action']} {s['from']} → {s['to']} from seq {s['first_seq']}")
    return "\n".join(lines)
