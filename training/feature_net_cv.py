"""Stratified k-fold of the CNN-feature thread member against today's PCA members (research, issue 14).

Usage::

    python -m training.feature_net_cv --data ../shared/data/screws-300 --out /work/runs/q14c --repeats 1

Per repeat (split seed) and fold (engine.split.make_kfold, as training.variants): the feature net is trained on
the fit side's OK thread bands only (the held-out fold is never seen, not even as synthetic damage), its memory
fitted on the same OK parts; today's two PCA members (half-resolution crop, thread band) are fitted on the same
parts with training.patch_memory.fit. Held-out logits of every member and of the ensembles (mean of member
logits, each standardised on its good parts' leave-one-out logits) are saved as ``NAME.npy``, rows
(repeat, fold, dataset index, logit), and summarised as training.variants does.

Measured (5-fold, split seed 0, width 16, full resolution, 500 steps, 96-dim 3 × 3-pooled features; the
thread-band members alone also face head defects they cannot see, so compare them on thread_side):

| member | AUROC per fold | pooled | FRR @ recall 1 | thread_side AUROC | OK above thread_side009 |
|---|---|---|---|---|---|
| PCA thread band (today) | 0.901 ± 0.039 | 0.899 | 0.752 | 0.956 | 22 |
| CNN thread band | 0.912 ± 0.041 | 0.906 | 0.640 | 0.907 | 116 |
| PCA half + PCA thread (today's default) | 0.988 ± 0.005 | 0.986 | 0.116 | 0.963 | 29 |
| PCA half + CNN thread | 0.977 ± 0.019 | 0.979 | 0.324 | 0.940 | 81 |
| PCA half + PCA thread + CNN thread | 0.983 ± 0.014 | 0.982 | 0.152 | 0.962 | 38 |

The learned features lose to the PCA codes where it matters (thread_side), and the ensemble with them is worse
than today's default. Command: ``--net '{"steps": 500, "width": 16, "pool": 1}' --tag cnn_w16 --threads 1``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.dataset import discover
from engine.preprocess import Preprocessor
from engine.split import make_kfold
from training.config import PRESETS
from training.feature_net import (
    NetSettings,
    cell_mask,
    fit_memory,
    head_scores,
    memory_logits,
    net_features,
    train_net,
)
from training.images import load_images, normalised
from training.metrics import auroc
from training.patch_memory import fit
from training.synth_damage import part_mask
from training.variants import frr_at_full_recall, gauge_flags

ROWS, COLS = (48, 272), (440, 1000)  # the default preset's thread band (view rows and columns)


def summary(
    rows: np.ndarray, labels: np.ndarray, groups: np.ndarray, paths: np.ndarray, gauges: np.ndarray
) -> dict[str, Any]:
    """``rows``: (repeat, fold, index, logit) → per-fold and pooled AUROC, FRR at recall 1, per type, weakest."""
    idx, z = rows[:, 2].astype(int), rows[:, 3]
    y = labels[idx]
    per_fold = [
        auroc(z[sel], y[sel])
        for sel in (rows[:, 0] * 100 + rows[:, 1] == k for k in np.unique(rows[:, 0] * 100 + rows[:, 1]))
    ]
    ok_z = np.sort(z[y == 0])
    out: dict[str, Any] = {
        "auroc_mean": float(np.mean(per_fold)),
        "auroc_sd": float(np.std(per_fold, ddof=1)),
        "auroc_pooled": auroc(z, y),
        "frr_at_recall1": frr_at_full_recall(z, y),
        "frr_at_recall1_with_gauges": frr_at_full_recall(z, y, gauges),
        "per_type": {
            t: auroc(z[(groups[idx] == t) | (y == 0)], y[(groups[idx] == t) | (y == 0)])
            for t in sorted(set(groups[labels == 1]))
        },
    }
    weakest = np.argsort(z[y == 1])[:4]
    out["weakest"] = [
        (Path(paths[idx[y == 1][i]]).stem, int(len(ok_z) - np.searchsorted(ok_z, z[y == 1][i], side="right")))
        for i in weakest
    ]
    ts9 = [i for i in range(len(idx)) if paths[idx[i]].endswith("thread_side009.png")]
    out["thread_side009_ok_above"] = [int(len(ok_z) - np.searchsorted(ok_z, z[i], side="right")) for i in ts9]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m training.feature_net_cv", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--first-repeat", type=int, default=0)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--net", default="{}", help="NetSettings overrides, JSON")
    ap.add_argument("--memory", default="{}", help="PatchSettings overrides for the CNN memory, JSON")
    ap.add_argument("--tag", default="cnn", help="name of this CNN variant's files")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    ns = replace(NetSettings(), **json.loads(args.net))
    ds = discover(args.data)
    cfg = PRESETS["default"]
    pre = Preprocessor(cfg.preprocess())
    imgs = load_images(ds, ds.samples, pre)
    if imgs.failed or imgs.measurements is None:
        raise ValueError("every image must load with a pose")
    x = normalised(pre, imgs.pixels)
    labels = np.array([s.label for s in ds.samples])
    groups = np.array([s.group for s in ds.samples])
    paths = np.array([str(s.path) for s in ds.samples])
    pos = {s.path: i for i, s in enumerate(ds.samples)}
    parts = np.stack([part_mask(p) for p in imgs.pixels])
    half_s, thread_s = cfg.patch_members_settings()
    # Memory readouts of each trained net: name suffix → (PatchSettings overrides, local pooling).
    readouts = {k: dict(v) for k, v in json.loads(args.memory).items()} or {"": {}}
    mem_settings = {
        k: (
            replace(
                thread_s,
                **{
                    "dims": 0,
                    "residual": False,
                    **{a: tuple(b) if isinstance(b, list) else b for a, b in v.items() if a != "local"},
                },
            ),
            int(v.get("local", 3)),
        )
        for k, v in readouts.items()
    }
    (t, b), (left, right) = ROWS, COLS
    m = ns.shift
    band_big = x[:, 0, t - m : b + m, left:right]
    parts_big = parts[:, t - m : b + m, left:right]
    band = x[:, :, t:b, left:right]
    rows: dict[str, list[np.ndarray]] = {}
    gauge_rows: list[np.ndarray] = []
    info: list[dict[str, Any]] = []
    for r in range(args.first_repeat, args.first_repeat + args.repeats):
        for f in range(args.folds):
            sp = make_kfold(ds.samples, folds=args.folds, fold=f, seed=r)
            fit_idx = np.array([pos[p] for p in sp.train + sp.val])
            test = np.array([pos[p] for p in sp.test])
            ok = fit_idx[labels[fit_idx] == 0]
            logits: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name → (held-out logits, LOO logits)
            pca_file = args.out / f"pca_r{r}_f{f}.npz"
            if pca_file.is_file():
                c = np.load(pca_file)
                logits = {k: (c[f"{k}_test"], c[f"{k}_loo"]) for k in ("pca_half", "pca_thread")}
                pca_s = float(c["fit_s"])
            else:
                t0 = time.monotonic()
                for name, s in (("pca_half", half_s), ("pca_thread", thread_s)):
                    model, loo = fit(x[ok], imgs.pixels[ok], s, seed=cfg.seed, log=lambda _: None)
                    with torch.no_grad():
                        z = np.concatenate(
                            [
                                model(torch.from_numpy(x[test[i : i + 8]]))[:, 0].numpy()
                                for i in range(0, len(test), 8)
                            ]
                        )
                    logits[name] = (z, loo)
                pca_s = time.monotonic() - t0
                np.savez(
                    pca_file,
                    fit_s=pca_s,
                    **{f"{k}_{w}": v[j] for k, v in logits.items() for j, w in enumerate(("test", "loo"))},
                )
            t0 = time.monotonic()
            net = train_net(
                band_big[ok],
                parts_big[ok],
                ns,
                rows=(m, m + b - t),
                seed=r * 100 + f,
                log=lambda s, r=r, f=f: print(f"  r{r} f{f} {s}", flush=True),
            )
            train_s = time.monotonic() - t0
            t0 = time.monotonic()
            tags = []
            for suffix, (ms, local) in mem_settings.items():
                feats = [net_features(net, band[ok], local=local)] + [
                    net_features(net, band[ok], round(8 * ns.pool * k / ms.axial_phases), local)
                    for k in range(1, ms.axial_phases)
                ]
                grid = tuple(feats[0].shape[2:])
                mask = cell_mask(parts[ok, t:b, left:right], grid, ms.mask_share)
                mem, loo, proj = fit_memory(feats, mask, ms)
                tag = args.tag + suffix
                logits[tag] = (memory_logits(mem, net_features(net, band[test], local=local), proj), loo)
                tags.append(tag)
            # The damage head alone, standardised on the fit side's OK parts (which it was trained on: its
            # logit scale is optimistic, its ranking of held-out parts is not).
            h_ok, h_test = head_scores(net, band[ok], mask), head_scores(net, band[test], mask)
            mu, sd = float(h_ok.mean()), float(h_ok.std()) or 1.0
            logits[args.tag + "_head"] = ((h_test - mu - 3 * sd) / sd, (h_ok - mu - 3 * sd) / sd)
            mem_fit_s = time.monotonic() - t0
            combos = [("half+pca_thread", ("pca_half", "pca_thread"))]
            for tag in tags:
                combos += [
                    (f"half+{tag}", ("pca_half", tag)),
                    (f"half+pca_thread+{tag}", ("pca_half", "pca_thread", tag)),
                ]
            for name, members in combos:
                logits[name] = (
                    np.mean([logits[k][0] for k in members], 0),
                    np.mean([logits[k][1] for k in members], 0),
                )
            for name, (z, _) in logits.items():
                rows.setdefault(name, []).append(
                    np.stack([np.full(len(test), r), np.full(len(test), f), test, z], 1)
                )
            g_test, _ = gauge_flags(list(imgs.measurements), labels, fit_idx, test)
            gauge_rows.append(g_test)
            aucs = {k: round(auroc(v[0], labels[test]), 4) for k, v in logits.items()}
            info.append(
                {
                    "repeat": r,
                    "fold": f,
                    "train_s": train_s,
                    "memory_fit_s": mem_fit_s,
                    "pca_fit_s": pca_s,
                    "grid": grid,
                    "cells": int(mask.sum()),
                    "auroc": aucs,
                }
            )
            print(json.dumps(info[-1]), flush=True)
    gauges = np.concatenate(gauge_rows)
    results: dict[str, Any] = {
        "net": asdict(ns),
        "memory": {k: [asdict(v[0]), v[1]] for k, v in mem_settings.items()},
        "folds": info,
        "members": {},
    }
    for name, parts_ in rows.items():
        arr = np.concatenate(parts_)
        np.save(args.out / f"{name}_r{args.first_repeat}-{args.first_repeat + args.repeats - 1}.npy", arr)
        results["members"][name] = summary(arr, labels, groups, paths, gauges)
        s = results["members"][name]
        print(
            f"{name:28s} AUROC {s['auroc_mean']:.4f}±{s['auroc_sd']:.4f} pooled {s['auroc_pooled']:.4f} "
            f"FRR@R1 {s['frr_at_recall1']:.3f} (+gauges {s['frr_at_recall1_with_gauges']:.3f}) "
            + " ".join(f"{k[:11]} {v:.3f}" for k, v in s["per_type"].items())
            + f" ts009 OK above {s['thread_side009_ok_above']} weakest {s['weakest']}",
            flush=True,
        )
    with open(args.out / f"summary_{args.tag}_r{args.first_repeat}.json", "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
