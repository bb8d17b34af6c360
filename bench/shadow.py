"""What shadow scoring costs, on the real daemon (``inspectd bench --shadow``, or ``--shadow-only``).

One daemon (``inspectd serve`` as a subprocess with the benchmark's settings), four phases on the same images:

1. a line rate below saturation (``--shadow-rate``, open loop), no candidate;
2. saturation (closed loop), no candidate;
3. a candidate — a copy of the package under another name: the same network, so the same cost as a retrained
   model of the same architecture — loaded through the control socket (``inspectd model load --shadow``), and
   the line rate again;
4. saturation again.

The shadow cost is the difference of the daemon's CPU time per frame between phases 3 and 1 (/proc, over each
phase; the candidate's warm-up happens between them, not in either), beside the shadow thread's own CPU time
per scored frame (``inspectd model status``). At saturation production keeps the cores and the candidate
scores what is left: the sampled share is scored ÷ offered over phase 4. Deadline misses are reported per
phase: shadow scoring must cause none below saturation.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.daemon_load import LoadClient
from bench.images import BenchImages
from daemon.control import ControlClient, ControlError
from daemon.settings import Settings
from engine.package import META_NAME, ONNX_NAME, ModelPackage, load_package, write_meta
from tools.daemon_process import DaemonProcess

Log = Callable[[str], None]


def candidate_copy(package: ModelPackage, directory: Path) -> ModelPackage:
    """The package's network under another name: a candidate that costs exactly what production costs."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in (ONNX_NAME, META_NAME):
        shutil.copyfile(package.directory / name, directory / name)
    write_meta(directory, dataclasses.replace(package.meta, name=f"{package.meta.name}-shadow", variants={}))
    return load_package(directory)


def shadow_runs(
    settings: Settings,
    package: ModelPackage,
    images: BenchImages,
    *,
    rate: float,
    seconds: float,
    closed_loop: dict[str, Any],
    work: Path,
    log: Log,
) -> dict[str, Any]:
    raw = images.grays
    drain = settings.deadlines.max_latency_ms / 1000 + 5.0
    warm = min(2.0, max(0.5, seconds / 5))
    candidate = candidate_copy(package, work / "candidate")
    out: dict[str, Any] = {"rate_fps": rate, "candidate": candidate.meta.model_id}
    log(f"shadow: daemon start … then {rate:g} fps and saturation without, then with a shadowing candidate")
    with DaemonProcess(settings, work, name="shadow") as d, LoadClient(d, settings.line) as client:
        control = ControlClient(d.ready["control"], timeout_s=30)

        def phases(name: str) -> dict[str, Any]:
            before = (control.status().get("shadow") or {}).copy()
            line = client.open_loop(
                f"{name}-rate", raw, "raw", fps=rate, seconds=seconds, drain_s=drain, daemon=d
            )
            middle = (control.status().get("shadow") or {}).copy()
            sat = client.closed_loop(
                f"{name}-sat",
                raw,
                "raw",
                seconds=seconds,
                warmup_s=warm,
                drain_s=drain,
                daemon=d,
                **closed_loop,
            )
            after = (control.status().get("shadow") or {}).copy()
            return {
                "rate": _phase(line, before, middle),
                "saturation": {**_phase(sat, middle, after), "img_s": sat["img_s"]},
            }

        out["without"] = phases("shadow-off")
        log(f"  without: {out['without']['rate']['core_ms_per_frame']} core-ms/frame at {rate:g} fps")
        try:
            control.load(candidate.directory, shadow=True, wait_s=600)
        except ControlError as exc:  # refused (e.g. over the inference budget on a loaded machine): reported
            out["error"] = f"candidate not loaded: {exc}"
            log(f"  {out['error']}")
            return out
        out["with"] = phases("shadow-on")
        status = control.status()["shadow"]
        out["shadow_thread_core_ms_per_frame"] = status["core_ms_per_frame"]
        out["memory"] = d.memory()
        out["seq_gaps"] = client.seq_gaps
    out["exit_code"] = d.exit_code
    w, wo = out["with"], out["without"]
    cost = _diff(w["rate"]["core_ms_per_frame"], wo["rate"]["core_ms_per_frame"])
    out["shadow_core_ms_per_frame"] = cost
    out["sampled_share_at_saturation"] = w["saturation"]["sampled_share"]
    log(
        f"  with: {w['rate']['core_ms_per_frame']} core-ms/frame (shadow +{cost}); at saturation "
        f"{w['saturation']['img_s']} img/s (without {wo['saturation']['img_s']}), sampled share "
        f"{w['saturation']['sampled_share']}"
    )
    return out


def _phase(r: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """A phase's daemon CPU per frame (open loop: per frame sent; closed loop: per frame inspected in the measured
    interval), its latency and misses, and what the candidate scored meanwhile."""
    if "sent_fps" in r:
        core_ms = round(1000 * r["daemon_cores"] / r["sent_fps"], 2) if r["sent_fps"] else None
    else:
        core_ms = r["daemon_core_ms_per_img"]
    offered = after.get("offered", 0) - before.get("offered", 0)
    scored = after.get("scored", 0) - before.get("scored", 0)
    return {
        "sent": r["sent"],
        "core_ms_per_frame": core_ms,
        "p99_ms": r["latency_ms"]["p99"],
        "deadline_misses": r["deadline_misses"],
        "overload": r["overload"],
        "offered": offered,
        "scored": scored,
        "sampled_share": round(scored / offered, 3) if offered else None,
    }


def _diff(a: float | None, b: float | None) -> float | None:
    return round(a - b, 2) if a is not None and b is not None else None
