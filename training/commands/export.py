"""Export a training run as a verified model package: model.onnx (one file) + model.json, with the run's gauges."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="RUN_DIR from inspectd train")
    parser.add_argument("--out", type=Path, required=True, help="package directory to write (MODEL_DIR)")
    parser.add_argument("--name", help="model name in model.json (default: the run directory's name)")
    parser.add_argument(
        "--data", type=Path, help="the training data, if it moved (default: the path recorded in the run)"
    )
    parser.add_argument("--no-heatmap", action="store_true", help="export without the second (CAM) output")


def run(args: argparse.Namespace) -> int:
    from engine.dataset import DataError
    from engine.gauges import Band
    from training.export import ExportError
    from training.package import export_run

    try:
        meta = export_run(args.run, args.out, name=args.name, data=args.data, heatmap=not args.no_heatmap)
    except (DataError, ExportError, ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"inspectd export: {exc}") from None
    parity = meta.created_by["parity"]
    print(
        f"wrote {args.out}/model.onnx + model.json ({meta.model_id}, opset {meta.opset}); torch vs ONNX Runtime on "
        f"{parity['n_images']} validation images: max |logit diff| {parity['max_abs_logit_diff']:.2g}, verdicts equal"
    )
    print(
        f"threshold {meta.decision.threshold:.4g}"
        + (f", grey zone {meta.decision.grey_zone}" if meta.decision.grey_zone else "")
    )
    bands = [Band.from_dict(b) for b in (meta.gauges or {}).get("bands", [])]
    margins = [m["name"] for m in ((meta.gauges or {}).get("margins") or {}).get("margins", [])]
    print(
        "gauges: "
        + (", ".join(f"{b.name} {b.describe()}" for b in bands) or "none (the model alone)")
        + (f"; their margins add to the score: {', '.join(margins)}" if margins else "")
    )
    return 0
