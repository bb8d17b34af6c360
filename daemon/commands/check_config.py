"""Validate the configuration and the model package; print the effective config as TOML."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="TOML config file (default: /etc/inspectd/inspectd.toml when present)"
    )
    parser.add_argument("--model", type=Path, help="model package directory (overrides model.path)")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")


def run(args: argparse.Namespace) -> int:
    from daemon.commands.serve import cli_overrides
    from daemon.settings import ConfigError, load_settings, to_toml

    try:
        settings = load_settings(args.config, cli_overrides(args))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    problems = []
    # Checks that read the disk live here, not in validators: the model package and the watched folders.
    if settings.model.path is None:
        problems.append("model.path: not set (set it in the config or pass --model DIR)")
    else:
        from engine.package import PackageError, load_package

        try:
            load_package(settings.model.path, verify=settings.model.verify_sha256)
        except PackageError as exc:
            problems.append(f"model.path: {exc}")
    folder = settings.sources.folder
    if folder.enabled and folder.path is not None and not folder.path.is_dir():
        problems.append(f"sources.folder.path: {folder.path} is not a directory")
    if not (settings.sources.camera.enabled or folder.enabled):
        problems.append("sources: no source enabled")
    if not args.quiet:
        print(to_toml(settings), end="")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if problems else 0
