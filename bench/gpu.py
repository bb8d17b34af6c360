"""The GPU station's measurements (``bench/gpu_check.sh`` runs this after ``tests/gpu``), in one run, on the real
images carried in ``bench/gpu_images`` (``bench/gpu_wheels.sh`` puts them there):

1. the two packages, made here: the default kind (the default preset's two patch memories, fitted on the good
   images) and the ResNet18 (seeded random weights: speed does not depend on them);
2. engine-only img/s per batch size, FP16 vs FP32, both models, on the torch CUDA backend (CUDA graphs), and on
   TensorRT where it is importable;
3. verdict flips against ONNX Runtime FP32 on the real images: torch CUDA FP32 and FP16 (and TensorRT FP16);
   and the GPU preprocessing's against OpenCV's;
4. ``inspectd serve`` (a subprocess, the production code path) on raw 1024² frames over loopback ZeroMQ:
   saturation (closed loop), then p50/p99 arrival → verdict at 100 fps and at 80 % of saturation, with the
   preprocessing threads the station has, once with CPU preprocessing and once with ``preprocess_device =
   "cuda"``;
5. where the time goes: the daemon's own per-stage histograms (scraped from its /metrics around each phase) and
   its CPU time per frame, against the measured per-frame cost of the CPU stages.

Everything lands in ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``. ``--cpu-dry-run`` runs every phase on the
CPU with small sizes (the integration smoke test): it checks the driver, not the numbers.

    python -m bench.gpu --images bench/gpu_images --out OUT [--cpu-dry-run]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Log = Callable[[str], None]
TARGETS = {"e2e_img_s": 3000.0, "p99_ms_at_100fps": 10.0, "flips_fp16_vs_fp32": 0}


@dataclass(frozen=True, slots=True)
class GpuCheckConfig:
    out: Path
    images: Path | None = None  # good/ and not-good/ real images; None: rendered screws
    device: str = "cuda"
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    engine_seconds: float = 0.3  # per batch size, engine-only
    seconds: float = 12.0  # per daemon phase
    rates: tuple[float, ...] = (100.0,)
    sat_fraction: float = 0.8
    max_batch: int = 32
    inference_workers: int = 2
    preprocess_threads: int = 0  # 0: the station's cores less three (camera, batcher, inference)
    max_latency_ms: float = 250.0
    small: bool = False  # the dry run: a small patch preset and input
    tensorrt: bool = True  # time TensorRT too where it is importable
    work: Path | None = None  # packages and daemon files (default: a temporary directory, never OUT)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def dry_run(cls, out: Path, images: Path | None) -> GpuCheckConfig:
        return cls(
            out=out,
            images=images,
            device="cpu",
            batch_sizes=(1, 2),
            engine_seconds=0.05,
            seconds=1.5,
            rates=(20.0,),
            max_batch=2,
            inference_workers=1,
            preprocess_threads=1,
            small=True,
            tensorrt=False,
        )


# -- images and packages ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Images:
    source: str
    frames: list[np.ndarray]
    labels: list[int]  # 1 NG, 0 OK
    png: list[bytes]


def load_images(folder: Path | None, *, count: int = 34) -> Images:
    import cv2

    if folder is not None and (folder / "good").is_dir():
        files = sorted((folder / "good").glob("*.png")) + sorted((folder / "not-good").glob("*.png"))
        frames = [cv2.imread(str(f), cv2.IMREAD_GRAYSCALE) for f in files]
        labels = [int(f.parent.name != "good") for f in files]
        source = str(folder)
    else:
        from tools.camera_sim import synth_pool

        pool = synth_pool(count, seed=7)
        frames, labels, source = [f.image for f in pool], [int(f.label == "NG") for f in pool], "rendered"
    png = [cv2.imencode(".png", f, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes() for f in frames]
    return Images(source, frames, labels, png)


def patch_package(images: Images, out: Path, *, small: bool, log: Log) -> Path:
    """The default preset's patch ensemble (the dry run: a small one) fitted on the good images, exported as
    training exports it, with a flip-sensitive threshold in the middle of the images' logits."""
    import torch

    from engine.preprocess import Preprocessor, PreprocessParams
    from training.config import PRESETS
    from training.export import export_package
    from training.patch_memory import PatchSettings, fit_members

    cfg = PRESETS["default"]
    params, members = cfg.preprocess(), cfg.patch_members_settings()
    if small:
        from engine.pose import PoseParams

        params = PreprocessParams(input_size=(80, 250), pose=PoseParams().to_dict())
        s = PatchSettings(patch=8, stride=4, dims=16, window=(1, 1))
        members = [s.__class__(**{**asdict(s), "view": (0, 80, 0, 250, 2)}), s]
    pre = Preprocessor(params)
    good = [f for f, y in zip(images.frames, images.labels, strict=True) if y == 0]
    pixels = np.stack([pre.geometric(f) for f in good])
    x_fit = ((pixels.astype(np.float32) / 255.0 - params.mean) / params.std)[:, None]
    t0 = time.perf_counter()
    model, _ = fit_members(x_fit, pixels, members, seed=0, log=lambda _: None)
    log(f"  patch memory fitted on {len(good)} good images in {time.perf_counter() - t0:.1f} s")
    x = pre.batch(images.frames)
    with torch.no_grad():
        logits = np.concatenate(
            [model(torch.from_numpy(x[i : i + 8]))[:, 0].numpy() for i in range(0, len(x), 8)]
        )
    export_package(
        model,
        out,
        preprocess=params,
        decision=_middle_threshold(logits),
        name="gpu-check-patch",
        verify_batch=x,
    )
    return out


