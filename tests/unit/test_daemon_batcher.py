from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from daemon.batcher import END, Batch, BufferPool, MicroBatcher
from daemon.decision import Decider
from daemon.intake import IntakeQueue
from daemon.ledger import Job, Ledger
from daemon.settings import Backpressure
from daemon.types import Frame, Reason
from engine.package import Decision

DECIDER = Decider(Decision(), "m")


def fill(job: Job, row: np.ndarray) -> None:
    row[...] = job.key
    job.ok = True


def setup(
    max_batch: int, max_wait_s: float, latency_s: float = 10.0, executor: bool = False
) -> tuple[Ledger, IntakeQueue, BufferPool, MicroBatcher]:
    ledger = Ledger(
        max_latency_s=latency_s, expire=lambda j, r: DECIDER.reject(j.frame, r), monotonic=time.monotonic
    )
    intake = IntakeQueue(64)
    pool = BufferPool(3, max_batch, (4, 4))
    ex = ThreadPoolExecutor(2) if executor else None
    batcher = MicroBatcher(
        intake, pool, ledger, fill, ex, max_batch=max_batch, max_wait_s=max_wait_s, monotonic=time.monotonic
    )
    return ledger, intake, pool, batcher


def submit(ledger: Ledger, intake: IntakeQueue, n: int, start: int = 0) -> list[Job]:
    jobs = []
    for i in range(start, start + n):
        job = ledger.admit(Frame("cam", i, f"f{i}", time.monotonic(), time.time()))
        intake.put(job, Backpressure.BLOCK)
        jobs.append(job)
    return jobs


def take(batcher: MicroBatcher, timeout: float = 5.0) -> Batch:
    b = batcher.out.get(timeout=timeout)
    assert b is not None
    b.wait_preprocessed()
    return b


@pytest.mark.timeout(20)
@pytest.mark.parametrize("executor", [False, True])
def test_flushes_at_max_batch_in_arrival_order(executor: bool) -> None:
    ledger, intake, pool, batcher = setup(max_batch=4, max_wait_s=5.0, executor=executor)
    jobs = submit(ledger, intake, 8)
    batcher.start()
    t0 = time.monotonic()
    b1, b2 = take(batcher), take(batcher)
    assert time.monotonic() - t0 < 1.0, "full batches must not wait for max_wait"
    assert [j.key for j in b1.jobs + b2.jobs] == [j.key for j in jobs]
    assert b1.buffer[:4, 0, 0, 0].tolist() == [j.key for j in jobs[:4]]  # each row holds its own frame
    pool.release(b1.buffer)
    pool.release(b2.buffer)
    intake.close()
    assert batcher.out.get(timeout=5) is END
    assert batcher.join(5)


@pytest.mark.timeout(20)
def test_partial_batch_flushes_after_max_wait() -> None:
    ledger, intake, _, batcher = setup(max_batch=8, max_wait_s=0.05)
    batcher.start()
    submit(ledger, intake, 2)
    t0 = time.monotonic()
    b = take(batcher)
    waited = time.monotonic() - t0
    assert len(b.jobs) == 2
    assert 0.03 <= waited < 0.5, waited
    intake.close()
    batcher.join(5)


@pytest.mark.timeout(20)
def test_never_holds_a_frame_past_its_deadline_for_company() -> None:
    ledger, intake, _, batcher = setup(max_batch=8, max_wait_s=5.0, latency_s=0.08)
    batcher.start()
    (job,) = submit(ledger, intake, 1)
    b = take(batcher)
    assert b.jobs == [job]
    assert b.t_closed <= job.deadline + 0.1  # not max_wait (5 s); slack for a loaded CI machine
    intake.close()
    batcher.join(5)


@pytest.mark.timeout(20)
def test_settled_frames_are_skipped() -> None:
    ledger, intake, _, batcher = setup(max_batch=4, max_wait_s=0.01)
    jobs = submit(ledger, intake, 3)
    ledger.settle(jobs[1], DECIDER.reject(jobs[1].frame, Reason.DEADLINE))
    batcher.start()
    b = take(batcher)
    assert [j.key for j in b.jobs] == [jobs[0].key, jobs[2].key]
    intake.close()
    batcher.join(5)


