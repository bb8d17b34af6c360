"""The run's numbers as tables (markdown, also readable in a terminal) and the issue's targets, checked."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from bench.daemon_load import sat_percent

# Issue 19's targets for this 2-core machine (ratios from one run).
TARGET_RATIO_TO_LIMIT = 0.90
TARGET_CORE_EFFICIENCY = 0.92
TARGET_SPEEDUP_FP32 = 4.0
TARGET_SPEEDUP_INT8 = 3.5
TARGET_P99_OVER_SERVICE = 1.5  # at the fixed line rates
TARGET_P99_OVER_SERVICE_NEAR_SATURATION = 2.5  # at --sat-fraction of the raw saturation
TARGET_PEAK_RSS_MB = 1536.0


def targets(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target: ``value``, ``target``, ``higher`` (is better), ``met`` (None without a value) and ``note``
    (what bounds the value, where this run measured it)."""
    out: dict[str, dict[str, Any]] = {}

    def add(name: str, value: float | None, target: float, higher: bool = True, note: str = "") -> None:
        met = None if value is None else (value >= target if higher else value <= target)
        out[name] = {"value": value, "target": target, "higher": higher, "met": met, "note": note}

    cpu = r.get("cpu", {})
    png = r.get("daemon", {}).get("saturation", {}).get("png", {})
    # Against the linear limit, and against the limit measured with every core busy where the run has it.
    against_both = (
        ("ratio_to_limit", r.get("ratio_to_limit"), r.get("ratio_to_measured_limit"), TARGET_RATIO_TO_LIMIT),
        (
            "core efficiency",
            cpu.get("core_efficiency"),
            cpu.get("core_efficiency_measured"),
            TARGET_CORE_EFFICIENCY,
        ),
    )
    for name, linear, measured, target in against_both:
        add(f"{name} (fp32, raw)", linear, target)
        if measured is not None:
            add(f"{name} measured with every core busy (fp32, raw)", measured, target)
    if png.get("ratio_to_limit") is not None:
        add("ratio_to_limit (PNG)", png.get("ratio_to_limit"), TARGET_RATIO_TO_LIMIT)
    add("speedup_vs_baseline (fp32)", r.get("speedup_vs_baseline"), TARGET_SPEEDUP_FP32, note=_ceiling(r))
    if r.get("int8", {}).get("available"):
        add("speedup_vs_baseline (int8)", r.get("speedup_vs_baseline_int8"), TARGET_SPEEDUP_INT8)
    for rate, row in r.get("latency", {}).items():
        pct = sat_percent(rate)
        label = rate if pct is None else f"{pct} % of saturation ({row.get('fps', 0):.1f} fps)"
        add(
            f"p99 at {label} / single-image service time",
            row.get("p99_over_service"),
            TARGET_P99_OVER_SERVICE if pct is None else TARGET_P99_OVER_SERVICE_NEAR_SATURATION,
            False,
        )
    below = [v for v in r.get("latency", {}).values() if v.get("below_saturation")]
    add("deadline misses below saturation", int(sum(v["deadline_misses"] for v in below)), 0, False)
    add("peak RSS (MB)", r.get("peak_rss_mb"), TARGET_PEAK_RSS_MB, False)
    return out


def _ceiling(r: dict[str, Any]) -> str:
    """The most any daemon doing the same work could be sped up over this run's naive loop: each limit ÷ it."""
    base = r.get("baseline_img_s")
    raw = r.get("machine_limit", {}).get("raw", {})
    linear, measured = raw.get("img_s"), raw.get("measured", {}).get("img_s")
    if not base or not linear:
        return ""
    out = f"at most {linear / base:.2f} × here (the linear limit ÷ the naive loop"
    if measured:
        out += f"; the limit measured with every core busy: {measured / base:.2f} ×"
    return out + ")"


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def _fmt_value(v: Any) -> str:
    """A target's value: a ratio with the three digits it is stored with ("0.90 ≥ 0.90: no" was 0.898), a count
    as it is, anything larger with one decimal."""
    return _fmt(v, 3 if isinstance(v, float) and abs(v) < 10 else 1)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return lines