def resnet_package(images: Images, out: Path, *, small: bool) -> Path:
    import torch

    from engine.model import build_model
    from engine.preprocess import Preprocessor, PreprocessParams
    from training.export import export_package

    params = PreprocessParams(input_size=(64, 64) if small else (256, 256))
    torch.manual_seed(0)
    model = build_model(None).eval()
    x = Preprocessor(params).batch(images.frames)
    with torch.no_grad():
        logits = model(torch.from_numpy(x))[:, 0].numpy()
    export_package(
        model,
        out,
        preprocess=params,
        decision=_middle_threshold(logits),
        name="gpu-check-resnet18",
        verify_batch=x,
    )
    return out


def _middle_threshold(logits: np.ndarray) -> Any:
    from engine.package import Decision

    # In the widest gap between neighbouring logits of the middle half: as many verdicts on each side as can be
    # had (the flip count means something) without a logit near the threshold by accident (a tie, a duplicate).
    s = np.sort(np.asarray(logits, dtype=np.float64))
    lo, hi = len(s) // 4, max(len(s) // 4 + 1, 3 * len(s) // 4)
    i = lo + int(np.argmax(np.diff(s[lo : hi + 1])))
    mid = 0.5 * (s[i] + s[i + 1])
    return Decision(threshold=float(1.0 / (1.0 + math.exp(-mid))))


