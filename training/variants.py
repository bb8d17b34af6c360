"""Repeated stratified k-fold of model variants: what each setting buys, measured where no choice was made.

Usage::

    python -m training.variants --data ../shared/data/screws-300 --variant default top8 --repeats 3

For every repeat (the split seed) and fold (``engine.split.make_kfold``), the variant's model is fitted on the
OK images of the other folds (train + val parts), its threshold is calibrated as ``inspectd train`` does it (on
the fit side's NG and its OK images scored leave-one-out; gauges learned from the fit side's OK parts), and the
held-out fold is scored once. Every image is thus scored ``repeats`` times, each time by a model that never saw
it. The summary gives, pooled over all held-out scores:

- AUROC per fold (mean, sd, min) and pooled;
- the false-reject rate at NG recall 1.0 of the pooled scores, by the model alone and with the gauges (NG the
  gauges reject need not be caught by the model; OK parts the gauges reject are false rejects);
- the same at each fold's own calibrated threshold (what the procedure train → calibrate → deploy delivers);
- per defect type: AUROC against the OK parts and recall at the calibrated thresholds.

``--decisions`` evaluates other ways for model and gauges to decide (DECISIONS: other bands, measurements fused
into the score) on the same fitted models and folds, one summary row each; ``--first-repeat`` continues an
earlier run with the next split seeds.

Pooled logits mix the folds' models; each model's logit scale is set by its own good parts (leave-one-out), so
pooling is meaningful, and the per-fold AUROC is reported beside it. Only the patch memory is supported (the
ResNet18 presets take minutes per fold; ``inspectd train --folds`` covers them).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.dataset import Dataset, discover
from engine.gauges import DEFAULT_MARGIN_PX, MAX_MARGIN_LOGIT, Margins, learn_margins, outside, values
from engine.pose import Measurements, PoseParams, estimate_pose
from engine.preprocess import Preprocessor, load_gray
from engine.split import make_kfold
from training.calibrate import calibrate
from training.config import PRESETS, TrainConfig
from training.gauge_fit import DEFAULT_BANDS, DEFAULT_ONE_SIDED, kfold_flags, learn_bands
from training.images import load_images, normalised
from training.metrics import auroc

# name → TrainConfig overrides of the default preset (every row of docs/training.md's variant table). Each
# variant names every setting it depends on, so a row means the same after the default changes: the single
# memories start from SINGLE (the default before the ensemble), the ensembles from FULL + members.
SINGLE: dict[str, Any] = {
    "input_size": [160, 500],
    "patch_members": [],
    "patch_residual": False,
    "patch_sd_pool": 1,
}
FULL: dict[str, Any] = {"input_size": [320, 1000], "patch_residual": False, "patch_sd_pool": 1}
HALF: dict[str, Any] = {"pool": 2}  # a member on the whole crop at half resolution
THREAD: dict[str, Any] = {"region": [0.15, 0.85, 0.44, 1.0]}  # the thread band (tip end) at full resolution
HEAD: dict[str, Any] = {"region": [0.0, 1.0, 0.0, 0.32]}  # the head and neck at full resolution
TUNED = {"sd_pool": 3, "residual": True}
# Thread-phase registration of the thread band on its regular part (band columns 60:460 of 560 at 320×1000)
# within ± 34 px, about half a thread pitch; registered, the band needs no column search.
ALIGNED = {"align": [0.107, 0.821, 0.0607], "window": [1, 0]}
# The three-member default before the head member's wider mean (each member's top 4), spelt out so the screens
# built on it keep their meaning when the preset changes.
DEFAULT3: list[dict[str, Any]] = [
    {**HALF, "bank_size": 100},
    {**THREAD, "bank_size": 100, "patch": 8, "stride": 4, "dims": 16, **ALIGNED},
    {**HEAD, "bank_size": 100},
]
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},  # the default preset as it is now
    "single_half": SINGLE,  # the default before this table: one memory on the 160×500 crop
    "top8": {**SINGLE, "patch_top_k": 8},
    "top16": {**SINGLE, "patch_top_k": 16},
    "dims64": {**SINGLE, "patch_dims": 64},
    "window13": {**SINGLE, "patch_window": [1, 3]},
    "res75": {**SINGLE, "input_size": [240, 750]},
    "phases4": {**SINGLE, "patch_axial_phases": 4},
    "residual": {**SINGLE, "patch_residual": True},
    "sdpool3": {**SINGLE, "patch_sd_pool": 3},
    "sdpool3_residual": {**SINGLE, "patch_sd_pool": 3, "patch_residual": True},
    "q95_sdpool3": {**SINGLE, "patch_spread_quantile": 0.95, "patch_sd_pool": 3},
    "head_anchor": {**SINGLE, "pose_params": {"anchor": "head"}},
    "thread_band_only": {**FULL, "patch_members": [{**THREAD}]},
    "half+thread": {**FULL, "patch_members": [{**HALF}, {**THREAD}]},
    "half+thread_tuned": {
        **FULL,
        "patch_members": [{**HALF, **TUNED}, {**THREAD, **TUNED}],
    },
    "half+thread+head_tuned": {
        **FULL,
        "patch_members": [{**HALF, **TUNED}, {**THREAD, **TUNED}, {**HEAD, **TUNED}],
    },
    "half+thread_d16": {
        **FULL,
        "patch_members": [{**HALF, "dims": 16, **TUNED}, {**THREAD, "dims": 16, **TUNED}],
    },
    "half+thread_d16_w11": {
        **FULL,
        "patch_members": [
            {**HALF, "dims": 16, "window": [1, 1], **TUNED},
            {**THREAD, "dims": 16, "window": [1, 1], **TUNED},
        ],
    },
    "half+thread_ph1": {
        **FULL,
        "patch_members": [{**HALF, **TUNED}, {**THREAD, "axial_phases": 1, **TUNED}],
    },
    "half+thread_b200": {
        **FULL,
        "patch_members": [
            {**HALF, "bank_size": 200, **TUNED},
            {**THREAD, "bank_size": 200, **TUNED},
        ],
    },
    "half+thread_b100": {
        **FULL,
        "patch_members": [
            {**HALF, "bank_size": 100, **TUNED},
            {**THREAD, "bank_size": 100, **TUNED},
        ],
    },
    "half+thread_b50": {
        **FULL,
        "patch_members": [{**HALF, "bank_size": 50, **TUNED}, {**THREAD, "bank_size": 50, **TUNED}],
    },
    "half+thread_b100_w11": {
        **FULL,
        "patch_members": [
            {**HALF, "bank_size": 100, "window": [1, 1], **TUNED},
            {**THREAD, "bank_size": 100, "window": [1, 1], **TUNED},
        ],
    },
    "half+thread_b200_w11": {
        **FULL,
        "patch_members": [
            {**HALF, "bank_size": 200, "window": [1, 1], **TUNED},
            {**THREAD, "bank_size": 200, "window": [1, 1], **TUNED},
        ],
    },
    "half+thread+head_b100_w11": {
        **FULL,
        "patch_members": [
            {**HALF, "bank_size": 100, "window": [1, 1], **TUNED},
            {**THREAD, "bank_size": 100, "window": [1, 1], **TUNED},
            {**HEAD, "bank_size": 100, "window": [1, 1], **TUNED},
        ],
    },
    "half+thread+head_b100": {
        **FULL,
        "patch_members": [
            {**HALF, "bank_size": 100, **TUNED},
            {**THREAD, "bank_size": 100, **TUNED},
            {**HEAD, "bank_size": 100, **TUNED},
        ],
    },
    "half+thread_aligned": {
        **FULL,
        "patch_members": [
            {**HALF, "bank_size": 100, **TUNED},
            {**THREAD, "bank_size": 100, **TUNED, **ALIGNED},
        ],
    },
    "half+thread_aligned_p8": {
        **FULL,
        "patch_members": [
            {**HALF, "bank_size": 100, **TUNED},
            {**THREAD, "bank_size": 100, "patch": 8, "stride": 4, "dims": 16, **TUNED, **ALIGNED},
        ],
    },
    "half+thread_aligned_p8_top16": {
        **FULL,
        "patch_members": [
            {**HALF, "bank_size": 100, **TUNED},
            {
                **THREAD,
                "bank_size": 100,
                "patch": 8,
                "stride": 4,
                "dims": 16,
                "top_k": 16,
                **TUNED,
                **ALIGNED,
            },
        ],
    },
    "half+thread_aligned_p8+head": {
        **FULL,
        "patch_members": [
            {**HALF, "bank_size": 100, **TUNED},
            {**THREAD, "bank_size": 100, "patch": 8, "stride": 4, "dims": 16, **TUNED, **ALIGNED},
            {**HEAD, "bank_size": 100, **TUNED},
        ],
    },
    # Fitted once with --members-out to screen member subsets and weights (``w=…`` decisions): the default's
    # two members, the head and neck at full resolution (16- and 8-pixel patches), the unregistered 16-pixel
    # thread band of the default before.
    "screen5": {
        **FULL,
        "patch_members": [
            {**HALF, "bank_size": 100, **TUNED},
            {**THREAD, "bank_size": 100, "patch": 8, "stride": 4, "dims": 16, **TUNED, **ALIGNED},
            {**HEAD, "bank_size": 100, **TUNED},
            {**THREAD, "bank_size": 100, "window": [1, 1], **TUNED},
            {**HEAD, "bank_size": 100, "patch": 8, "stride": 4, "dims": 16, **TUNED},
        ],
    },
    # The head member made cheaper (screened with --members-out like screen5): 16 components, a search of
    # ± 1 column only (along the axis) or ± 1 row only, both.
    "screen_head": {
        **FULL,
        "patch_members": [
            {**HALF, "bank_size": 100, **TUNED},
            {**THREAD, "bank_size": 100, "patch": 8, "stride": 4, "dims": 16, **TUNED, **ALIGNED},
            {**HEAD, "bank_size": 100, "dims": 16, **TUNED},
            {**HEAD, "bank_size": 100, "window": [0, 1], **TUNED},
            {**HEAD, "bank_size": 100, "window": [1, 0], **TUNED},
            {**HEAD, "bank_size": 100, "dims": 16, "window": [0, 1], **TUNED},
        ],
    },
    # The patch mean against its surround (``contrast``, cells) as one more feature, screened with --members-out
    # and decided with --from-members default.npz screen_contrast.npz --stack: the head member with a 5- or
    # 11-cell surround, the half-resolution member with a 5-cell one.
    "screen_contrast": {
        **FULL,
        "patch_members": [
            {**HEAD, "bank_size": 100, "contrast": 5, **TUNED},
            {**HEAD, "bank_size": 100, "contrast": 11, **TUNED},
            {**HALF, "bank_size": 100, "contrast": 5, **TUNED},
        ],
    },
    # How many cells a member's score averages (``top_k``; the default's members use 4): screened with
    # --members-out and decided with --from-members default.npz screen_topk.npz --stack. A defect spans more
    # cells of the finer members (the registered band's cells are a quarter of the others').
    "default3_top4": {"patch_members": DEFAULT3},  # the default before the head member's wider mean
    "screen_topk": {
        "patch_members": [
            {**DEFAULT3[1], "top_k": 16},
            {**DEFAULT3[1], "top_k": 64},
            {**DEFAULT3[2], "top_k": 16},
            {**DEFAULT3[2], "top_k": 32},
            {**DEFAULT3[0], "top_k": 8},
        ]
    },
    # Bank jitter (``jitter``): every member also stores each good crop turned ± 0.5° about the crop's centre
    # (the ends move ± 4 px), or moved ± 2 rows across the axis: the pose crop's own residual error. On the
    # three members with the head's top 4 (as measured on split seeds 0–2), and with its top 32 (the default).
    "jitter_rot": {"patch_members": [{**m, "jitter": [[0.5, 0.0], [-0.5, 0.0]]} for m in DEFAULT3]},
    "jitter_rows": {"patch_members": [{**m, "jitter": [[0.0, 2.0], [0.0, -2.0]]} for m in DEFAULT3]},
    "jitter_rot_head32": {
        "patch_members": [
            {**m, **({"top_k": 32} if i == 2 else {}), "jitter": [[0.5, 0.0], [-0.5, 0.0]]}
            for i, m in enumerate(DEFAULT3)
        ]
    },
    # The default (``jitter_rot_head32``) with ± 1° copies beside its ± 0.5° ones: how far the pose crop's
    # error reaches. Screened with --members-out and --stack against the default's own members.
    "jitter_wide": {
        "patch_members": [
            {
                **m,
                **({"top_k": 32} if i == 2 else {}),
                "jitter": [[0.5, 0.0], [-0.5, 0.0], [1.0, 0.0], [-1.0, 0.0]],
            }
            for i, m in enumerate(DEFAULT3)
        ]
    },
    "half+thread_p8": {
        **FULL,
        "patch_members": [
            {**HALF, "bank_size": 100, **TUNED},
            {**THREAD, "bank_size": 100, "patch": 8, "stride": 4, "dims": 16, "window": [1, 1], **TUNED},
        ],
    },
    "half+thread+thread_aligned": {
        **FULL,
        "patch_members": [
            {**HALF, "bank_size": 100, **TUNED},
            {**THREAD, "bank_size": 100, **TUNED},
            {**THREAD, "bank_size": 100, **TUNED, **ALIGNED},
        ],
    },
    "half+thread_p24_tuned": {
        **FULL,
        "patch_members": [{**HALF, **TUNED}, {**THREAD, "patch": 24, **TUNED}],
    },
}


# How model and gauges make the decision, evaluated on the same fitted models (``--decisions``): the gauge bands
# learnt on each fold's fit-side OK parts, and measurements fused into the score (each z-normalised on the
# fit-side OK parts and added to the model's logit, whose scale is set by the same parts). Every decision but
# ``default`` and ``margins=`` is without the gauge margins (the crest-dip rows were measured before them).
NO_CREST = ("length_px", "straightness_px")  # the default bands before the crest dip
DECISIONS: dict[str, dict[str, Any]] = {
    "default": {},  # training.gauge_fit's default bands and the default preset's gauge margins
    "no_margins": {"margins": None},  # the model's logit alone (the default before the margins)
    "no_crest": {"bands": NO_CREST, "margins": None},
    "crest_band": {"bands": (*NO_CREST, "crest_dip_px"), "margins": None},
    "crest_fused": {"bands": NO_CREST, "fuse": ("crest_dip_px",), "margins": None},
    "crest_fused_half": {"bands": NO_CREST, "fuse": ("crest_dip_px",), "fuse_weight": 0.5, "margins": None},
    "crest_band+fused": {"bands": (*NO_CREST, "crest_dip_px"), "fuse": ("crest_dip_px",), "margins": None},
}


@dataclass(frozen=True, slots=True)
class Scored:
    """One fold of one repeat: held-out logits, the fold's calibrated threshold (logit), gauge flags."""

    test: np.ndarray  # indices into the dataset
    logits: np.ndarray
    threshold_logit: float
    gauge_reject: np.ndarray  # held-out parts outside the fold's bands
    fit_s: float


