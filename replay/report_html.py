"""The replay report on disk: ``replay.json`` (everything, per file), ``confusion.png``, ``heatmaps/`` and one
self-contained ``report.html`` (images embedded), laid out like ``inspectd evaluate``'s report.

Figures are drawn with OpenCV, not matplotlib: replay runs where the daemon runs, and matplotlib is only in the
``train`` extra. Heatmaps are :func:`engine.heatmap.overlay` on the class-activation map that the package's
second ONNX output (``heatmap_output``) gives, computed for the misclassified files only.
"""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engine.heatmap import overlay
from engine.package import ModelPackage
from engine.preprocess import DecodeError, Preprocessor, load_gray

_MIN_SIDE = 320  # heatmaps are enlarged (whole pixels) to at least this many pixels on their long side
_CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:.5em 0}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}.pass{color:#070}.fail{color:#b00;font-weight:bold}"
    ".figs img{max-width:100%;margin:4px;vertical-align:top}figure{display:inline-block;margin:4px;font-size:80%}"
    "code{font-size:90%}"
)


# -- figures -----------------------------------------------------------------------------------------------
def confusion_png(confusion: dict[str, int], path: Path) -> Path:
    """A 2×2 confusion matrix (rows: truth OK/NG; columns: verdict PASS/REJECT), cell shade by count."""
    c = confusion
    cells = [[c["tn"], c["fp"]], [c["fn"], c["tp"]]]
    cell, left, top = 110, 70, 50
    img = np.full((top + 2 * cell + 12, left + 2 * cell + 12, 3), 255, np.uint8)
    peak = max(max(row) for row in cells) or 1
    font = cv2.FONT_HERSHEY_SIMPLEX
    for i, row in enumerate(cells):
        for j, v in enumerate(row):
            x0, y0 = left + j * cell, top + i * cell
            shade = int(235 - 150 * v / peak)
            img[y0 : y0 + cell, x0 : x0 + cell] = (255, shade, shade)  # BGR: white → blue with the count
            cv2.rectangle(img, (x0, y0), (x0 + cell, y0 + cell), (120, 120, 120), 1)
            text = str(v)
            (tw, th), _ = cv2.getTextSize(text, font, 1.0, 2)
            cv2.putText(img, text, (x0 + (cell - tw) // 2, y0 + (cell + th) // 2), font, 1.0, (0, 0, 0), 2,
                        cv2.LINE_AA)  # fmt: skip
    for j, name in enumerate(("PASS", "REJECT")):
        cv2.putText(img, name, (left + j * cell + 22, top - 12), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    for i, name in enumerate(("OK", "NG")):
        cv2.putText(img, name, (20, top + i * cell + cell // 2 + 5), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "truth \\ verdict", (4, 20), font, 0.45, (80, 80, 80), 1, cv2.LINE_AA)
    cv2.imwrite(str(path), img)
    return path


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "image"


def heatmaps(
    package: ModelPackage, records: list[dict[str, Any]], root: Path, out: Path, limit: int
) -> dict[str, str]:
    """file → PNG (relative to ``out``): what the network saw, with the NG evidence (CAM) over it when the
    package exports one. Only for ``records`` (the misclassified), at most ``limit``."""
    meta = package.meta
    pre = Preprocessor(meta.preprocess)
    session = _session(package)
    names = [meta.output_name] + ([meta.heatmap_output] if meta.heatmap_output else [])
    folder = out / "heatmaps"
    shutil.rmtree(folder, ignore_errors=True)  # a report directory reused: no stale pictures from before
    folder.mkdir(parents=True)
    written: dict[str, str] = {}
    for r in records[:limit]:
        try:
            seen = pre.geometric(load_gray(str(root / r["file"])))
        except (DecodeError, OSError, ValueError):
            continue  # a decode/pose failure has no picture to show; its reason is in the table
        x = np.empty((1, 1, *meta.preprocess.input_size), np.float32)
        pre.normalise_into(seen, x[0, 0])
        outputs = session.run(names, {meta.input_name: x})
        rgb = (
            overlay(seen, np.asarray(outputs[1])[0])
            if len(outputs) > 1
            else cv2.cvtColor(seen, cv2.COLOR_GRAY2RGB)
        )
        scale = max(1, _MIN_SIDE // max(rgb.shape[:2]))  # a small network input is unreadable at its size
        rgb = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        name = f"heatmaps/{_safe(Path(r['file']).with_suffix('').as_posix())}.png"
        cv2.imwrite(str(out / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        written[r["file"]] = name
    return written


def _session(package: ModelPackage) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(package.onnx_path), sess_options=so, providers=["CPUExecutionProvider"])


# -- HTML --------------------------------------------------------------------------------------------------
def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _table(head: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def write_html(report: dict[str, Any], out: Path) -> Path:
    s, m = report["summary"], report["model"]
    lat = s["latency_ms"]
    gz = f", grey zone {m['grey_zone']}" if m.get("grey_zone") else ""
    head = [
        ("images", f"{s['n']} ({s['n_ok']} OK / {s['n_ng']} NG / {s['n_unlabelled']} unlabelled), part “{report['part']}”"),
        ("verdicts", ", ".join(f"{k} {v}" for k, v in s["verdicts"].items())),
        ("NG recall", _fmt(s["ng_recall"])),
        ("false-reject rate (OK rejected)", _fmt(s["false_reject_rate"])),
        ("accuracy", _fmt(s["accuracy"])),
        ("missed NG (NG that passed)", _fmt(s["missed_ng"])),
        (f"escape rate, {100 * s['escape_confidence']:.0f} % upper bound", f"≤ {_fmt(100 * s['escape_rate_upper'], 1)} %"),
        ("threshold on p(NG)", _fmt(m["threshold"], 4) + gz),
        ("gauges", html.escape(", ".join(m.get("gauges") or []) or "none")),
        ("calibrated for", _calibrated(m.get("calibration") or {})),
        ("latency arrival → published (ms)",
         f"p50 {_fmt(lat['p50'], 1)}, p95 {_fmt(lat['p95'], 1)}, p99 {_fmt(lat['p99'], 1)}, max {_fmt(lat['max'], 1)}"),
        ("throughput", f"{_fmt(s['throughput']['images_per_s'], 1)} images/s ({s['throughput']['seconds']:.1f} s, rate {report['run']['source']['rate']})"),
        ("wire (a real subscriber)", f"{report['run']['wire']['received']} of {report['run']['wire']['published']} verdicts received, {report['run']['wire']['gaps']} seq gaps"),
    ]  # fmt: skip
    gates = _table(
        ["gate", "rule", "value", "result"],
        [[html.escape(g["gate"]), html.escape(g["rule"]), _fmt(g["value"]),
          '<span class="pass">pass</span>' if g["passed"] else f'<span class="fail">FAIL</span> {html.escape(g.get("why", ""))}']
         for g in report["gates"]],
    ) if report["gates"] else "<p>no gates configured</p>"  # fmt: skip
    per_type = _table(
        ["defect type", "n", "rejected", "recall"],
        [[html.escape(k), v["n"], v["rejected"], _fmt(v["recall"])] for k, v in s["per_type"].items()],
    )
    sources = _sources_table(s["by_source"])
    reasons = _table(
        ["REJECT reason", "total", "truth OK", "truth NG", "unlabelled"],
        [
            [html.escape(k), v["total"], v["OK"], v["NG"], v["unlabelled"]]
            for k, v in s["reject_reasons"].items()
        ],
    )
    stages = _table(
        ["stage (ms)", "p50", "p95", "p99", "max"],
        [[html.escape(k), _fmt(v["p50"], 2), _fmt(v["p95"], 2), _fmt(v["p99"], 2), _fmt(v["max"], 2)]
         for k, v in s["stage_ms"].items()],
    )  # fmt: skip
    by_file = {r["file"]: r for r in report["images"]}
    figs = []
    for f in s["misclassified"]:
        r = by_file[f]
        caption = (f"<code>{html.escape(f)}</code><br>truth {html.escape(str(r['label']))} "
                   f"{html.escape(r['defect_type'] or '')} → {r['verdict']} ({html.escape(r['reason'])}), p(NG) {_fmt(r['score'])}")  # fmt: skip
        pic = report["heatmaps"].get(f)
        figs.append(f"<figure>{_img(out / pic, f) if pic else ''}<figcaption>{caption}</figcaption></figure>")
    mis = "".join(figs) or "<p>none</p>"
    cmp_html = _compare_html(report.get("compare"))
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report["notes"])
    all_rows = _table(
        ["file", "truth", "type", "verdict", "reason", "p(NG)", "latency ms", "seq"],
        [[f"<code>{html.escape(r['file'])}</code>", _fmt(r["label"]), _fmt(r["defect_type"]), r["verdict"],
          html.escape(r["reason"]), _fmt(r["score"], 4), _fmt(r["latency_ms"], 1), r["seq"]] for r in report["images"]],
    )  # fmt: skip
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>inspectd replay — {html.escape(m["model_id"])}</title>
<style>{_CSS}</style></head><body>
<h1>Replay of <code>{html.escape(report["data"])}</code> through <code>{html.escape(m["model_id"])}</code></h1>
<p>Every image went through the daemon's own pipeline (decode → preprocess → micro-batcher → {html.escape(report["run"]["backend"].get("backend", ""))}
→ decision → publisher), as on the line. NG is the positive class; every REJECT counts as “called NG”, whatever
its reason (a grey-zone or fail-safe REJECT does not reach the customer either); the reasons are listed below.
Created {html.escape(report["created"])} by inspectd {html.escape(report["inspectd"])}.</p>
<table>{"".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in head)}</table>
<h2>Gates</h2>{gates}
<h2>Confusion at the package's threshold</h2><div class=figs>{_img(out / "confusion.png", "confusion")}</div>
<h2>Per defect type</h2>{per_type}
<h2>Model, gauges and the verdict</h2>
<p>Who rejected the labelled parts: the model (score at or above the threshold, grey zone included), the gauges
(<code>out_of_tolerance</code>; the verdict records whether the model would have rejected the part too), either
of them (fail-safe REJECTs are in neither column).</p>{sources}
<h2>REJECT reasons</h2>{reasons}
<h2>Stage timings</h2>{stages}
{cmp_html}
{_gauges_html(report, out)}
<h2>Misclassified images ({len(s["misclassified"])})</h2>
<p>What the network saw{" with the positive part of its class-activation map (NG evidence)" if m.get("heatmap_output") else " (the package has no heatmap output)"}.</p>
<div class=figs>{mis}</div>
{f"<h2>Notes</h2><ul>{notes}</ul>" if notes else ""}
<h2>Every image</h2><details><summary>{len(report["images"])} rows</summary>{all_rows}</details>
<h2>Settings</h2><pre>{html.escape(json.dumps(report["settings"], indent=1))}</pre>
</body></html>"""
    path = out / "report.html"
    path.write_text(doc, encoding="utf-8")
    return path


def _calibrated(cal: dict[str, Any]) -> str:
    """The package's calibration in one line (empty for a package calibrated before the escape bound existed)."""
    if not cal:
        return "–"
    text = (
        f"recall {_fmt(cal.get('recall'))}, false-reject rate {_fmt(cal.get('false_reject_rate'))} on "
        f"{cal.get('n_ng')} NG / {cal.get('n_ok')} OK ({html.escape(str(cal.get('split')))})"
    )
    if cal.get("escape_rate_upper") is not None:
        text += f"; escape rate ≤ {_fmt(100 * cal['escape_rate_upper'], 1)} % (95 % upper bound)"
    return text


def _sources_table(src: dict[str, Any]) -> str:
    """engine.stats.rejections_by_source as a table: NG overall and per type, then OK."""

    def share(n: int, total: int) -> str:
        return f"{n}/{total}" if total else "–"

    named = [("NG, all types", src["ng"]), *((f"NG {t}", c) for t, c in src["per_type"].items()),
             ("OK (false rejects)", src["ok"])]  # fmt: skip
    return _table(
        ["parts", "n", "rejected by the model", "by the gauges", "by either", "gauges only"],
        [[html.escape(name), c["n"], *(share(c[k], c["n"]) for k in ("model", "gauges", "either", "gauges_only"))]
         for name, c in named],
    )  # fmt: skip


def _compare_html(c: dict[str, Any] | None) -> str:
    if c is None:
        return ""
    p = c["previous"]
    rows = [
        [f"<code>{html.escape(r['file'])}</code>", _fmt(r["label"]), f"{r['before']} ({html.escape(r['reason_before'])})",
         f"{r['after']} ({html.escape(r['reason_after'])})", _fmt(r["score_before"], 4), _fmt(r["score_after"], 4),
         f'<span class="{"pass" if r["effect"] == "fixed" else "fail" if r["effect"] == "broken" else ""}">{r["effect"]}</span>']
        for r in c["flips"]
    ]  # fmt: skip
    extra = ""
    if c["only_before"] or c["only_now"]:
        extra = f"<p>{len(c['only_before'])} file(s) only in the earlier replay, {len(c['only_now'])} only in this one.</p>"
    return (
        f"<h2>Compared with the replay of {html.escape(str(p['created']))} (model <code>{html.escape(str(p['model_id']))}</code>, "
        f"threshold {_fmt(p['threshold'], 4)})</h2><p>{c['common']} files in both; {len(c['flips'])} verdict(s) flipped "
        f"({c['fixed']} fixed, {c['broken']} broken); {len(c['reason_changes'])} REJECT reason change(s); "
        f"largest score change {_fmt(c['max_abs_score_change'], 4)}.</p>{extra}"
        + (
            _table(["file", "truth", "before", "after", "p(NG) before", "p(NG) after", "effect"], rows)
            if rows
            else ""
        )
    )


def _gauges_html(report: dict[str, Any], out: Path) -> str:
    g = report.get("gauges")
    if not g:
        return ""
    caught = report["summary"].get("caught_by_gauges_only", [])
    by_file = {r["file"]: r for r in report["images"]}
    rows = [
        [f"<code>{html.escape(f)}</code>", html.escape(by_file[f]["defect_type"] or ""), _fmt(by_file[f]["score"]),
         html.escape("; ".join(f"{v['name']} {v['value']} ∉ [{v['low']}, {v['high']}]" for v in by_file[f]["gauges"] or []))]
        for f in caught
    ]  # fmt: skip
    bands = ", ".join(f"{b['name']} [{b['low']}, {b['high']}] {b['unit']}" for b in g["bands"])
    return f"""<h2>Gauges</h2>
<p>Tolerance bands: {html.escape(bands)}. Measured {g["measured"]["OK"]} OK and {g["measured"]["NG"]} NG parts
({g["measured"]["failed"]} could not be measured).</p>
<div class=figs>{_img(out / g["figure"], "measurements, OK vs NG, with the bands")}</div>
<h3>NG parts the gauges caught that the model missed ({len(caught)})</h3>
{_table(["file", "defect type", "p(NG)", "outside its band"], rows) if rows else "<p>none</p>"}"""
