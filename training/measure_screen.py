"""Screen one gauge measurement on a labelled folder: per defect type, its AUROC against the OK parts, and how many OK
parts lie at or above each NG part (no model, no folds: a first look before the k-fold of training.variants).

Usage::

    python -m training.measure_screen --data ../shared/data/screws-300 --name crest_dip_px
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.dataset import discover
from engine.gauges import MEASUREMENTS
from engine.pose import PoseParams, estimate_pose
from engine.preprocess import load_gray
from training.metrics import auroc


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m training.measure_screen", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--name", default="crest_dip_px", choices=MEASUREMENTS)
    args = ap.parse_args(argv)
    ds = discover(args.data)
    params = PoseParams()
    vals, groups, names, secs = [], [], [], []
    for s in ds.samples:
        gray = load_gray(str(ds.abspath(s)))
        t0 = time.perf_counter()
        try:
            m = estimate_pose(gray, params).measurements
        except ValueError:
            continue
        secs.append(time.perf_counter() - t0)
        vals.append(float(getattr(m, args.name)))
        groups.append(s.group)
        names.append(Path(s.path).stem)
    v, g = np.array(vals), np.array(groups)
    ok = v[g == "OK"]
    print(f"{args.name}: {len(v)} parts measured, estimate_pose median {1e3 * np.median(secs):.2f} ms/part")
    print(
        f"  OK ({len(ok)}): median {np.nanmedian(ok):.2f}, largest {np.round(np.sort(ok)[-5:], 2).tolist()}"
    )
    for t in sorted(set(groups) - {"OK"}):
        sel = g == t
        a = auroc(np.concatenate([ok, v[sel]]), np.r_[np.zeros(len(ok)), np.ones(int(sel.sum()))])
        above = [
            f"{n} {x:.1f} ({int((ok >= x).sum())})" for n, x in zip(np.array(names)[sel], v[sel], strict=True)
        ]
        print(f"  {t:18s} AUROC {a:.3f}  value (OK at or above): {', '.join(above)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