@dataclass(frozen=True, slots=True)
class FoldScores:
    """One fold's logits, one row per ensemble member (members × parts): the held-out parts, the fit side's NG
    and its OK parts (leave-one-out). The ensemble's logit is the members' mean (``fused``)."""

    test: np.ndarray
    ng: np.ndarray
    loo: np.ndarray
    fit_s: float

    def fused(self, weights: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(test, ng, loo) logits of the members weighted by ``weights`` (normalised to sum 1; None = the
        ensemble's plain mean). A weight 0 leaves a member out."""
        n = self.test.shape[0]
        w = np.full(n, 1.0 / n) if weights is None else np.asarray(weights, np.float64)
        if w.shape != (n,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights {list(w)} do not fit {n} member(s): one non-negative weight each")
        w = w / w.sum()
        return tuple(np.tensordot(w, a, axes=1) for a in (self.test, self.ng, self.loo))  # type: ignore[return-value]


def measure_all(ds: Dataset, params: PoseParams) -> list[Measurements | None]:
    out: list[Measurements | None] = []
    for s in ds.samples:
        try:
            out.append(estimate_pose(load_gray(str(ds.abspath(s))), params).measurements)
        except ValueError:
            out.append(None)
    return out


def fit_fold(
    cfg: TrainConfig,
    x: np.ndarray,
    pixels: np.ndarray,
    labels: np.ndarray,
    fit_idx: np.ndarray,
    test_idx: np.ndarray,
) -> FoldScores:
    import torch

    from training.patch_memory import fit

    ok = fit_idx[labels[fit_idx] == 0]
    ng = fit_idx[labels[fit_idx] == 1]
    t0 = time.monotonic()
    # The members one by one (what training.patch_memory.fit_members does), so each one's logits are kept.
    fitted = [
        fit(x[ok], pixels[ok], m, seed=cfg.seed, log=lambda _: None) for m in cfg.patch_members_settings()
    ]
    fit_s = time.monotonic() - t0

    def score(idx: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.stack(
                [
                    np.concatenate(
                        [m(torch.from_numpy(x[idx[i : i + 8]]))[:, 0].numpy() for i in range(0, len(idx), 8)]
                    )
                    for m, _ in fitted
                ]
            ).astype(np.float64)

    loo = np.stack([lo for _, lo in fitted]).astype(np.float64)
    return FoldScores(score(test_idx), score(ng), loo, fit_s)


def gauge_flags(
    meas: Sequence[Measurements | None],
    labels: np.ndarray,
    fit_idx: np.ndarray,
    test_idx: np.ndarray,
    names: Sequence[str] = DEFAULT_BANDS,
    one_sided: dict[str, str] | None = None,
    margin_px: float = DEFAULT_MARGIN_PX,
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out parts outside the bands learned from the fit side's OK parts, and the calibration parts'
    flags (fit-side NG: the bands; fit-side OK: k-fold, each judged by bands learned without it)."""
    ok = fit_idx[labels[fit_idx] == 0]
    ng = fit_idx[labels[fit_idx] == 1]
    good = [meas[i] for i in ok]
    if any(m is None for m in good):
        raise ValueError("a fit-side OK part has no pose")
    learn: dict[str, Any] = {"names": names, "one_sided": one_sided, "margin_px": margin_px}
    bands = learn_bands([m for m in good if m is not None], **learn)

    def out_of(idx: np.ndarray) -> np.ndarray:
        return np.array(
            [meas[i] is None or any(bool(outside([meas[i]], b)[0]) for b in bands) for i in idx], bool
        )

    flags = kfold_flags([m for m in good if m is not None], **learn)
    return out_of(test_idx), np.concatenate([out_of(ng), np.logical_or.reduce(list(flags.values()))])


def fused_z(
    meas: Sequence[Measurements | None], names: Sequence[str], ok_idx: np.ndarray, idx: np.ndarray
) -> np.ndarray:
    """Sum over ``names`` of each measurement z-normalised on the OK parts ``ok_idx`` (mean, s.d.), for ``idx``;
    a part without a pose or with a non-finite value gets +inf (it cannot pass)."""
    total = np.zeros(len(idx))
    for name in names:
        ref = values([m for i in ok_idx if (m := meas[i]) is not None], name)
        mu, sd = float(np.mean(ref)), max(float(np.std(ref, ddof=1)), 1e-9)
        v = np.array([np.inf if (m := meas[i]) is None else float(getattr(m, name)) for i in idx])
        total += np.where(np.isfinite(v), (v - mu) / sd, np.inf)
    return total


def margin_terms(margins: Margins, meas: Sequence[Measurements | None], idx: np.ndarray) -> np.ndarray:
    """What the gauges' margins add to the logits of the parts ``idx`` (a part without a pose: the cap)."""
    return np.array([MAX_MARGIN_LOGIT if (m := meas[i]) is None else margins.term(m) for i in idx])


def frr_at_full_recall(z: np.ndarray, y: np.ndarray, caught: np.ndarray | None = None) -> float:
    """Share of OK parts rejected when the threshold catches every NG not already ``caught`` (by gauges);
    OK parts ``caught`` count as rejected."""
    caught = np.zeros(len(z), bool) if caught is None else caught
    need = z[(y == 1) & ~caught]
    thr = float(need.min()) if need.size else np.inf
    rejected = (z >= thr) | caught
    return float(rejected[y == 0].mean())


def summarise(scored: list[Scored], ds: Dataset, repeats: int) -> dict[str, Any]:
    labels = np.array([s.label for s in ds.samples])
    groups = np.array([s.group for s in ds.samples])
    idx = np.concatenate([s.test for s in scored])
    z = np.concatenate([s.logits for s in scored])
    g = np.concatenate([s.gauge_reject for s in scored])
    thr = np.concatenate([np.full(len(s.test), s.threshold_logit) for s in scored])
    y = labels[idx]
    per_fold = [auroc(s.logits, labels[s.test]) for s in scored]
    reject_model = z >= thr
    reject = reject_model | g
    out: dict[str, Any] = {
        "folds": len(scored),
        "repeats": repeats,
        "scored": len(z),
        "auroc_mean": float(np.mean(per_fold)),
        "auroc_sd": float(np.std(per_fold, ddof=1)) if len(per_fold) > 1 else 0.0,
        "auroc_min": float(np.min(per_fold)),
        "auroc_pooled": auroc(z, y),
        # The deployed decision's ranking: a part the gauges reject ranks above every part they pass (whatever
        # its logit), so this is the ROC of model + gauges as the model's threshold sweeps.
        "auroc_pooled_with_gauges": auroc(np.where(g, np.inf, z), y),
        "frr_at_recall1_model": frr_at_full_recall(z, y),
        "frr_at_recall1_with_gauges": frr_at_full_recall(z, y, g),
        "calibrated_recall": float(reject[y == 1].mean()),
        "calibrated_frr": float(reject[y == 0].mean()),
        "calibrated_frr_model_only": float(reject_model[y == 0].mean()),
        "calibrated_misses": sorted({str(ds.samples[i].path) for i in idx[(y == 1) & ~reject]}),
        "fit_s_mean": float(np.mean([s.fit_s for s in scored])),
        "per_type": {},
    }
    for t in sorted(set(groups[labels == 1])):
        sel = groups[idx] == t
        both = sel | (y == 0)
        out["per_type"][t] = {
            "auroc": auroc(z[both], y[both]),
            "recall_calibrated": float(reject[sel].mean()),
            "gauges_caught": float(g[sel].mean()),
        }
    # The weakest NG against the good parts: how many OK scores lie above each of the 5 lowest NG.
    ok_z = np.sort(z[y == 0])
    ng_order = np.argsort(z[y == 1])[:5]
    out["weakest_ng"] = [
        {
            "path": str(ds.samples[int(idx[y == 1][i])].path),
            "ok_above": int(len(ok_z) - np.searchsorted(ok_z, z[y == 1][i], side="right")),
            "gauges": bool(g[y == 1][i]),
        }
        for i in ng_order
    ]
    # … and of the NG the gauges do not reject: those set the threshold that catches every NG.
    ng_pos = np.flatnonzero((y == 1) & ~g)
    out["weakest_ng_model"] = [
        {
            "path": str(ds.samples[int(idx[i])].path),
            "ok_above": int(len(ok_z) - np.searchsorted(ok_z, z[i], side="right")),
        }
        for i in ng_pos[np.argsort(z[ng_pos])[:5]]
    ]
    return out


@dataclass(frozen=True, slots=True)
class Fold:
    """One fitted fold of one repeat: which parts were fitted and held out, and the members' logits."""

    repeat: int
    fold: int
    fit_idx: np.ndarray
    test_idx: np.ndarray
    scores: FoldScores


def fit_variant(
    name: str,
    spec: dict[str, Any],
    base: TrainConfig,
    ds: Dataset,
    *,
    folds: int,
    repeats: int,
    log: Callable[[str], None],
    first_repeat: int = 0,
) -> list[Fold]:
    """The variant's models on every fold of every repeat (split seeds ``first_repeat`` …)."""
    cfg = TrainConfig.from_dict(spec, base)
    pre = Preprocessor(cfg.preprocess())
    imgs = load_images(ds, ds.samples, pre)
    if imgs.failed:
        raise ValueError(f"{len(imgs.failed)} image(s) failed preprocessing: {list(imgs.failed)[:5]}")
    x = normalised(pre, imgs.pixels)
    labels = np.array([s.label for s in ds.samples])
    pos = {s.path: i for i, s in enumerate(ds.samples)}
    out = []
    for r in range(first_repeat, first_repeat + repeats):
        for f in range(folds):
            sp = make_kfold(ds.samples, folds=folds, fold=f, seed=r)
            fit_idx = np.array([pos[p] for p in sp.train + sp.val])
            test_idx = np.array([pos[p] for p in sp.test])
            part = fit_fold(cfg, x, imgs.pixels, labels, fit_idx, test_idx)
            out.append(Fold(r, f, fit_idx, test_idx, part))
            log(
                f"  {name}: repeat {r} fold {f}: AUROC {auroc(part.fused()[0], labels[test_idx]):.3f} "
                f"({part.fit_s:.0f} s)"
            )
    return out


def save_folds(path: Path, folds: Sequence[Fold]) -> None:
    """The fitted folds' member logits as one ``.npz`` (``--members-out``), for ``--from-members``."""
    arrays: dict[str, Any] = {"n": np.array(len(folds))}
    for i, f in enumerate(folds):
        arrays[f"{i}.rf"] = np.array([f.repeat, f.fold])
        arrays[f"{i}.fit_idx"], arrays[f"{i}.test_idx"] = f.fit_idx, f.test_idx
        sc = f.scores
        arrays[f"{i}.test"], arrays[f"{i}.ng"], arrays[f"{i}.loo"] = sc.test, sc.ng, sc.loo
        arrays[f"{i}.fit_s"] = np.array(sc.fit_s)
    np.savez_compressed(path, **arrays)


def load_folds(path: Path) -> list[Fold]:
    with np.load(path) as z:
        return [
            Fold(
                int(z[f"{i}.rf"][0]),
                int(z[f"{i}.rf"][1]),
                z[f"{i}.fit_idx"],
                z[f"{i}.test_idx"],
                FoldScores(z[f"{i}.test"], z[f"{i}.ng"], z[f"{i}.loo"], float(z[f"{i}.fit_s"])),
            )
            for i in range(int(z["n"]))
        ]


def stack_folds(runs: Sequence[Sequence[Fold]]) -> list[Fold]:
    """The members of several runs on the same folds as one run (member rows in the order given): members fitted
    separately (a screen of new members) decided together with those of an earlier run."""
    first = runs[0]
    for other in runs[1:]:
        same = len(other) == len(first) and all(
            (a.repeat, a.fold) == (b.repeat, b.fold)
            and np.array_equal(a.fit_idx, b.fit_idx)
            and np.array_equal(a.test_idx, b.test_idx)
            for a, b in zip(first, other, strict=True)
        )
        if not same:
            raise ValueError("--stack needs runs on the same folds (same --folds, --repeats, --first-repeat)")

    def rows(i: int, part: str) -> np.ndarray:
        return np.vstack([getattr(r[i].scores, part) for r in runs])

    return [
        Fold(
            f.repeat,
            f.fold,
            f.fit_idx,
            f.test_idx,
            FoldScores(rows(i, "test"), rows(i, "ng"), rows(i, "loo"), sum(r[i].scores.fit_s for r in runs)),
        )
        for i, f in enumerate(first)
    ]


def decision(name: str) -> dict[str, Any]:
    """A DECISIONS entry; ``w=1,1,0.5``: the default bands with the members' logits weighted so; ``budget=0.05``
    or ``budget=none``: the threshold calibrated with that false-reject budget (training.calibrate) instead of
    the default preset's ``frr_budget``."""
    if name in DECISIONS:
        return DECISIONS[name]
    if name.startswith("budget="):
        v = name[len("budget=") :]
        try:
            return {"frr_budget": None if v == "none" else float(v)}
        except ValueError:
            pass
    if name.startswith("band_margin="):
        try:
            return {"band_margin_px": float(name[len("band_margin=") :])}
        except ValueError:
            pass
    if name.startswith("margins="):
        try:
            k, w = (float(v) for v in name[len("margins=") :].split(","))
            return {"margins": {"k": k, "weight": w}}
        except ValueError:
            pass
    if name.startswith("w="):
        try:
            return {"weights": tuple(float(v) for v in name[2:].split(","))}
        except ValueError:
            pass
    raise ValueError(
        f"unknown decision {name!r}; known: {list(DECISIONS)}, w=<weight>,<weight>,…, margins=<k>,<weight>, "
        "band_margin=<px> or budget=<share>|none"
    )


def decide(
    name: str,
    spec: dict[str, Any],
    ds: Dataset,
    meas: Sequence[Measurements | None],
    folds: Sequence[Fold],
    decisions: Sequence[str] = ("default",),
) -> list[dict[str, Any]]:
    """One summary per decision in ``decisions`` (see :func:`decision`), all from the same fitted folds."""
    labels = np.array([s.label for s in ds.samples])
    repeats = len({f.repeat for f in folds})
    out = []
    for d in decisions:
        dec = decision(d)
        scored: list[Scored] = []
        for fo in folds:
            fit_idx, test_idx = fo.fit_idx, fo.test_idx
            ok_idx = fit_idx[labels[fit_idx] == 0]
            ng_idx = fit_idx[labels[fit_idx] == 1]
            z_test, z_ng, z_loo = fo.scores.fused(dec.get("weights"))
            margins = dec.get("margins", PRESETS["default"].gauge_margins)
            if margins is not None:
                # As inspectd train: the margins learnt from the fit side's OK parts, on the bands' sides.
                good = [m for i in ok_idx if (m := meas[i]) is not None]
                names = dec.get("bands", DEFAULT_BANDS)
                mg = learn_margins(good, names, dec.get("one_sided") or DEFAULT_ONE_SIDED, **margins)
                z_test = z_test + margin_terms(mg, meas, test_idx)
                z_ng = z_ng + margin_terms(mg, meas, ng_idx)
                z_loo = z_loo + margin_terms(mg, meas, ok_idx)
            if dec.get("fuse"):
                wgt = float(dec.get("fuse_weight", 1.0))
                z_test = z_test + wgt * fused_z(meas, dec["fuse"], ok_idx, test_idx)
                z_ng = z_ng + wgt * fused_z(meas, dec["fuse"], ok_idx, ng_idx)
                z_loo = z_loo + wgt * fused_z(meas, dec["fuse"], ok_idx, ok_idx)
            z_cal = np.concatenate([z_ng, z_loo])
            g_test, g_cal = gauge_flags(
                meas,
                labels,
                fit_idx,
                test_idx,
                names=dec.get("bands", DEFAULT_BANDS),
                one_sided=dec.get("one_sided"),
                margin_px=dec.get("band_margin_px", DEFAULT_MARGIN_PX),
            )
            n_ng = len(z_ng)
            y_cal = np.concatenate([np.ones(n_ng), np.zeros(len(z_cal) - n_ng)])
            # Fused with a measurement that is +inf (no pose), a part is out of the calibration's finite range.
            z_cal = np.nan_to_num(z_cal, posinf=1e6)
            budget = dec.get("frr_budget", PRESETS["default"].frr_budget)
            cal = calibrate(z_cal, y_cal, target_recall=1.0, gauge_reject=g_cal, frr_budget=budget)
            scored.append(
                Scored(
                    test_idx, np.nan_to_num(z_test, posinf=1e6), cal.threshold_logit, g_test, fo.scores.fit_s
                )
            )
        summary = summarise(scored, ds, repeats)
        summary["variant"] = name if d == "default" else f"{name} [{d}]"
        summary["config"] = spec
        summary["decision"] = {k: list(v) if isinstance(v, tuple) else v for k, v in dec.items()}
        out.append(summary)
    return out


def line(s: dict[str, Any]) -> str:
    types = " ".join(f"{t[:11]} {v['auroc']:.3f}" for t, v in s["per_type"].items())
    return (
        f"{s['variant']:24s} AUROC {s['auroc_mean']:.3f}±{s['auroc_sd']:.3f} (min {s['auroc_min']:.3f}) "
        f"pooled {s['auroc_pooled']:.4f} (+gauges {s['auroc_pooled_with_gauges']:.4f}) | FRR@R1 model {s['frr_at_recall1_model']:.3f} "
        f"+gauges {s['frr_at_recall1_with_gauges']:.3f} | calibrated recall {s['calibrated_recall']:.3f} "
        f"FRR {s['calibrated_frr']:.3f} | {types} | fit {s['fit_s_mean']:.0f} s"
    )


def table(rows: Sequence[dict[str, Any]]) -> str:
    """docs/training.md's variant table: one markdown row per summary (the last one of each variant name)."""
    last = {r["variant"]: r for r in rows}
    types = sorted({t for r in last.values() for t in r["per_type"]})
    head = (
        "| variant | folds × repeats | AUROC per fold (mean ± sd, min) | pooled AUROC: model / + gauges "
        "| FRR @ recall 1.0: model "
        "| + gauges | at calibrated thresholds: recall / FRR | "
        + " | ".join(t.replace("_", " ") for t in types)
        + " | fit s |"
    )
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in last.values():
        g = r.get("auroc_pooled_with_gauges")  # rows from before it was measured have none
        out.append(
            f"| `{r['variant']}` | {r['folds'] // r['repeats']} × {r['repeats']} "
            f"| {r['auroc_mean']:.3f} ± {r['auroc_sd']:.3f}, {r['auroc_min']:.3f} | {r['auroc_pooled']:.3f} / "
            + ("–" if g is None else f"{g:.3f}")
            + f" | {r['frr_at_recall1_model']:.3f} | {r['frr_at_recall1_with_gauges']:.3f} "
            f"| {r['calibrated_recall']:.3f} / {r['calibrated_frr']:.3f} | "
            + " | ".join(f"{r['per_type'][t]['auroc']:.3f}" for t in types)
            + f" | {r['fit_s_mean']:.0f} |"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.variants", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path)
    ap.add_argument("--table", type=Path, help="print the markdown table of a --out file and exit")
    ap.add_argument("--variant", nargs="+", default=["default"], help=f"any of {list(VARIANTS)}")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument(
        "--first-repeat", type=int, default=0, help="split seed of the first repeat (continue an earlier run)"
    )
    ap.add_argument("--out", type=Path, help="append each variant's summary (JSON lines) here")
    ap.add_argument(
        "--decisions",
        nargs="+",
        default=["default"],
        help=f"decisions evaluated on the same models, one row each: any of {list(DECISIONS)}, "
        "w=1,1,0.5 (the members' logits weighted so; 0 leaves a member out), or budget=0.05|none (the "
        "threshold's false-reject budget instead of the default preset's)",
    )
    ap.add_argument(
        "--stack",
        action="store_true",
        help="with --from-members: one run whose members are those of every file, in order (same folds)",
    )
    ap.add_argument(
        "--members-out",
        type=Path,
        help="keep every fold's per-member logits here, one DIR/<variant>.npz each (for --from-members)",
    )
    ap.add_argument(
        "--from-members",
        type=Path,
        nargs="+",
        help="decide from --members-out files instead of fitting (the variant is the file's name)",
    )
    args = ap.parse_args(argv)
    if args.table:
        lines = args.table.read_text(encoding="utf-8").splitlines()
        print(table([json.loads(x) for x in lines if x.strip()]))
        return 0
    if args.data is None:
        ap.error("--data is required (or --table FILE)")
    unknown = [v for v in args.variant if v not in VARIANTS]
    if unknown and not args.from_members:
        ap.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    for d in args.decisions:
        try:
            decision(d)
        except ValueError as e:
            ap.error(str(e))
    ds = discover(args.data)
    base = PRESETS["default"]
    meas = measure_all(ds, PoseParams.from_dict(dict(base.pose_params)))
    runs: list[tuple[str, Callable[[], list[Fold]]]] = []
    if args.stack and args.from_members:
        paths = list(args.from_members)
        runs.append(("+".join(p.stem for p in paths), lambda: stack_folds([load_folds(p) for p in paths])))
    for path in [] if args.stack else args.from_members or ():
        runs.append((path.stem, functools.partial(load_folds, path)))
    for name in [] if args.from_members else args.variant:

        def fitted(name: str = name) -> list[Fold]:
            folds = fit_variant(
                name,
                VARIANTS[name],
                base,
                ds,
                folds=args.folds,
                repeats=args.repeats,
                log=lambda m: print(m, flush=True),
                first_repeat=args.first_repeat,
            )
            if args.members_out:
                args.members_out.mkdir(parents=True, exist_ok=True)
                save_folds(args.members_out / f"{name}.npz", folds)
            return folds

        runs.append((name, fitted))
    for name, get in runs:
        t0 = time.monotonic()
        folds = get()
        seconds = round(time.monotonic() - t0, 1)
        for s in decide(name, VARIANTS.get(name, {}), ds, meas, folds, args.decisions):
            s["seconds"] = seconds
            print(line(s), flush=True)
            weakest = [(w["path"].split("/")[-1], w["ok_above"]) for w in s["weakest_ng_model"]]
            print("  weakest NG the gauges pass (OK above):", weakest, flush=True)
            print("  misses:", s["calibrated_misses"], flush=True)
            if args.out:
                with open(args.out, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(s) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
