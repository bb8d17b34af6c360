"""A finished training run → a verified model package (training.export.export_package) with its provenance and
the gauges the run learnt: the package is the whole inspection the threshold was calibrated for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from engine.dataset import discover, subset
from engine.gauges import load_gauges
from engine.package import Decision, ModelMeta
from engine.preprocess import Preprocessor
from engine.split import Split
from training.export import export_package
from training.images import load_images, normalised
from training.train import SPLIT, history, load_run_gauges, load_run_model

MAX_VERIFY = 64
TEST_KEYS = (
    "n",
    "n_ok",
    "n_ng",
    "auroc",
    "auroc_ci95",
    "recall",
    "false_reject_rate",
    "accuracy",
    "precision",
    "f1",
    "per_type",
    "split",
    "evaluated",
    "auroc_neutral_background",
    "cam_on_part",
    "brightness_baseline",
    "gauges",
    "model_only",
    "by_source",
    "escapes",
    "escape_rate_upper",
)


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    name: str | None = None,
    data: str | Path | None = None,
    heatmap: bool = True,
) -> ModelMeta:
    """Export the run's best checkpoint, checked against its real validation images at its calibrated threshold,
    with the run's gauges (its threshold was calibrated counting on them)."""
    run = Path(run_dir)
    model, cfg, summary = load_run_model(run)
    pre = Preprocessor(cfg.preprocess())
    gauges = load_run_gauges(run)
    if gauges is not None:  # as the daemon will open them: bands measured as its pose crop measures
        load_gauges(gauges.to_dict(), pre.params.pose)
    ds = discover(data or summary["data"])
    split = Split.load(run / SPLIT)
    if split.data_hash and split.data_hash != ds.content_hash():
        raise ValueError(
            f"{ds.root} is not the data the run was trained on (content hash differs); pass --data"
        )
    val = load_images(ds, subset(ds, split.val), pre)
    if not len(val.samples):
        raise ValueError("no usable validation images to verify the export with")
    verify = normalised(pre, val.pixels[:MAX_VERIFY])
    cal = summary["calibration"]
    gz = cal.get("grey_zone")
    decision = Decision(
        threshold=float(cal["threshold"]), grey_zone=(float(gz[0]), float(gz[1])) if gz else None
    )
    training: dict[str, Any] = {
        "data": summary["data"],
        "data_hash": summary["data_hash"],
        "counts": summary["counts"],
        "config": summary["config"],
        "best_epoch": summary.get("best_epoch"),
        "epochs_run": summary.get("epochs_run"),
        "stopped": summary.get("stopped"),
        "seconds": summary.get("seconds"),
        "excluded": summary.get("excluded", []),
        "split": split.to_dict(),
        "history": history(run),
    }
    metrics: dict[str, Any] = {"val": summary["val"]}
    test_file = run / "eval-test" / "metrics.json"
    if test_file.is_file():  # the held-back split, if the run was evaluated before export
        test = json.loads(test_file.read_text(encoding="utf-8"))
        metrics["test"] = {k: test[k] for k in TEST_KEYS if k in test}
    return export_package(
        model,
        out_dir,
        preprocess=pre.params,
        decision=decision,
        name=name or run.resolve().name,
        heatmap=heatmap,
        verify_batch=np.ascontiguousarray(verify),
        training=training,
        metrics=metrics,
        calibration=cal,
        gauges=gauges.to_dict() if gauges is not None else None,
        score_reference=summary.get("score_reference"),  # None from a run trained before it existed
    )
