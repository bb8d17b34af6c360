"""The inference stage: one thread that owns the Backend, turns batches into scores and scores into verdicts.

The backend is entered (and warmed up) on this thread, because GPU backends bind their context/stream to the
thread that creates them. A failing batch (an exception, or an output that is not one number per frame) becomes
REJECT ``engine_error`` for each of its frames; the backend is then re-created (exit + enter) and the stage goes
on. ``failures_not_ready`` consecutive failures make the daemon report not ready until a batch succeeds again.
A frame whose own logit is not finite or implausibly large
(``daemon.decision.MAX_ABS_LOGIT``) is REJECT ``engine_error`` by itself, checked before the sigmoid, counted
(``inspectd_verdicts_total{reason="engine_error"}``, :attr:`InferenceWorker.invalid_logits`) and logged with
its frame id and logit; the rest of its batch is decided as usual.

Several workers may share one batch queue, each with its own backend instance (``batching.inference_workers``):
on a small CPU, N single-threaded sessions running N batches side by side keep every core busy without the
intra-op barriers of one multi-threaded session, which stall whenever one of its threads is descheduled.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from daemon.batcher import END, Batch, Batches, BatchLimit, BatchQueue, BufferPool, cap_batch
from daemon.decision import Decider, valid_logit
from daemon.ledger import Ledger
from daemon.logs import get_logger
from daemon.metrics import MetricsSink
from daemon.threads import StageThread
from daemon.types import Outcome, Reason
from engine.backend import Backend, BackendError, sigmoid

log = get_logger(__name__)

_EWMA = 0.2  # weight of the newest batch in the inference-time estimate the batcher plans with


class LoneFrameSession:
    """A lone frame on an otherwise idle daemon is inferred on every core, not on its worker's one.

    One more backend instance with ``batching.lone_frame_threads`` intra-op threads, shared by the workers:
    a worker whose batch holds one frame while every other worker waits for work takes it (never waiting for
    it). Measured on 2 cores with the patch-memory default after an idle gap, batch 1: 15.2 ms on one
    thread, 10.2 ms on two (docs/benchmarks.md). At saturation the workers are busy and it is not used. If it
    fails once, the batch is rejected like any failed batch and the session is not used again (logged)."""

    def __init__(self, backend: Backend, batches: BatchQueue, workers: int) -> None:
        self.backend = backend
        self._batches = batches
        self._others = workers - 1
        self._lock = threading.Lock()
        self.broken = False
        self.frames = 0

    def open(self, warmup: bool = True) -> None:
        self.backend.__enter__()
        if warmup:
            self.backend.warmup((1,))

    def close(self) -> None:
        try:
            self.backend.__exit__(None, None, None)
        except Exception as exc:
            log.warning("lone-frame session exit failed", error=str(exc))

    def acquire(self, n: int) -> bool:
        """For a batch of ``n`` frames: True (and held until :meth:`release`) when it is the daemon's only work
        and the session is free."""
        if n != 1 or self.broken or self._batches.waiting < self._others:
            return False
        return self._lock.acquire(blocking=False)

    def release(self, failed: BaseException | None = None) -> None:
        if failed is None:
            self.frames += 1
        else:
            self.broken = True
            log.error("lone-frame session failed; not used again", error=f"{type(failed).__name__}: {failed}")
        self._lock.release()


class InferenceWorker(StageThread):
    def __init__(
        self,
        backend: Backend,
        batches: Batches,
        pool: BufferPool,
        ledger: Ledger,
        decider: Decider,
        metrics: MetricsSink,
        *,
        batch_limit: BatchLimit,
        monotonic: Callable[[], float],
        failures_not_ready: int = 3,
        warmup: bool = True,
        batch_budget_s: float | None = None,
        batch_lines: bool = True,
        name: str = "inference",
        lone: LoneFrameSession | None = None,
    ) -> None:
        self.backend = backend
        self.lone = lone
        self.batches = batches
        self.pool = pool
        self.ledger = ledger
        self.decider = decider
        self.metrics = metrics
        self._now = monotonic
        self.failures_not_ready = failures_not_ready
        self._warmup = warmup
        # The pipeline's batch limit: the worker given a budget caps it at warm-up (from the timings below);
        # the others read it then and warm up only up to it.
        self.batch_limit = batch_limit
        self._batch_budget_s = batch_budget_s
        self.batch_timings: dict[int, float] = {}  # batch size → warm-up seconds (when a budget was given)
        self._batch_lines = batch_lines
        self.name = name
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self.start_error: BaseException | None = None
        self.warmed = False
        self.consecutive_failures = 0
        self.last_progress = monotonic()
        self.est_infer_s = 0.0
        self.frames_inferred = 0
        self.batches_done = 0
        self.invalid_logits = 0  # frames rejected for an implausible logit (engine_error verdicts)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self, timeout: float) -> None:
        """Start the thread; returns once the backend is entered and warmed up (raises what went wrong)."""
        self._spawn(self.run, self.name)
        if not self._started.wait(timeout):
            raise TimeoutError(f"backend warm-up did not finish within {timeout:.0f} s")
        if self.start_error is not None:
            raise self.start_error

    @property
    def healthy(self) -> bool:
        return self.warmed and self.consecutive_failures < self.failures_not_ready

    def progressing(self, stall_s: float) -> bool:
        """False when the stage has been stuck (one batch, or waiting on preprocessing) longer than stall_s."""
        return self.alive and self._now() - self.last_progress < stall_s

    def run(self) -> None:
        try:
            self.backend.__enter__()
            if self._warmup:
                t0 = self._now()
                limit = self.batch_limit
                if self._batch_budget_s is not None:
                    # Timing 1, 2, 4, … is the warm-up; sizes past the budget are never run, so a CPU does not
                    # allocate for a GPU's batch it will never form.
                    self.backend.warmup((1,))
                    self.batch_timings = self.backend.time_batches(
                        self._batch_budget_s, largest=limit.configured
                    )
                    limit.cap(cap_batch(self.batch_timings, self._batch_budget_s))
                    # The size found over budget will not run again: give back its memory, then grow the
                    # allocator again to the cap, or the first real full batch pays for it (785 ms, measured).
                    self.backend.trim()
                    self.backend.warmup((limit.value,))
                    # The batcher plans its first batches with this until real batches are measured.
                    self.est_infer_s = self.batch_timings[limit.value]
                else:
                    # Capped by the first worker: only the sizes that will run. Else the backend's default.
                    self.backend.warmup(tuple(sorted({1, limit.value})) if limit.capped else None)
                log.info(
                    "backend warmed up", ms=round((self._now() - t0) * 1000, 1), **self.backend.describe()
                )
            self.warmed = True
        except BaseException as exc:
            self.start_error = exc
            self._started.set()
            return
        self._started.set()
        try:
            while True:
                try:
                    batch = self.batches.get(timeout=0.5)
                except queue.Empty:
                    self.last_progress = self._now()  # idle is progress: nothing is waiting on us
                    continue
                if batch is END:
                    self.batches.put(END)  # for the other inference workers on this queue
                    return
                try:
                    self._process(batch)
                finally:
                    self.pool.release(batch.buffer)
                self.last_progress = self._now()
        except Exception:
            log.exception("inference stage failed")
            raise
        finally:
            try:
                self.backend.__exit__(None, None, None)
            except Exception:
                log.exception("backend exit failed")

    # -- one batch ---------------------------------------------------------------------------------------
    def _process(self, batch: Batch) -> None:
        batch.wait_preprocessed()
        jobs = batch.jobs
        rows = [i for i, j in enumerate(jobs) if j.ok and self.ledger.is_pending(j)]
        if not rows:
            return
        # The common case infers the buffer view as is; holes (failed or expired frames) cost one copy.
        x = batch.buffer[: len(jobs)] if len(rows) == len(jobs) else batch.buffer[rows]
        lone = self.lone if self.lone is not None and self.lone.acquire(len(rows)) else None
        t0 = self._now()
        try:
            # One logit per row, as numbers: anything else is a malformed output, and the whole batch fails.
            logits = _as_logits((lone.backend if lone is not None else self.backend).infer(x), len(rows))
        except Exception as exc:
            if lone is not None:
                lone.release(failed=exc)
            self._failed(batch, rows, exc, t0, reset=lone is None)
            return
        t1 = self._now()
        if lone is not None:
            lone.release()
        infer_s = t1 - t0
        if lone is None:  # the batcher plans with what the workers' own sessions take
            self.est_infer_s = (
                infer_s if self.batches_done == 0 else (1 - _EWMA) * self.est_infer_s + _EWMA * infer_s
            )
        self.consecutive_failures = 0
        self.batches_done += 1
        self.frames_inferred += len(rows)
        # The logits are checked before their sigmoid is believed (Decider.decide): sigmoid(-inf) = 0.0 is a
        # confident PASS. Each implausible logit rejects its own frame (engine_error), not the batch.
        scores = sigmoid(logits).tolist()
        raw = logits.tolist()
        invalid = [
            (jobs[i].frame.frame_id, repr(x)) for i, x in zip(rows, raw, strict=True) if not valid_logit(x)
        ]
        infer_ms = infer_s * 1000.0
        passed = rejected = late = 0
        decided: list[float] = []  # logits of the parts this batch decided: the drift window's
        observe = self.metrics.observe_stage
        for i, score, logit in zip(rows, scores, raw, strict=True):
            job = jobs[i]
            queue_ms = max(0.0, (t0 - job.frame.t_arrival) * 1000.0 - job.t_decode_ms - job.t_pre_ms)
            timings = {
                "decode": job.t_decode_ms,
                "preprocess": job.t_pre_ms,
                "queue": queue_ms,
                "infer": infer_ms,
            }
            verdict = self.decider.decide(job.frame, score, timings, job.violations, logit=logit)
            published = self.ledger.settle(job, verdict)
            if published is verdict:
                if verdict.score is not None:  # a model decision (an implausible logit is engine_error)
                    decided.append(logit)
                if verdict.outcome is Outcome.PASS:
                    passed += 1
                else:
                    rejected += 1
            else:
                # Its deadline verdict went out first (None), or this result came after the deadline and was
                # published as REJECT deadline instead (the ledger keeps it in the detail).
                late += 1
                rejected += published is not None
            observe("queue", queue_ms / 1000.0)
            observe("infer", infer_s)
        self.metrics.observe_batch(len(rows))
        self.metrics.observe_parts(decided, [image for i in rows if (image := jobs[i].image) is not None])
        if invalid:
            self.invalid_logits += len(invalid)
            log.error(
                "model returned implausible logits: REJECT engine_error for those frames",
                n=len(invalid),
                frames=dict(invalid[:10]),  # frame id → logit
            )
        if late:
            self.metrics.late_result(late)
            log.warning(
                "late results (after the deadline): REJECT deadline", n=late, infer_ms=round(infer_ms, 2)
            )
        if self._batch_lines:
            log.info(
                "batch",
                n=len(rows),
                passed=passed,
                rejected=rejected,
                late=late,
                infer_ms=round(infer_ms, 2),
                wait_ms=round((t0 - jobs[rows[0]].frame.t_arrival) * 1000.0, 2),
                first=jobs[rows[0]].frame.frame_id,
                last=jobs[rows[-1]].frame.frame_id,
            )

    def _failed(self, batch: Batch, rows: list[int], exc: Exception, t0: float, reset: bool = True) -> None:
        self.consecutive_failures += 1
        message = f"{type(exc).__name__}: {exc}"
        ids = []
        for i in rows:
            job = batch.jobs[i]
            ids.append(job.frame.frame_id)
            self.ledger.settle(job, self.decider.reject(job.frame, Reason.ENGINE_ERROR, {"error": message}))
        log.error(
            "inference failed; batch rejected" + (", backend re-created" if reset else ""),
            error=message,
            frame_ids=ids,
            consecutive_failures=self.consecutive_failures,
            ready=self.healthy,
        )
        if reset:
            self._reset_backend()

    def _reset_backend(self) -> None:
        try:
            self.backend.__exit__(None, None, None)
        except Exception as exc:
            log.warning("backend exit failed during reset", error=str(exc))
        try:
            self.backend.__enter__()
        except Exception as exc:  # stays inactive: the next batch fails fast and we try again
            log.error("backend re-create failed", error=str(exc))


def _as_logits(out: Any, n: int) -> np.ndarray:
    """The backend's output as n float64 logits, or BackendError: a malformed output fails the whole batch."""
    try:
        logits = np.asarray(out, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise BackendError(f"backend output is not numeric ({type(exc).__name__}: {exc})") from None
    if logits.shape != (n,):
        raise BackendError(f"backend output has shape {logits.shape}, expected ({n},)")
    return logits
