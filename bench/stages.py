"""Per-stage costs on the same images: decode, CLAHE, resize, normalise, the daemon's whole per-frame function,
and backend inference per batch size.

Cost is measured twice per item: wall time, and process CPU time (``time.process_time``: user + system of
every thread of this process), i.e. core-seconds. The machine limit is built from core-seconds, so a stage
that keeps two cores busy is charged for both, and a stage that waits is charged for nothing.
"""

from __future__ import annotations

import functools
import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from engine.backend import backend_options, create_backend
from engine.package import ModelPackage
from engine.preprocess import INTERPOLATIONS, Preprocessor, decode


@dataclass(frozen=True, slots=True)
class Cost:
    wall_ms: float  # per item
    core_ms: float  # process CPU time per item (all threads): what the machine limit is built from

    def to_dict(self) -> dict[str, float]:
        return {"wall_ms": round(self.wall_ms, 3), "core_ms": round(self.core_ms, 3)}


def measure(fn: Callable[[], Any], items: int, *, min_seconds: float = 0.5) -> Cost:
    """Run ``fn`` (which processes ``items`` items) repeatedly for at least ``min_seconds`` of wall time."""
    fn()  # first-call costs (ORT arenas, cv2 thread pools, page faults) are not the steady state
    n = 0
    w0, c0 = time.perf_counter(), time.process_time()
    while True:
        fn()
        n += 1
        wall = time.perf_counter() - w0
        if wall >= min_seconds and n >= 2:
            break
    cpu = time.process_time() - c0
    return Cost(wall_ms=1000 * wall / (n * items), core_ms=1000 * cpu / (n * items))


def stage_costs(
    encoded: Sequence[bytes], grays: Sequence[np.ndarray], package: ModelPackage, *, min_seconds: float = 0.5
) -> dict[str, Cost]:
    """Each step alone, then the daemon's own per-frame function (``daemon.prep.FramePreprocessor``) on a raw
    and on a PNG frame: exactly what one pool worker does, including pose/gauges when the package has them.

    OpenCV runs single-threaded here, as the daemon's pool workers do (``cv2.setNumThreads(1)`` in the
    measurement, the daemon's ``batching.opencv_threads`` default), so the core-seconds are those of one worker,
    with no OpenCV-internal parallel overhead.
    """
    pre = Preprocessor(package.meta.preprocess)
    p = pre.params
    h, w = p.input_size
    interp = INTERPOLATIONS[p.interpolation]
    n = len(grays)
    prev = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        clahe = cv2.createCLAHE(clipLimit=p.clahe_clip_limit, tileGridSize=tuple(p.clahe_tile_grid))
        eq = [clahe.apply(g) for g in grays]
        small = [cv2.resize(e, (w, h), interpolation=interp) for e in eq]
        out = np.empty((h, w), np.float32)
        raw_frame, png_frame = _frame_functions(package, grays, encoded)

        def run(fn: Callable[[], Any]) -> Cost:
            return measure(fn, n, min_seconds=min_seconds)

        costs = {
            "decode_png": run(lambda: [decode(b) for b in encoded]),
            "clahe": run(lambda: [clahe.apply(g) for g in grays]),
            "resize": run(lambda: [cv2.resize(e, (w, h), interpolation=interp) for e in eq]),
            "normalise": run(lambda: _each(small, lambda s: pre.normalise_into(s, out))),
            "preprocess": run(lambda: [pre(g) for g in grays]),
            "frame_raw": run(raw_frame),
            "frame_png": run(png_frame),
        }
    finally:
        cv2.setNumThreads(prev)
    return costs


def _each(items: Sequence[np.ndarray], fn: Callable[[np.ndarray], None]) -> None:
    for item in items:
        fn(item)


