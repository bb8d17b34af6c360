"""The lone-frame session (daemon/lone_frame.py): a batch of one on an idle daemon runs on a session with one
thread per worker, only when every other worker waits; start-up keeps it only where it measured faster; the
verdicts are the ones the workers' sessions give; a candidate gets one too; a setting that cannot apply fails
at start naming the field."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import Field

from daemon.batcher import Batch, BatchQueue
from daemon.drift import DriftMonitor
from daemon.loading import CandidateLoader
from daemon.lone_frame import (
    LONE_FRAME_MAX_BUSY,
    LoneFrameError,
    lone_frame_threads,
    lone_like,
    start_lone_frame,
)
from daemon.models import Role
from daemon.settings import Backpressure, ConfigError, Settings
from daemon.types import Frame, Reason
from engine.backend import Backend, BackendOptions
from engine.backends.onnxruntime import OnnxRuntimeBackend
from engine.package import ModelPackage, load_package
from tests.helpers import pipeline_for, settled_items, tiny_package


class ThreadedOptions(BackendOptions):
    intra_op_threads: int = Field(default=1, ge=0)
    work_s: float = 0.02  # one thread's time for a batch of one
    scales: bool = True  # N threads take work_s / N (else work_s whatever N)


class ThreadedBackend(Backend):
    """A CPU backend whose batch of one takes ``work_s`` / threads (or ``work_s`` flat): the timing rule's
    two cases without depending on this machine's cores."""

    name = "threaded"
    options_type = ThreadedOptions
    options: ThreadedOptions
    entered = 0

    def _open(self) -> None:
        type(self).entered += 1

    def _close(self) -> None:
        type(self).entered -= 1

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        o = self.options
        time.sleep(o.work_s / (max(1, o.intra_op_threads) if o.scales else 1))
        return np.zeros(batch.shape[0], np.float32)


class GpuLike(ThreadedBackend):
    name = "gpu-like"

    @property
    def on_cpu(self) -> bool:
        return False


@pytest.fixture
def package(tmp_path: Path) -> ModelPackage:
    tiny_package(tmp_path / "pkg", input_size=(16, 16))
    return load_package(tmp_path / "pkg")


# -- how many threads, from the setting -------------------------------------------------------------------------
def test_auto_gives_one_thread_per_worker_only_to_single_threaded_cpu_workers(package: ModelPackage) -> None:
    one = ThreadedBackend(package, options={"intra_op_threads": 1})
    assert lone_frame_threads("auto", one, 2, warmup=True) == 2
    assert lone_frame_threads("auto", one, 4, warmup=True) == 4
    assert lone_frame_threads("auto", one, 1, warmup=True) == 0  # one worker: no idle core to borrow
    assert lone_frame_threads("auto", one, 2, warmup=False) == 0  # not timed: not taken on trust
    for intra in (0, 2):  # workers that already use every core
        multi = ThreadedBackend(package, options={"intra_op_threads": intra})
        assert lone_frame_threads("auto", multi, 2, warmup=True) == 0
    assert lone_frame_threads("auto", GpuLike(package), 2, warmup=True) == 0
    assert lone_frame_threads(0, one, 2, warmup=True) == 0
    assert lone_frame_threads(3, one, 2, warmup=False) == 3  # explicit: kept as asked


def test_an_explicit_session_the_backend_cannot_make_is_refused(package: ModelPackage) -> None:
    with pytest.raises(LoneFrameError, match="on its device"):
        lone_frame_threads(2, GpuLike(package), 2, warmup=True)
    with pytest.raises(LoneFrameError, match="use 0 or ≥ 2"):
        lone_frame_threads(1, ThreadedBackend(package), 2, warmup=True)


def test_bad_setting_fails_at_start_naming_the_field(package: ModelPackage) -> None:
    settings = Settings(batching={"inference_workers": 2, "lone_frame_threads": 2}, model={"warmup": False})
    with pytest.raises(ConfigError, match=r"batching\.lone_frame_threads = 2: .*gpu-like"):
        pipeline_for(settings, package, GpuLike(package, max_batch=8))
    with pytest.raises(ValueError, match="lone_frame_threads"):
        Settings(batching={"lone_frame_threads": -1})


# -- kept only where it measured faster --------------------------------------------------------------------------
def test_auto_keeps_the_session_only_when_it_is_faster(package: ModelPackage) -> None:
    worker = ThreadedBackend(package, options={"work_s": 0.01})
    with worker:
        faster = start_lone_frame(worker, 2, explicit=False)
        assert faster.session is not None and faster.session.options.intra_op_threads == 2
        assert faster.lone_ms is not None and faster.worker_ms is not None
        assert faster.lone_ms < 0.9 * faster.worker_ms
        faster.session.__exit__(None, None, None)

        flat = ThreadedBackend(package, options={"work_s": 0.02, "scales": False})
        with flat:
            before = ThreadedBackend.entered
            same = start_lone_frame(flat, 2, explicit=False)
            assert same.session is None and "less than 10 %" in same.describe()["reason"]
            assert ThreadedBackend.entered == before  # the session it did not keep was closed again
            forced = start_lone_frame(flat, 2, explicit=True)
            assert forced.session is not None and forced.describe()["reason"] == "configured"
            forced.session.__exit__(None, None, None)
    off = start_lone_frame(worker, 0, explicit=False)
    assert off.session is None and off.describe()["threads"] == 0


