"""What a replay measured, as plain data: confusion, NG recall / false-reject rate, per-type recall, REJECT
reasons, latency percentiles, throughput; the file-by-file comparison with an earlier replay; the CI gates.

NG is the positive class and every REJECT counts as "called NG", whatever its reason: a part rejected for a
deadline or a decode error does not reach the customer either, exactly as a grey-zone part does not (the same
convention as ``inspectd evaluate``). The reasons are reported beside it, so a fail-safe REJECT is never
mistaken for a good model decision. ``by_source`` splits the model's and the gauges' REJECTs (the same
breakdown as ``inspectd evaluate``: engine.stats.rejections_by_source), and the escape rate comes with its
one-sided 95 % upper bound (the replay's NG are a sample too).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.stats import ESCAPE_CONFIDENCE, escape_upper_bound, percentiles, rejections_by_source

REPORT_JSON = "replay.json"
REPORT_VERSION = 1


# latency_ms and stage_ms in replay.json: milliseconds to the microsecond
PERCENTILE_KEYS = ("p50", "p95", "p99", "max", "mean")
MODEL_REASONS = ("model", "grey_zone")


def rejected_by(record: dict[str, Any]) -> tuple[bool, bool]:
    """(the model, the gauges): who rejected this part. An ``out_of_tolerance`` verdict records in
    ``rejected_by`` whether the model would have rejected it too; fail-safe REJECTs are neither's."""
    if record["verdict"] != "REJECT":
        return False, False
    if record["reason"] == "out_of_tolerance":
        return "model" in (record.get("rejected_by") or []), True
    return record["reason"] in MODEL_REASONS, False


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def summarise(records: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Everything the report shows, computed from the per-file records alone (so it can be recomputed)."""
    labelled = [r for r in records if r["label"] in ("OK", "NG")]
    tp = sum(1 for r in labelled if r["label"] == "NG" and r["verdict"] == "REJECT")
    fn = sum(1 for r in labelled if r["label"] == "NG" and r["verdict"] == "PASS")
    fp = sum(1 for r in labelled if r["label"] == "OK" and r["verdict"] == "REJECT")
    tn = sum(1 for r in labelled if r["label"] == "OK" and r["verdict"] == "PASS")
    per_type: dict[str, dict[str, Any]] = {}
    for kind in sorted({r["defect_type"] for r in labelled if r["label"] == "NG"}):
        rows = [r for r in labelled if r["label"] == "NG" and r["defect_type"] == kind]
        hit = sum(1 for r in rows if r["verdict"] == "REJECT")
        per_type[kind] = {"n": len(rows), "rejected": hit, "recall": _ratio(hit, len(rows))}
    rejects = [r for r in records if r["verdict"] == "REJECT"]
    by_reason: dict[str, dict[str, int]] = {}
    for r in rejects:
        row = by_reason.setdefault(r["reason"], {"total": 0, "OK": 0, "NG": 0, "unlabelled": 0})
        row["total"] += 1
        row[r["label"] if r["label"] in ("OK", "NG") else "unlabelled"] += 1
    stages = sorted({k for r in records for k in r["timings_ms"]})
    who = [rejected_by(r) for r in labelled]
    return {
        "n": len(records),
        "n_ok": fp + tn,
        "n_ng": tp + fn,
        "n_unlabelled": len(records) - len(labelled),
        "verdicts": dict(sorted(Counter(r["verdict"] for r in records).items())),
        "confusion": {"tp": tp, "fn": fn, "fp": fp, "tn": tn},
        "accuracy": _ratio(tp + tn, len(labelled)),
        "ng_recall": _ratio(tp, tp + fn),
        "false_reject_rate": _ratio(fp, fp + tn),
        "precision": _ratio(tp, tp + fp),
        "missed_ng": fn,
        "false_rejects": fp,
        "per_type": per_type,
        "by_source": rejections_by_source(
            [r["label"] == "NG" for r in labelled],
            [r["defect_type"] or r["label"] for r in labelled],
            [m for m, _ in who],
            [g for _, g in who],
        ),
        "escape_rate_upper": escape_upper_bound(fn, tp + fn, ESCAPE_CONFIDENCE),
        "escape_confidence": ESCAPE_CONFIDENCE,
        "reject_reasons": dict(sorted(by_reason.items(), key=lambda kv: -kv[1]["total"])),
        "fail_safe_rejects": sum(1 for r in rejects if r["reason"] not in ("model", "grey_zone")),
        "latency_ms": percentiles([r["latency_ms"] for r in records], PERCENTILE_KEYS),
        "stage_ms": {
            s: percentiles([r["timings_ms"][s] for r in records if s in r["timings_ms"]], PERCENTILE_KEYS)
            for s in stages
        },
        "throughput": {
            "images": len(records),
            "seconds": round(seconds, 3),
            "images_per_s": round(len(records) / seconds, 2) if seconds > 0 else None,
        },
        "misclassified": [r["file"] for r in labelled if (r["label"] == "NG") != (r["verdict"] == "REJECT")],
        # NG parts the gauges rejected while the model alone would have passed them
        "caught_by_gauges_only": [
            r["file"] for r in labelled if r["label"] == "NG" and r.get("rejected_by") == ["gauges"]
        ],
    }


# -- comparison with an earlier replay ---------------------------------------------------------------------
def load_report(directory: Path) -> dict[str, Any]:
    path = directory / REPORT_JSON if directory.is_dir() else directory
    try:
        report: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--compare {directory}: cannot read {path.name}: {exc}") from None
    if report.get("kind") != "inspectd-replay" or "images" not in report:
        raise ValueError(f"--compare {directory}: {path} is not an inspectd replay report")
    return report


def _correct(label: str | None, verdict: str) -> bool | None:
    return None if label not in ("OK", "NG") else (label == "NG") == (verdict == "REJECT")


def compare(previous: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Every file whose verdict flipped (PASS ↔ REJECT), and those whose REJECT reason changed."""
    old = {r["file"]: r for r in previous["images"]}
    new = {r["file"]: r for r in records}
    flips, reason_changes = [], []
    for f in sorted(old.keys() & new.keys()):
        a, b = old[f], new[f]
        row = {
            "file": f,
            "label": b["label"],
            "before": a["verdict"],
            "after": b["verdict"],
            "reason_before": a["reason"],
            "reason_after": b["reason"],
            "score_before": a["score"],
            "score_after": b["score"],
        }
        if a["verdict"] != b["verdict"]:
            now_right = _correct(b["label"], b["verdict"])
            row["effect"] = "unlabelled" if now_right is None else ("fixed" if now_right else "broken")
            flips.append(row)
        elif a["reason"] != b["reason"]:
            reason_changes.append(row)
    deltas = [
        abs(new[f]["score"] - old[f]["score"])
        for f in old.keys() & new.keys()
        if new[f]["score"] is not None and old[f]["score"] is not None
    ]
    prev_model = previous.get("model", {})
    return {
        "previous": {
            "created": previous.get("created"),
            "model_id": prev_model.get("model_id"),
            "threshold": prev_model.get("threshold"),
        },
        "common": len(old.keys() & new.keys()),
        "only_before": sorted(old.keys() - new.keys()),
        "only_now": sorted(new.keys() - old.keys()),
        "flips": flips,
        "fixed": sum(1 for r in flips if r["effect"] == "fixed"),
        "broken": sum(1 for r in flips if r["effect"] == "broken"),
        "reason_changes": reason_changes,
        "max_abs_score_change": max(deltas) if deltas else None,
    }


# -- gates -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gate:
    name: str  # the CLI flag
    limit: float
    metric: str  # key in the summary (or "flips")
    upper: bool = True  # True: value must be ≤ limit; False: ≥ limit

    def check(self, summary: dict[str, Any], comparison: dict[str, Any] | None) -> dict[str, Any]:
        if self.metric == "flips":
            value = None if comparison is None else len(comparison["flips"])
        elif self.metric == "latency_p99_ms":
            value = summary["latency_ms"]["p99"]
        else:
            value = summary.get(self.metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            passed, why = False, "cannot be evaluated (no labels, no comparison or no data)"
        else:
            passed = value <= self.limit if self.upper else value >= self.limit
            why = ""
        return {
            "gate": self.name,
            "limit": self.limit,
            "value": value,
            "passed": passed,
            "rule": f"{'≤' if self.upper else '≥'} {self.limit:g}",
            **({"why": why} if why else {}),
        }


GATES: dict[str, tuple[str, bool, str]] = {
    # flag → (summary metric, upper bound?, help)
    "max_missed_ng": ("missed_ng", True, "fail when more NG images than this PASS (e.g. 0)"),
    "min_ng_recall": ("ng_recall", False, "fail when NG recall is below this"),
    "max_false_reject_rate": ("false_reject_rate", True, "fail when the OK reject rate is above this"),
    "max_fail_safe": ("fail_safe_rejects", True, "fail when more rejects than this are not model decisions"),
    "max_p99_ms": ("latency_p99_ms", True, "fail when the p99 latency (arrival → published) is above this"),
    "max_flips": ("flips", True, "with --compare: fail when more verdicts than this flipped"),
}


def check_gates(
    limits: dict[str, float | None], summary: dict[str, Any], comparison: dict[str, Any] | None
) -> list[dict[str, Any]]:
    out = []
    for flag, (metric, upper, _) in GATES.items():
        limit = limits.get(flag)
        if limit is not None:
            out.append(
                Gate("--" + flag.replace("_", "-"), float(limit), metric, upper).check(summary, comparison)
            )
    return out
