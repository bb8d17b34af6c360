"""One benchmark run, in a fixed order: stage costs → backend costs → the real daemon (saturation, line rates,
INT8) → the naive loop → the torch backend. The machine limit and every ratio are computed from numbers of
this same run, on the same images.

Order matters on a small machine: nothing else runs in this process while the daemon is measured, and torch
(whose thread pool lingers) is only imported after the daemon phases.
"""

from __future__ import annotations

import contextlib
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.baseline import naive_loop
from bench.daemon_load import INSPECTED, LoadClient, line_rates
from bench.daemon_proc import bench_settings
from bench.images import BenchImages, load_images
from bench.model import Int8Status, default_cache, generated_package, int8_status
from bench.profile import PhaseProfile
from bench.stages import BackendSpec, Cost, available_specs, backend_costs, parallel_limit, stage_costs
from daemon.settings import deep_update, settings_assignments
from engine.package import ModelPackage, load_package
from tools.daemon_process import DaemonProcess

Log = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class BenchConfig:
    model: Path | None = None  # None: the generated ResNet18 package
    images: str = "synth"
    count: int = 16
    seconds: float = 15.0  # per daemon phase and for the naive loop
    rates: tuple[float, ...] = (5.0, 10.0, 20.0)
    sat_fraction: float = 0.8  # the extra line rate, as a fraction of the measured raw saturation
    max_batch: int = 4
    max_wait_ms: float = 2.0
    preprocess_threads: int | None = None  # None: the daemon's default
    intra_op_threads: int = 0  # 0: the daemon's default (model.intra_op_threads)
    inference_workers: int = 0  # 0: the daemon's "auto" (batching.inference_workers)
    buffers: int = 0  # 0: the daemon's "auto" (batching.buffers); filled in by resolve()
    max_latency_ms: float = 250.0
    window: int = 0  # closed-loop outstanding frames; 0 = adaptive (latency near half the deadline)
    batch_sizes: tuple[int, ...] = (1, 4, 8, 16, 32)
    int8: bool = True
    torch: bool = True
    baseline: bool = True
    png: bool = True
    seed: int = 0
    cache: Path = field(default_factory=default_cache)
    profile: Path | None = None  # py-spy the fp32 daemon at saturation and the lowest rate: raw stacks here
    daemon_set: tuple[str, ...] = ()  # further daemon settings, "section.key=TOML value"
    shadow: bool = False  # also measure shadow scoring (bench/shadow.py)
    shadow_only: bool = False  # measure only that (and what it needs: the model, the images)
    shadow_rate: float = 10.0  # the line rate (fps) its cost per frame is measured at

    def closed_loop_args(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "max_window": 4 * self.max_batch,
            "target_latency_s": 0.5 * self.max_latency_ms / 1000.0,
        }


def resolve(cfg: BenchConfig) -> BenchConfig:
    """Fill in what was left to the daemon with what it will use on this machine: its thread layout for an
    ONNX Runtime backend (``BatchingSettings.layout``: one single-threaded session per core, …), its default
    preprocessing threads and ``model.intra_op_threads``, after any ``--set``."""
    from daemon.settings import BatchingSettings, ModelSettings

    explicit: dict[str, Any] = {"max_batch": cfg.max_batch}
    if cfg.inference_workers:
        explicit["inference_workers"] = cfg.inference_workers
    if cfg.preprocess_threads is not None:
        explicit["preprocess_threads"] = cfg.preprocess_threads
    batching = BatchingSettings(
        **deep_update(explicit, settings_assignments(cfg.daemon_set).get("batching", {}))
    )
    threads = cfg.intra_op_threads or ModelSettings().intra_op_threads
    layout = batching.layout(on_cpu=True, intra_op_threads=threads)
    return replace(
        cfg,
        inference_workers=layout.inference_workers,
        intra_op_threads=threads,
        preprocess_threads=layout.preprocess_threads,
        buffers=layout.buffers,
    )


