"""Assemble a replay's report (one JSON document) and write it with its figures and HTML into a directory."""

from __future__ import annotations

import importlib.metadata
import json
import time
from pathlib import Path
from typing import Any

from daemon.settings import Settings
from engine.package import ModelMeta, ModelPackage
from replay.report import REPORT_JSON, REPORT_VERSION, check_gates, compare, summarise
from replay.report_html import confusion_png, heatmaps, write_html
from replay.runner import RunResult
from replay.selection import Selection

# What replay.json repeats of the package's calibration: the operating point it promised, beside what the replay saw.
CALIBRATION_KEYS = ("split", "n_ok", "n_ng", "recall", "false_reject_rate", "escapes", "escape_rate_upper")


def _version() -> str:
    try:
        return importlib.metadata.version("inspectd")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def build_report(
    settings: Settings,
    package: ModelPackage,
    selection: Selection,
    result: RunResult,
    *,
    out: Path,
    gates: dict[str, float | None],
    previous: dict[str, Any] | None = None,
    max_heatmaps: int = 60,
) -> dict[str, Any]:
    """Compute the summary, comparison and gates, write ``out/{replay.json, confusion.png, heatmaps/,
    report.html}``, and return the report."""
    meta = package.meta
    summary = summarise(result.records, result.seconds)
    comparison = compare(previous, result.records) if previous is not None else None
    notes = list(selection.notes)
    if result.wire["received"] != result.wire["published"] or result.wire["gaps"]:
        notes.append(
            f"the subscriber received {result.wire['received']} of {result.wire['published']} verdicts "
            f"with {result.wire['gaps']} seq gap(s)"
        )
    if not result.complete:
        notes.append(f"incomplete: {len(result.records)} of {len(selection.items)} images got a verdict")
    report: dict[str, Any] = {
        "kind": "inspectd-replay",
        "version": REPORT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inspectd": _version(),
        "data": str(selection.root),
        "layout": selection.layout,
        "part": selection.part,
        "model": {
            "path": str(package.directory),
            "model_id": meta.model_id,
            "threshold": meta.decision.threshold,
            "grey_zone": list(meta.decision.grey_zone) if meta.decision.grey_zone else None,
            "input_size": list(meta.preprocess.input_size),
            "pose": meta.preprocess.pose is not None,
            "heatmap_output": meta.heatmap_output,
            "gauges": [b["name"] for b in (meta.gauges or {}).get("bands", [])],
            "calibration": {k: meta.calibration.get(k) for k in CALIBRATION_KEYS if k in meta.calibration},
        },
        "settings": {
            "line": settings.line,
            "model": settings.model.model_dump(mode="json", exclude={"path"}),
            "batching": settings.batching.model_dump(mode="json"),
            "deadlines": settings.deadlines.model_dump(mode="json"),
        },
        "run": {
            "complete": result.complete,
            "source": result.source,
            "wire": result.wire,
            "backend": result.backend,
        },
        "summary": summary,
        # The daemon's own drift statistics over the last metrics.drift_window parts (docs/operations.md)
        "drift": result.drift,
        "gates": check_gates(gates, summary, comparison),
        "compare": comparison,
        "notes": notes,
        "heatmaps": {},
        "images": result.records,
    }
    out.mkdir(parents=True, exist_ok=True)
    confusion_png(summary["confusion"], out / "confusion.png")
    by_file = {r["file"]: r for r in result.records}
    wrong = [by_file[f] for f in summary["misclassified"]]
    if wrong and max_heatmaps > 0:
        report["heatmaps"] = heatmaps(package, wrong, selection.root, out, max_heatmaps)
    if meta.gauges:
        report["gauges"] = gauges_section(meta, selection, out)
    (out / REPORT_JSON).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    write_html(report, out)
    return report


def gauges_section(meta: ModelMeta, selection: Selection, out: Path) -> dict[str, Any]:
    """Measure every labelled image the way the daemon did and draw OK vs NG per measurement, bands on top."""
    from engine.gauge_plot import gauge_figure
    from engine.gauges import load_gauges
    from engine.pose import PoseError, estimate_pose
    from engine.preprocess import DecodeError, load_gray

    gauges = load_gauges(meta.gauges, meta.preprocess.pose)
    assert gauges is not None
    params = gauges.pose_params()
    ok: list[Any] = []
    ng: dict[str, list[Any]] = {}
    failed = 0
    for item in selection.items:
        if item.label not in ("OK", "NG"):
            continue
        try:
            m = estimate_pose(load_gray(str(item.path)), params).measurements
        except (PoseError, DecodeError, OSError):
            failed += 1  # the daemon rejected these as no_part / pose_error / decode_error
            continue
        if item.label == "OK":
            ok.append(m)
        else:
            ng.setdefault(item.defect_type or "NG", []).append(m)
    (out / "gauges.png").write_bytes(gauge_figure(ok, ng, gauges))
    return {
        "figure": "gauges.png",
        "bands": [b.to_dict() for b in gauges.bands],
        "measured": {"OK": len(ok), "NG": sum(len(v) for v in ng.values()), "failed": failed},
    }
