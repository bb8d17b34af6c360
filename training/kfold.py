"""Pool the held-out folds of a k-fold experiment: every image scored once, by the model that never saw it.

Usage: ``python -m training.kfold RUN_DIR...`` (each evaluated with ``inspectd evaluate RUN_DIR --data …``).
Each fold's verdicts use that fold's own calibrated threshold, so the pooled recall and false-reject rate are
what the procedure (train, calibrate on val, deploy) delivers. AUROC is reported per fold (mean, spread) and
pooled; the pooled value mixes five models' score scales and is a slightly pessimistic summary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from training.metrics import at_threshold, auroc, auroc_ci


def summarise(run_dirs: list[Path], part: str = "test") -> dict[str, Any]:
    folds = [
        json.loads((Path(r) / f"eval-{part}" / "metrics.json").read_text(encoding="utf-8")) for r in run_dirs
    ]
    images = [im for f in folds for im in f["images"]]
    paths = [im["path"] for im in images]
    if len(set(paths)) != len(paths):
        raise ValueError("the folds' test parts overlap: these runs are not folds of one k-fold split")
    y = np.array([im["label"] for im in images])
    z = np.array([im["logit"] for im in images])
    reject = np.array([im["reject"] for im in images])
    per_fold = [f["auroc"] for f in folds]
    out: dict[str, Any] = {
        "runs": [str(r) for r in run_dirs],
        "n": len(images),
        "auroc_per_fold": per_fold,
        "auroc_mean": float(np.mean(per_fold)),
        "auroc_sd": float(np.std(per_fold, ddof=1)) if len(per_fold) > 1 else 0.0,
        "auroc_pooled": auroc(z, y),
        "auroc_pooled_ci95": list(auroc_ci(z, y)),
        **at_threshold(reject, y),
        "per_type_recall": {},
    }
    for g in sorted({im["group"] for im in images} - {"OK"}):
        sel = [i for i, im in enumerate(images) if im["group"] == g]
        out["per_type_recall"][g] = float(reject[sel].mean())
    return out


def main(argv: list[str]) -> int:
    s = summarise([Path(a) for a in argv])
    print(json.dumps({k: v for k, v in s.items()}, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