@pytest.mark.timeout(20)
def test_holds_the_batch_open_while_no_worker_is_free_and_fills_it() -> None:
    """Every worker busy (nobody waits on ``out``): waiting costs the frames nothing, so the batch fills up
    instead of closing at ``max_wait`` half empty."""
    ledger, intake, _, batcher = setup(max_batch=4, max_wait_s=0.01)
    batcher.start()
    first = submit(ledger, intake, 2)
    time.sleep(0.2)  # behaviour: 20 × max_wait with no free worker
    assert batcher.out.qsize() == 0, "closed without a worker to take it"
    rest = submit(ledger, intake, 2, start=2)
    b = take(batcher)
    assert [j.key for j in b.jobs] == [j.key for j in first + rest]
    intake.close()
    batcher.join(5)


@pytest.mark.timeout(20)
def test_a_worker_becoming_free_takes_the_open_batch_at_once() -> None:
    ledger, intake, _, batcher = setup(max_batch=8, max_wait_s=0.01)
    batcher.start()
    jobs = submit(ledger, intake, 3)
    time.sleep(0.1)  # the batch is open, past max_wait, no worker free
    t0 = time.monotonic()
    b = take(batcher)  # a worker starts waiting: the batcher is woken and closes the batch
    assert time.monotonic() - t0 < 1.0
    assert [j.key for j in b.jobs] == [j.key for j in jobs]
    intake.close()
    batcher.join(5)


@pytest.mark.timeout(20)
def test_with_no_worker_free_a_frame_still_goes_in_time_for_its_deadline() -> None:
    ledger, intake, _, batcher = setup(max_batch=8, max_wait_s=5.0, latency_s=0.08)
    batcher.start()
    (job,) = submit(ledger, intake, 1)
    time.sleep(0.3)  # nobody waits on out, but the frame's deadline passed
    b = batcher.out.get(timeout=5)
    assert b is not None and b.jobs == [job]
    assert b.t_closed <= job.deadline + 0.1  # slack for a loaded CI machine
    intake.close()
    batcher.join(5)


def test_a_wake_before_the_wait_is_not_lost() -> None:
    intake = IntakeQueue(4)
    intake.wake()
    t0 = time.monotonic()
    assert intake.get(timeout=5.0) is None
    assert time.monotonic() - t0 < 1.0


@pytest.mark.timeout(20)
def test_a_batch_stays_open_while_its_frames_are_preprocessed_and_goes_when_they_are() -> None:
    """A worker is free, but the first frame is still being preprocessed: the worker would wait for it anyway,
    so a frame that arrives meanwhile joins the batch, and the batch goes the moment both are preprocessed
    (no later: a lone frame on an idle daemon is not held for company)."""
    ledger = Ledger(
        max_latency_s=10.0, expire=lambda j, r: DECIDER.reject(j.frame, r), monotonic=time.monotonic
    )
    intake = IntakeQueue(64)
    slow_s = 0.3

    def slow_fill(job: Job, row: np.ndarray) -> None:
        time.sleep(slow_s)  # a PNG decode, stretched
        fill(job, row)

    batcher = MicroBatcher(
        intake, BufferPool(3, 4, (4, 4)), ledger, slow_fill, ThreadPoolExecutor(2), max_batch=4,
        max_wait_s=0.001, monotonic=time.monotonic,
    )  # fmt: skip
    batcher.start()
    got: list[Batch | None] = []
    worker = threading.Thread(target=lambda: got.append(batcher.out.get(timeout=10)))
    worker.start()  # a free worker, waiting before the first frame arrives
    t0 = time.monotonic()
    first = submit(ledger, intake, 1)
    time.sleep(slow_s / 3)  # the first frame is in preprocessing, past max_wait
    second = submit(ledger, intake, 1, start=1)
    worker.join(10)
    (b,) = got
    assert b is not None and [j.key for j in b.jobs] == [j.key for j in first + second]
    assert b.preprocessed() and all(j.ok for j in b.jobs)  # the worker infers at once, without waiting
    assert time.monotonic() - t0 < slow_s * 2.5  # both ran side by side on the pool: ~1.33 × slow_s
    # Alone, a frame goes as soon as it is preprocessed.
    lone: list[Batch | None] = []
    worker = threading.Thread(target=lambda: lone.append(batcher.out.get(timeout=10)))
    worker.start()
    t0 = time.monotonic()
    submit(ledger, intake, 1, start=2)
    worker.join(10)
    assert lone[0] is not None and len(lone[0].jobs) == 1
    assert slow_s <= time.monotonic() - t0 < slow_s + 0.5
    intake.close()
    batcher.join(5)
