"""Assemble a replay's report (one JSON document) and write it with its figures and HTML into a directory."""

from __future__ import annotations

import importlib.metadata
import json
import time
from pathlib import Path
from typing import Any

from daemon.replay import RunResult, Selection
from daemon.replay_html import confusion_png, heatmaps, write_html
from daemon.replay_report import REPORT_JSON, REPORT_VERSION, check_gates, compare, summarise
from daemon.settings import Settings
from engine.package import ModelPackage


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
    (out / REPORT_JSON).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    write_html(report, out)
    return report
