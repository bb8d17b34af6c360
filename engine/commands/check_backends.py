"""Run every available backend on the same preprocessed images; table of max |Δlogit|, max |Δscore| and
verdict flips against ONNX Runtime FP32 (exit 1 when any backend is outside tolerance)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, help="model package (model.onnx + model.json)")
    parser.add_argument("--data", type=Path, required=True, help="image folder (good/, not-good/ … or flat)")
    parser.add_argument(
        "--limit", type=int, default=64, help="images in the fixed sample (default 64; 0 = all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sample seed (default 0)")
    parser.add_argument("--max-batch", type=int, default=32, help="batch size per backend call (default 32)")
    parser.add_argument("--max-flips", type=int, default=0, help="verdict flips tolerated (default 0)")
    parser.add_argument(
        "--max-score-delta",
        type=float,
        default=None,
        help="largest |Δscore| tolerated (default: not checked)",
    )
    parser.add_argument(
        "--backends",
        default="",
        help="comma-separated labels to run (default all), e.g. 'onnxruntime cpu,torch cpu'; the reference "
        "(onnxruntime cpu) always runs",
    )


def run(args: argparse.Namespace) -> int:
    from engine.package import load_package
    from engine.parity import (
        Tolerance,
        available_candidates,
        check_backends,
        format_table,
        list_images,
        preprocess_images,
        stratified_sample,
    )

    package = load_package(args.model_dir)
    images = stratified_sample(list_images(args.data), args.limit or None, args.seed)
    batch = preprocess_images(package, images)
    candidates = available_candidates(package)
    if args.backends:
        wanted = {s.strip() for s in args.backends.split(",") if s.strip()}
        known = {c.label for c in candidates}
        if not wanted <= known:
            raise SystemExit(
                f"inspectd check-backends: unknown backend(s) {sorted(wanted - known)}; known {sorted(known)}"
            )
        candidates = [c for i, c in enumerate(candidates) if i == 0 or c.label in wanted]
    tol = Tolerance(max_flips=args.max_flips, max_score_delta=args.max_score_delta)
    rows = check_backends(package, batch, candidates, max_batch=args.max_batch, tolerance=tol)
    n_ng = sum(1 for im in images if im.label == 1)
    print(
        f"{package.meta.model_id}: {len(images)} images from {args.data} ({n_ng} NG by folder), "
        f"threshold {package.meta.decision.threshold}, reference {candidates[0].label}"
    )
    print(format_table(rows))
    return 1 if any(r.status == "FAIL" for r in rows) else 0
