"""The inference stage: one thread per worker that turns batches into scores and scores into verdicts.

Each batch is decided by the model in production when the batch starts (:meth:`ModelSlots.serving`): that
model's backend for this worker, its operating point and its gauge bands (checked here against the part's
measurements from preprocessing), so a promote or rollback takes effect between two batches
(daemon/models.py). When a candidate shadows production, the settled batch is then offered to the shadow stage
(daemon/shadow.py), which never holds this thread up.

The start-up model's backend is entered (and warmed up) on this thread, because GPU backends bind their
context/stream to the thread that creates them (a candidate's are entered by the loader, daemon/loading.py,
and used here once promoted). A failing batch (an exception, or an output that is not one number per frame) becomes
REJECT ``engine_error`` for each of its frames; the backend is then re-created (exit + enter) and the stage goes
on. ``failures_not_ready`` consecutive failures make the daemon report not ready until a batch succeeds again.
A frame whose own logit is not finite or implausibly large
(``daemon.decision.MAX_ABS_LOGIT``) is REJECT ``engine_error`` by itself, checked before the sigmoid, counted
(``inspectd_verdicts_total{reason="engine_error"}``, :attr:`InferenceWorker.invalid_logits`) and logged with
its frame id and logit; the rest of its batch is decided as usual.

Several workers may share one batch queue, each with its own backend instance (``batching.inference_workers``):
on a small CPU, N single-threaded sessions running N batches side by side keep every core busy without the
intra-op barriers of one multi-threaded session, which stall whenever one of its threads is descheduled. A batch
of one that finds every other worker idle runs on the model's lone-frame session instead, on all those cores
(daemon/lone_frame.py).
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable

import numpy as np

from daemon.batcher import END, Batch, Batches, BatchLimit, BatchQueue, BufferPool, cap_batch
from daemon.decision import Decider, as_logits, valid_logit
from daemon.ledger import Ledger
from daemon.logs import get_logger
from daemon.metrics import MetricsSink
from daemon.models import ModelSlots, ServedModel, recreate
from daemon.shadow import Offered, ShadowScorer
from daemon.threads import StageThread
from daemon.types import Outcome, Reason
from engine.backend import Backend, BackendError, sigmoid

log = get_logger(__name__)

_EWMA = 0.2  # weight of the newest batch in the inference-time estimate the batcher plans with


class InferenceWorker(StageThread):
    def __init__(
        self,
        models: ModelSlots,
        index: int,
        batches: Batches,
        pool: BufferPool,
        ledger: Ledger,
        metrics: MetricsSink,
        *,
        shadow: ShadowScorer | None = None,
        batch_limit: BatchLimit,
        monotonic: Callable[[], float],
        failures_not_ready: int = 3,
        warmup: bool = True,
        batch_budget_s: float | None = None,
        batch_lines: bool = True,
        name: str = "inference",
    ) -> None:
        self.models = models
        self.index = index  # this worker's backend in every loaded model's list
        self.batches = batches
        self.pool = pool
        self.ledger = ledger
        self.metrics = metrics
        self.shadow = shadow
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
        self.busy_s = 0.0  # time spent deciding batches (from preprocessed to settled): the pipeline's load
        self.invalid_logits = 0  # frames rejected for an implausible logit (engine_error verdicts)
        self.alone_batches = 0  # batches of one run on the lone-frame session

    @property
    def backend(self) -> Backend:
        """This worker's backend of the production model (the one it warms up at start)."""
        return self.models.production.backends[self.index]

    @property
    def decider(self) -> Decider:
        return self.models.production.decider

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
        # Backends are exited with their models once no batch runs (Pipeline.drain → ModelSlots.close).

    # -- one batch ---------------------------------------------------------------------------------------
    def _process(self, batch: Batch) -> None:
        batch.wait_preprocessed()
        jobs = batch.jobs
        rows = [i for i, j in enumerate(jobs) if j.ok and self.ledger.is_pending(j)]
        if not rows:
            return
        # The common case infers the buffer view as is; holes (failed or expired frames) cost one copy.
        x = batch.buffer[: len(jobs)] if len(rows) == len(jobs) else batch.buffer[rows]
        t0 = self._now()
        with self.models.serving() as (served, candidate):
            offered = self._decide(batch, rows, x, served)
        self.busy_s += self._now() - t0
        if candidate is not None and self.shadow is not None and offered:
            self.shadow.offer(candidate, x, offered)  # settled already: the candidate only looks

    def _decide(self, batch: Batch, rows: list[int], x: np.ndarray, served: ServedModel) -> list[Offered]:
        """Infer and settle the batch with ``served``; returns its model decisions (for shadow scoring)."""
        jobs = batch.jobs
        backend, decider = served.backends[self.index], served.decider
        # A frame alone on an idle daemon runs on the lone-frame session, on every core (daemon/lone_frame.py).
        gate = self.batches if isinstance(self.batches, BatchQueue) else None
        alone = False
        lone = served.lone
        if len(rows) == 1 and lone is not None and gate is not None and gate.take_alone():
            if served.lone is lone:
                backend, alone = lone, True
            else:  # dropped (it failed) by the frame that ran alone before this one
                gate.alone_done()
        t0 = self._now()
        dropped = served if alone else None  # a failing lone-frame session is dropped, not re-created
        try:
            logits = backend.infer(x)
        except Exception as exc:
            self._failed(batch, rows, exc, backend, decider, dropped)
            return []
        finally:
            if alone and gate is not None:
                gate.alone_done()
        t1 = self._now()
        try:
            # One logit per row, as numbers: anything else is a malformed output, and the whole batch fails.
            logits = as_logits(logits, len(rows))
        except BackendError as exc:
            self._failed(batch, rows, exc, backend, decider, dropped)
            return []
        infer_s = t1 - t0
        if alone:
            self.alone_batches += 1  # not a worker's own time: the batcher plans with those
        else:
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
        offered: list[Offered] = []
        observe = self.metrics.observe_stage
        for pos, (i, score, logit) in enumerate(zip(rows, scores, raw, strict=True)):
            job = jobs[i]
            queue_ms = max(0.0, (t0 - job.frame.t_arrival) * 1000.0 - job.t_decode_ms - job.t_pre_ms)
            timings = {
                "decode": job.t_decode_ms,
                "preprocess": job.t_pre_ms,
                "queue": queue_ms,
                "infer": infer_ms,
            }
            measurements = job.image.measurements if job.image is not None else None
            violations = decider.violations(measurements)
            verdict = decider.decide(
                job.frame, score, timings, violations, logit=logit, measurements=measurements
            )
            if verdict.score is not None:
                offered.append(Offered(pos, job.frame, measurements, verdict))
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
            # Logged by the publisher after this batch's verdicts are out: the line costs a cold lone frame ~0.6 ms
            # of Python, which the publisher would otherwise wait for (docs/benchmarks.md, run 15).
            self.ledger.after_published(
                functools.partial(
                    log.info,
                    "batch",
                    n=len(rows),
                    passed=passed,
                    rejected=rejected,
                    late=late,
                    infer_ms=round(infer_ms, 2),
                    wait_ms=round((t0 - jobs[rows[0]].frame.t_arrival) * 1000.0, 2),
                    **({"lone": True} if alone else {}),
                    first=jobs[rows[0]].frame.frame_id,
                    last=jobs[rows[-1]].frame.frame_id,
                    model=served.model_id,
                )
            )
        return offered

    def _failed(
        self,
        batch: Batch,
        rows: list[int],
        exc: Exception,
        backend: Backend,
        decider: Decider,
        lone_of: ServedModel | None = None,
    ) -> None:
        """Reject the batch (engine_error) and re-create ``backend``; when it was ``lone_of``'s lone-frame session,
        drop that session instead: the workers' own sessions run its lone frames from then on."""
        self.consecutive_failures += 1
        message = f"{type(exc).__name__}: {exc}"
        ids = []
        for i in rows:
            job = batch.jobs[i]
            ids.append(job.frame.frame_id)
            self.ledger.settle(job, decider.reject(job.frame, Reason.ENGINE_ERROR, {"error": message}))
        log.error(
            "inference failed; batch rejected, "
            + ("lone-frame session dropped" if lone_of is not None else "backend re-created"),
            error=message,
            frame_ids=ids,
            consecutive_failures=self.consecutive_failures,
            ready=self.healthy,
            model=decider.model_id,
        )
        if lone_of is None:
            recreate(backend)
            return
        lone_of.lone = None  # no batch uses it now: only one frame runs alone at a time, and this one is done
        try:
            backend.__exit__(None, None, None)
        except Exception as exit_exc:
            log.warning("lone-frame session exit failed", error=str(exit_exc))
