"""Generate ZeroMQ CURVE key pairs for the daemon, its cameras and its line controllers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

USAGE = """\
Set up (one pair per party; only public *.key files are ever copied):
  station:     inspectd keys generate /etc/inspectd/keys --name server
  each camera: inspectd keys generate DIR --name cam1   -> copy cam1.key into security.camera_clients
  each PLC:    inspectd keys generate DIR --name plc1   -> copy plc1.key into security.subscriber_clients
  copy the station's server.key (public) to every camera and PLC gateway.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = USAGE
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    gen = sub.add_parser("generate", help="write NAME.key (public) and NAME.key_secret (0600) into DIR")
    gen.add_argument("directory", type=Path, metavar="DIR")
    gen.add_argument("--name", default="server", help="key pair name (default: server)")
    gen.add_argument("--force", action="store_true", help="replace an existing pair of that name")


def run(args: argparse.Namespace) -> int:
    from daemon.security import SecurityError, generate_keys

    try:
        public, secret = generate_keys(args.directory, args.name, force=args.force)
    except (SecurityError, OSError) as exc:
        print(f"inspectd keys: {exc}", file=sys.stderr)
        return 1
    print(f"public key: {public}\nsecret key: {secret} (mode 0600: keep it on this machine)")
    return 0
