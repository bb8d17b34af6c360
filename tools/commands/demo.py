"""The one-command demo: synthetic screws → short training → package → daemon → simulated camera → live view.

Trains on --data DIR, or on ../shared/data/screws-300 when it is there, instead of synthetic screws. Everything
is cached in --workdir (default ~/.cache/inspectd/demo): a second run reuses the trained package.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tools.demo import PRODUCTION_INPUT

if TYPE_CHECKING:  # pragma: no cover
    from engine.package import ModelMeta


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("×", "x").split("x")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be S or HxW, got {text!r}") from None
    if len(nums) not in (1, 2) or min(nums) < 16:
        raise argparse.ArgumentTypeError(f"size must be S or HxW with sides ≥ 16, got {text!r}")
    return (nums[0], nums[-1])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, help="stop the live view after this long (default: Ctrl-C)")
    parser.add_argument("--fps", type=float, default=5.0, help="simulated camera frame rate (default 5)")
    parser.add_argument("--data", type=Path, help="train on these labelled images instead of synthetic ones")
    parser.add_argument(
        "--synthetic", action="store_true", help="synthetic screws even when screws-300 is present"
    )
    parser.add_argument("--workdir", type=Path, help="cache directory (default ~/.cache/inspectd/demo)")
    parser.add_argument("--retrain", action="store_true", help="train again even when a package is cached")
    parser.add_argument(
        "--preset",
        default="default",
        help="training preset: default (patch memory, fitted in seconds), cnn or recipe (ResNet18)",
    )
    parser.add_argument(
        "--input-size",
        type=_size,
        default=PRODUCTION_INPUT,
        help=f"network input HxW (default {PRODUCTION_INPUT[0]}x{PRODUCTION_INPUT[1]}, the default preset's)",
    )
    parser.add_argument("--epochs", type=int, default=30, help="ResNet18 presets: at most this many epochs")
    parser.add_argument(
        "--train-minutes", type=float, default=3.0, help="ResNet18 presets: time budget (min)"
    )
    parser.add_argument("--ok", type=int, default=120, dest="n_ok", help="synthetic OK screws (default 120)")
    parser.add_argument("--ng", type=int, default=40, dest="n_ng", help="synthetic NG screws (default 40)")
    parser.add_argument("--pool", type=int, default=24, help="distinct synthetic camera frames (default 24)")
    parser.add_argument("--metrics-port", type=int, default=9108, help="metrics port; busy → ephemeral (default 9108)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from engine.package import load_package
    from tools.demo import (
        Camera,
        DemoConfig,
        DemoError,
        camera_frames,
        default_workdir,
        find_real_data,
        model_package,
        start_daemon,
        synthetic_data,
    )
    from tools.demo_view import LiveView, Tally, summary

    t_start = time.monotonic()
    out = sys.stdout

    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    real = None if args.synthetic else (args.data or find_real_data())
    if args.data is not None and not args.data.is_dir():
        print(f"inspectd demo: --data {args.data} is not a directory", file=sys.stderr)
        return 2
    cfg = DemoConfig(
        workdir=(args.workdir or default_workdir()).expanduser(),
        data=real,
        seconds=args.seconds,
        fps=args.fps,
        input_size=args.input_size,
        preset=args.preset,
        epochs=args.epochs,
        train_minutes=args.train_minutes,
        n_ok=args.n_ok,
        n_ng=args.n_ng,
        pool=args.pool,
        retrain=args.retrain,
        metrics_port=args.metrics_port,
    )
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    tally = Tally(t_start=t_start)
    try:
        say(f"[1/4] data  (work directory {cfg.workdir})")
        if real is not None:
            say(
                f"training on the labelled images in {real}"
                + ("" if args.data else " (found; --synthetic to skip)")
            )
            data = real
        else:
            data = synthetic_data(cfg, say)
        say("[2/4] model")
        pkg_dir = model_package(cfg, data, say)
        package = load_package(pkg_dir)
        meta = package.meta
        frames = camera_frames(cfg, real, pkg_dir, say)
        say("[3/4] daemon")
        view = LiveView(tally, out)
        app = start_daemon(cfg, pkg_dir, view.on_verdict)
    except DemoError as exc:
        print(f"inspectd demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninspectd demo: interrupted", file=sys.stderr)
        return 130
    metrics_url = f"http://127.0.0.1:{app.metrics_port}/metrics" if app.metrics_port else ""
    view.metrics_url = metrics_url
    say(f"daemon ready: camera {app.camera_endpoint}, verdicts {app.publisher_endpoint} (line 'demo'), "
        f"metrics {metrics_url}")  # fmt: skip
    say(f"watch from another terminal: inspectd watch --connect {app.publisher_endpoint} --line demo")
    say(f"[4/4] camera at {cfg.fps:g} fps — " + (f"{cfg.seconds:g} s" if cfg.seconds else "Ctrl-C to stop"))
    assert app.camera_endpoint is not None
    camera = Camera(app.camera_endpoint, frames, cfg.fps)
    t_cam = time.monotonic()
    camera.start()
    try:
        end = t_cam + cfg.seconds if cfg.seconds else float("inf")
        while time.monotonic() < end and not app.stop_requested.is_set():
            view.pump(min(end, time.monotonic() + 1.0))
    except KeyboardInterrupt:
        pass
    camera.stop()
    seconds = time.monotonic() - t_cam
    app.stop()  # every frame the daemon accepted gets its verdict before this returns
    view.drain()
    info = {
        **_model_info(meta, real),
        "camera": f"{len(frames)} {'new synthetic parts' if real is None else 'held-out test images'}",
        "fps": cfg.fps,
        "sent": camera.sent,
        "seconds": seconds,
        "label_kind": "synthetic" if real is None else real.name,
        "metrics_url": metrics_url,
        "package": str(pkg_dir),
    }
    say(summary(tally, info))
    return app.exit_code


def _model_info(meta: ModelMeta, real: Path | None) -> dict[str, Any]:
    from tools.demo import PRODUCTION_INPUT

    h, w = meta.preprocess.input_size
    counts = meta.training.get("counts", {})
    n = sum(counts.values())
    n_ok = counts.get("OK", 0)
    what = "synthetic screws" if real is None else f"images of {real.name}"
    minutes = (meta.training.get("seconds") or 0) / 60
    arch = (meta.training.get("config") or {}).get("arch", "resnet18")
    how = (
        f"patch memory fitted in {minutes * 60:.0f} s"
        if arch == "patch_memory"
        else f"ResNet18, {meta.training.get('epochs_run')} epoch(s) in {minutes:.1f} min"
    )
    return {
        "model_id": meta.model_id,
        "input": f"{h}×{w}",
        "reduced": (h, w) != PRODUCTION_INPUT,
        "threshold": meta.decision.threshold,
        "trained_on": f"{n} {what} ({n_ok} OK / {n - n_ok} NG; 80/10/10 split), "
        f"{how}, val AUROC {_val_auroc(meta.metrics)}",
    }


def _val_auroc(metrics: dict[str, object]) -> str:
    val = metrics.get("val")
    auroc = val.get("val_auroc") if isinstance(val, dict) else None
    return f"{auroc:.3f}" if isinstance(auroc, float) else "–"