def _frame_functions(
    package: ModelPackage, grays: Sequence[np.ndarray], encoded: Sequence[bytes]
) -> tuple[Callable[[], None], Callable[[], None]]:
    """The daemon's per-frame preprocessing, called on admitted jobs exactly as the batcher's pool does."""
    from daemon.decision import Decider
    from daemon.ledger import Ledger
    from daemon.prep import FramePreprocessor
    from daemon.types import Frame
    from engine.gauges import load_gauges

    meta = package.meta
    gauges = load_gauges(meta.gauges, meta.preprocess.pose)
    decider = Decider(meta.decision, meta.model_id, gauges=gauges)
    ledger = Ledger(
        max_latency_s=3600.0,
        expire=lambda job, reason: decider.reject(job.frame, reason),
        monotonic=time.monotonic,
    )
    prep = FramePreprocessor(
        Preprocessor(meta.preprocess),
        decider,
        ledger,
        max_pixels=64 * 1024 * 1024,
        monotonic=time.monotonic,
        observe_stage=lambda stage, seconds: None,
    )
    now = time.monotonic()
    raw_jobs = [ledger.admit(Frame("bench", i, f"r{i}", now, 0.0, image=g)) for i, g in enumerate(grays)]
    png_jobs = [ledger.admit(Frame("bench", i, f"p{i}", now, 0.0, data=b)) for i, b in enumerate(encoded)]
    rows = np.zeros((len(grays), 1, *meta.preprocess.input_size), np.float32)

    def run(jobs: list[Any]) -> Callable[[], None]:
        def fn() -> None:
            for i, job in enumerate(jobs):
                prep(job, rows[i])
                if not job.ok:
                    raise RuntimeError(f"the daemon's preprocessing rejected bench image {i}")

        return fn

    return run(raw_jobs), run(png_jobs)


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """One backend configuration to measure: a name for the tables, the kind, and its options (as configured:
    they go into the report; checked here against the backend's options type, so a misspelt key fails now)."""

    label: str
    kind: str
    options: dict[str, Any]

    def __post_init__(self) -> None:
        backend_options(self.kind, self.options)


def available_specs(package: ModelPackage, *, int8: bool, threads: Sequence[int]) -> list[BackendSpec]:
    specs = [BackendSpec(f"onnxruntime-fp32-t{t}", "onnxruntime", {"intra_op_threads": t}) for t in threads]
    if int8:
        from engine.quantize import INT8_FILE

        specs += [
            BackendSpec(
                f"onnxruntime-int8-t{t}", "onnxruntime", {"intra_op_threads": t, "model_file": INT8_FILE}
            )
            for t in threads
        ]
    # One thread, like the other core-second figures (torch's 2 OpenMP threads are measured by the naive loop).
    specs.append(BackendSpec("torch-fp32-t1", "torch", {"device": "cpu", "threads": 1}))
    if importlib.util.find_spec("tensorrt") is not None:
        specs.append(BackendSpec("tensorrt-fp16", "tensorrt", {}))
    return specs


def backend_costs(
    package: ModelPackage,
    kind: str,
    batch_sizes: Sequence[int] = (1, 4, 8, 16, 32),
    *,
    min_seconds: float = 1.0,
    **options: object,
) -> dict[int, dict[str, float]]:
    """img/s, ms/batch and core-ms/img of one backend at each batch size, on random inputs of the real shape
    (CNN inference time does not depend on pixel values)."""
    backend = create_backend(kind, package, max_batch=max(batch_sizes), options=options)
    rng = np.random.default_rng(0)
    results: dict[int, dict[str, float]] = {}
    with backend:
        for n in batch_sizes:
            batch = rng.normal(size=(n, *backend.input_spec.shape)).astype(np.float32)
            cost = measure(functools.partial(backend.infer, batch), n, min_seconds=min_seconds)
            results[n] = {
                "img_s": round(1000 / cost.wall_ms, 2),
                "ms_per_batch": round(cost.wall_ms * n, 3),
                "core_ms_per_img": round(cost.core_ms, 3),
            }
    return results
