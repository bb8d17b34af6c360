"""Several inference workers on one batch queue (``batching.inference_workers``): every frame still gets exactly
one verdict, batches really run side by side on replicas of the backend, and draining ends every worker."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from daemon.models import backend_like
from daemon.pipeline import Pipeline
from daemon.settings import AUTO_CPU_WORKERS, Backpressure, BatchingSettings, Settings
from daemon.types import Frame, Reason
from engine.backend import Backend, BackendOptions
from engine.package import ModelPackage, load_package
from tests.helpers import next_settled, pipeline_for, settled_items, tiny_package


class SlowOptions(BackendOptions):
    delay_s: float = 0.0


class SlowBackend(Backend):
    """Sleeps ``delay_s`` per batch (an option, so replicas get it too) and records which thread ran it."""

    name = "slow"
    options_type = SlowOptions
    options: SlowOptions
    threads: ClassVar[list[str]] = []
    concurrent: ClassVar[int] = 0
    max_concurrent: ClassVar[int] = 0
    lock: ClassVar[threading.Lock] = threading.Lock()

    def _open(self) -> None:
        pass

    def _close(self) -> None:
        pass

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        cls = type(self)
        with cls.lock:
            cls.threads.append(threading.current_thread().name)
            cls.concurrent += 1
            cls.max_concurrent = max(cls.max_concurrent, cls.concurrent)
        time.sleep(self.options.delay_s)
        with cls.lock:
            cls.concurrent -= 1
        return np.zeros(batch.shape[0], np.float32)


@pytest.fixture
def package(tmp_path: Path) -> ModelPackage:
    tiny_package(tmp_path / "pkg", input_size=(16, 16))
    return load_package(tmp_path / "pkg")


def pipeline(package: ModelPackage, workers: int, backend: Backend) -> Pipeline:
    settings = Settings(
        batching={"max_batch": 2, "max_wait_ms": 1.0, "preprocess_threads": 1, "inference_workers": workers},
        deadlines={"max_latency_ms": 10_000},
        model={"warmup": False},
    )
    return pipeline_for(settings, package, backend)


def frames(n: int) -> list[Frame]:
    img = np.full((32, 32), 128, np.uint8)
    return [Frame("camera", i, f"f{i}", time.monotonic(), time.time(), image=img) for i in range(n)]


@pytest.mark.timeout(30)
def test_two_workers_run_batches_side_by_side_and_decide_every_frame_once(package: ModelPackage) -> None:
    SlowBackend.threads.clear()
    SlowBackend.max_concurrent = 0
    p = pipeline(package, 2, SlowBackend(package, max_batch=2, options={"delay_s": 0.1}))
    assert [w.name for w in p.workers] == ["inference", "inference-1"]
    assert p.workers[1].backend is not p.workers[0].backend  # a replica with its own state, same options
    assert p.workers[1].backend.options == SlowOptions(delay_s=0.1)
    p.start()
    try:
        for f in frames(12):
            p.submit(f, Backpressure.BLOCK)
        items = settled_items(p, 12)
    finally:
        p.drain(5.0)
    assert sorted(i.verdict.frame_id for i in items) == sorted(f"f{i}" for i in range(12))
    assert all(i.verdict.reason is Reason.MODEL for i in items)
    assert set(SlowBackend.threads) == {"inference", "inference-1"}
    assert SlowBackend.max_concurrent == 2  # two batches really were in flight at once
    assert not any(w.alive for w in p.workers)  # the end of stream reached both workers
    assert p.ledger.pending_count == 0


@pytest.mark.timeout(30)
def test_one_worker_when_configured(package: ModelPackage) -> None:
    p = pipeline(package, 1, SlowBackend(package, max_batch=2))
    assert len(p.workers) == 1 and p.worker is p.workers[0]
    p.start()
    try:
        assert p.healthy and p.progressing(5.0)
    finally:
        p.drain(5.0)
    assert not p.threads_alive()


@pytest.mark.parametrize(
    ("batching", "on_cpu", "cores", "expected"),
    [
        ({}, True, 2, (2, 4)),  # auto on this 2-core machine: one single-threaded session per core
        ({}, True, 16, (AUTO_CPU_WORKERS, AUTO_CPU_WORKERS + 2)),  # capped: each session holds the weights
        ({}, False, 16, (1, 3)),  # a GPU backend: one worker
        ({"buffers": 2}, True, 2, (1, 2)),  # explicit buffers bound auto workers
        ({"inference_workers": 3}, True, 2, (3, 5)),  # an explicit value is kept
    ],
)
def test_auto_thread_layout(
    batching: dict[str, int], on_cpu: bool, cores: int, expected: tuple[int, int]
) -> None:
    layout = BatchingSettings(**batching).layout(on_cpu=on_cpu, cores=cores)
    assert (layout.inference_workers, layout.buffers) == expected
    assert BatchingSettings().layout(on_cpu=True, intra_op_threads=0, cores=16).inference_workers == 1


def test_replica_is_a_fresh_backend_with_the_same_package_batch_and_options(package: ModelPackage) -> None:
    b = SlowBackend(package, max_batch=4, options={"delay_s": 0.5})
    r = backend_like(b)
    assert type(r) is SlowBackend and r is not b
    assert (r.package, r.max_batch, r.options) == (b.package, 4, SlowOptions(delay_s=0.5))
    assert r.options is b.options  # frozen: shared, never copied


class ClockJumpBackend(Backend):
    """Returns logit -4 (a clear PASS) after moving the pipeline's fake clock ``jump_s`` forward: the batch
    "took" that long by the daemon's clock, while the real time the watchdog sleeps on has hardly moved."""

    name = "clock-jump"

    def __init__(self, package: ModelPackage, *, now: list[float], jump_s: float, **kw: Any) -> None:
        super().__init__(package, **kw)
        self.now = now
        self.jump_s = jump_s

    def _open(self) -> None:
        pass

    def _close(self) -> None:
        pass

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        self.now[0] += self.jump_s
        return np.full(batch.shape[0], -4.0, np.float32)


