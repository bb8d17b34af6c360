"""Simulated camera: push synthetic screws or a folder's images to the daemon at a steady frame rate."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connect", default="tcp://127.0.0.1:5555", help="the daemon's camera endpoint")
    parser.add_argument("--fps", type=float, default=10.0, help="frames per second (default 10)")
    parser.add_argument("--source", default="synth", help="'synth' or a directory of images (default synth)")
    parser.add_argument("--count", type=int, default=None, help="frames to send (default: until Ctrl-C)")
    parser.add_argument("--encoding", choices=("raw", "png"), default="raw", help="payload encoding")
    parser.add_argument("--size", type=int, default=1024, help="synthetic image side (default 1024)")
    parser.add_argument(
        "--pool", type=int, default=32, help="distinct synthetic images to cycle (default 32)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefix", default="cam", help="frame id prefix (default cam)")


def run(args: argparse.Namespace) -> int:
    from tools.camera_sim import CameraSim, folder_pool, synth_pool

    if args.count is not None and args.count < 1:
        raise SystemExit("inspectd camera: --count must be ≥ 1")
    if args.source == "synth":
        n = min(args.pool, args.count) if args.count else args.pool
        frames = synth_pool(max(n, 1), size=args.size, seed=args.seed)
    else:
        frames = folder_pool(Path(args.source))
    sim = CameraSim(args.connect, fps=args.fps, encoding=args.encoding)
    try:
        stats = sim.run(frames, args.count, prefix=args.prefix)
    except KeyboardInterrupt:
        return 130
    finally:
        sim.close()
    print(
        f"sent {stats['sent']} frames in {stats['seconds']:.1f} s ({stats['fps']:.1f} fps"
        f"{', ' + str(int(stats['late'])) + ' behind schedule' if stats['late'] else ''}) to {args.connect}"
    )
    return 0
