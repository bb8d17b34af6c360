"""Build the TensorRT engine for this station (ONNX → plan, FP16, batch profile 1..max, timing cache) into the
package's engine cache; activate it only if it passes the parity gate against ONNX Runtime on real images.

The plan's sidecar records the plan's sha256 (at build) and, once gated, the gate's result for exactly those
bytes (images, flips, max |Δ|, tolerance); the daemon refuses an ungated plan unless ``allow_ungated``. A cached
plan counts as a hit only if its bytes still match its sha256 and it is gated (or ``--no-parity`` is asked
for); an ungated plan is rebuilt and gated, a corrupted one is reported and replaced only with ``--force``."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, help="model package (model.onnx + model.json)")
    prec = parser.add_mutually_exclusive_group()
    prec.add_argument("--fp16", dest="precision", action="store_const", const="fp16", help="FP16 (default)")
    prec.add_argument("--fp32", dest="precision", action="store_const", const="fp32", help="FP32")
    parser.set_defaults(precision="fp16")
    parser.add_argument("--max-batch", type=int, default=32, help="profile max batch (default 32)")
    parser.add_argument(
        "--opt-batch", type=int, default=8, help="profile opt batch: the typical batch (default 8)"
    )
    parser.add_argument(
        "--data", type=Path, help="validation images for the parity gate (required unless --no-parity)"
    )
    parser.add_argument(
        "--limit", type=int, default=64, help="images in the gate's fixed sample (default 64; 0 = all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sample seed (default 0)")
    parser.add_argument("--max-flips", type=int, default=0, help="verdict flips tolerated (default 0)")
    parser.add_argument("--max-score-delta", type=float, default=None, help="largest |Δscore| tolerated")
    parser.add_argument(
        "--no-parity",
        action="store_true",
        help="activate without the gate (recorded as ungated: the daemon serves it only with allow_ungated)",
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild even when the cache already has this key"
    )
    parser.add_argument(
        "--workspace-mb", type=int, default=1024, help="builder workspace limit (default 1024)"
    )
    parser.add_argument("--timing-cache", type=Path, help="timing cache file (default: in the engine cache)")
    parser.add_argument("--device", type=int, default=0, help="CUDA device ordinal (default 0)")


def run(args: argparse.Namespace) -> int:
    import time
    from dataclasses import asdict

    from engine.backends.tensorrt import station_key
    from engine.package import load_package
    from engine.parity import (
        Candidate,
        Tolerance,
        check_backends,
        format_table,
        list_images,
        preprocess_images,
        stratified_sample,
    )
    from engine.trt_build import (
        BatchProfile,
        EngineCache,
        PlanIntegrityError,
        build_plan,
        passed_gate,
        precision_route,
    )

    if not args.no_parity and args.data is None:
        raise SystemExit(
            "inspectd build-engine: the parity gate needs validation images (--data DIR); "
            "--no-parity activates an ungated engine"
        )
    package = load_package(args.model_dir)
    profile = BatchProfile.for_max(args.max_batch, args.opt_batch)
    key = station_key(package, args.precision, profile, args.device)
    cache = EngineCache(package.engine_cache_dir)
    hit = cache.lookup(key)
    if hit is not None and not args.force:
        try:
            cache.read_plan(hit.plan, hit.record)  # a hit only if its bytes are the ones that were built
        except PlanIntegrityError as exc:
            print(f"REFUSED: {exc}\n  --force replaces it with a newly built one")
            return 1
        if passed_gate(hit.record) or args.no_parity:
            print(f"cache hit: {hit.plan}\n  [{key.describe()}]\n  parity: {hit.record.get('parity')}")
            return 0
        print(f"the cache holds an ungated plan for this key ({hit.plan}); building and gating a replacement")
    batch = None
    if not args.no_parity:  # read the images before the long build, so a bad --data fails fast
        images = stratified_sample(list_images(args.data), args.limit or None, args.seed)
        batch = preprocess_images(package, images)

    t0 = time.perf_counter()
    plan = build_plan(
        package.onnx_path,
        key,
        input_name=package.meta.input_name,
        timing_cache=args.timing_cache or cache.timing_cache_path(key),
        workspace_mb=args.workspace_mb,
    )
    seconds = round(time.perf_counter() - t0, 1)
    route = precision_route(args.precision).name
    candidate = cache.store(
        key,
        plan,
        {"built_by": "inspectd build-engine", "build_seconds": seconds, "precision_route": route},
        candidate=True,
    )
    # What the gate's backend checks the candidate's bytes against before it deserializes them:
    plan_sha256 = str((cache.read_record(candidate) or {}).get("plan_sha256", ""))
    print(f"built {len(plan) / 1e6:.1f} MB plan in {seconds} s: [{key.describe()}]\n  {route}")
    if batch is None:
        final = cache.activate(
            key, {"parity": {"gated": False, "reason": "activated by inspectd build-engine --no-parity"}}
        )
        print(
            f"activated WITHOUT parity gate: {final}\n  the daemon serves it only with "
            "model.options.allow_ungated = true"
        )
        return 0

    tol = Tolerance(args.max_flips, args.max_score_delta)
    try:
        rows = check_backends(
            package,
            batch,
            [
                Candidate("onnxruntime cpu", "onnxruntime"),
                Candidate.of(
                    f"tensorrt {args.precision}",
                    "tensorrt",
                    precision=args.precision,
                    opt_batch=args.opt_batch,
                    engine_file=candidate,
                    device=args.device,
                    allow_ungated=True,  # the candidate is ungated until this very run gates it
                ),
            ],
            max_batch=args.max_batch,
            tolerance=tol,
        )
    except BaseException:
        cache.discard_candidate(key)
        raise
    print(format_table(rows))
    gate = rows[-1]
    if gate.comparison is None or gate.status != "ok":
        cache.discard_candidate(key)
        print(f"REFUSED: the {args.precision} engine is outside tolerance ({gate.status}); not activated")
        return 1
    final = cache.activate(
        key,
        {
            "parity": {
                "gated": True,
                "plan_sha256": plan_sha256,  # the gate's result holds for these bytes only
                **gate.comparison.to_dict(),
                "tolerance": asdict(tol),
                "data": str(args.data),
                "sample": {"limit": args.limit, "seed": args.seed},
            }
        },
    )
    print(f"activated: {final}")
    return 0