def _headline(r: dict[str, Any]) -> list[list[str]]:
    """img/s (wall) and core-ms/img (CPU time) side by side: on a shared machine img/s says how much CPU the
    process got, core-ms/img how well it used it."""
    m, lim, d, cpu = r["machine"], r["machine_limit"], r["daemon"], r["cpu"]
    sat = d["saturation"]

    def ratio(v: Any, what: str) -> str:
        return f"{_fmt(v, 2)} × {what}" if v is not None else ""

    rows = [
        [
            "machine limit (fp32, raw)",
            _fmt(lim["raw"]["img_s"]),
            _fmt(lim["raw"]["core_ms_per_img"]),
            str(m["cores"]),
            "cores ÷ Σ stage core-ms",
        ],
    ]
    measured = lim["raw"].get("measured")
    if measured is not None:
        rows.append(
            [
                "machine limit, every core busy (fp32, raw)",
                _fmt(measured["img_s"]),
                _fmt(measured["core_ms_per_img"]),
                str(measured["threads"]),
                f"measured: {measured['threads']} threads × (the per-frame function + inference at batch "
                f"{measured['batch']}) side by side; {_fmt(measured['scaling'], 2)} × the line above",
            ]
        )
    also = (
        f" ({_fmt(r['ratio_to_measured_limit'], 2)} × the limit measured, core efficiency "
        f"{_fmt(cpu.get('core_efficiency_measured'), 2)})"
        if r.get("ratio_to_measured_limit") is not None
        else ""
    )
    rows.append(
        [
            "daemon, raw frames",
            _fmt(r["daemon_img_s"]),
            _fmt(sat["raw"]["daemon_core_ms_per_img"]),
            _fmt(sat["raw"]["daemon_cores"], 2),
            f"{ratio(r['ratio_to_limit'], 'limit')}; core efficiency {_fmt(cpu['core_efficiency'], 2)}{also}",
        ]
    )
    if "png" in sat and "png" in lim:
        p = sat["png"]
        rows.append(
            [
                "daemon, PNG frames",
                _fmt(p["img_s"]),
                _fmt(p["daemon_core_ms_per_img"]),
                _fmt(p["daemon_cores"], 2),
                ratio(p.get("ratio_to_limit"), f"PNG limit {_fmt(lim['png']['img_s'])}")
                + (
                    f" ({_fmt(p['ratio_to_measured_limit'], 2)} × the PNG limit measured with every core busy, "
                    f"{_fmt(lim['png']['measured']['img_s'])})"
                    if p.get("ratio_to_measured_limit") is not None
                    else ""
                ),
            ]
        )
    if "int8" in d:
        q = d["int8"]
        limit8 = lim.get("raw_int8", {})
        rows.append(
            [
                "daemon, raw, INT8",
                _fmt(q["img_s"]),
                _fmt(q["daemon_core_ms_per_img"]),
                _fmt(q["daemon_cores"], 2),
                ratio(
                    q.get("ratio_to_limit"),
                    f"INT8 limit {_fmt(limit8.get('img_s'))} ({_fmt(limit8.get('core_ms_per_img'))} core-ms)",
                ),
            ]
        )
    base = r.get("baseline")
    core = r.get("core_speedup_vs_baseline", {})
    if base is not None:
        for name, run in base["runs"].items():
            chosen = " (the baseline)" if name == base["variant"] else ""
            rows.append(
                [
                    f"naive loop, {_runtime(run)}{chosen}",
                    _fmt(run["img_s"]),
                    _fmt(run["core_ms_per_img"]),
                    _fmt(run["core_ms_per_img"] * run["img_s"] / 1000, 2),
                    "",
                ]
            )
        rows.append(
            [
                "daemon speed-up over the naive loop",
                "",
                "",
                "",
                f"fp32 {_fmt(r.get('speedup_vs_baseline'), 2)} ×, INT8 {_fmt(r.get('speedup_vs_baseline_int8'), 2)} × "
                f"(in core-ms/img: fp32 {_fmt(core.get('fp32'), 2)} ×, INT8 {_fmt(core.get('int8'), 2)} ×)",
            ]
        )
    rows.append(["peak RSS of the daemon", "", "", "", f"{_fmt(r['peak_rss_mb'])} MB"])
    return rows


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    cfg = r["config"]
    out: list[str] = []
    out.append(
        f"Machine: {m['cores']} cores, {m['cpu_model']}; load average before {m['loadavg_before']}, "
        f"after {m['loadavg_after']}. Model: `{r['model']['id']}`, input {r['model']['input_size']}; images: "
        f"{r['images']['n']} × {', '.join(r['images']['size'])} ({r['images']['source']}). Daemon: batch "
        f"{_batch(r)}, {cfg['inference_workers']} inference worker(s) × {cfg['intra_op_threads']} ONNX Runtime "
        f"thread(s) + {cfg['preprocess_threads']} preprocessing thread(s), {cfg.get('buffers', '?')} batch buffers, "
        f"deadline {cfg['max_latency_ms']:g} ms, CPU latency request "
        f"{r.get('daemon', {}).get('cpu_latency') or '–'}; {cfg['seconds']:g} s per phase."
    )
    out.append("")
    out.append("**Headline**")
    out.append("")
    out += _table(["", "img/s", "core-ms/img", "cores used", "note"], _headline(r))
    out.append("")
    out.append("**Stage costs** (per image, OpenCV 1 thread)")
    out.append("")
    out += _table(
        ["stage", "wall ms", "core ms"],
        [[k, v["wall_ms"], v["core_ms"]] for k, v in r["stages"].items()],
    )
    out.append("")
    out += _threads(r)
    out.append("**Backends** (img/s · ms/batch · core-ms/img)")
    out.append("")
    sizes = sorted({int(b) for v in r["backends"].values() for b in v.get("batch", {})})
    rows = []
    for label, v in r["backends"].items():
        if "error" in v:
            rows.append([label, *(["–"] * (len(sizes) - 1)), v["error"][:80]])
            continue
        cells = []
        for b in sizes:
            c = v["batch"].get(str(b))
            cells.append(
                f"{c['img_s']:.1f} · {c['ms_per_batch']:.0f} · {c['core_ms_per_img']:.0f}" if c else ""
            )
        rows.append([label, *cells])
    out += _table(["backend", *[f"batch {b}" for b in sizes]], rows)
    out.append("")
    out.append(
        f"**Latency at line rates** (raw frames, send → verdict received; single-image service time "
        f"{_fmt(r['single_image_service_ms'].get('ms'))} ms{_lone(r)})"
    )
    out.append("")
    out += _table(
        [
            "rate",
            "fps",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
            "p99 / service",
            "deadline misses",
            "below saturation",
            "daemon cores",
        ],
        [
            [
                k,
                v["fps"],
                v["p50"],
                v["p95"],
                v["p99"],
                v["max"],
                _fmt(v["p99_over_service"], 2),
                v["deadline_misses"],
                v["below_saturation"],
                _fmt(v["daemon_cores"], 2),
            ]
            for k, v in r["latency"].items()
        ],
    )
    out.append("")
    stages = ("decode", "preprocess", "queue", "infer", "publish", "other", "latency")
    staged = {k: v["stage_ms"] for k, v in r["latency"].items() if v.get("stage_ms")}
    if staged:
        out.append(
            "Where a frame's time goes at each rate (mean ms per frame from `inspectd_stage_seconds`; "
            "queue: arrival to inference less decode and preprocessing; other: the daemon's latency no "
            "stage accounts for)"
        )
        out.append("")
        out += _table(
            ["rate", *stages],
            [[k, *[_fmt(v.get(s), 2) for s in stages]] for k, v in staged.items()],
        )
        out.append("")
    sat = r["daemon"].get("saturation", {})
    collected = {f"saturation {k}": v["gc"] for k, v in sat.items() if "gc" in v}
    collected |= {k: v["gc"] for k, v in r["latency"].items() if "gc" in v}
    if collected:
        out.append(
            "The daemon's garbage collections at each rate (`inspectd_gc_pause_seconds`; per generation: "
            "collections, total ms, the longest ≤ ms)"
        )
        out.append("")
        out += _table(
            ["rate", "generation 0", "generation 1", "generation 2"],
            [[k, *[_gc_cell(v.get(g)) for g in ("0", "1", "2")]] for k, v in collected.items()],
        )
        out.append("")
    if "shadow" in r:
        out += shadow_table(r["shadow"])
    out.append("**Targets**")
    out.append("")
    out += _table(
        ["target", "value", "goal", "met", "note"],
        [
            [
                k,
                _fmt_value(v["value"]),
                ("≥ " if v["higher"] else "≤ ") + _fmt(v["target"], 2),
                _fmt(v["met"]),
                v["note"],
            ]
            for k, v in r["targets"].items()
        ],
    )
    out.append("")
    out.append(f"GPU: {r['gpu']['reason'] if not r['gpu']['measured'] else 'see JSON'}.")
    out += _profile(r["daemon"].get("profile", {}))
    return "\n".join(out) + "\n"