def run_bench(cfg: BenchConfig, log: Log = print) -> dict[str, Any]:
    t_start = time.monotonic()
    cfg = resolve(cfg)
    result: dict[str, Any] = {"machine": machine_info(), "config": _config_dict(cfg)}
    result["machine"]["loadavg_before"] = loadavg()
    log(f"load average {result['machine']['loadavg_before']}; {result['machine']['cores']} cores")
    images = load_images(cfg.images, cfg.count, seed=cfg.seed)
    try:
        package, generated = _package(cfg, log)
        result["images"] = images.describe()
        result["model"] = _model_dict(package, generated)
        if cfg.shadow_only:
            result["shadow"] = _shadow(package, images, cfg, log)
            result["machine"]["loadavg_after"] = loadavg()
            result["seconds_total"] = round(time.monotonic() - t_start, 1)
            return result
        int8 = int8_status(package, generated, images.grays) if cfg.int8 else Int8Status(False, "skipped", {})
        package = load_package(package.directory)  # quantising may have added the INT8 record
        result["int8"] = {"available": int8.available, "gate": int8.gate, **int8.detail}
        log(f"model {result['model']['id']} ({result['model']['input_size']}); INT8: {int8.gate}")

        min_s = max(0.2, min(1.0, cfg.seconds / 8))
        log("stage costs …")
        stages = stage_costs(images.png, images.grays, package, min_seconds=min_s)
        result["stages"] = {k: v.to_dict() for k, v in stages.items()}
        log("backend costs (ONNX Runtime) …")
        # The lone-frame session's thread count too: a frame alone on an idle daemon may run there.
        threads = sorted({1, cfg.intra_op_threads, cfg.inference_workers})
        specs = available_specs(package, int8=int8.available, threads=threads)
        ort_specs = [s for s in specs if s.kind == "onnxruntime"]
        result["backends"] = _backends(package, ort_specs, cfg, min_s, log)
        with tempfile.TemporaryDirectory(prefix="inspectd-bench-") as work:
            result["daemon"] = _daemon_runs(package, images, cfg, Path(work), int8.available, log)
        lone = int(result["daemon"].get("lone_frame", {}).get("threads") or 0)
        result["single_image_service_ms"] = service_ms(stages, result["backends"], cfg, lone)
        # The limit is charged at the batch the daemon really forms: max_batch as capped at its start-up to fit
        # the deadline (batching.max_infer_share), timed here too if the table lacks that size.
        batch = result["daemon"]["max_batch"]
        _time_batch(package, ort_specs, result["backends"], batch, min_s, log)
        log(f"machine limit with every core busy (batch {batch}) …")
        measured = parallel_limit(
            package,
            images.grays,
            images.png,
            batch,
            threads=len(os.sched_getaffinity(0)),
            seconds=max(0.5, min(5.0, cfg.seconds / 3)),
        )
        result["machine_limit"] = machine_limits(
            stages, result["backends"], batch, int8.available, measured=measured
        )
        result["machine_limit_img_s"] = result["machine_limit"]["raw"]["img_s"]
        _summarise_daemon(result, cfg)
        if cfg.shadow:
            result["shadow"] = _shadow(package, images, cfg, log)

        if cfg.baseline:
            log("naive loop …")
            result["baseline"] = _baseline(package, images, cfg)
            result["baseline_img_s"] = result["baseline"]["img_s"]
        if cfg.torch:  # after the naive loop: the torch backend sets torch's (process-wide) thread count
            log("backend costs (torch) …")
            torch_specs = [s for s in specs if s.kind != "onnxruntime"]
            result["backends"].update(_backends(package, torch_specs, cfg, min_s, log))
        _ratios(result)
    finally:
        images.close()
    result["machine"]["loadavg_after"] = loadavg()
    result["gpu"] = {
        "measured": False,
        "reason": "inspectd bench measures this machine's CPU path; the GPU station's numbers come from "
        "bench/gpu_check.sh (docs/gpu.md)",
    }
    result["seconds_total"] = round(time.monotonic() - t_start, 1)
    from bench.report import targets

    result["targets"] = targets(result)
    return result


# -- model ------------------------------------------------------------------------------------------------------
def _package(cfg: BenchConfig, log: Log) -> tuple[ModelPackage, bool]:
    if cfg.model is not None:
        return load_package(cfg.model), False
    log(f"model: the generated ResNet18 package (made once, cached under {cfg.cache}) …")
    return generated_package(cfg.cache, seed=cfg.seed), True


def _model_dict(package: ModelPackage, generated: bool) -> dict[str, Any]:
    meta = package.meta
    return {
        "dir": str(package.directory),
        "id": meta.model_id,
        "generated": generated,
        "input_size": list(meta.preprocess.input_size),
        "pose_crop": meta.preprocess.pose is not None,
        "gauges": meta.gauges is not None,
        "onnx_mb": round(package.onnx_path.stat().st_size / 1e6, 1),
    }


