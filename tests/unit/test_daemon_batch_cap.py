"""The batch size is capped at start-up to what the backend can infer within a share of the deadline.

A GPU's ``max_batch`` of 8 on a small CPU is eight frames' latency in one call (the patch memory: 367 ms at
batch 8 against a 250 ms deadline), so the daemon times 1, 2, 4, … at warm-up and never forms a batch it cannot
finish in time (``batching.max_infer_share``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.batcher import cap_batch
from daemon.pipeline import Pipeline
from daemon.settings import Backpressure, Settings
from daemon.types import Frame, Reason
from engine.backend import Backend, BackendOptions
from engine.package import ModelPackage, load_package
from tests.helpers import next_settled, pipeline_for, tiny_package


class PerFrameOptions(BackendOptions):
    per_frame_s: float


class PerFrameBackend(Backend):
    """Costs ``per_frame_s`` × batch size: on a fake clock when one is given, else by sleeping."""

    name = "per-frame"
    options_type = PerFrameOptions
    options: PerFrameOptions

    def __init__(
        self, package: ModelPackage, *, max_batch: int, options: PerFrameOptions | dict[str, Any]
    ) -> None:
        super().__init__(package, max_batch=max_batch, options=options)  # options: replicas get them too
        self.per_frame_s = self.options.per_frame_s
        self.fake_now: float | None = None
        self.sizes: list[int] = []
        self.trims_after: list[int] = []  # how many inferences had run at each trim()

    def trim(self) -> None:
        self.trims_after.append(len(self.sizes))

    def _open(self) -> None:
        pass

    def _close(self) -> None:
        pass

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        self.sizes.append(batch.shape[0])
        cost = self.per_frame_s * batch.shape[0]
        if self.fake_now is not None:
            self.fake_now += cost
        else:
            time.sleep(cost)
        return np.zeros(batch.shape[0], np.float32)

    def clock(self) -> float:
        assert self.fake_now is not None
        return self.fake_now


@pytest.fixture
def package(tmp_path: Path) -> ModelPackage:
    tiny_package(tmp_path / "pkg", input_size=(16, 16))
    return load_package(tmp_path / "pkg")


def test_cap_is_the_largest_timed_size_within_the_budget() -> None:
    timings = {1: 0.040, 2: 0.080, 4: 0.150, 8: 0.367}  # the patch memory on one core of this machine
    assert cap_batch(timings, budget_s=0.100) == 2
    assert cap_batch(timings, budget_s=0.400) == 8
    assert cap_batch(timings, budget_s=0.150) == 4  # at the budget still fits
    assert cap_batch(timings, budget_s=0.010) == 1  # nothing fits: one frame at a time, never zero


def test_timing_stops_after_the_first_size_over_budget(package: ModelPackage) -> None:
    b = PerFrameBackend(package, max_batch=64, options={"per_frame_s": 0.010})
    b.fake_now = 0.0
    with b:
        timings = b.time_batches(budget_s=0.035, repeats=3, clock=b.clock, untimed=2)
    assert timings == pytest.approx({1: 0.010, 2: 0.020, 4: 0.040})  # 8 … 64 never run
    assert b.sizes == [1] * 5 + [2] * 5 + [4] * 5  # 2 untimed runs (the allocator grows), then 3 timed
    assert cap_batch(timings, 0.035) == 2


def test_a_max_batch_that_is_not_a_power_of_two_is_timed_itself(package: ModelPackage) -> None:
    b = PerFrameBackend(package, max_batch=6, options={"per_frame_s": 0.001})
    b.fake_now = 0.0
    with b:
        timings = b.time_batches(budget_s=1.0, repeats=1, clock=b.clock)
    assert sorted(timings) == [1, 2, 4, 6]


def _pipeline(
    package: ModelPackage, backend: Backend, batching: dict[str, Any] | None = None, warmup: bool = True
) -> Pipeline:
    settings = Settings(
        # One worker unless a test asks for more: these tests count one backend's timings and trims.
        batching={
            "max_batch": 8,
            "max_wait_ms": 50.0,
            "preprocess_threads": 1,
            "inference_workers": 1,
            **(batching or {}),
        },
        deadlines={"max_latency_ms": 75.0},  # × 0.4 = a 30 ms budget: batch 4 (20 ms) fits, 8 (40 ms) not
        model={"warmup": warmup},
    )
    return pipeline_for(settings, package, backend)


@pytest.mark.timeout(30)
def test_the_pipeline_never_forms_a_batch_over_the_cap(package: ModelPackage) -> None:
    backend = PerFrameBackend(package, max_batch=8, options={"per_frame_s": 0.005})
    p = _pipeline(package, backend)
    p.start()
    try:
        # One home: the pipeline's limit, which the batcher reads (and the ready log line reports).
        assert p.max_batch == p.batcher.max_batch == p.batch_limit.value == 4
        assert p.batcher.limit is p.batch_limit and all(w.batch_limit is p.batch_limit for w in p.workers)
        assert p.batch_limit.configured == 8 and p.batch_limit.capped
        assert sorted(p.worker.batch_timings) == [1, 2, 4, 8]  # 8 was timed, found over budget, and dropped
        # Its memory given back right after the timing, then grown again to the cap with one batch of 4, so
        # the first real full batch does not pay for the allocation.
        assert backend.trims_after == [len(backend.sizes) - 1] and backend.sizes[-1] == 4
        warm = len(backend.sizes)
        img = np.full((32, 32), 128, np.uint8)
        # Far from the deadline's reach: what is tested is the batch size, not the latency.
        t_far = time.monotonic() + 3600
        for i in range(24):
            p.submit(Frame("camera", i, f"f{i}", t_far, time.time(), image=img), Backpressure.BLOCK)
        items = []
        while len(items) < 24:
            item = next_settled(p.settled)
            assert item is not None
            items.append(item)
    finally:
        p.drain(5.0)
    assert {i.verdict.reason for i in items} == {Reason.MODEL}
    served = backend.sizes[warm:]
    assert sum(served) == 24 and max(served) <= 4
    assert max(served) == 4  # frames were queued faster than served: the cap, not the queue, bounded batches


@pytest.mark.timeout(30)
@pytest.mark.parametrize("batching, warmup", [({"max_infer_share": 0.0}, True), ({}, False)])
def test_no_cap_when_switched_off_or_without_warmup(
    package: ModelPackage, batching: dict[str, Any], warmup: bool
) -> None:
    backend = PerFrameBackend(package, max_batch=8, options={"per_frame_s": 0.005})
    p = _pipeline(package, backend, batching, warmup)
    p.start()
    try:
        assert p.batcher.max_batch == 8 and not p.batch_limit.capped
        assert p.worker.batch_timings == {}
    finally:
        p.drain(5.0)


@pytest.mark.timeout(30)
def test_a_backend_larger_than_the_buffers_is_timed_only_up_to_them(package: ModelPackage) -> None:
    backend = PerFrameBackend(package, max_batch=16, options={"per_frame_s": 0.0001})
    p = _pipeline(package, backend, {"max_batch": 4})
    p.start()
    try:
        assert max(p.worker.batch_timings) == 4 and p.max_batch == 4  # never a batch the buffers cannot hold
    finally:
        p.drain(5.0)


@pytest.mark.timeout(30)
def test_other_workers_warm_up_only_to_the_cap(package: ModelPackage) -> None:
    backend = PerFrameBackend(package, max_batch=8, options={"per_frame_s": 0.005})
    p = _pipeline(package, backend, {"inference_workers": 2})
    p.start()
    try:
        assert p.batcher.max_batch == 4
        replica = p.workers[1].backend
        assert isinstance(replica, PerFrameBackend) and replica is not backend
        assert sorted(set(replica.sizes)) == [1, 4]  # never the 8 that does not fit
    finally:
        p.drain(5.0)


def test_onnxruntime_trim_keeps_the_session_and_its_results(package: ModelPackage) -> None:
    from engine.backends.onnxruntime import OnnxRuntimeBackend

    x = np.random.default_rng(0).normal(size=(4, 1, 16, 16)).astype(np.float32)
    with OnnxRuntimeBackend(package, max_batch=4, options={"intra_op_threads": 1}) as b:
        before = b.infer(x)
        b.trim()  # a run with arena shrinkage: ONNX Runtime must accept the config entry
        np.testing.assert_array_equal(b.infer(x), before)