def _threads(r: dict[str, Any]) -> list[str]:
    """Where the daemon's CPU went at saturation, per thread (``inspectd_thread_cpu_seconds_total``), beside the
    machine limit's terms: what each stage cost in the daemon against what it costs alone."""
    sat = r["daemon"].get("saturation", {})
    cols = [(enc, sat[enc].get("thread_core_ms_per_img") or {}) for enc in ("raw", "png") if enc in sat]
    cols = [(enc, t) for enc, t in cols if t]
    if not cols:
        return []
    names = list(dict.fromkeys(k for _, t in cols for k in t))
    rows = [[k, *(_fmt(t.get(k), 2) for _, t in cols)] for k in names]
    rows.append(["**total**", *(_fmt(sum(t.values()), 2) for _, t in cols)])
    mix = [sat[enc].get("batches") or {} for enc, _ in cols]
    rows.append(["mean batch (share of batches of 1 / ≤ 2)", *(
        f"{m['mean']:.2f} ({m['share_le1']:.0%} / {m['share_le2']:.0%})" if m else "–" for m in mix
    )])  # fmt: skip
    limit = r.get("machine_limit", {})
    terms = [f"{enc}: " + " + ".join(f"{k} {v:g}" for k, v in limit[enc]["terms_core_ms"].items())
             for enc, _ in cols if enc in limit]  # fmt: skip
    out = [
        "**Where the daemon's CPU goes at saturation** (core-ms per inspected frame, by thread: "
        "`inspectd_thread_cpu_seconds_total` scraped at the start and end of the phase; the machine limit "
        f"charges {'; '.join(terms)})",
        "",
    ]
    out += _table(["thread", *[f"{enc} frames" for enc, _ in cols]], rows)
    out.append("")
    return out