# -- backends and the limit -------------------------------------------------------------------------------------
def _backends(
    package: ModelPackage, specs: Sequence[BackendSpec], cfg: BenchConfig, min_s: float, log: Log
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    full = tuple(sorted(set(cfg.batch_sizes) | {1, cfg.max_batch}))
    for spec in specs:
        # Single-threaded ORT gives the core-seconds of the limit: every batch size. Other thread counts
        # only at the sizes the daemon uses (1 for the service time, max_batch at saturation).
        threads = spec.options.get("intra_op_threads", spec.options.get("threads", 1))
        sizes = full if threads == 1 else tuple(sorted({1, cfg.max_batch}))
        log(f"  {spec.label} at batch {list(sizes)}")
        try:
            per = backend_costs(package, spec.kind, sizes, min_seconds=min_s, **spec.options)
        except Exception as exc:  # a backend that cannot run here is reported, not fatal
            out[spec.label] = {
                "kind": spec.kind,
                "options": spec.options,
                "error": f"{type(exc).__name__}: {exc}",
            }
            continue
        out[spec.label] = {
            "kind": spec.kind,
            "options": spec.options,
            "batch": {str(k): v for k, v in per.items()},
        }
    return out


def _time_batch(
    package: ModelPackage,
    specs: Sequence[BackendSpec],
    backends: dict[str, Any],
    batch: int,
    min_s: float,
    log: Log,
) -> None:
    """Add ``batch`` to the single-threaded rows the limit is charged from, where it is missing."""
    for spec in specs:
        if spec.options.get("intra_op_threads", spec.options.get("threads", 1)) != 1:
            continue
        entry = backends.get(spec.label, {})
        if "batch" not in entry or str(batch) in entry["batch"]:
            continue
        log(f"  {spec.label} at batch {batch} (the daemon's)")
        per = backend_costs(package, spec.kind, (batch,), min_seconds=min_s, **spec.options)
        entry["batch"] = dict(
            sorted({**entry["batch"], str(batch): per[batch]}.items(), key=lambda kv: int(kv[0]))
        )


def _infer(backends: dict[str, Any], label: str, batch: int) -> dict[str, float] | None:
    entry = backends.get(label, {})
    return entry.get("batch", {}).get(str(batch))


def machine_limits(
    stages: dict[str, Cost],
    backends: dict[str, Any],
    batch: int,
    int8: bool,
    *,
    measured: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """cores ÷ Σ core-seconds per image of what the daemon does to a frame, at the batch size it runs.

    Inference is charged at its single-threaded cost (the cheapest way to run it: no intra-op
    synchronisation), so the limit is an upper bound the daemon's thread layout can only approach. It assumes
    that every core, busy beside the others, runs as fast as one alone; ``measured`` (bench.stages.
    parallel_limit: the same work on every core at once) is kept beside it under ``"measured"``, with
    ``scaling`` = measured ÷ linear img/s."""
    cores = len(os.sched_getaffinity(0))
    out: dict[str, Any] = {
        "cores": cores,
        "batch": batch,
        "method": (
            "cores ÷ Σ per-image core-seconds; core-seconds = process CPU time (time.process_time, user+system, "
            "all threads) per image, OpenCV with 1 thread, ONNX Runtime with 1 intra-op thread"
        ),
    }
    variants = [("raw", "frame_raw", "onnxruntime-fp32-t1"), ("png", "frame_png", "onnxruntime-fp32-t1")]
    if int8:
        variants.append(("raw_int8", "frame_raw", "onnxruntime-int8-t1"))
    for name, stage, label in variants:
        inf = _infer(backends, label, batch)
        if inf is None:
            continue
        pre_ms = stages[stage].core_ms
        total = pre_ms + inf["core_ms_per_img"]
        out[name] = {
            "img_s": round(1000 * cores / total, 2),
            "core_ms_per_img": round(total, 2),
            "terms_core_ms": {stage: round(pre_ms, 2), f"infer@{batch}": inf["core_ms_per_img"]},
        }
        m = (measured or {}).get(name)
        if m is not None:
            out[name]["measured"] = {**m, "scaling": _ratio(m["img_s"], out[name]["img_s"])}
    return out


def service_ms(
    stages: dict[str, Cost], backends: dict[str, Any], cfg: BenchConfig, lone_threads: int = 0
) -> dict[str, Any]:
    """One frame alone through the daemon's configuration: its preprocessing + a batch-1 inference (wall), on
    the lone-frame session's thread count where the daemon kept one (``lone_threads``), else a worker's. The
    worker's own is kept beside it (``worker_ms``): what a lone frame took before that session existed."""
    pre = stages["frame_raw"].wall_ms
    worker_label = f"onnxruntime-fp32-t{cfg.intra_op_threads}"
    label = f"onnxruntime-fp32-t{lone_threads}" if lone_threads else worker_label
    inf, worker = _infer(backends, label, 1), _infer(backends, worker_label, 1)
    if inf is None:
        return {"ms": None}
    return {
        "ms": round(pre + inf["ms_per_batch"], 2),
        "preprocess_ms": round(pre, 2),
        "infer_b1_ms": inf["ms_per_batch"],
        "backend": label,
        "worker_ms": round(pre + worker["ms_per_batch"], 2) if worker is not None else None,
    }


# -- the daemon ------------------------------------------------------------------------------------------------
def _overrides(cfg: BenchConfig, model_file: str | None = None) -> dict[str, Any]:
    model: dict[str, Any] = {"intra_op_threads": cfg.intra_op_threads}
    if model_file:
        model["options"] = {"model_file": model_file}
    out: dict[str, Any] = {
        "model": model,
        "batching": {
            "max_batch": cfg.max_batch,
            "max_wait_ms": cfg.max_wait_ms,
            "preprocess_threads": cfg.preprocess_threads,
            "inference_workers": cfg.inference_workers,
            "buffers": cfg.buffers,
        },
        "deadlines": {"max_latency_ms": cfg.max_latency_ms},
    }
    return deep_update(out, settings_assignments(cfg.daemon_set))


def _daemon_runs(
    package: ModelPackage, images: BenchImages, cfg: BenchConfig, work: Path, int8: bool, log: Log
) -> dict[str, Any]:
    raw = images.grays
    png = images.png
    drain = cfg.max_latency_ms / 1000 + 5.0
    warm = min(2.0, max(0.5, cfg.seconds / 5))
    out: dict[str, Any] = {}
    settings = bench_settings(package.directory, _overrides(cfg))
    out["settings"] = {
        "batching": settings.batching.model_dump(),
        "model": settings.model.model_dump(mode="json"),
        "deadlines": settings.deadlines.model_dump(),
    }
    log(
        f"daemon (fp32): start … batch {cfg.max_batch}, {cfg.inference_workers} × {cfg.intra_op_threads} ORT "
        f"+ {cfg.preprocess_threads} prep threads, {cfg.buffers} buffers"
    )
    profiles: dict[str, Any] = {}
    with (
        DaemonProcess(settings, work, name="fp32") as d,
        LoadClient(d, settings.line) as client,
    ):
        out["startup_rss_mb"] = d.memory().get("VmRSS")
        out["max_batch"] = int(d.ready.get("max_batch") or cfg.max_batch)  # as capped at start-up
        out["lone_frame"] = d.ready.get("lone_frame") or {}
        out["cpu_latency"] = d.ready.get("cpu_latency")  # batching.cpu_latency_us: held or not, and why
        log(f"  CPU latency request: {out['cpu_latency']}")
        log(f"  lone-frame session: {out['lone_frame']}")
        if out["max_batch"] != cfg.max_batch:
            log(f"  max_batch {cfg.max_batch} capped to {out['max_batch']} by the daemon to fit the deadline")
        sat: dict[str, Any] = {}
        log(f"  saturation raw ({cfg.seconds:g} s) …")
        with _profiled(cfg, d, "saturation-raw", warm + cfg.seconds, profiles):
            sat["raw"] = client.closed_loop(
                "sat-raw",
                raw,
                "raw",
                seconds=cfg.seconds,
                warmup_s=warm,
                drain_s=drain,
                daemon=d,
                **cfg.closed_loop_args(),
            )
        log(
            f"    {sat['raw']['img_s']} img/s, daemon {sat['raw']['daemon_cores']} cores, "
            f"{sat['raw']['mean_outstanding']} outstanding, p99 {sat['raw']['latency_ms']['p99']} ms"
        )
        if cfg.png:
            log("  saturation png …")
            sat["png"] = client.closed_loop(
                "sat-png",
                png,
                "png",
                seconds=cfg.seconds,
                warmup_s=warm,
                drain_s=drain,
                daemon=d,
                **cfg.closed_loop_args(),
            )
            log(f"    {sat['png']['img_s']} img/s")
        out["saturation"] = sat
        lat: dict[str, Any] = {}
        rates = line_rates(cfg.rates, cfg.sat_fraction, sat["raw"]["img_s"])
        for i, (name, fps) in enumerate(rates):
            log(f"  line rate {name} ({fps:.1f} fps, raw) …")
            with _profiled(cfg if i == 0 else None, d, f"rate-{name}", cfg.seconds, profiles):
                r = client.open_loop(
                    f"rate-{name}", raw, "raw", fps=fps, seconds=cfg.seconds, drain_s=drain, daemon=d
                )
            r["below_saturation"] = fps < sat["raw"]["img_s"]
            lat[name] = r
            log(
                f"    p50 {r['latency_ms']['p50']} p99 {r['latency_ms']['p99']} ms, deadline misses {r['deadline_misses']}"
            )
        out["latency"] = lat
        if profiles:
            out["profile"] = profiles
        out["memory"] = d.memory()
        out["seq_gaps"] = client.seq_gaps
    out["exit_code"] = d.exit_code
    out["batches"] = _batch_sizes(d)
    if int8:
        s8 = bench_settings(package.directory, _overrides(cfg, model_file="model.int8.onnx"))
        log("daemon (INT8): saturation raw …")
        with DaemonProcess(s8, work, name="int8") as d8, LoadClient(d8, s8.line) as c8:
            out["int8"] = c8.closed_loop(
                "sat-int8",
                raw,
                "raw",
                seconds=cfg.seconds,
                warmup_s=warm,
                drain_s=drain,
                daemon=d8,
                **cfg.closed_loop_args(),
            )
            out["int8"]["memory"] = d8.memory()
        out["int8"]["exit_code"] = d8.exit_code
        log(f"    {out['int8']['img_s']} img/s")
    return out


@contextlib.contextmanager
def _profiled(
    cfg: BenchConfig | None, d: DaemonProcess, name: str, seconds: float, into: dict[str, Any]
) -> Iterator[None]:
    """The phase under py-spy when ``--profile`` was given (its summary lands in ``into[name]``)."""
    if cfg is None or cfg.profile is None or d.proc is None:
        yield
        return
    with PhaseProfile(cfg.profile, name, d.proc.pid, seconds) as prof:
        yield
    into[name] = prof.summary


def _shadow(package: ModelPackage, images: BenchImages, cfg: BenchConfig, log: Log) -> dict[str, Any]:
    from bench.shadow import shadow_runs

    with tempfile.TemporaryDirectory(prefix="inspectd-bench-shadow-") as work:
        return shadow_runs(
            bench_settings(package.directory, _overrides(cfg)),
            package,
            images,
            rate=cfg.shadow_rate,
            seconds=cfg.seconds,
            closed_loop=cfg.closed_loop_args(),
            work=Path(work),
            log=log,
        )


def _batch_sizes(d: DaemonProcess) -> dict[str, Any]:
    """How full the batches were (from the daemon's one log line per batch)."""
    sizes = [int(r["n"]) for r in d.log_records() if r.get("event") == "batch" and "n" in r]
    if not sizes:
        return {"n": 0}
    return {"n": len(sizes), "mean_size": round(sum(sizes) / len(sizes), 2), "max_size": max(sizes)}


def _summarise_daemon(result: dict[str, Any], cfg: BenchConfig) -> None:
    d = result["daemon"]
    raw = d["saturation"]["raw"]
    result["daemon_img_s"] = raw["img_s"]
    lim = result["machine_limit"]
    result["ratio_to_limit"] = _ratio(raw["img_s"], lim["raw"]["img_s"])
    # Against the limit measured with every core busy (bench.stages.parallel_limit): what the daemon's own
    # design costs, apart from what two busy cores lose to each other.
    result["ratio_to_measured_limit"] = _ratio(raw["img_s"], lim["raw"].get("measured", {}).get("img_s"))
    if "png" in d["saturation"] and "png" in lim:
        png = d["saturation"]["png"]
        png["ratio_to_limit"] = _ratio(png["img_s"], lim["png"]["img_s"])
        png["ratio_to_measured_limit"] = _ratio(png["img_s"], lim["png"].get("measured", {}).get("img_s"))
    if "int8" in d and "raw_int8" in lim:
        d["int8"]["ratio_to_limit"] = _ratio(d["int8"]["img_s"], lim["raw_int8"]["img_s"])
    service = result["single_image_service_ms"].get("ms")
    latency: dict[str, Any] = {}
    for name, r in d["latency"].items():
        lat = r["latency_ms"]
        latency[name] = {
            "fps": r["fps"],
            **{k: lat[k] for k in ("p50", "p95", "p99", "max")},
            "deadline_misses": r["deadline_misses"],
            "overload": r["overload"],
            "inspected": sum(v for k, v in r["reasons"].items() if k in INSPECTED),
            "sent": r["sent"],
            "below_saturation": r["below_saturation"],
            "p99_over_service": _ratio(lat["p99"], service),
            "daemon_cores": r["daemon_cores"],
            "stage_ms": r.get("stage_ms", {}),
            "gc": r.get("gc", {}),
        }
    result["latency"] = latency
    mems = [d["memory"].get("VmHWM", 0.0)] + ([d["int8"]["memory"].get("VmHWM", 0.0)] if "int8" in d else [])
    result["peak_rss_mb"] = max(mems)
    result["cpu"] = {
        "cores": lim["cores"],
        "daemon_cores_at_saturation": raw["daemon_cores"],
        "daemon_utilisation": _ratio(raw["daemon_cores"], lim["cores"]),
        "loadgen_cores_at_saturation": raw["loadgen_cores"],
        "daemon_core_ms_per_img": raw["daemon_core_ms_per_img"],
        "limit_core_ms_per_img": lim["raw"]["core_ms_per_img"],
        # Independent of how many cores other processes left us: the share of the daemon's CPU time that
        # went into the measured stages (the rest is Python per-frame work, ZeroMQ, threads waiting busily).
        "core_efficiency": _ratio(lim["raw"]["core_ms_per_img"], raw["daemon_core_ms_per_img"]),
        # The same against the core-ms the work costs with every core busy (bench.stages.parallel_limit).
        "core_efficiency_measured": _ratio(
            lim["raw"].get("measured", {}).get("core_ms_per_img"), raw["daemon_core_ms_per_img"]
        ),
    }


def _baseline(package: ModelPackage, images: BenchImages, cfg: BenchConfig) -> dict[str, Any]:
    """The notebook's loop with its runtime's default threads, and again with 1 thread. The faster of the two is
    the baseline: on a shared 2-core machine torch's 2 OpenMP threads can be many times slower than 1 (a
    descheduled thread stalls the other at every barrier), and a speed-up must not be quoted against that
    accident."""
    runs = {
        name: naive_loop(images.paths, package.directory, seconds=seconds, threads=threads)
        for name, threads, seconds in (
            ("default_threads", None, cfg.seconds),
            ("1_thread", 1, cfg.seconds / 2),
        )
    }
    best = max(runs, key=lambda k: runs[k]["img_s"])
    return {**runs[best], "variant": best, "runs": runs}


def _ratios(result: dict[str, Any]) -> None:
    base = result.get("baseline_img_s")
    result["speedup_vs_baseline"] = _ratio(result.get("daemon_img_s"), base)
    d = result["daemon"]
    if "int8" in d:
        result["daemon_int8_img_s"] = d["int8"]["img_s"]
        result["speedup_vs_baseline_int8"] = _ratio(d["int8"]["img_s"], base)
    # The same comparison in CPU time per image, which does not depend on how much CPU each run was given
    # (on a shared machine the img/s ratio mostly compares CPU shares).
    if "baseline" in result:
        base_core = result["baseline"]["core_ms_per_img"]
        result["core_speedup_vs_baseline"] = {
            "fp32": _ratio(base_core, d["saturation"]["raw"]["daemon_core_ms_per_img"]),
            "int8": _ratio(base_core, d["int8"]["daemon_core_ms_per_img"]) if "int8" in d else None,
        }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


# -- the machine ------------------------------------------------------------------------------------------------
def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def machine_info() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for mod in ("numpy", "cv2", "onnxruntime", "zmq"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = "unknown"
    return {
        "cores": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


def _config_dict(cfg: BenchConfig) -> dict[str, Any]:
    d = asdict(cfg)
    return {
        k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()
    }
