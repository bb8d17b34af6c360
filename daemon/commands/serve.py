"""Run the inspection daemon: camera/folder in, one PASS/REJECT verdict per frame out over ZeroMQ."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="TOML config file (default: /etc/inspectd/inspectd.toml when present)"
    )
    parser.add_argument("--model", type=Path, help="model package directory (overrides model.path)")
    parser.add_argument("--log-format", choices=("auto", "json", "console"), help="overrides logging.format")


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if getattr(args, "model", None) is not None:
        overrides["model"] = {"path": str(args.model)}
    if getattr(args, "log_format", None) is not None:
        overrides["logging"] = {"format": args.log_format}
    return overrides


def run(args: argparse.Namespace) -> int:
    from daemon.settings import ConfigError, load_settings

    try:
        settings = load_settings(args.config, cli_overrides(args))
    except ConfigError as exc:
        print(f"inspectd serve: {exc}", file=sys.stderr)
        return 2

    import uuid

    from daemon.image_policy import limit_opencv_pixels

    # Before daemon.app imports cv2: OpenCV reads its pixel limit once, at load (a JPEG/TIFF bomb guard).
    opencv_limited = limit_opencv_pixels(settings.decode.max_pixels)

    from daemon.app import App
    from daemon.logs import configure_logging, get_logger

    boot_id = uuid.uuid4().hex[:16]
    configure_logging(
        level=settings.logging.level, fmt=settings.logging.format, line=settings.line, boot_id=boot_id
    )
    log = get_logger("inspectd.serve")
    if not opencv_limited:
        log.warning(
            "OpenCV was loaded before its pixel limit could be set", max_pixels=settings.decode.max_pixels
        )
    app = App(settings, boot_id=boot_id)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        app.request_stop()  # only records the request; the main thread does the shutdown

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        app.start()
    except ConfigError as exc:  # found only once the backend is known (settings made without load_settings)
        log.error("start-up failed: configuration error", error=str(exc))
        return 2
    except Exception as exc:
        log.error("start-up failed", error=f"{type(exc).__name__}: {exc}")
        return 1
    return app.run_until_stopped()