def _profile(profiles: dict[str, Any]) -> list[str]:
    """``--profile``: per phase, how busy each thread was, the GIL, and the top functions."""
    out: list[str] = []
    for phase, p in profiles.items():
        if not p:
            continue
        busy = ", ".join(f"{t} {v:.0%}" for t, v in p["threads_busy"].items() if v >= 0.01)
        out += [
            "",
            f"**Profile: {phase}** (py-spy; threads busy: {busy}; GIL held {p.get('gil_held_share', 0):.0%})",
            "",
        ]
        rows = [["self", e["function"], f"{e['share']:.1%}"] for e in p["top_self"][:8]]
        rows += [["inclusive", e["function"], f"{e['share']:.1%}"] for e in p["top_inclusive"][:8]]
        rows += [["GIL", e["function"], f"{e['share']:.1%}"] for e in p.get("gil_top_self", [])[:5]]
        out += _table(["", "function", "share of samples"], rows)
    return out


def shadow_only(r: dict[str, Any]) -> str:
    """``inspectd bench --shadow-only``: the machine, the model, and the shadow table."""
    m = r["machine"]
    head = (
        f"Machine: {m['cores']} cores, {m['cpu_model']}; load average before {m['loadavg_before']}, after "
        f"{m['loadavg_after']}. Model: `{r['model']['id']}`, input {r['model']['input_size']}; "
        f"{r['config']['seconds']:g} s per phase."
    )
    return "\n".join([head, "", *shadow_table(r["shadow"])])


