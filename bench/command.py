"""Measure the daemon against the machine's limit and the naive loop, in one run; prints tables, writes JSON.

inspectd bench [--model DIR] [--images DIR|synth] [--seconds S] [--out FILE.json] [--markdown FILE.md]
               [--shadow | --shadow-only [--shadow-rate FPS]]

Stage costs (decode, CLAHE, resize, normalise, the daemon's per-frame function), inference per batch size for
each available backend, the machine limit (cores ÷ per-image core-seconds), the real daemon (``inspectd serve``
as a subprocess) at saturation over loopback ZeroMQ (raw and PNG frames, and INT8 when the package has it),
latency at fixed line rates, peak RSS and CPU, and the naive per-image loop, all on the same images. With
``--shadow``, what shadow-scoring a candidate model costs (core-ms per frame) and the share it scores at
saturation (bench/shadow.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bench.run import BenchConfig

    d = BenchConfig()
    a = parser.add_argument
    a(
        "--model",
        type=Path,
        help="model package (default: a ResNet18 package with random weights, generated once)",
    )
    a(
        "--images",
        default=d.images,
        help="image directory, or 'synth' (seeded synthetic 1024² screws; default)",
    )
    a("--count", type=int, default=d.count, help=f"images used, cycled (default {d.count})")
    a(
        "--seconds",
        type=float,
        default=d.seconds,
        help=f"seconds per daemon phase and naive loop (default {d.seconds:g})",
    )
    a("--rates", type=_floats, default=d.rates, help="line rates in fps, comma-separated (default 5,10,20)")
    a(
        "--sat-fraction",
        type=float,
        default=d.sat_fraction,
        help="also measure latency at this fraction of the raw saturation rate (0 = skip; default 0.8)",
    )
    a("--max-batch", type=int, default=d.max_batch, help=f"daemon batching.max_batch (default {d.max_batch})")
    a(
        "--max-wait-ms",
        type=float,
        default=d.max_wait_ms,
        help=f"daemon batching.max_wait_ms (default {d.max_wait_ms:g})",
    )
    a(
        "--preprocess-threads",
        type=int,
        default=d.preprocess_threads,
        help="daemon batching.preprocess_threads (default: the daemon's)",
    )
    a(
        "--intra-op-threads",
        type=int,
        default=d.intra_op_threads,
        help="daemon model.intra_op_threads (default 0: the daemon's, model.intra_op_threads)",
    )
    a(
        "--inference-workers",
        type=int,
        default=d.inference_workers,
        help="daemon batching.inference_workers: sessions running batches side by side (default 0: the daemon's "
        "auto, one per core here)",
    )
    a(
        "--deadline-ms",
        type=float,
        default=d.max_latency_ms,
        help="daemon deadlines.max_latency_ms (default 250)",
    )
    a(
        "--window",
        type=int,
        default=d.window,
        help="closed-loop outstanding frames (default 0: adaptive, latency near half the deadline)",
    )
    a("--batch-sizes", type=_ints, default=d.batch_sizes, help="backend batch sizes (default 1,4,8,16,32)")
    a(
        "--no-int8",
        action="store_true",
        help="skip INT8 (quantising the generated package, the INT8 daemon run)",
    )
    a("--no-torch", action="store_true", help="skip the torch backend")
    a("--no-baseline", action="store_true", help="skip the naive loop")
    a("--no-png", action="store_true", help="skip the PNG saturation run")
    a("--seed", type=int, default=d.seed, help="image and model seed (default 0)")
    a(
        "--set",
        dest="daemon_set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="any other daemon setting, as a TOML value (repeatable), e.g. --set batching.buffers=4",
    )
    a(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample the fp32 daemon with py-spy at saturation and at the lowest line rate: raw stacks into DIR, "
        "threads, GIL and top functions into the results (pip install py-spy)",
    )
    a(
        "--shadow",
        action="store_true",
        help="also measure shadow scoring: core-ms per frame with a shadowing candidate vs without, and the "
        "share it scores at saturation",
    )
    a("--shadow-only", action="store_true", help="measure only shadow scoring (implies --shadow)")
    a(
        "--shadow-rate",
        type=float,
        default=d.shadow_rate,
        help=f"line rate (fps) the shadow cost is measured at (default {d.shadow_rate:g})",
    )
    a("--out", type=Path, help="write the results as JSON here")
    a("--markdown", type=Path, help="write the tables as markdown here (docs/benchmarks.md's table)")
    a("--quiet", action="store_true", help="no progress lines, only the tables")


def run(args: argparse.Namespace) -> int:
    from bench.report import markdown, shadow_only
    from bench.run import BenchConfig, run_bench

    cfg = BenchConfig(
        model=args.model,
        images=args.images,
        count=args.count,
        seconds=args.seconds,
        rates=args.rates,
        sat_fraction=args.sat_fraction,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        preprocess_threads=args.preprocess_threads,
        intra_op_threads=args.intra_op_threads,
        inference_workers=args.inference_workers,
        profile=args.profile,
        max_latency_ms=args.deadline_ms,
        window=args.window,
        batch_sizes=args.batch_sizes,
        int8=not args.no_int8,
        torch=not args.no_torch,
        baseline=not args.no_baseline,
        png=not args.no_png,
        seed=args.seed,
        daemon_set=tuple(args.daemon_set),
        shadow=args.shadow or args.shadow_only,
        shadow_only=args.shadow_only,
        shadow_rate=args.shadow_rate,
    )

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    try:
        result = run_bench(cfg, log=log)
    except (ValueError, FileNotFoundError) as exc:
        print(f"inspectd bench: {exc}", file=sys.stderr)
        return 2
    result["command"] = (
        "inspectd bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "inspectd bench"
    )
    text = shadow_only(result) if args.shadow_only else markdown(result)
    print(text)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.markdown is not None:
        args.markdown.write_text(text, encoding="utf-8")
    return 0
