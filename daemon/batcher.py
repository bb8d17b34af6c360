"""Micro-batching: frames from the intake queue into preallocated batch buffers, preprocessed as they arrive.

Batches form while the inference workers are busy (as a dynamic batcher does), so a batch is as full as the
load makes it and never waits for company the line does not send. A batch closes when

- it is full (``max_batch`` frames), or
- an inference worker is free to take it, ``max_wait`` has passed since its first frame and every frame in it
  is preprocessed, or
- its most urgent frame must go now to be inferred before its deadline: two inference times before it, one
  to wait for a worker, one of its own,

whichever comes first. Each frame's preprocessing is handed to the pool the moment it joins the batch (writing
straight into its row), so waiting and preprocessing overlap. A batch stays open while its frames are being
preprocessed: the worker would wait for them anyway, so frames that arrive meanwhile join at no cost to the
first one's latency, and a worker only ever takes a batch it can infer at once (a lone frame on an idle daemon
goes the moment its preprocessing ends, as before). The batcher takes a free buffer *before* it takes frames:
while every buffer is busy, frames wait in the intake queue, where the backpressure policy sees them.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Protocol

import numpy as np

from daemon.intake import IntakeQueue
from daemon.ledger import Job, Ledger
from daemon.logs import get_logger
from daemon.threads import StageThread

log = get_logger(__name__)


class BatchLimit:
    """The one home of the largest batch the pipeline forms. ``configured`` is ``batching.max_batch`` (the rows
    of every batch buffer); ``value`` starts there and is capped once, at start-up, by the first inference
    worker to what the backend infers within its share of the deadline (:func:`cap_batch`). The pipeline owns
    it; the batcher and the inference workers read it here and keep no copy."""

    __slots__ = ("capped", "configured", "value")

    def __init__(self, configured: int) -> None:
        if configured < 1:
            raise ValueError(f"max_batch must be ≥ 1, got {configured}")
        self.configured = configured
        self.value = configured
        self.capped = False  # True once set from measured timings

    def cap(self, n: int) -> None:
        """Form batches of at most ``n`` (never more than the buffers hold, never fewer than 1)."""
        self.value = max(1, min(n, self.configured))
        self.capped = True

    def __repr__(self) -> str:
        return f"BatchLimit(value={self.value}, configured={self.configured}, capped={self.capped})"


class BufferPool:
    """A fixed set of float32 (max_batch, 1, H, W) arrays, reused for the life of the process."""

    def __init__(self, count: int, max_batch: int, input_size: tuple[int, int]) -> None:
        self._free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        self.count = count
        for _ in range(count):
            self._free.put(np.zeros((max_batch, 1, *input_size), dtype=np.float32))

    def acquire(self, timeout: float) -> np.ndarray | None:
        try:
            return self._free.get(timeout=timeout)
        except queue.Empty:
            return None

    def release(self, buf: np.ndarray) -> None:
        self._free.put(buf)


class Batch:
    __slots__ = ("buffer", "finish", "futures", "jobs", "t_closed")

    def __init__(self, buffer: np.ndarray, finish: Callable[[Batch], None] | None = None) -> None:
        self.buffer = buffer
        self.jobs: list[Job] = []
        self.futures: list[Future[None]] = []
        self.t_closed = 0.0
        self.finish = finish  # the batch's own step after the per-frame ones (GPU preprocessing), if any

    def preprocessed(self) -> bool:
        """Every frame's preprocessing task has finished (the batch's own ``finish`` step is the worker's)."""
        return all(f.done() for f in self.futures)

    def wait_preprocessed(self) -> None:
        for f in self.futures:
            f.result()  # preprocessing tasks settle their own failures and never raise
        if self.finish is not None:
            self.finish(self)  # settles its own failures too


def cap_batch(timings: dict[int, float], budget_s: float) -> int:
    """The largest timed batch size whose inference fits ``budget_s`` (1 when none does: a frame must still
    be inferred, and the deadline then rejects what is late)."""
    fitting = [n for n, t in timings.items() if t <= budget_s]
    return max(fitting, default=1)


class Batches(Protocol):
    """Where inference workers take batches from (a :class:`BatchQueue`, or a plain ``queue.SimpleQueue``)."""

    def get(self, timeout: float | None = None) -> Batch | None: ...

    def put(self, item: Batch | None) -> None: ...


class BatchQueue:
    """Closed batches on their way to the inference workers, and how many workers wait for one: the batcher
    keeps a batch open while none is free. A worker that starts waiting calls ``on_waiting`` (the batcher's
    wake-up). Used like a ``queue.SimpleQueue`` (``put``, ``get(timeout)``, ``qsize``)."""

    def __init__(
        self,
        on_waiting: Callable[[], None] = lambda: None,
        workers: int = 1,
        quiet: Callable[[], bool] = lambda: True,
    ) -> None:
        self._q: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._on_waiting = on_waiting
        self.workers = workers  # how many workers take from this queue
        self._alone = False  # a batch of one runs on the lone-frame session (daemon/lone_frame.py)
        self._quiet = quiet  # no other frame is waiting or being preprocessed (the pipeline's view)

    def put(self, item: Batch | None) -> None:
        self._q.put(item)

    def qsize(self) -> int:
        return self._q.qsize()

    def get(self, timeout: float | None = None) -> Batch | None:
        """The next batch (raises ``queue.Empty`` on timeout), counted as a free worker while it waits."""
        with self._lock:
            self._waiting += 1
        self._on_waiting()
        try:
            return self._q.get(timeout=timeout)
        finally:
            with self._lock:
                self._waiting -= 1

    def worker_free(self) -> bool:
        """A worker waits with nothing queued for it: a batch closed now is inferred now (and on cores of its
        own: while a frame runs alone on every core, no worker counts as free)."""
        return not self._alone and self._waiting > self._q.qsize()

    def take_alone(self) -> bool:
        """For a worker holding a batch of one: True when every other worker waits with nothing queued for it,
        no other frame runs alone and no frame waits or is being preprocessed (``quiet``), so the frame may use
        the cores the daemon leaves idle. Until :meth:`alone_done` the batcher counts every worker busy (a batch
        then closes when full or when its deadline needs it)."""
        with self._lock:
            if self._alone or self._waiting < self.workers - 1 or self._q.qsize() or not self._quiet():
                return False
            self._alone = True
            return True

    def alone_done(self) -> None:
        with self._lock:
            self._alone = False
        self._on_waiting()  # a batch the batcher held open may go now