def test_the_session_is_the_workers_kind_and_options_for_batches_of_one(package: ModelPackage) -> None:
    worker = ThreadedBackend(package, max_batch=8, options={"work_s": 0.003, "scales": False})
    lone = lone_like(worker, 4)
    assert type(lone) is ThreadedBackend and lone.max_batch == 1
    assert lone.options == ThreadedOptions(intra_op_threads=4, work_s=0.003, scales=False)
    assert worker.options.intra_op_threads == 1  # the worker's own options are untouched


# -- when a batch runs alone ----------------------------------------------------------------------------------------
def _get_in_background(q: BatchQueue, n: int) -> list[threading.Thread]:
    """``n`` threads blocked in ``q.get`` (workers waiting for a batch); each ends when it gets an item."""
    threads = [threading.Thread(target=q.get) for _ in range(n)]
    for t in threads:
        t.start()
    end = time.monotonic() + 5
    while q._waiting < n and time.monotonic() < end:
        time.sleep(0.001)
    return threads


def test_a_batch_runs_alone_only_while_every_other_worker_waits_with_nothing_queued() -> None:
    woken: list[int] = []
    q = BatchQueue(on_waiting=lambda: woken.append(1), workers=3)
    assert not q.take_alone()  # the other two workers are not waiting: they are busy
    threads = _get_in_background(q, 1)
    assert not q.take_alone()  # one of the two others is still busy
    threads += _get_in_background(q, 1)
    assert q.worker_free()
    woken.clear()
    assert q.take_alone()
    assert not q.worker_free()  # the batcher holds the next batch while the lone frame has the cores
    assert not q.take_alone()  # one at a time
    q.alone_done()
    assert woken and q.worker_free()  # the batcher is woken: a batch it held may go
    for _ in threads:
        q.put(None)
    for t in threads:
        t.join(5)

    busy = [True]
    q3 = BatchQueue(workers=1, quiet=lambda: not busy[0])
    assert not q3.take_alone()  # another frame waits or is being preprocessed: it would share the cores
    busy[0] = False
    assert q3.take_alone()

    q2 = BatchQueue(workers=2)
    threads = _get_in_background(q2, 1)
    q2._q.put(Batch(np.zeros((1, 1, 2, 2), np.float32)))  # queued, not yet taken by the waiting worker
    assert not q2.take_alone()  # a batch is about to run beside it: not alone
    for t in threads:
        t.join(5)


def _frames(n: int, seed: int = 0, prefix: str = "f") -> list[Frame]:
    rng = np.random.default_rng(seed)
    return [
        Frame(
            "camera",
            i,
            f"{prefix}{i}",
            time.monotonic(),
            time.time(),
            image=rng.integers(0, 255, (32, 32), np.uint8),
        )
        for i in range(n)
    ]


def _onnx_pipeline(package: ModelPackage, lone: Any) -> Any:
    settings = Settings(
        batching={
            "max_batch": 4,
            "max_wait_ms": 1.0,
            "preprocess_threads": 1,
            "inference_workers": 2,
            "lone_frame_threads": lone,
        },
        deadlines={"max_latency_ms": 10_000},
    )
    return pipeline_for(
        settings, package, OnnxRuntimeBackend(package, max_batch=4, options={"intra_op_threads": 1})
    )


def _idle(p: Any) -> None:
    """Until every inference worker waits for a batch (a worker that published a verdict may not be back yet)."""
    end = time.monotonic() + 5
    while p.batcher.out._waiting < len(p.workers) and time.monotonic() < end:
        time.sleep(0.001)


