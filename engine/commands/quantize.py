"""Statically quantise a package's model to INT8 for the CPU (QDQ, per-channel, reduce_range), calibrated on
real images; writes model.int8.onnx and its record in model.json only if no verdict flips vs FP32."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, help="model package (model.onnx + model.json)")
    parser.add_argument("--data", type=Path, required=True, help="real images (good/, not-good/ … or flat)")
    parser.add_argument(
        "--calib-data",
        type=Path,
        help="take calibration images from this folder instead (e.g. the training split; default: --data)",
    )
    parser.add_argument("--calib", type=int, default=64, help="calibration images (default 64)")
    parser.add_argument(
        "--val",
        type=int,
        default=0,
        help="validation images, disjoint from calibration (default 0 = all the rest)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument(
        "--max-flips", type=int, default=0, help="verdict flips vs FP32 tolerated (default 0)"
    )
    parser.add_argument(
        "--max-score-delta",
        type=float,
        default=None,
        help="largest |Δscore| tolerated (default: not checked)",
    )
    parser.add_argument(
        "--no-reduce-range",
        action="store_true",
        help="full 8-bit weights: only on CPUs with VNNI (otherwise U8S8 kernels saturate and outputs are wrong)",
    )


def run(args: argparse.Namespace) -> int:
    import time

    from engine.package import load_package
    from engine.parity import Tolerance, list_images, preprocess_images, stratified_sample
    from engine.quantize import QuantizeRefused, QuantizeSettings, quantize_package

    if args.calib < 1:
        raise SystemExit("inspectd quantize: --calib must be ≥ 1")
    package = load_package(args.model_dir)
    images = list_images(args.data)
    calib_pool = list_images(args.calib_data) if args.calib_data else images
    calib = stratified_sample(calib_pool, args.calib, args.seed)
    used = {im.path.resolve() for im in calib}
    val = stratified_sample(
        [im for im in images if im.path.resolve() not in used], args.val or None, args.seed + 1
    )
    if not val:
        raise SystemExit(f"inspectd quantize: no validation images left after {len(calib)} for calibration")
    t0 = time.perf_counter()
    try:
        result = quantize_package(
            package,
            preprocess_images(package, calib),
            preprocess_images(package, val),
            calib_files=[im.path.name for im in calib],
            val_files=[im.path.name for im in val],
            tolerance=Tolerance(args.max_flips, args.max_score_delta),
            settings=QuantizeSettings(reduce_range=not args.no_reduce_range),
            data=str(args.data),
            calib_data=str(args.calib_data or args.data),
        )
    except QuantizeRefused as exc:
        print(f"refused: {exc}")
        return 1
    c = result.comparison
    print(
        f"wrote {result.path} ({result.path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.0f} s: "
        f"calibrated on {len(calib)} images; on {c.n} validation images verdict agreement "
        f"{100 * c.agreement:.1f} % ({c.flips} flips), max |Δscore| {c.max_abs_score:.3g}, "
        f"max |Δlogit| {c.max_abs_logit:.3g}"
    )
    print(f'use it with model.options = {{ model_file = "{result.path.name}" }} (backend onnxruntime)')
    return 0
