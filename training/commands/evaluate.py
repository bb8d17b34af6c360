"""Evaluate a training run (torch) or a model package (ONNX Runtime) on a split: report.html + metrics.json."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target", type=Path, help="RUN_DIR (from inspectd train) or MODEL_DIR (from inspectd export)"
    )
    parser.add_argument("--data", type=Path, required=True, help="the labelled images (as for training)")
    parser.add_argument(
        "--split",
        default="test",
        choices=["train", "val", "test", "all"],
        help="which part of the recorded split to score (default test; all = every image in --data)",
    )
    parser.add_argument("--out", type=Path, help="report directory (default TARGET/eval-SPLIT)")
    parser.add_argument(
        "--heatmaps", type=int, default=8, help="NG images to show with heatmaps besides the misclassified"
    )


def run(args: argparse.Namespace) -> int:
    from engine.dataset import DataError
    from training.evaluate import evaluate

    try:
        m = evaluate(args.target, args.data, part=args.split, out=args.out, n_ng_heatmaps=args.heatmaps)
    except (DataError, ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"inspectd evaluate: {exc}") from None
    out = args.out or args.target / f"eval-{args.split}"
    ci = m["auroc_ci95"]
    print(
        f"{m['n']} images ({m['n_ok']} OK / {m['n_ng']} NG) on {m['evaluated']['backend']}: AUROC {m['auroc']:.3f} "
        f"(95% CI {ci[0]:.2f}–{ci[1]:.2f}); at threshold {m['threshold']:.4g}: NG recall {m['recall']:.3f}, "
        f"false-reject rate {m['false_reject_rate']:.3f}, accuracy {m['accuracy']:.3f}"
    )
    src = m["by_source"]
    if m["gauges"]:
        print(
            f"  the verdict is model or gauges: the model alone recall {m['model_only']['recall']:.3f}, "
            f"false-reject rate {m['model_only']['false_reject_rate']:.3f}; the gauges reject "
            f"{src['ng']['gauges']} NG ({src['ng']['gauges_only']} the model passed) and {src['ok']['gauges']} OK"
        )
    print(
        f"  escape rate {m['escapes']}/{m['n_ng']}, ≤ {100 * m['escape_rate_upper']:.1f} % "
        f"({100 * m['escape_confidence']:.0f} % upper bound)"
    )
    for kind, v in m["per_type"].items():
        if kind != "OK":
            gauged = f" (gauges {src['per_type'][kind]['gauges']})" if m["gauges"] else ""
            print(f"  {kind:<20} n={v['n']:<3} recall {v['recall']:.2f}{gauged}")
    if m["failed"]:
        print(f"  {len(m['failed'])} image(s) failed preprocessing (scored REJECT): {m['failed_by_reason']}")
    print(f"report: {out / 'report.html'}")
    return 0