@pytest.mark.timeout(60)
def test_lone_frames_run_on_the_session_and_get_the_workers_verdicts(package: ModelPackage) -> None:
    """Real ONNX Runtime sessions: frames one at a time run alone on the 2-thread session, a burst on the
    workers; every frame is decided once, with the score the workers' own sessions give it."""
    results = {}
    for lone in (2, 0):
        p = _onnx_pipeline(package, lone)
        p.start()
        try:
            assert (p.models.production.lone is not None) == (lone == 2)
            assert p.models.production.summary()["lone_frame_threads"] == lone
            items = []
            for f in _frames(6):  # one at a time: the daemon is idle when each arrives
                _idle(p)
                p.submit(f, Backpressure.BLOCK)
                items += settled_items(p, 1)
            for f in _frames(24, seed=1, prefix="bf"):  # then a burst
                p.submit(f, Backpressure.BLOCK)
            items += settled_items(p, 24)
            alone = sum(w.alone_batches for w in p.workers)
        finally:
            p.drain(5.0)
        assert sorted(i.verdict.frame_id for i in items) == sorted(
            [f"f{i}" for i in range(6)] + [f"bf{i}" for i in range(24)]
        )
        assert all(i.verdict.reason is Reason.MODEL for i in items)
        results[lone] = {i.verdict.frame_id: i.verdict.score for i in items}
        if lone:
            assert alone >= 6  # every lone frame, and perhaps the burst's tail
        else:
            assert alone == 0
    assert results[2].keys() == results[0].keys()
    for k, score in results[0].items():
        assert results[2][k] == pytest.approx(score, abs=1e-6)


@pytest.mark.timeout(60)
def test_a_candidate_gets_its_own_lone_frame_session(package: ModelPackage, tmp_path: Path) -> None:
    tiny_package(tmp_path / "cand", input_size=(16, 16), seed=1, name="cand")
    p = _onnx_pipeline(package, 2)
    p.start()
    try:
        production = p.models.production
        loader = CandidateLoader(
            template=lambda: production.backends[0],
            workers=len(p.workers),
            batch_sizes=lambda: (1, p.max_batch),
            budget_s=None,
            verify=True,
            drift=lambda meta: DriftMonitor("test"),
            lone=lambda: production.lone,
        )
        cand = loader.load(tmp_path / "cand", loaded=[(Role.PRODUCTION, production)], origin="control")
        try:
            assert cand.lone is not None and cand.lone is not production.lone
            assert cand.lone.package is cand.package
            assert cand.lone.options.intra_op_threads == 2  # type: ignore[attr-defined]
            x = np.zeros((1, 1, 16, 16), np.float32)
            assert cand.lone.infer(x) == pytest.approx(cand.backends[0].infer(x), abs=1e-6)  # entered
        finally:
            cand.close()
    finally:
        p.drain(5.0)


@pytest.mark.timeout(60)
def test_no_frame_runs_alone_while_the_workers_were_busy_of_late(
    package: ModelPackage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Near saturation a lone frame's held batch would leave a worker idle: busy workers mean no lone frames."""
    p = _onnx_pipeline(package, 2)
    share = [LONE_FRAME_MAX_BUSY]
    monkeypatch.setattr(p, "busy_share", lambda: share[0])
    p.start()
    try:
        for i, f in enumerate(_frames(4)):
            if i == 2:
                share[0] = LONE_FRAME_MAX_BUSY - 0.01  # below the bar: alone again
            _idle(p)
            p.submit(f, Backpressure.BLOCK)
            assert len(settled_items(p, 1)) == 1
            assert sum(w.alone_batches for w in p.workers) == max(0, i - 1)
    finally:
        p.drain(5.0)


class FailsAlone(ThreadedBackend):
    """Once ``broken``, fails every batch on a session of more than one thread (the lone-frame session); a
    worker's keeps working."""

    name = "fails-alone"
    broken = False

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        if self.broken and self.options.intra_op_threads > 1:
            raise RuntimeError("lone session broke")
        return np.full(batch.shape[0], -4.0, np.float32)  # a clear PASS


@pytest.mark.timeout(60)
def test_a_failing_lone_frame_session_rejects_its_frame_and_is_dropped(package: ModelPackage) -> None:
    settings = Settings(
        batching={"max_batch": 2, "preprocess_threads": 1, "inference_workers": 2, "lone_frame_threads": 2},
        deadlines={"max_latency_ms": 10_000},
        model={"warmup": False},
    )
    p = pipeline_for(settings, package, FailsAlone(package, max_batch=2, options={"work_s": 0.0}))
    p.start()
    FailsAlone.broken = True
    try:
        assert p.models.production.lone is not None
        verdicts = []
        for f in _frames(3):
            _idle(p)
            p.submit(f, Backpressure.BLOCK)
            verdicts += [i.verdict for i in settled_items(p, 1)]
        production = p.models.production
    finally:
        FailsAlone.broken = False
        p.drain(5.0)
    assert [v.reason for v in verdicts] == [Reason.ENGINE_ERROR, Reason.MODEL, Reason.MODEL]
    assert "lone session broke" in (verdicts[0].detail or {}).get("error", "")
    assert production.lone is None  # dropped: the workers' sessions ran the next lone frames
    assert sum(w.alone_batches for w in p.workers) == 0
    # The lone session's failure counts against the worker that ran it, until that worker's next batch: which
    # worker takes the next frames is a race, so at most that one failure is left, and the daemon stays ready.
    assert sum(w.consecutive_failures for w in p.workers) <= 1 and p.healthy