@pytest.mark.timeout(30)
def test_a_result_after_the_deadline_is_published_as_a_deadline_reject_even_if_the_watchdog_is_late(
    package: ModelPackage,
) -> None:
    """Issue 16, finding 4, end to end through the inference stage, with the injectable clock: the deadline is
    30 s of the pipeline's clock, the backend's batch moves that clock 31 s, and the watchdog (waiting 30 s of
    real time for that deadline) has not run. The model said PASS; the verdict must be REJECT deadline."""
    from prometheus_client import CollectorRegistry

    from daemon.clock import Clock
    from daemon.decision import Decider
    from daemon.metrics import Metrics
    from engine.preprocess import Preprocessor

    now = [5000.0]
    settings = Settings(
        batching={"max_batch": 1, "max_wait_ms": 0.0, "preprocess_threads": 1, "inference_workers": 1},
        deadlines={"max_latency_ms": 30_000},
        model={"warmup": False},
    )
    registry = CollectorRegistry()
    p = Pipeline(
        settings,
        backend=ClockJumpBackend(package, max_batch=1, now=now, jump_s=31.0),
        preprocessor=Preprocessor(package.meta.preprocess),
        decider=Decider(package.meta.decision, package.meta.model_id),
        metrics=Metrics(registry, "t", process_collector=False),
        clock=Clock(monotonic=lambda: now[0], wall=time.time),
    )
    img = np.full((32, 32), 128, np.uint8)
    p.start()
    try:
        p.submit(Frame("camera", 0, "late", now[0], time.time(), image=img), Backpressure.BLOCK)
        item = next_settled(p.settled)
    finally:
        p.drain(5.0)
    assert item is not None
    v = item.verdict
    assert (v.frame_id, v.outcome, v.reason, v.score) == ("late", "REJECT", Reason.DEADLINE, None)
    assert v.detail is not None and v.detail["max_latency_ms"] == 30_000
    late = v.detail["late_result"]
    assert (late["outcome"], late["reason"]) == ("PASS", "model") and 0.0 < late["score"] < 0.05
    assert late["ms_after_deadline"] == pytest.approx(1000.0)
    assert item.t_settled == now[0]  # settled by the pipeline's clock, at the result
    assert registry.get_sample_value("inspectd_late_results_total", {"line": "t"}) == 1
    assert set(v.timings_ms) == {"decode", "preprocess", "queue", "infer"}  # the model's timings, kept
