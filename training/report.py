"""Figures (matplotlib, Agg) and one self-contained ``report.html`` with every image embedded as base64."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from engine.backend import sigmoid
from engine.heatmap import overlay
from training.calibrate import margin_text
from training.metrics import pr_curve, roc_curve
from training.scored import Scored, Target


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training machines
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def figures(
    out: Path, target: Target, scored: Scored, metrics: dict[str, Any], n_ng_heatmaps: int
) -> dict[str, Path]:
    plt = _plt()
    y = np.array([s.label for s in scored.samples])
    z = scored.logits
    p = sigmoid(z)
    figs: dict[str, Path] = {}

    fpr, tpr = roc_curve(z, y)
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot(fpr, tpr, drawstyle="steps-post")
    ax.plot([0, 1], [0, 1], ":", color="gray")
    ax.set(
        xlabel="false-reject rate (OK called NG)",
        ylabel="NG recall",
        title=f"ROC  AUROC {metrics['auroc'] or float('nan'):.3f}",
    )
    figs["roc"] = _save(fig, out / "roc.png")

    rec, prec = pr_curve(z, y)
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot(rec, prec, drawstyle="steps-post")
    ax.set(xlabel="NG recall", ylabel="precision", ylim=(0, 1.02), title="precision–recall")
    figs["pr"] = _save(fig, out / "pr.png")

    c = metrics["confusion"]
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    mat = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
    ax.imshow(mat, cmap="Blues")
    for (i, j), v in np.ndenumerate(mat):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=14)
    ax.set(
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=["PASS", "REJECT"],
        yticklabels=["OK", "NG"],
        xlabel="verdict",
        ylabel="truth",
        title="confusion at the calibrated threshold",
    )
    figs["confusion"] = _save(fig, out / "confusion.png")

    fig, ax = plt.subplots(figsize=(6, 3))
    bins = np.linspace(-12, 12, 49)
    ax.hist(np.clip(z[y == 0], -12, 12), bins=bins, alpha=0.6, label="OK")
    ax.hist(np.clip(z[y == 1], -12, 12), bins=bins, alpha=0.6, label="NG")
    t = (
        float(np.log(target.decision.threshold / (1 - target.decision.threshold)))
        if 0 < target.decision.threshold < 1
        else 0.0
    )
    ax.axvline(t, color="k", ls="--", label="threshold")
    ax.set(xlabel="NG logit (clipped to ±12)", ylabel="images", title="score distribution")
    ax.legend()
    figs["scores"] = _save(fig, out / "scores.png")

    if any("train_loss" in h for h in target.history):  # a fitted patch memory has no curves
        ep = [h["epoch"] for h in target.history]
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
        ax[0].plot(ep, [h["train_loss"] for h in target.history], label="train (balanced draws)")
        ax[0].plot(ep, [h.get("val_loss") for h in target.history], label="val")
        ax[0].plot(ep, [h.get("val_balanced_loss") for h in target.history], label="val, class-balanced")
        ax[0].set(xlabel="epoch", ylabel="BCE", title="loss")
        ax[0].legend()
        ax[1].plot(ep, [h.get("val_auroc") for h in target.history], color="C3")
        best = [h["epoch"] for h in target.history if h.get("best")]
        for b in best[-1:]:
            ax[1].axvline(b, color="gray", ls=":")
        ax[1].set(
            xlabel="epoch", ylabel="val AUROC", ylim=(0, 1.02), title="validation AUROC (dotted: chosen)"
        )
        figs["curves"] = _save(fig, out / "curves.png")

    reject = [r["reject"] for r in metrics["images"]]  # the combined verdict: model or gauges
    wrong = [i for i, s in enumerate(scored.samples) if reject[i] != bool(s.label)]
    ng = [i for i, s in enumerate(scored.samples) if s.label == 1 and i not in wrong]
    rng = np.random.default_rng(0)
    sample_ng = sorted(rng.choice(ng, size=min(n_ng_heatmaps, len(ng)), replace=False).tolist()) if ng else []
    for name, idx in (("misclassified", wrong), ("ng_sample", sample_ng)):
        tiles = [i for i in idx if scored.samples[i].path in scored.cams]
        if not tiles:
            continue
        cols = (
            2
            if scored.pixels[scored.samples[tiles[0]].path].shape[1]
            > 1.8 * scored.pixels[scored.samples[tiles[0]].path].shape[0]
            else 4
        )
        rows = (len(tiles) + cols - 1) // cols
        fig, axes = plt.subplots(
            rows, cols, figsize=(4.2 * cols, 2.0 * rows * (2 if cols == 4 else 1) + 0.4), squeeze=False
        )
        for ax in axes.ravel():
            ax.axis("off")
        for ax, i in zip(axes.ravel(), tiles, strict=False):
            s = scored.samples[i]
            ax.imshow(overlay(scored.pixels[s.path], scored.cams[s.path]))
            truth = "OK" if s.label == 0 else f"NG {s.defect_type}"
            ax.set_title(f"{Path(s.path).name}\n{truth}  p(NG)={p[i]:.3f}", fontsize=8)
        figs[name] = _save(fig, out / f"heatmaps_{name}.png")
    return figs


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v)) if v is not None else "–"


def _pct(n: int, total: int) -> str:
    return f"{n}/{total} ({100.0 * n / total:.1f} %)" if total else "–"


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return (
        f"<table><tr>{th}</tr>"
        + "".join(f"<tr><td>{'</td><td>'.join(r)}</td></tr>" for r in rows)
        + "</table>"
    )


def _calibration_text(cal: dict[str, Any]) -> str:
    """The calibration's operating point in one line: its set, recall and false rejects (combined, and the
    model's alone), and the escape rate's upper bound; what a package made before any of it says, it says."""
    if not cal:
        return "–"
    text = (
        f"on {cal.get('n_ng')} NG / {cal.get('n_ok')} OK ({html.escape(str(cal.get('split')))}): recall "
        f"{_fmt(cal.get('recall'))}, false-reject rate {_fmt(cal.get('false_reject_rate'))}"
    )
    if cal.get("gauges"):
        text += (
            f" with the gauges (model alone {_fmt(cal.get('model_recall'))}, "
            f"{_fmt(cal.get('model_false_reject_rate'))}; gauges reject {cal.get('ng_rejected_by_gauges')} NG, "
            f"{cal.get('ok_rejected_by_gauges')} OK)"
        )
    if cal.get("escape_rate_upper") is not None:
        text += (
            f"; escape rate ≤ {100 * cal['escape_rate_upper']:.1f} % ({100 * cal['escape_confidence']:.0f} % "
            f"upper bound, {cal['escapes']} of {cal['n_ng']} NG passed)"
        )
    return text + html.escape(margin_text(cal))


def _sources_html(m: dict[str, Any]) -> str:
    """Who rejected what: the model, the gauges, either (the verdict), and the NG only the gauges caught."""
    src = m["by_source"]
    head = ["parts", "n", "rejected by the model", "by the gauges", "by either (the verdict)", "gauges only"]
    rows = [[html.escape(name), str(c["n"])] + [_pct(c[k], c["n"]) for k in ("model", "gauges", "either", "gauges_only")]
            for name, c in [("NG, all types", src["ng"]), *((f"NG {t}", c) for t, c in src["per_type"].items()),
                            ("OK (false rejects)", src["ok"])]]  # fmt: skip
    note = "" if m.get("gauges") else "<p>This model has no gauges: every REJECT is the model's.</p>"
    if m.get("margins") and m.get("margins_raised"):
        r = m["margins_raised"]
        note += (
            "<p>The model's score includes the gauges' margins (each band's measurement adds to the logit "
            f"where it lies far outside the good parts' spread): they raised {r['ng']} NG and {r['ok']} OK part(s), and "
            f'carried {r["rejected_by_them"]} over the threshold. "Rejected by the model" counts the score '
            "with them.</p>"
        )
    return "<h2>Model, gauges and the combined verdict</h2>" + note + _table(head, rows)


def _zone_cells(c: dict[str, int] | None) -> list[str]:
    """One training.calibrate.zone_counts record as table cells, each a share of its class."""
    if c is None:
        return ["–"] * 4
    ok = c["ok_scrapped"] + c["ok_reinspected"] + c["ok_passed"]
    ng = c["ng_rejected"] + c["ng_reinspected"] + c["ng_passed"]
    return [_pct(c["ok_scrapped"], ok), _pct(c["ok_reinspected"], ok), _pct(c["ng_rejected"], ng),
            _pct(c["ng_reinspected"], ng)]  # fmt: skip


def _budgets_html(cal: dict[str, Any], here: list[dict[str, Any]] | None, split: str) -> str:
    """What a re-inspection budget buys: per grey-zone budget, where the parts go, on the calibration images and
    on the evaluated ones."""
    rows_cal = cal.get("grey_zone_budgets") or []
    if not rows_cal:
        return ""
    here_by = {r["budget"]: r for r in here or []}
    rows = []
    for r in rows_cal:
        gz = r["grey_zone"]
        mark = " (shipped)" if gz and gz == cal.get("grey_zone") else ""
        cells = [f"{100 * r['budget']:g} %{mark}", f"{gz[0]:.4g}–{gz[1]:.4g}" if gz else "none"]
        rows.append(cells + _zone_cells(r) + _zone_cells(here_by.get(r["budget"])))
    cols = ["OK scrapped", "OK re-inspected", "NG rejected", "NG re-inspected"]
    head = ["budget (OK scrapped unseen)", "grey zone on p(NG)"] + [f"calibration: {c}" for c in cols]
    head += [f"{split}: {c}" for c in cols]
    return (
        "<h2>Grey-zone budget: what re-inspection buys</h2><p>For each budget (the share of OK calibration parts "
        "that may be scrapped without a person looking: <code>--grey-zone-frr</code>), the grey zone above the "
        "threshold it sets, and where the parts go: rejected automatically (score above the grey zone, or "
        "outside a gauge band) or sent to a person (in the grey zone). The threshold, and so the NG that pass, "
        "do not depend on the budget.</p>" + _table(head, rows)
    )


def write_report(
    out: Path, target: Target, scored: Scored, metrics: dict[str, Any], *, n_ng_heatmaps: int = 8
) -> Path:
    figs = figures(out, target, scored, metrics, n_ng_heatmaps)
    m = metrics
    ci = m.get("auroc_ci95") or [None, None]
    patch = target.info.get("arch") == "patch_memory"
    rows = [
        (
            "model",
            "patch memory: nearest good patch, z-scored per cell (heatmap: the z-map)"
            if patch
            else "ResNet18 (heatmap: class-activation map)",
        ),
        ("images", f"{m['n']} ({m['n_ok']} OK / {m['n_ng']} NG), split “{m['split']}”"),
        ("AUROC (95 % bootstrap CI)", f"{_fmt(m['auroc'])} ({_fmt(ci[0])}–{_fmt(ci[1])})"),
        (
            "threshold on p(NG)",
            _fmt(m["threshold"]) + (f", grey zone {m['grey_zone']}" if m.get("grey_zone") else ""),
        ),
        ("NG recall" + (" (the verdict: model or gauges)" if m.get("gauges") else ""), _fmt(m["recall"])),
        ("false-reject rate (OK rejected)", _fmt(m["false_reject_rate"])),
        (
            "the model alone: NG recall, false-reject rate",
            f"{_fmt(m['model_only']['recall'])}, {_fmt(m['model_only']['false_reject_rate'])}",
        ),
        (
            f"escape rate (NG passed), {100 * m['escape_confidence']:.0f} % upper bound",
            f"{_pct(m['escapes'], m['n_ng'])}; ≤ {100 * m['escape_rate_upper']:.1f} %",
        ),
        ("calibration", _calibration_text(target.info.get("calibration") or {})),
        ("accuracy", _fmt(m["accuracy"])),
        ("precision", _fmt(m["precision"])),
        ("F1", _fmt(m["f1"])),
        ("BCE loss", _fmt(m["loss"])),
        ("preprocessing failures (scored REJECT)", _fmt(len(m["failed"]))),
        (
            "NG evidence on the part (CAM heat share on NG images; the part's share of the area)",
            f"{_fmt(m['cam_on_part']['ng'])} ({_fmt(m['cam_on_part']['part_area'])})",
        ),
        (
            "AUROC with every part on one shared background (shortcut check)",
            _fmt(m.get("auroc_neutral_background")),
        ),
        (
            "brightness-only AUROC (confound check)",
            f"{_fmt(m['brightness_baseline']['auroc'])} ({m['brightness_baseline']['direction']})",
        ),
    ]
    per = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v['n']}</td><td>{_fmt(v.get('recall', v.get('pass_rate')))}</td>"
        f"<td>{_fmt(v.get('model_recall'))}</td><td>{_fmt(v.get('auroc_vs_ok'))}</td></tr>"
        for k, v in m["per_type"].items()
    )
    failed = "".join(
        f"<li><code>{html.escape(k)}</code>: {html.escape(v)}</li>" for k, v in m["failed"].items()
    )
    sections = [
        ("Curves", [figs[k] for k in ("roc", "pr", "confusion") if k in figs]),
        ("Scores", [figs["scores"]]),
        ("Training", [figs["curves"]] if "curves" in figs else []),
        (
            "Class-activation heatmaps: every misclassified image",
            [figs["misclassified"]] if "misclassified" in figs else [],
        ),
        (
            "Class-activation heatmaps: a sample of correctly rejected NG images",
            [figs["ng_sample"]] if "ng_sample" in figs else [],
        ),
    ]
    body = "".join(
        f"<h2>{html.escape(t)}</h2><div class=figs>{''.join(_img(p) for p in ps) or '<p>none</p>'}</div>"
        for t, ps in sections
    )
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>inspectd evaluation — {html.escape(str(target.path))}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}
.figs img{{max-width:100%;margin:4px;vertical-align:top}}code{{font-size:90%}}</style></head><body>
<h1>Evaluation of {html.escape(target.kind)} <code>{html.escape(str(target.path))}</code></h1>
<p>Data <code>{html.escape(str(m.get("data", "")))}</code>; scored with {html.escape(m.get("evaluated", {}).get("backend", ""))}.
NG is the positive class; a grey-zone score counts as REJECT. The heatmaps show where the evidence for NG lies
({"where the crop is unlike every good screw: z-scores above 0 on the part" if patch else "the positive part of the class-activation map"}) on the image the model saw: check that it sits on the defect,
not on the background or the image as a whole (the brightness confound).</p>
<table>{"".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)}</table>
<h2>Per defect type</h2><table><tr><th>type</th><th>n</th><th>recall (OK: pass rate)</th><th>the model alone</th><th>AUROC vs all OK</th></tr>{per}</table>
{_sources_html(m)}
{_budgets_html(target.info.get("calibration") or {}, m.get("grey_zone_budgets"), m["split"])}
{f"<h2>Preprocessing failures</h2><ul>{failed}</ul>" if failed else ""}
{body}
<h2>Provenance</h2><pre>{html.escape(json.dumps(target.info, indent=1, default=str)[:20000])}</pre>
</body></html>"""
    path = out / "report.html"
    path.write_text(doc, encoding="utf-8")
    return path