Preprocess = Callable[[Job, np.ndarray], None]  # (job, its batch row (1, H, W)) → fills the row, sets job.ok
END = None  # end-of-stream marker on the batch queue


class MicroBatcher(StageThread):
    def __init__(
        self,
        intake: IntakeQueue,
        pool: BufferPool,
        ledger: Ledger,
        preprocess: Preprocess,
        executor: Executor | None,
        *,
        max_batch: BatchLimit | int,
        max_wait_s: float,
        monotonic: Callable[[], float],
        est_infer_s: Callable[[], float] = lambda: 0.0,
        out: BatchQueue | None = None,
        finish: Callable[[Batch], None] | None = None,
    ) -> None:
        self.intake = intake
        self.pool = pool
        self.ledger = ledger
        self.out = out if out is not None else BatchQueue(on_waiting=intake.wake)
        self._preprocess = preprocess
        self._executor = executor
        self.limit = max_batch if isinstance(max_batch, BatchLimit) else BatchLimit(max_batch)
        self.max_wait_s = max_wait_s
        self._now = monotonic
        self._est_infer_s = est_infer_s
        self._finish = finish
        self._awaiting_prep = False  # the open batch waits only for its frames' preprocessing
        self.filling = 0  # frames in the batch being filled (not yet handed to the workers)
        self._thread: threading.Thread | None = None
        self.batches = 0

    @property
    def max_batch(self) -> int:
        """The largest batch formed now (read from the limit the pipeline owns)."""
        return self.limit.value

    def start(self) -> None:
        self._spawn(self.run, "batcher")

    def run(self) -> None:
        try:
            while True:
                buf = self.pool.acquire(timeout=0.5)
                if buf is None:
                    if self.intake.drain_closed():
                        return
                    continue
                batch = self._fill(Batch(buf, self._finish))
                if batch.jobs:
                    self.batches += 1
                    self.out.put(batch)
                else:
                    self.pool.release(buf)
                if self.intake.drain_closed():
                    return
        except Exception:
            log.exception("batcher failed")
            raise
        finally:
            self.out.put(END)  # the inference stage always learns that the stream ended

    def _fill(self, batch: Batch) -> Batch:
        # Wait (without a deadline) for the first frame; the batch's clock starts when it arrives.
        first = self._next(timeout=0.2)
        if first is None:
            return batch
        self._add(batch, first)
        go_at = self._now() + self.max_wait_s  # from here a free worker takes the batch as it is
        close_by = self._close_by(first)
        while len(batch.jobs) < self.limit.value:
            now = self._now()
            free = self.out.worker_free()
            if now >= close_by or (free and now >= go_at and self._prepared_now(batch)):
                # The batch is going: frames already queued still join, without waiting.
                job = self._next(timeout=0.0)
                if job is None:
                    break
            else:
                # Wait for a frame, for the time to go, or (woken by the intake) for a worker to become free
                # or a frame's preprocessing to end.
                job = self._next(timeout=(min(go_at, close_by) if free and now < go_at else close_by) - now)
                if job is None:
                    continue
            self._add(batch, job)
            close_by = min(close_by, self._close_by(job))
        self._awaiting_prep = False
        self.filling = 0
        batch.t_closed = self._now()
        return batch

    def _close_by(self, job: Job) -> float:
        # Never hold a frame past the point where it could still wait for a worker and be inferred in time.
        return job.deadline - 2.0 * self._est_infer_s()

    def _next(self, timeout: float) -> Job | None:
        while True:
            job = self.intake.get(timeout=timeout)
            if job is None:
                return None
            if self.ledger.is_pending(job):  # already settled (deadline, overload): don't spend work on it
                return job

    def _add(self, batch: Batch, job: Job) -> None:
        row = batch.buffer[len(batch.jobs)]
        batch.jobs.append(job)
        self.filling = len(batch.jobs)
        if self._executor is None:
            self._preprocess(job, row)
        else:
            future = self._executor.submit(self._preprocess, job, row)
            future.add_done_callback(self._prepared)
            batch.futures.append(future)

    def _prepared_now(self, batch: Batch) -> bool:
        # From here until the batch goes, a frame's preprocessing ending wakes the batcher (and only then: a
        # wake per frame at saturation would cost more than it saves). Future.done() is true before its
        # callbacks run, so no ending is missed between this flag and the check.
        self._awaiting_prep = True
        return batch.preprocessed()

    def _prepared(self, _: Future[None]) -> None:
        if self._awaiting_prep:
            self.intake.wake()  # the open batch may go now
