"""Evaluate a training run (torch, best checkpoint) or an exported package (ONNX Runtime — the production path)
on one part of its split, and write ``metrics.json``, PNG figures and a self-contained ``report.html``.

The verdict scored is the daemon's: REJECT when the model or a gauge band says so (the target's gauges: the
package's ``gauges``, a run's gauges.json). Beside it, what the model and the gauges each catch
(``by_source``), the model alone (``model_only``), the escape rate's 95 % upper bound, and what each grey-zone
budget of the calibration does on these images.

Images whose preprocessing fails (undecodable, no pose found) are scored as REJECT, as the daemon would
decide them, and listed in the report; they are never dropped from the denominators.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from engine.backend import sigmoid
from engine.dataset import DataError, Dataset, Sample, discover, subset
from engine.gauges import GaugeSet, load_gauges, outside_any
from engine.package import Decision, load_package
from engine.pose import Measurements, estimate_pose
from engine.preprocess import DecodeError, Preprocessor, load_gray
from engine.split import Split
from engine.stats import ESCAPE_CONFIDENCE, escape_upper_bound, rejections_by_source
from training.augment import part_alpha, swap_background
from training.calibrate import zone_counts
from training.images import Images, load_images, normalised
from training.metrics import at_threshold, auroc, auroc_ci
from training.scored import FAILED_LOGIT, Scored, Target


def open_target(path: str | Path) -> Target:
    """A model package (model.json) or a finished run (run.json) — what to score and how."""
    p = Path(path)
    if (p / "model.json").is_file():
        meta = load_package(p).meta
        sp = meta.training.get("split")
        info = {
            "model_id": meta.model_id,
            "arch": (meta.training.get("config") or {}).get("arch", "resnet18"),
            "calibration": meta.calibration,
            "training": {k: v for k, v in meta.training.items() if k not in ("split", "history")},
        }
        split = Split.from_dict(sp) if sp else None
        history = list(meta.training.get("history", []))
        gauges = load_gauges(meta.gauges, meta.preprocess.pose)
        return Target("package", p, meta.preprocess, meta.decision, split, history, info, gauges)
    if (p / "run.json").is_file():
        from training.config import TrainConfig
        from training.train import SPLIT, load_run_gauges
        from training.train import history as run_history

        summary = json.loads((p / "run.json").read_text(encoding="utf-8"))
        cfg = TrainConfig.from_saved(summary["config"])
        cal = summary["calibration"]
        gz = cal.get("grey_zone")
        decision = Decision(cal["threshold"], (gz[0], gz[1]) if gz else None)
        info = {
            "arch": cfg.arch,
            "calibration": cal,
            "best_epoch": summary.get("best_epoch"),
            "stopped": summary.get("stopped"),
        }
        split = Split.load(p / SPLIT)
        return Target("run", p, cfg.preprocess(), decision, split, run_history(p), info, load_run_gauges(p))
    raise FileNotFoundError(
        f"{p} is neither a model package (model.json) nor a finished training run (run.json)"
    )


def score(target: Target, ds: Dataset, samples: list[Sample], *, threads: int = 2) -> Scored:
    """Preprocess with the target's parameters and run it; failed images get ``FAILED_LOGIT`` (REJECT). With
    gauges, which images they reject."""
    pre = Preprocessor(target.preprocess)
    imgs = load_images(ds, samples, pre, threads=threads)
    x = normalised(pre, imgs.pixels)
    logits, cams = _infer_package(target.path, x) if target.kind == "package" else _infer_run(target.path, x)
    row = {s.path: i for i, s in enumerate(imgs.samples)}
    z = [logits[row[s.path]] if s.path in row else FAILED_LOGIT for s in samples]
    measured, unmeasurable = _measured(target.gauges, ds, samples, imgs) if target.gauges else ([], None)
    added = None
    if target.gauges is not None and target.gauges.margins is not None:
        # The score the daemon thresholds: the model's logit plus what the part's measurements add. A part that
        # could not be measured is a gauge reject (below), and adds nothing here.
        margins = target.gauges.margins
        added = np.array([0.0 if m is None else margins.term(m) for m in measured], np.float64)
    neutral = None
    ok = imgs.pixels[imgs.labels == 0]
    if len(ok):
        # Counterfactual: every part on the same background (the pixelwise median of the OK images). What the
        # background said about the label is gone; a model that read the part scores as before.
        donor = np.median(ok, axis=0).astype(np.uint8)
        xn = normalised(pre, np.stack([swap_background(img, donor) for img in imgs.pixels]))
        zn = (
            _infer_package(target.path, xn)[0] if target.kind == "package" else _infer_run(target.path, xn)[0]
        )
        neutral = np.array([zn[row[s.path]] if s.path in row else FAILED_LOGIT for s in samples], np.float64)
        neutral = (neutral if added is None else neutral + added).astype(np.float32)
    model_z = np.array(z, np.float64)
    gauge_reject = None
    if target.gauges is not None:
        assert unmeasurable is not None
        bands = target.gauges.bands
        gauge_reject = unmeasurable | np.array(
            [m is not None and bool(outside_any([m], bands)[0]) for m in measured], bool
        )
    return Scored(
        samples=list(samples),
        logits=(model_z if added is None else model_z + added).astype(np.float32),
        failed=dict(imgs.failed),
        pixels={p: imgs.pixels[i] for p, i in row.items()},
        cams={p: cams[i] for p, i in row.items()} if cams is not None else {},
        neutral_logits=neutral,
        gauge_reject=gauge_reject,
        margin_logits=None if added is None else added.astype(np.float32),
    )


def _measured(
    gauges: GaugeSet, ds: Dataset, samples: list[Sample], imgs: Images
) -> tuple[list[Measurements | None], np.ndarray]:
    """Per sample, its measurements as the daemon takes them, and whether it is a gauge reject because it cannot
    be measured: with the pose the crop was cut with (``imgs.measurements``; an image whose crop failed has none
    and is already a REJECT, no gauge's), or, for a model without a pose crop, by ``estimate_pose`` with the
    gauges' parameters, where a part that cannot be measured cannot pass a gauge."""
    if imgs.measurements is not None:
        by_path = dict(zip((s.path for s in imgs.samples), imgs.measurements, strict=True))
        return [by_path.get(s.path) for s in samples], np.zeros(len(samples), bool)
    params = gauges.pose_params()
    out: list[Measurements | None] = []
    for s in samples:
        try:
            out.append(estimate_pose(load_gray(str(ds.abspath(s))), params).measurements)
        except (DecodeError, OSError, ValueError):  # PoseError is a ValueError
            out.append(None)
    return out, np.array([m is None for m in out], bool)


def _infer_package(path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    import onnxruntime as ort

    pkg = load_package(path)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(pkg.onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
    names = [pkg.meta.output_name] + ([pkg.meta.heatmap_output] if pkg.meta.heatmap_output else [])
    logits, cams = [], []
    for i in range(0, len(x), 16):
        out = sess.run(names, {pkg.meta.input_name: x[i : i + 16]})
        logits.append(np.asarray(out[0], np.float32).reshape(-1))
        if len(out) > 1:
            cams.append(np.asarray(out[1], np.float32))
    if not logits:
        return np.empty(0, np.float32), None
    return np.concatenate(logits), (np.concatenate(cams) if cams else None)


def _infer_run(path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    import torch

    from engine.model import CamHead
    from training.train import load_run_model

    model, _, _ = load_run_model(path)
    net = CamHead.wrap(model).eval()
    logits, cams = [], []
    with torch.no_grad():
        for i in range(0, len(x), 16):
            z, c = net(torch.from_numpy(x[i : i + 16]))
            logits.append(z.numpy())
            cams.append(c.numpy())
    if not logits:
        return np.empty(0, np.float32), None
    return np.concatenate(logits), np.concatenate(cams)


def compute_metrics(scored: Scored, decision: Decision) -> dict[str, Any]:
    """The combined verdict's metrics (model or gauges: what the daemon decides), the model's alone beside them,
    who caught what, and every image's score and verdict."""
    y = np.array([s.label for s in scored.samples])
    p = sigmoid(scored.logits)
    lo = decision.grey_zone[0] if decision.grey_zone else decision.threshold
    by_model = p >= lo  # grey zone counts as REJECT: a part in it does not pass unattended
    gauged = scored.gauge_reject if scored.gauge_reject is not None else np.zeros(len(y), bool)
    reject = by_model | gauged
    m: dict[str, Any] = {"n": len(y), "n_ok": int((y == 0).sum()), "n_ng": int((y == 1).sum())}
    m["auroc"] = auroc(scored.logits, y)
    m["auroc_ci95"] = list(auroc_ci(scored.logits, y))
    m["threshold"] = decision.threshold
    m["grey_zone"] = list(decision.grey_zone) if decision.grey_zone else None
    if decision.grey_zone:
        # a gauge reject is REJECT out_of_tolerance, never grey
        grey = (p >= decision.grey_zone[0]) & (p < decision.grey_zone[1]) & ~gauged
        m["grey_fraction"] = float(np.mean(grey))
    m |= at_threshold(reject, y)
    m["gauges"] = scored.gauge_reject is not None
    added = scored.margin_logits if scored.margin_logits is not None else np.zeros(len(y), np.float32)
    # The gauges' margins in the score: how many parts they raised, and how many crossed the threshold by it.
    m["margins"] = scored.margin_logits is not None
    if scored.margin_logits is not None:
        by_model_alone = sigmoid(scored.logits - added) >= lo
        m["margins_raised"] = {
            "ok": int(((added > 0) & (y == 0)).sum()),
            "ng": int(((added > 0) & (y == 1)).sum()),
            "rejected_by_them": int((by_model & ~by_model_alone).sum()),
        }
    alone = at_threshold(by_model, y)
    m["model_only"] = {k: alone[k] for k in ("recall", "false_reject_rate", "confusion")}
    m["by_source"] = rejections_by_source(y == 1, [s.group for s in scored.samples], by_model, gauged)
    m["escapes"] = int(((y == 1) & ~reject).sum())
    m["escape_rate_upper"] = escape_upper_bound(m["escapes"], m["n_ng"], ESCAPE_CONFIDENCE)
    m["escape_confidence"] = ESCAPE_CONFIDENCE
    per: dict[str, dict[str, Any]] = {}
    ok_logits = scored.logits[y == 0]
    for kind in sorted({s.group for s in scored.samples}):
        idx = [i for i, s in enumerate(scored.samples) if s.group == kind]
        if kind == "OK":
            per[kind] = {"n": len(idx), "pass_rate": float((~reject[idx]).mean())}
            continue
        vs_ok = np.r_[np.ones(len(idx)), np.zeros(len(ok_logits))]
        per[kind] = {
            "n": len(idx),
            "recall": float(reject[idx].mean()),
            "model_recall": float(by_model[idx].mean()),
            "auroc_vs_ok": auroc(np.r_[scored.logits[idx], ok_logits], vs_ok),
        }
    m["per_type"] = per
    z = scored.logits.astype(np.float64)
    bce = np.logaddexp(0, z) - y * z
    m["loss"] = float(bce.mean()) if len(z) else float("nan")
    m["images"] = [
        {
            "path": s.path,
            "label": s.label,
            "group": s.group,
            "logit": float(z[i]),
            "margin_logit": float(added[i]),
            "p_ng": float(p[i]),
            "reject": bool(reject[i]),
            "gauge_reject": bool(gauged[i]),
        }
        for i, s in enumerate(scored.samples)
    ]
    m["failed"] = scored.failed
    m["failed_by_reason"] = dict(Counter(r.split(":")[0] for r in scored.failed.values()))
    return _clean(m)


def budgets_here(scored: Scored, decision: Decision, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The calibration's grey-zone budget table (``rows``: training.calibrate.budget_table) applied to these
    images: each budget's grey zone, and where it sends these parts (training.calibrate.zone_counts)."""
    y = np.array([s.label for s in scored.samples])
    p = sigmoid(scored.logits)
    out = []
    for row in rows:
        gz = row.get("grey_zone")
        d = Decision(gz[0], (gz[0], gz[1])) if gz else Decision(decision.threshold)
        out.append({"budget": row["budget"], "grey_zone": gz} | zone_counts(p, y, scored.gauge_reject, d))
    return out


def cam_on_part(scored: Scored) -> dict[str, Any]:
    """Share of the positive (NG-evidence) CAM mass that lies on the part's silhouette, mean over NG images and
    over all images, beside the share of the image the part covers. Near the area share: the model looks
    everywhere; well below: it looks at the background (a shortcut such as session lighting or shadow)."""
    import cv2

    on_ng, on_all, area = [], [], []
    for s in scored.samples:
        if s.path not in scored.cams:
            continue
        img = scored.pixels[s.path]
        alpha = part_alpha(img)
        heat = cv2.resize(
            np.maximum(scored.cams[s.path], 0), (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR
        )
        total = float(heat.sum())
        if total <= 0:
            continue
        frac = float((heat * alpha).sum()) / total
        on_all.append(frac)
        area.append(float(alpha.mean()))
        if s.label == 1:
            on_ng.append(frac)
    return {"ng": _mean(on_ng), "all": _mean(on_all), "part_area": _mean(area)}


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def brightness_baseline(ds: Dataset, samples: list[Sample]) -> dict[str, Any]:
    """AUROC of mean raw image brightness alone: the confound a model must beat (and not simply learn)."""
    y = np.array([s.label for s in samples])
    means = np.array([float(load_gray(str(ds.abspath(s))).mean()) for s in samples])
    a = auroc(means, y)
    return {
        "auroc": max(a, 1 - a),
        "direction": "brighter is NG" if a >= 0.5 else "darker is NG",
        "mean_ok": float(means[y == 0].mean()),
        "mean_ng": float(means[y == 1].mean()),
    }


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return None if math.isnan(x) else x
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        return _clean(x.item())
    return x


def evaluate(
    target_path: str | Path,
    data: str | Path,
    *,
    part: str = "test",
    out: str | Path | None = None,
    n_ng_heatmaps: int = 8,
) -> dict[str, Any]:
    """Score ``part`` of the target's split (``all``: every image in ``data``) and write the report."""
    from training.report import write_report

    target = open_target(target_path)
    ds = discover(data)
    if part == "all" or target.split is None:
        if part != "all":
            raise ValueError(
                f"{target.path} records no split; use --split all to evaluate every image in {data}"
            )
        samples = list(ds.samples)
    else:
        try:
            samples = subset(ds, target.split.part(part))
        except DataError as exc:
            raise DataError(
                f"{exc}. To score a folder the model was not trained on, use --split all"
            ) from None
    if not samples:
        raise ValueError(f"the {part} split of {target.path} is empty")
    scored = score(target, ds, samples)
    metrics = compute_metrics(scored, target.decision)
    budget_rows = (target.info.get("calibration") or {}).get("grey_zone_budgets")
    if budget_rows:
        metrics["grey_zone_budgets"] = budgets_here(scored, target.decision, budget_rows)
    metrics["split"] = part
    metrics["evaluated"] = {
        "kind": target.kind,
        "path": str(target.path),
        "backend": "onnxruntime" if target.kind == "package" else "torch",
    }
    metrics["data"] = str(ds.root)
    metrics["brightness_baseline"] = _clean(brightness_baseline(ds, samples))
    metrics["cam_on_part"] = _clean(cam_on_part(scored))
    if scored.neutral_logits is not None:
        y = np.array([s.label for s in samples])
        metrics["auroc_neutral_background"] = _clean(auroc(scored.neutral_logits, y))
    out_dir = Path(out) if out else target.path / f"eval-{part}"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    write_report(out_dir, target, scored, metrics, n_ng_heatmaps=n_ng_heatmaps)
    return metrics
