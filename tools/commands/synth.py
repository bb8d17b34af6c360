"""Generate labelled synthetic screw images (OK/ and NG/ folders + labels.csv) for tests, demo and camera."""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="output directory (created)")
    parser.add_argument("--ok", type=int, default=20, help="number of OK screws (default 20)")
    parser.add_argument(
        "--ng", type=int, default=10, help="number of NG screws, cycling defect types (default 10)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed; the same seed writes identical bytes")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")


def run(args: argparse.Namespace) -> int:
    from tools.synth import write_dataset

    if args.ok < 0 or args.ng < 0 or args.ok + args.ng == 0:
        raise SystemExit("inspectd synth: --ok and --ng must be ≥ 0 and not both 0")
    if args.size < 64:
        raise SystemExit("inspectd synth: --size must be ≥ 64")
    t0 = time.perf_counter()
    rows = write_dataset(args.out, args.ok, args.ng, seed=args.seed, size=args.size)
    dt = time.perf_counter() - t0
    kinds = collections.Counter(r["defect_type"] or "OK" for r in rows)
    print(
        f"wrote {len(rows)} images ({args.size}×{args.size}) to {args.out} in {dt:.1f} s "
        f"({1000 * dt / max(len(rows), 1):.0f} ms/image)"
    )
    for kind, n in sorted(kinds.items()):
        print(f"  {kind:<18} {n}")
    print(f"labels: {Path(args.out) / 'labels.csv'}")
    return 0
