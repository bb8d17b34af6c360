"""The demo's live terminal view and its one-screen summary.

Verdicts reach the view through an in-process listener (the after-publish stage, the same hook replay and the
audit archive use), which sees each frame's ground-truth label; what is printed is the published message.
"""

from __future__ import annotations

import queue
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from daemon.types import Frame, Verdict

_STATUS_EVERY_S = 2.0


@dataclass
class Tally:
    t_start: float  # when the demo started (monotonic): "first verdict after …"
    t_first: float | None = None
    n: int = 0
    passed: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    correct: int = 0
    labelled: int = 0
    ng_total: int = 0
    ng_rejected: int = 0
    ok_total: int = 0
    ok_rejected: int = 0
    latencies: list[float] = field(default_factory=list)

    def add(self, verdict: str, reason: str, label: str | None, latency_ms: float) -> None:
        if self.t_first is None:
            self.t_first = time.monotonic()
        self.n += 1
        reject = verdict == "REJECT"
        self.rejected += reject
        self.passed += not reject
        if reject:
            self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if label in ("OK", "NG"):
            self.labelled += 1
            self.correct += (label == "NG") == reject
            if label == "NG":
                self.ng_total += 1
                self.ng_rejected += reject
            else:
                self.ok_total += 1
                self.ok_rejected += reject
        self.latencies.append(latency_ms)

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")


class LiveView:
    """Listener (after-publish thread) → queue → :meth:`pump` on the main thread, which prints."""

    def __init__(self, tally: Tally, out: TextIO | None = None, *, metrics_url: str = "") -> None:
        self.tally = tally
        self.out = out or sys.stdout
        self.metrics_url = metrics_url
        self.colour = bool(getattr(self.out, "isatty", lambda: False)())
        self._q: queue.SimpleQueue[tuple[dict[str, Any], str | None]] = queue.SimpleQueue()
        self._t_status = time.monotonic()

    def on_verdict(self, verdict: Verdict, frame: Frame, message: dict[str, Any]) -> None:
        self._q.put((message, frame.label))

    def pump(self, until: float) -> None:
        """Print what arrived until ``until`` (monotonic), with a status line every couple of seconds."""
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return
            try:
                msg, label = self._q.get(timeout=min(left, 0.2))
            except queue.Empty:
                msg = None
            if msg is not None:
                self._line(msg, label)
            if time.monotonic() - self._t_status >= _STATUS_EVERY_S and self.tally.n:
                self._t_status = time.monotonic()
                self.out.write(self.status() + "\n")
                self.out.flush()

    def drain(self) -> None:
        while True:
            try:
                msg, label = self._q.get_nowait()
            except queue.Empty:
                return
            self._line(msg, label)

    def _paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.colour else text

    def _line(self, msg: dict[str, Any], label: str | None) -> None:
        t = self.tally
        first = t.t_first is None
        t.add(msg["verdict"], msg["reason"], label, msg["latency_ms"])
        if first and t.t_first is not None:
            self.out.write(f"first verdict {t.t_first - t.t_start:.0f} s after the demo started\n")
        verdict = self._paint(f"{msg['verdict']:<6}", "32" if msg["verdict"] == "PASS" else "31;1")
        score = "  –   " if msg["score"] is None else f"{msg['score']:.3f}"
        if label in ("OK", "NG"):
            right = (label == "NG") == (msg["verdict"] == "REJECT")
            truth = f"truth {label} " + (self._paint("✓", "32") if right else self._paint("✗", "31;1"))
        else:
            truth = ""
        self.out.write(
            f"{msg['seq']:>6}  {verdict} {msg['reason']:<10} p(NG) {score} {msg['latency_ms']:7.1f} ms  "
            f"{truth}  {msg['frame_id']}\n"
        )
        self.out.flush()

    def status(self) -> str:
        t = self.tally
        ng_rate = t.rejected / t.n if t.n else 0.0
        acc = f"  accuracy {t.correct / t.labelled:.1%}" if t.labelled else ""
        lat = f"  p50 {t.pct(50):.0f} ms  p99 {t.pct(99):.0f} ms" if t.latencies else ""
        url = f"  {self.metrics_url}" if self.metrics_url else ""
        return self._paint(
            f"── {t.n} frames  PASS {t.passed}  REJECT {t.rejected}  NG rate {ng_rate:.1%}{acc}{lat}{url}",
            "36",
        )


def summary(t: Tally, info: dict[str, Any]) -> str:
    """One screen: what was served, how it did against the labels, how fast."""

    def ratio(num: int, den: int) -> str:
        return f"{num / den:.3f}" if den else "–"

    seconds = info["seconds"]
    rule = "─" * 78
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(t.reasons.items())) or "none"
    lines = [
        rule,
        " inspectd demo — summary",
        rule,
        f" model      {info['model_id']}  input {info['input']}{' (reduced)' if info['reduced'] else ''}, "
        f"threshold {info['threshold']:.4g}",
        f" trained on {info['trained_on']}",
        f" camera     {info['camera']}, {info['fps']:g} fps for {seconds:.0f} s: {info['sent']} frames sent",
        f" verdicts   {t.n}: PASS {t.passed}, REJECT {t.rejected} (reasons: {reasons})",
        f" accuracy   {ratio(t.correct, t.labelled)} against the {info['label_kind']} labels "
        f"({t.labelled} labelled; NG recall {ratio(t.ng_rejected, t.ng_total)}, "
        f"false-reject rate {ratio(t.ok_rejected, t.ok_total)})",
        f" latency    p50 {t.pct(50):.1f} ms, p99 {t.pct(99):.1f} ms, max {max(t.latencies, default=float('nan')):.1f} ms "
        "(frame arrival → verdict published)",
        f" first verdict {t.t_first - t.t_start:.0f} s after start"
        if t.t_first is not None
        else " no verdict",
        f" metrics    {info['metrics_url'] or 'off'} (served while the demo ran)",
        f" package    {info['package']}",
        f" next       inspectd serve --model {info['package']}",
        f"            inspectd replay DATA --model {info['package']} --out REPORT_DIR",
        rule,
    ]
    return "\n".join(lines)