def _batch(r: dict[str, Any]) -> str:
    """The batch the daemon ran: max_batch, or what its start-up cap (batching.max_infer_share) made of it."""
    configured = r["config"]["max_batch"]
    ran = r["daemon"].get("max_batch", configured)
    return f"{ran}" if ran == configured else f"{ran} (max_batch {configured}, capped to fit the deadline)"


def shadow_table(s: dict[str, Any]) -> list[str]:
    """``inspectd bench --shadow``'s phases (bench/shadow.py) as markdown lines."""
    out = [f"**Shadow scoring** (candidate `{s['candidate']}`: the same network under another name)", ""]
    if "error" in s:
        return [*out, s["error"], ""]
    rows = []
    for label, key in (("without a candidate", "without"), ("candidate shadowing", "with")):
        p = s[key]
        rows.append(
            [
                label,
                p["rate"]["core_ms_per_frame"],
                p["rate"]["p99_ms"],
                p["rate"]["deadline_misses"],
                p["saturation"]["img_s"],
                _fmt(p["saturation"]["sampled_share"], 3),
                p["saturation"]["deadline_misses"],
            ]
        )
    out += _table(
        [
            "",
            f"core-ms/frame at {s['rate_fps']:g} fps",
            "p99 ms",
            "deadline misses",
            "img/s at saturation",
            "sampled share at saturation",
            "deadline misses",
        ],
        rows,
    )
    out += [
        "",
        f"Shadow scoring costs {_fmt(s['shadow_core_ms_per_frame'], 2)} core-ms per frame (daemon CPU time, with "
        f"minus without; the shadow thread itself: {_fmt(s['shadow_thread_core_ms_per_frame'], 2)} core-ms per "
        f"scored frame). At saturation the candidate scores a sampled share of "
        f"{_fmt(s['sampled_share_at_saturation'], 3)} of the frames.",
        "",
    ]
    return out


def _lone(r: dict[str, Any]) -> str:
    """How the service time was taken: on the daemon's lone-frame session, if it kept one."""
    lone = r.get("daemon", {}).get("lone_frame") or {}
    service = r["single_image_service_ms"]
    if not lone.get("threads"):
        return f"; no lone-frame session: {lone.get('reason', 'n/a')}" if lone else ""
    return (
        f", on the lone-frame session of {lone['threads']} threads; on one worker's session "
        f"{_fmt(service.get('worker_ms'))} ms"
    )


def _runtime(run: dict[str, Any]) -> str:
    """Which runtime, threads and weights a naive-loop run used."""
    return f"{run['runtime']} {run['threads']} thread(s), {run['weights']}"


def _gc_cell(g: dict[str, float] | None) -> str:
    """One generation's collections in a phase: "count, total ms, ≤ longest ms" ("0" when there were none)."""
    if not g:
        return "0"
    return f"{g['count']:.0f}, {g['total_ms']:.1f} ms, ≤ {g['max_ms_le']:g} ms"
