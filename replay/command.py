"""Replay a labelled folder through the daemon's own pipeline: report (HTML + JSON), comparison, CI gates.

Exit status: 0 when every gate passes, 1 when a gate fails (or the replay could not finish), 2 on a usage,
configuration, model or data error.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any


def _rate(text: str) -> float | None:
    if text.lower() == "max":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--rate must be a number of frames per second or 'max', got {text!r}"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError("--rate must be > 0")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from replay.report import GATES

    parser.add_argument(
        "data",
        type=Path,
        help="labelled images: class folders (OK/NG, good/not-good…), MVTec layout, or a CSV",
    )
    parser.add_argument(
        "--model", type=Path, required=True, help="model package directory (model.onnx + model.json)"
    )
    parser.add_argument(
        "--labels", type=Path, help="labels CSV (path,label[,defect_type]) inside DATA, if not labels.csv"
    )
    parser.add_argument(
        "--split",
        default="all",
        choices=["all", "train", "val", "test"],
        help="replay only this part of the model's recorded split (default all images in DATA)",
    )
    parser.add_argument("--split-file", type=Path, help="split.json to use instead of the one in model.json")
    parser.add_argument("--out", type=Path, help="report directory (default ./replay-YYYYmmdd-HHMMSS)")
    parser.add_argument(
        "--rate",
        type=_rate,
        default=None,
        metavar="FPS|max",
        help="frames per second, or max: as fast as the pipeline takes them (default)",
    )
    parser.add_argument(
        "--window",
        type=int,
        help="frames in flight at most (default 2 × batching.max_batch; adapts below it at max rate)",
    )
    parser.add_argument(
        "--config", type=Path, help="the station's TOML config (batching, deadlines, backend…)"
    )
    parser.add_argument(
        "--max-latency-ms",
        type=float,
        help="override deadlines.max_latency_ms (a slow QA machine is not the station)",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        metavar="PREVIOUS_REPORT_DIR",
        help="list every verdict that flipped since this earlier replay",
    )
    parser.add_argument(
        "--max-heatmaps", type=int, default=60, help="misclassified images drawn (default 60)"
    )
    parser.add_argument("--metrics-port", type=int, help="serve /metrics on this port during the replay")
    parser.add_argument("--log-level", default="ERROR", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--no-progress", action="store_true", help="no progress line")
    gates = parser.add_argument_group("gates (exit status 1 when one fails)")
    for flag, (_, _, help_text) in GATES.items():
        gates.add_argument("--" + flag.replace("_", "-"), type=float, dest=flag, help=help_text)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from daemon.settings import ConfigError, load_settings
    from engine.package import PackageError, load_package
    from replay import ReplayError
    from replay.report import load_report
    from replay.runner import replay_settings
    from replay.runner import run as run_replay
    from replay.selection import select

    overrides: dict[str, Any] = {"model": {"path": str(args.model)}, "logging": {"level": args.log_level}}
    if args.max_latency_ms is not None:
        overrides["deadlines"] = {"max_latency_ms": args.max_latency_ms}
    try:
        settings = replay_settings(load_settings(args.config, overrides), metrics_port=args.metrics_port)
        package = load_package(args.model, verify=settings.model.verify_sha256)
        selection = select(
            args.data, labels=args.labels, part=args.split, split_file=args.split_file, package=package
        )
        previous = load_report(args.compare) if args.compare else None
    except (ConfigError, PackageError, ReplayError, ValueError) as exc:
        print(f"inspectd replay: {exc}", file=sys.stderr)
        return 2
    from daemon.logs import configure_logging

    configure_logging(level=settings.logging.level, fmt="console", line=settings.line)
    for note in selection.notes:
        print(f"note: {note}", file=sys.stderr)
    out = args.out or Path(time.strftime("replay-%Y%m%d-%H%M%S"))
    n = len(selection.items)
    print(f"replaying {n} images of {selection.root} ({selection.layout}, part {selection.part}) through "
          f"{package.meta.model_id} at rate {args.rate or 'max'}", file=sys.stderr)  # fmt: skip
    bar = Progress(enabled=not args.no_progress)
    try:
        result = run_replay(
            settings, selection.items, rate=args.rate, window=args.window, progress=bar.update
        )
    except ReplayError as exc:
        print(f"inspectd replay: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        bar.close()
        print("inspectd replay: interrupted; no report written", file=sys.stderr)
        return 130
    bar.close()
    from replay.output import build_report
    from replay.report import GATES

    gates = {flag: getattr(args, flag) for flag in GATES}
    report = build_report(
        settings, package, selection, result, out=out, gates=gates, previous=previous,
        max_heatmaps=args.max_heatmaps,
    )  # fmt: skip
    print(headline(report, out))
    failed = [g for g in report["gates"] if not g["passed"]]
    if not result.complete:
        print(f"inspectd replay: only {len(result.records)} of {n} images got a verdict", file=sys.stderr)
        return 1
    return 1 if failed else 0


def headline(report: dict[str, Any], out: Path) -> str:
    s, lat = report["summary"], report["summary"]["latency_ms"]

    def f(v: Any, d: int = 3) -> str:
        return "–" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))

    c = s["confusion"]
    lines = [
        f"{s['n']} images ({s['n_ok']} OK / {s['n_ng']} NG / {s['n_unlabelled']} unlabelled): "
        + ", ".join(f"{k} {v}" for k, v in s["verdicts"].items()),
        f"  confusion (truth × verdict): OK→PASS {c['tn']}  OK→REJECT {c['fp']}  NG→PASS {c['fn']}  NG→REJECT {c['tp']}",
        f"  NG recall {f(s['ng_recall'])}  false-reject rate {f(s['false_reject_rate'])}  accuracy {f(s['accuracy'])}"
        f"  at threshold {f(report['model']['threshold'], 4)}",
        "  REJECT reasons: " + (", ".join(f"{k} {v['total']}" for k, v in s["reject_reasons"].items()) or "none"),
        f"  latency ms p50 {f(lat['p50'], 1)}  p95 {f(lat['p95'], 1)}  p99 {f(lat['p99'], 1)}  max {f(lat['max'], 1)};"
        f"  {f(s['throughput']['images_per_s'], 1)} images/s",
    ]  # fmt: skip
    for k, v in s["per_type"].items():
        lines.append(f"  {k:<20} n={v['n']:<3} recall {f(v['recall'], 2)}")
    d = report.get("drift") or {}
    if d:
        against = (f"PSI {f(d['psi'])}, median rank {f(d['median_rank'], 2)} over {d['passed_parts']} passed parts "
                   f"against {d['reference_parts']} good calibration parts" if d["reference_parts"]
                   else f"no reference ({d['no_reference']})")  # fmt: skip
        lines.append(f"  drift: {against}; crop brightness {f(d['crop_brightness'], 1)}, "
                     f"contrast {f(d['crop_contrast'], 1)}")  # fmt: skip
    cmp = report.get("compare")
    if cmp is not None:
        prev = cmp["previous"]
        lines.append(f"  compared with {prev['model_id']} at threshold {f(prev['threshold'], 4)}: {len(cmp['flips'])} verdict(s) flipped "
                     f"({cmp['fixed']} fixed, {cmp['broken']} broken)")  # fmt: skip
        for r in cmp["flips"]:
            lines.append(f"    {r['before']:>6} → {r['after']:<6} {r['effect']:<10} {r['file']}")
    for g in report["gates"]:
        lines.append(f"  gate {g['gate']} {g['rule']}: {f(g['value'])} {'pass' if g['passed'] else 'FAIL'}")
    lines.append(f"report: {out / 'report.html'}")
    return "\n".join(lines)


class Progress:
    """One self-rewriting line on a terminal (no tqdm: it is only in the train extra); a line every 10 s
    otherwise, so CI logs show that a long replay is alive."""

    def __init__(self, enabled: bool = True, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = 0.0
        self._drawn = False

    def update(self, done: int, total: int, elapsed: float) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < (0.2 if self.tty else 10.0) and done < total:
            return
        self._last = now
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = f"ETA {(total - done) / rate:4.0f} s" if rate > 0 and done < total else ""
        width = 24
        filled = width * done // max(total, 1)
        line = f"replay [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {rate:6.1f} img/s {eta}"
        if self.tty:
            self.stream.write("\r" + line.ljust(78))
            self._drawn = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