# -- the phases ------------------------------------------------------------------------------------------------
def environment(cfg: GpuCheckConfig) -> dict[str, Any]:
    import importlib.util

    import torch

    from bench.run import machine_info

    env = machine_info()
    env["torch"] = torch.__version__
    env["torch_cuda"] = torch.version.cuda
    env["device"] = cfg.device
    if cfg.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(cfg.device))
        env["gpu"] = props.name
        env["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        env["compute_capability"] = f"{props.major}.{props.minor}"
    env["tensorrt"] = None
    if importlib.util.find_spec("tensorrt") is not None:
        try:
            import tensorrt

            env["tensorrt"] = str(tensorrt.__version__)
        except Exception as exc:  # a broken install is reported, not fatal
            env["tensorrt"] = f"unusable: {exc}"
    return env


def engine_only(package: Any, cfg: GpuCheckConfig, log: Log) -> dict[str, Any]:
    """img/s, ms per batch and host core-ms per image at each batch size, per backend configuration."""
    from bench.stages import backend_costs

    configs: list[tuple[str, str, dict[str, Any]]] = [
        ("torch-fp32", "torch", {"device": cfg.device, "precision": "fp32"})
    ]
    if cfg.device.startswith("cuda"):
        configs.append(("torch-fp16", "torch", {"device": cfg.device, "precision": "fp16"}))
        if cfg.tensorrt and _tensorrt_usable():
            configs.append(
                ("tensorrt-fp16", "tensorrt", {"precision": "fp16", "rebuild": True, "allow_ungated": True})
            )
    out: dict[str, Any] = {}
    for label, kind, options in configs:
        log(f"  {label} at batch {list(cfg.batch_sizes)}")
        try:
            per = backend_costs(package, kind, cfg.batch_sizes, min_seconds=cfg.engine_seconds, **options)
            out[label] = {str(n): v for n, v in per.items()}
        except Exception as exc:  # one configuration failing is reported with the others' numbers
            out[label] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def _tensorrt_usable() -> bool:
    from engine.backend import tensorrt_available

    return tensorrt_available()


def flips(package: Any, images: Images, cfg: GpuCheckConfig) -> dict[str, Any]:
    """Every backend configuration against ONNX Runtime FP32 on the real images (engine.parity, the gate's own
    comparison), and the device preprocessing against OpenCV's through ONNX Runtime."""
    from engine.backend import create_backend
    from engine.parity import Candidate, Tolerance, check_backends, compare, run_backend
    from engine.preprocess import Preprocessor, device_preprocessor

    batch = Preprocessor(package.meta.preprocess).batch(images.frames)
    candidates = [
        Candidate("onnxruntime cpu", "onnxruntime"),
        Candidate.of("torch fp32", "torch", device=cfg.device, precision="fp32"),
    ]
    if cfg.device.startswith("cuda"):
        candidates.append(Candidate.of("torch fp16", "torch", device=cfg.device, precision="fp16"))
        if cfg.tensorrt and _tensorrt_usable():
            candidates.append(
                Candidate.of("tensorrt fp16", "tensorrt", precision="fp16", rebuild=True, allow_ungated=True)
            )
    # The engine-only phase's largest batch: a TensorRT plan built there (same key) is a cache hit here.
    rows = check_backends(package, batch, candidates, max_batch=max(cfg.batch_sizes), tolerance=Tolerance())
    out: dict[str, Any] = {
        "n": len(images.frames),
        "threshold": package.meta.decision.threshold,
        "backends": {
            r.label: {
                "precision": r.precision,
                "status": r.status,
                **(r.comparison.to_dict() if r.comparison else {}),
            }
            for r in rows
        },
    }
    device = device_preprocessor(package.meta.preprocess, cfg.device)(images.frames).batch.cpu().numpy()
    levels = np.abs(np.rint((device - batch) * 255.0 * package.meta.preprocess.std))
    with create_backend("onnxruntime", package, max_batch=32) as ort:
        cmp = compare(run_backend(ort, batch), run_backend(ort, device), package.meta.decision)
    out["device_preprocessing"] = {
        "max_grey_levels": float(levels.max()),
        "share_of_pixels": float(np.count_nonzero(levels) / levels.size),
        **cmp.to_dict(),
    }
    return out


def cpu_stages(package: Any, images: Images) -> dict[str, Any]:
    """Per-frame CPU cost (1 thread) of the daemon's own per-frame function, and of the pose alone (what the pool
    still does with GPU preprocessing)."""
    import cv2

    from bench.stages import measure, stage_costs
    from engine.pose import PoseParams, estimate_pose

    costs = {
        k: v.to_dict() for k, v in stage_costs(images.png, images.frames, package, min_seconds=0.5).items()
    }
    pose = package.meta.preprocess.pose
    if pose is not None:
        params = PoseParams.from_dict(pose)
        prev = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            cost = measure(
                lambda: [estimate_pose(f, params) for f in images.frames], len(images.frames), min_seconds=0.5
            )
        finally:
            cv2.setNumThreads(prev)
        costs["pose"] = cost.to_dict()
    return costs


def device_preprocessing_cost(package: Any, images: Images, cfg: GpuCheckConfig) -> dict[str, Any]:
    """Wall ms per frame of the batched device preprocessing at the daemon's batch size (poses given, as the
    pool gives them), and host core-ms per frame of that call."""
    from bench.stages import measure
    from engine.pose import PoseParams, estimate_pose
    from engine.preprocess import device_preprocessor

    pre = device_preprocessor(package.meta.preprocess, cfg.device)
    n = min(cfg.max_batch, len(images.frames))
    frames = images.frames[:n]
    pose = package.meta.preprocess.pose
    poses = [estimate_pose(f, PoseParams.from_dict(pose)) for f in frames] if pose is not None else None
    out = np.empty((n, 1, *package.meta.preprocess.input_size), np.float32)
    cost = measure(lambda: pre.batch_into(frames, poses, out), n, min_seconds=1.0)
    return {"batch": n, **cost.to_dict()}


# -- the daemon ------------------------------------------------------------------------------------------------
def daemon_runs(package: Any, images: Images, cfg: GpuCheckConfig, work: Path, log: Log) -> dict[str, Any]:
    from bench.daemon_load import LoadClient, line_rates
    from bench.daemon_proc import bench_settings
    from tools.daemon_process import DaemonProcess

    cores = len(os.sched_getaffinity(0))
    threads = cfg.preprocess_threads or max(1, cores - 3)
    devices = ["cpu"] + (["cuda"] if cfg.device.startswith("cuda") else [])
    precision = "fp16" if cfg.device.startswith("cuda") else "fp32"
    out: dict[str, Any] = {
        "preprocess_threads": threads,
        "cores": cores,
        "backend": f"torch {cfg.device} {precision}",
    }
    drain = cfg.max_latency_ms / 1000 + 5.0
    for prep in devices:
        name = f"prep-{prep}"
        settings = bench_settings(
            package.directory,
            {
                "model": {"backend": "torch", "options": {"device": cfg.device, "precision": precision}},
                "batching": {
                    "max_batch": cfg.max_batch,
                    "max_wait_ms": 2.0,
                    "queue_size": 512,
                    "preprocess_threads": threads,
                    "inference_workers": cfg.inference_workers,
                    "buffers": cfg.inference_workers + 2,
                    "preprocess_device": prep if prep == "cpu" else cfg.device,
                },
                "deadlines": {"max_latency_ms": cfg.max_latency_ms},
                "logging": {"batch_lines": False},
            },
        )
        log(f"  daemon, preprocessing on {prep}: start …")
        run: dict[str, Any] = {}
        try:
            with DaemonProcess(settings, work, name=name) as d, LoadClient(d, settings.line) as client:
                run["max_batch"] = d.ready.get("max_batch")
                port = int(d.ready.get("metrics_port") or 0)
                before = _stage_seconds(port)
                sat = client.closed_loop(
                    f"{name}-sat", images.frames, "raw", seconds=cfg.seconds, window=0, max_window=8 * cfg.max_batch,
                    target_latency_s=0.5 * cfg.max_latency_ms / 1000, warmup_s=min(3.0, cfg.seconds / 3),
                    drain_s=drain, daemon=d,
                )  # fmt: skip
                run["saturation"] = sat
                run["stages_ms_per_frame"] = _stage_delta(before, _stage_seconds(port))
                log(
                    f"    saturation {sat['img_s']} img/s, daemon {sat['daemon_cores']} cores, p99 {sat['latency_ms']['p99']} ms"
                )
                rates = line_rates(cfg.rates, cfg.sat_fraction, sat["img_s"])
                run["latency"] = {}
                for label, fps in rates:
                    r = client.open_loop(
                        f"{name}-{label}",
                        images.frames,
                        "raw",
                        fps=fps,
                        seconds=cfg.seconds,
                        drain_s=drain,
                        daemon=d,
                    )
                    run["latency"][label] = r
                    log(
                        f"    {label} ({fps:.0f} fps): p50 {r['latency_ms']['p50']} p99 {r['latency_ms']['p99']} ms"
                    )
                run["memory"] = d.memory()
        except Exception as exc:  # reported with what was measured; the other configuration still runs
            run["error"] = f"{type(exc).__name__}: {exc}"
            log(f"    failed: {run['error']}")
        out[prep] = run
    return out


def _stage_seconds(port: int) -> dict[str, tuple[float, float]]:
    """(sum seconds, count) of inspectd_stage_seconds per stage, from the daemon's /metrics."""
    if not port:
        return {}
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        if not line.startswith("inspectd_stage_seconds_"):
            continue
        name, _, value = line.rpartition(" ")
        kind = (
            "sum"
            if name.startswith("inspectd_stage_seconds_sum")
            else "count"
            if name.startswith("inspectd_stage_seconds_count")
            else None
        )
        if kind is None or 'stage="' not in name:
            continue
        stage = name.split('stage="', 1)[1].split('"', 1)[0]
        out.setdefault(stage, [0.0, 0.0])[0 if kind == "sum" else 1] = float(value)
    return {k: (v[0], v[1]) for k, v in out.items()}


def _stage_delta(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    out = {}
    for stage, (s1, c1) in after.items():
        s0, c0 = before.get(stage, (0.0, 0.0))
        if c1 > c0:
            out[stage] = round(1000 * (s1 - s0) / (c1 - c0), 3)
    return out


# -- the run ---------------------------------------------------------------------------------------------------
def run_check(cfg: GpuCheckConfig, log: Log = print) -> dict[str, Any]:
    t_start = time.monotonic()
    result: dict[str, Any] = {"config": _jsonable(asdict(cfg)), "environment": environment(cfg)}
    log(
        f"environment: {result['environment'].get('gpu', cfg.device)}, {result['environment']['cores']} cores, torch {result['environment']['torch']}"
    )
    images = load_images(cfg.images)
    result["images"] = {"source": images.source, "n": len(images.frames), "ng": int(sum(images.labels))}
    with tempfile.TemporaryDirectory(prefix="inspectd-gpu-") as tmp:
        work = cfg.work or Path(tmp)
        from engine.package import load_package

        log("packages …")
        t0 = time.monotonic()
        packages = {
            "patch_memory": load_package(patch_package(images, work / "patch", small=cfg.small, log=log)),
            "resnet18": load_package(resnet_package(images, work / "resnet18", small=cfg.small)),
        }
        result["packages"] = {
            k: {
                "id": p.meta.model_id,
                "input_size": list(p.meta.preprocess.input_size),
                "pose_crop": p.meta.preprocess.pose is not None,
            }
            for k, p in packages.items()
        }
        result["packages_seconds"] = round(time.monotonic() - t0, 1)
        result["engine_only"], result["flips"] = {}, {}
        for kind, pkg in packages.items():
            log(f"engine-only {kind} …")
            result["engine_only"][kind] = engine_only(pkg, cfg, log)
            log(f"verdict flips {kind} …")
            result["flips"][kind] = _guarded(lambda pkg=pkg: flips(pkg, images, cfg))
        patch = packages["patch_memory"]
        log("CPU stages …")
        result["cpu_stages"] = _guarded(lambda: cpu_stages(patch, images))
        result["device_preprocessing"] = _guarded(lambda: device_preprocessing_cost(patch, images, cfg))
        log("daemon …")
        result["daemon"] = daemon_runs(patch, images, cfg, work / "daemon", log)
    result["where_the_time_goes"] = where_the_time_goes(result)
    result["targets"] = targets(result)
    result["seconds_total"] = round(time.monotonic() - t_start, 1)
    return result


def _guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Exception as exc:  # one failed measurement is reported beside the others
        return {"error": f"{type(exc).__name__}: {exc}"}


def where_the_time_goes(result: dict[str, Any]) -> dict[str, Any]:
    """Per configuration: the daemon's CPU per frame at saturation, split into the measured per-frame CPU stages
    (the pool's work: the whole preprocessing, or only decode + pose with GPU preprocessing), inference's host
    side, and the rest (Python per frame: intake, ledger, batching, decisions, publishing, ZeroMQ)."""
    stages = result.get("cpu_stages", {})
    out: dict[str, Any] = {}
    for prep, run in result.get("daemon", {}).items():
        if not isinstance(run, dict) or "saturation" not in run:
            continue
        total = run["saturation"].get("daemon_core_ms_per_img")
        pool = (
            stages.get("frame_raw", {}).get("core_ms")
            if prep == "cpu"
            else stages.get("pose", {}).get("core_ms")
        )
        engine = result.get("engine_only", {}).get("patch_memory", {})
        best = next(
            (engine[k] for k in ("torch-fp16", "torch-fp32") if k in engine and "error" not in engine[k]), {}
        )
        batch = str(run.get("max_batch") or "")
        infer = best.get(batch, {}).get("core_ms_per_img") if best else None
        device = result.get("device_preprocessing", {}).get("core_ms") if prep != "cpu" else 0.0
        known = [v for v in (pool, infer, device) if isinstance(v, int | float)]
        out[prep] = {
            "daemon_core_ms_per_frame": total,
            "preprocessing_pool_core_ms": pool,
            "device_preprocessing_host_core_ms": device,
            "inference_host_core_ms": infer,
            "python_and_rest_core_ms": round(total - sum(known), 2)
            if isinstance(total, int | float)
            else None,
            "stage_wall_ms_per_frame": run.get("stages_ms_per_frame", {}),
            "cpu_bound_img_s": round(1000 * result["daemon"]["cores"] / total, 1) if total else None,
        }
    return out


def targets(result: dict[str, Any]) -> dict[str, Any]:
    runs = {k: v for k, v in result.get("daemon", {}).items() if isinstance(v, dict) and "saturation" in v}
    best = max(runs.items(), key=lambda kv: kv[1]["saturation"]["img_s"], default=(None, None))
    flips_fp16 = [
        v["flips"]
        for per in result.get("flips", {}).values()
        for label, v in per.get("backends", {}).items()
        if "fp16" in label and "flips" in v
    ]
    p99 = best[1]["latency"].get("100fps", {}).get("latency_ms", {}).get("p99") if best[1] else None
    measured = {
        "e2e_img_s": best[1]["saturation"]["img_s"] if best[1] else None,
        "e2e_config": f"preprocessing on {best[0]}" if best[0] else None,
        "p99_ms_at_100fps": p99,
        "flips_fp16_vs_fp32": sum(flips_fp16) if flips_fp16 else None,
    }
    met = {
        "e2e_img_s": measured["e2e_img_s"] is not None and measured["e2e_img_s"] >= TARGETS["e2e_img_s"],
        "p99_ms_at_100fps": p99 is not None and p99 <= TARGETS["p99_ms_at_100fps"],
        "flips_fp16_vs_fp32": bool(flips_fp16) and sum(flips_fp16) == TARGETS["flips_fp16_vs_fp32"],
    }
    return {"targets": TARGETS, "measured": measured, "met": met}


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()
    }


# -- markdown --------------------------------------------------------------------------------------------------
def markdown(r: dict[str, Any]) -> str:
    env = r["environment"]
    lines = [
        "# GPU station check",
        "",
        f"Command: `{r.get('command', 'bash bench/gpu_check.sh')}`",
        "",
        f"Machine: {env.get('gpu', env['device'])} ({env.get('gpu_memory_gb', '-')} GB, sm {env.get('compute_capability', '-')}), "
        f"{env['cores']} cores ({env['cpu_model']}), Python {env['python']}, torch {env['torch']} (CUDA {env['torch_cuda']}), "
        f"TensorRT {env.get('tensorrt') or 'not installed'}. Images: {r['images']['n']} ({r['images']['ng']} NG) from "
        f"{r['images']['source']}. Total {r.get('seconds_total')} s.",
        "",
        "## Targets",
        "",
        "| target | wanted | measured | met |",
        "|---|---|---|---|",
    ]
    t = r["targets"]
    for key, label in (
        ("e2e_img_s", "end-to-end img/s, raw 1024² frames"),
        ("p99_ms_at_100fps", "p99 ms at 100 fps"),
        ("flips_fp16_vs_fp32", "verdict flips FP16 vs FP32"),
    ):
        lines.append(
            f"| {label} | {t['targets'][key]} | {t['measured'][key]} | {'yes' if t['met'][key] else 'no'} |"
        )
    lines += [
        "",
        "## Engine only (img/s; batch of preprocessed input in host memory → logits in host memory)",
        "",
    ]
    for kind, per in r["engine_only"].items():
        sizes = sorted({int(n) for cfg in per.values() if "error" not in cfg for n in cfg}, key=int)
        lines += [
            f"**{kind}**",
            "",
            "| backend | " + " | ".join(f"b{n}" for n in sizes) + " |",
            "|---" * (len(sizes) + 1) + "|",
        ]
        for label, cfg in per.items():
            if "error" in cfg:
                lines.append(f"| {label} | {cfg['error'][:120]} |")
                continue
            lines.append(
                f"| {label} | " + " | ".join(str(cfg.get(str(n), {}).get("img_s", "-")) for n in sizes) + " |"
            )
        lines.append("")
    lines += [
        "## Verdict flips against ONNX Runtime FP32 (real images)",
        "",
        "| model | backend | precision | flips | max abs Δlogit | status |",
        "|---|---|---|---|---|---|",
    ]
    for kind, per in r["flips"].items():
        if "error" in per:
            lines.append(f"| {kind} | {per['error'][:120]} | | | | |")
            continue
        for label, v in per["backends"].items():
            lines.append(
                f"| {kind} | {label} | {v['precision']} | {v.get('flips', '-')}/{v.get('n', '-')} | {v.get('max_abs_logit_delta', '-')} | {v['status']} |"
            )
        dp = per["device_preprocessing"]
        lines.append(
            f"| {kind} | GPU preprocessing vs OpenCV (ORT) | fp32 | {dp['flips']}/{dp['n']} | {dp['max_abs_logit_delta']:.3g} | "
            f"max {dp['max_grey_levels']:.0f} grey levels on {100 * dp['share_of_pixels']:.2f} % of pixels |"
        )
    d = r["daemon"]
    lines += [
        "",
        f"## inspectd serve, raw 1024² frames over loopback ZeroMQ ({d.get('backend')}, {d.get('preprocess_threads')} preprocessing threads, {d.get('cores')} cores)",
        "",
    ]
    lines += [
        "| preprocessing | saturation img/s | daemon cores | loadgen cores | rate | fps | p50 ms | p99 ms | deadline misses |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for prep, run in d.items():
        if not isinstance(run, dict):
            continue
        if "error" in run and "saturation" not in run:
            lines.append(f"| {prep} | {run['error'][:120]} | | | | | | | |")
            continue
        sat = run["saturation"]
        for i, (label, lat) in enumerate(run.get("latency", {}).items()):
            head = (
                f"| {prep} | {sat['img_s']} | {sat['daemon_cores']} | {sat['loadgen_cores']} |"
                if i == 0
                else "| | | | |"
            )
            lines.append(
                f"{head} {label} | {lat['fps']} | {lat['latency_ms']['p50']} | {lat['latency_ms']['p99']} | {lat['deadline_misses']} |"
            )
    lines += [
        "",
        "## Where the time goes (per frame, at saturation)",
        "",
        "| preprocessing | daemon core-ms | pool (CPU prep) | device prep (host) | inference (host) | Python and the rest | CPU-bound limit img/s | stage wall ms (daemon histograms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for prep, w in r["where_the_time_goes"].items():
        stages = ", ".join(f"{k} {v}" for k, v in w["stage_wall_ms_per_frame"].items())
        lines.append(
            f"| {prep} | {w['daemon_core_ms_per_frame']} | {w['preprocessing_pool_core_ms']} | {w['device_preprocessing_host_core_ms']} | "
            f"{w['inference_host_core_ms']} | {w['python_and_rest_core_ms']} | {w['cpu_bound_img_s']} | {stages} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--images", type=Path, help="good/ and not-good/ images (default: rendered screws)")
    ap.add_argument("--cpu-dry-run", action="store_true", help="every phase on the CPU with small sizes")
    ap.add_argument("--seconds", type=float, help="seconds per daemon phase")
    args = ap.parse_args(argv)
    cfg = (
        GpuCheckConfig.dry_run(args.out, args.images)
        if args.cpu_dry_run
        else GpuCheckConfig(out=args.out, images=args.images)
    )
    if args.seconds:
        from dataclasses import replace

        cfg = replace(cfg, seconds=args.seconds)
    args.out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    result = run_check(cfg, log)
    result["command"] = "bash bench/gpu_check.sh" + (" --cpu-dry-run" if args.cpu_dry_run else "")
    (args.out / "gpu_check.json").write_text(
        json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8"
    )
    text = markdown(result)
    (args.out / "gpu_check.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
