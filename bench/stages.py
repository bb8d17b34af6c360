"""Per-stage costs on the same images: decode, CLAHE, resize, normalise, the daemon's whole per-frame function,
and backend inference per batch size.

Cost is measured twice per item: wall time, and process CPU time (``time.process_time``: user + system of
every thread of this process), i.e. core-seconds. The machine limit is built from core-seconds, so a stage
that keeps two cores busy is charged for both, and a stage that waits is charged for nothing.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import threading
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
    prep, jobs, rows = _frame_jobs(package, grays, encoded)

    def run(jobs: list[Any]) -> Callable[[], None]:
        def fn() -> None:
            for i, job in enumerate(jobs):
                _prep_one(prep, job, rows[i], i)

        return fn

    return run(jobs["raw"]), run(jobs["png"])


def _frame_jobs(
    package: ModelPackage, grays: Sequence[np.ndarray], encoded: Sequence[bytes]
) -> tuple[Callable[[Any, np.ndarray], None], dict[str, list[Any]], np.ndarray]:
    """The daemon's per-frame function (``daemon.prep.FramePreprocessor``, with the package's gauges), the bench
    images admitted as raw and as PNG jobs, and one batch row per image."""
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
    jobs = {
        "raw": [ledger.admit(Frame("bench", i, f"r{i}", now, 0.0, image=g)) for i, g in enumerate(grays)],
        "png": [ledger.admit(Frame("bench", i, f"p{i}", now, 0.0, data=b)) for i, b in enumerate(encoded)],
    }
    rows = np.zeros((len(grays), 1, *meta.preprocess.input_size), np.float32)
    return prep, jobs, rows


def _prep_one(prep: Callable[[Any, np.ndarray], None], job: Any, row: np.ndarray, i: int) -> None:
    prep(job, row)
    if not job.ok:
        raise RuntimeError(f"the daemon's preprocessing rejected bench image {i}")


def parallel_limit(
    package: ModelPackage,
    grays: Sequence[np.ndarray],
    encoded: Sequence[bytes],
    batch: int,
    *,
    threads: int,
    seconds: float,
) -> dict[str, dict[str, float]]:
    """The machine limit measured with every core busy at once, for raw and PNG frames.

    ``threads`` threads (one per core), each with its own single-threaded ONNX Runtime session and its own copy
    of the daemon's per-frame function, each looping "preprocess ``batch`` frames into the batch rows, infer
    the batch" for ``seconds`` side by side. No queues, no hand-offs, no sockets: what the daemon's work costs
    when the cores run it together. The linear limit (cores ÷ Σ single-thread core-ms) assumes two busy cores
    each run as fast as one alone; cores that share a cache, a memory bus or a host (a VM's vCPUs) do not, and
    this says by how much."""
    prev = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        return {
            enc: _parallel_run(package, grays, encoded, enc, batch, threads=threads, seconds=seconds)
            for enc in ("raw", "png")
        }
    finally:
        cv2.setNumThreads(prev)


def _parallel_run(
    package: ModelPackage,
    grays: Sequence[np.ndarray],
    encoded: Sequence[bytes],
    enc: str,
    batch: int,
    *,
    threads: int,
    seconds: float,
) -> dict[str, float]:
    backends = [
        create_backend("onnxruntime", package, max_batch=batch, options={"intra_op_threads": 1})
        for _ in range(threads)
    ]
    for backend in backends:
        backend.__enter__()
    try:
        work = [_frame_jobs(package, grays, encoded) for _ in range(threads)]
        counts = [0] * threads
        errors: list[BaseException] = []
        start = threading.Barrier(threads + 1)
        stop = threading.Event()

        def loop(t: int) -> None:
            prep, jobs, rows = work[t]
            frames = jobs[enc]
            x = rows[:batch]
            try:
                backends[t].warmup((batch,))
                for k in range(batch):  # first-call costs, before the clock starts
                    _prep_one(prep, frames[k % len(frames)], x[k], k)
                start.wait(timeout=60)
                i = 0
                while not stop.is_set():
                    for k in range(batch):
                        _prep_one(prep, frames[i % len(frames)], x[k], i % len(frames))
                        i += 1
                    backends[t].infer(x)
                    counts[t] += batch
            except BaseException as exc:  # reported below; the barrier must not hang the bench
                errors.append(exc)
                start.abort()

        pool = [threading.Thread(target=loop, args=(t,), name=f"parallel-limit-{t}") for t in range(threads)]
        for th in pool:
            th.start()
        with contextlib.suppress(threading.BrokenBarrierError):  # a thread failed: reported below
            start.wait(timeout=120)
        w0, c0 = time.perf_counter(), time.process_time()
        if not errors:
            time.sleep(seconds)
        stop.set()
        for th in pool:
            th.join()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if errors:
            raise RuntimeError(f"parallel limit ({enc}) failed: {errors[0]!r}") from errors[0]
        n = sum(counts)
        return {
            "img_s": round(n / wall, 2),
            "core_ms_per_img": round(1000 * cpu / n, 2) if n else 0.0,
            "frames": n,
            "threads": threads,
            "batch": batch,
            "seconds": round(wall, 2),
        }
    finally:
        for backend in backends:
            backend.__exit__(None, None, None)


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
