"""The frame path from admission to settled verdict: ledger → intake queue → batcher (+ preprocessing pool) →
inference. Sources call :meth:`Pipeline.submit`; the publisher consumes :attr:`Pipeline.settled`.

Threads: ``batcher``, ``inference`` (one per ``inference_workers``), ``deadline-watchdog``, ``shadow`` and
``preprocess_threads`` pool workers. The models the workers decide with are :attr:`Pipeline.models`
(daemon/models.py): the start-up model is production; daemon/lifecycle.py loads, shadows and switches others.
Everything is passed in, so replay (a folder source fed as fast as the pipeline takes it) and the benchmark
reuse exactly this path, and tests hand in slow or failing backends.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from daemon.batcher import BatchLimit, BatchQueue, BufferPool, MicroBatcher
from daemon.clock import SYSTEM_CLOCK, Clock
from daemon.decision import Decider
from daemon.inference import InferenceWorker
from daemon.intake import IntakeQueue
from daemon.ledger import Deferred, Job, Ledger, Settled
from daemon.logs import get_logger
from daemon.lone_frame import (
    LONE_FRAME_MAX_BUSY,
    LoneFrameError,
    LoneFrameStart,
    lone_frame_threads,
    start_lone_frame,
)
from daemon.metrics import MetricsSink
from daemon.models import ModelSlots, ServedModel, backend_like, json_sha256
from daemon.prep import DevicePreprocessing, FramePreprocessor
from daemon.settings import Backpressure, ConfigError, Settings
from daemon.shadow import ShadowScorer
from daemon.types import Frame, Reason, Verdict
from engine.backend import Backend
from engine.preprocess import Preprocessor, device_preprocessor

log = get_logger(__name__)


def release_free_heap() -> None:
    """Give the heap memory freed during start-up back to the OS (glibc ``malloc_trim``): every session parsed
    the model's bytes on its own thread, and glibc keeps what each thread's arena freed (110–290 MB measured on
    the default package) until asked. Nothing on other C libraries."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def set_opencv_threads(n: int) -> int:
    """OpenCV's thread count for every later call in the process (``batching.opencv_threads``; 0 leaves
    OpenCV's default); returns the count in effect."""
    if n > 0:
        cv2.setNumThreads(n)
    return int(cv2.getNumThreads())


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        *,
        backend: Backend,
        preprocessor: Preprocessor,
        decider: Decider,
        metrics: MetricsSink,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        b, d = settings.batching, settings.deadlines
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.max_latency_s = d.max_latency_ms / 1000.0
        self.ledger = Ledger(
            max_latency_s=self.max_latency_s,
            expire=self._expire,
            monotonic=clock.monotonic,
            restamp=self._restamp,
        )
        self.layout = b.layout(on_cpu=backend.on_cpu, intra_op_threads=settings.model.intra_op_threads)
        # One backend instance per inference worker: the injected one, and replicas of it (own session/context).
        backends = [backend, *(backend_like(backend) for _ in range(1, self.layout.inference_workers))]
        self.models = ModelSlots(
            ServedModel(backend.package, decider.model_id, decider, backends, json_sha256(backend.package)),
            ledger=self.ledger,
        )
        self.shadow = ShadowScorer(
            self.models,
            metrics,
            settings.shadow,
            capacity_short=self.capacity_short,
            monotonic=clock.monotonic,
        )
        self._busy_lock = threading.Lock()
        self._busy_at = (clock.monotonic(), 0.0)  # (when, the workers' busy seconds then)
        self._busy_share = 0.0
        self.intake = IntakeQueue(b.queue_size)
        # The one home of the batch size: batching.max_batch, capped at start-up (see _log_batch_cap).
        self.batch_limit = BatchLimit(b.max_batch)
        self.pool = BufferPool(
            self.layout.buffers, self.batch_limit.configured, preprocessor.params.input_size
        )
        self.opencv_threads = set_opencv_threads(b.opencv_threads)
        self.executor = (
            ThreadPoolExecutor(b.preprocess_threads, thread_name_prefix="preprocess")
            if b.preprocess_threads > 0
            else None
        )
        self._preprocessor = preprocessor
        self.device_stage = self._device_stage(settings, preprocessor, decider, metrics, clock)
        prep = FramePreprocessor(
            preprocessor,
            self.models,  # fail-safe REJECTs name the model in production
            self.ledger,
            max_pixels=settings.decode.max_pixels,
            monotonic=clock.monotonic,
            observe_stage=metrics.observe_stage,
            on_device=self.device_stage is not None,
        )
        # Inference time one batch may take (batching.max_infer_share), timed at warm-up; None = no cap.
        self._batch_budget_s = (
            b.max_infer_share * self.max_latency_s
            if b.max_infer_share > 0 and settings.model.warmup
            else None
        )
        # A free worker wakes the batcher.
        batches = BatchQueue(
            on_waiting=self.intake.wake, workers=self.layout.inference_workers, quiet=self._quiet
        )
        try:
            self.lone_threads = lone_frame_threads(
                b.lone_frame_threads, backend, self.layout.inference_workers, settings.model.warmup
            )
        except LoneFrameError as exc:
            raise ConfigError(f"batching.lone_frame_threads = {b.lone_frame_threads!r}: {exc}") from None
        self.lone_frame = LoneFrameStart(None, 0, reason="not started")
        self.workers = [
            InferenceWorker(
                self.models,
                i,
                batches,
                self.pool,
                self.ledger,
                metrics,
                shadow=self.shadow,
                batch_limit=self.batch_limit,
                monotonic=clock.monotonic,
                failures_not_ready=d.engine_failures_not_ready,
                warmup=settings.model.warmup,
                batch_budget_s=self._batch_budget_s if i == 0 else None,
                batch_lines=settings.logging.batch_lines,
                name="inference" if i == 0 else f"inference-{i}",
            )
            for i in range(self.layout.inference_workers)
        ]
        self.worker = self.workers[0]  # runs the injected backend; the others run replicas of it
        self.batcher = MicroBatcher(
            self.intake,
            self.pool,
            self.ledger,
            prep,
            self.executor,
            max_batch=self.batch_limit,
            max_wait_s=b.max_wait_ms / 1000.0,
            monotonic=clock.monotonic,
            est_infer_s=lambda: self.worker.est_infer_s,
            out=batches,
            finish=self.device_stage,
        )
        self._deadline_detail = {"max_latency_ms": d.max_latency_ms}

    def _device_stage(
        self,
        settings: Settings,
        preprocessor: Preprocessor,
        decider: Decider,
        metrics: MetricsSink,
        clock: Clock,
    ) -> DevicePreprocessing | None:
        """The batch's GPU preprocessing step when ``batching.preprocess_device`` asks for one (torch with CUDA
        must be here: refused now, naming the setting, if not)."""
        device = settings.batching.preprocess_device
        if device == "cpu":
            return None
        try:
            self._device_pre = device_preprocessor(preprocessor.params, device)
        except ValueError as exc:
            raise ConfigError(f"batching.preprocess_device = {device!r}: {exc}") from None
        return DevicePreprocessing(
            self._device_pre,
            decider,
            self.ledger,
            monotonic=clock.monotonic,
            observe_stage=metrics.observe_stage,
        )

    @property
    def decider(self) -> Decider:
        """Production's decider (its operating point and gauges)."""
        return self.models.production.decider

    @property
    def budget_s(self) -> float | None:
        """Inference time one batch may take (batching.max_infer_share × the deadline); None = no cap."""
        return self._batch_budget_s

    @property
    def max_batch(self) -> int:
        """The largest batch the pipeline forms: ``batching.max_batch``, or the cap found at start-up."""
        return self.batch_limit.value

    @property
    def settled(self) -> queue.SimpleQueue[Settled | Deferred | None]:
        return self.ledger.out

    # -- the Intake protocol sources use -------------------------------------------------------------------
    def submit(self, frame: Frame, policy: Backpressure) -> None:
        """Admit a frame: from here on it gets exactly one verdict, whatever happens."""
        self.metrics.frame_received(frame.source)
        job = self.ledger.admit(frame)
        if frame.error is not None:
            self.ledger.settle(job, self.models.reject(frame, Reason.DECODE_ERROR, {"error": frame.error}))
            return
        refused = self.intake.put(job, policy)
        if refused is not None:
            reason = Reason.SHUTDOWN if self.intake.closed else Reason.OVERLOAD
            detail = {"policy": policy.value, "queue_size": self.intake.maxsize}
            # Not logged per frame (an overload refuses thousands): the publisher logs a summary per heartbeat.
            self.ledger.settle(refused, self.models.reject(refused.frame, reason, detail))

    def wait_for_room(self, timeout: float) -> bool:
        return self.intake.wait_for_room(timeout)

    def message_error(self, kind: str) -> None:
        self.metrics.message_error(kind)

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self, warmup_timeout_s: float = 300.0) -> None:
        self.ledger.start()
        self._warm_preprocessing()
        # Each worker enters + warms its backend on its own thread. The first one times the batch sizes and caps
        # the batch limit; the others then warm up only up to the cap.
        self.worker.start(warmup_timeout_s)
        self._log_batch_cap()
        self._start_lone_frame()
        release_free_heap()
        for worker in self.workers[1:]:
            worker.start(warmup_timeout_s)
            release_free_heap()
        self.shadow.start()
        self.batcher.start()

    def _log_batch_cap(self) -> None:
        """Never form a batch that cannot be inferred in time (a GPU's max_batch of 8 on a small CPU is 8 × the
        latency of one frame): the first worker capped :attr:`batch_limit` from its warm-up timings."""
        limit, timings, budget_s = self.batch_limit, self.worker.batch_timings, self._batch_budget_s
        if not limit.capped or budget_s is None:
            return
        fields = {
            "configured": limit.configured,
            "max_batch": limit.value,
            "budget_ms": round(budget_s * 1000, 1),
            "timings_ms": {n: round(t * 1000, 1) for n, t in timings.items()},
        }
        if timings.get(1, 0.0) > budget_s:
            log.warning("one frame takes longer than the inference budget: expect deadline rejects", **fields)
        elif limit.value < limit.configured:
            log.info("batch size capped to fit the deadline", **fields)
        else:
            log.info("batch size fits the deadline", **fields)

    def _start_lone_frame(self) -> None:
        """Production's lone-frame session (daemon/lone_frame.py), timed against the first worker's backend
        while no frame flows (the other workers are not started yet)."""
        explicit = self.settings.batching.lone_frame_threads != "auto"
        self.lone_frame = start_lone_frame(self.worker.backend, self.lone_threads, explicit=explicit)
        self.models.production.lone = self.lone_frame.session
        if self.lone_threads:
            log.info(
                "lone-frame session " + ("on" if self.lone_frame.session is not None else "off"),
                **self.lone_frame.describe(),
            )

    def _warm_preprocessing(self) -> None:
        """Start every pool thread and build its CLAHE object now, not on the first parts of the shift (and run
        the device stage's kernels once)."""
        if self.device_stage is not None:
            self._device_pre.warmup()
        if self.executor is None:
            return
        n = self.settings.batching.preprocess_threads
        barrier = threading.Barrier(n)  # n tasks that wait for each other must run on n distinct threads
        gray = np.zeros((64, 64), np.uint8)
        rows = np.zeros((n, 1, *self._preprocessor.params.input_size), np.float32)

        def warm(i: int) -> None:
            barrier.wait(timeout=10)
            # A blank frame shows no part: a pose-crop package refuses it (PoseError); the thread is up anyway.
            with contextlib.suppress(ValueError):
                self._preprocessor(gray, rows[i])

        for f in [self.executor.submit(warm, i) for i in range(n)]:
            f.result()

    def drain(self, timeout: float) -> int:
        """Stop taking frames, finish what is queued (the deadlines keep running), then settle anything left
        as REJECT ``shutdown``. Ends the publish stream. Returns the number of shutdown rejects."""
        end = self.clock.monotonic() + timeout
        self.intake.close()
        finished = self.batcher.join(max(0.0, end - self.clock.monotonic()))
        for worker in self.workers:
            finished = worker.join(max(0.0, end - self.clock.monotonic())) and finished
        if not finished:
            log.error(
                "pipeline did not drain in time; remaining frames get REJECT shutdown", timeout_s=timeout
            )
        left = self.ledger.settle_all(Reason.SHUTDOWN)
        self.ledger.stop()
        self.ledger.close()
        if self.executor is not None:
            self.executor.shutdown(wait=finished, cancel_futures=True)
        idle = self.shadow.stop(max(0.5, end - self.clock.monotonic()))
        if finished and idle:  # no batch (and no shadow batch) runs: the backends can go
            self.models.close()
        return left

    def threads_alive(self) -> bool:
        return self.batcher.alive and all(w.alive for w in self.workers) and self.ledger.alive

    def progressing(self, stall_s: float) -> bool:
        return self.threads_alive() and all(w.progressing(stall_s) for w in self.workers)

    @property
    def healthy(self) -> bool:
        """Every inference worker warmed up and not failing batch after batch."""
        return all(w.healthy for w in self.workers)

    def busy_share(self) -> float:
        """The share of the last half second (at least) the inference workers spent deciding batches, 0…1."""
        with self._busy_lock:
            now, busy = self.clock.monotonic(), sum(w.busy_s for w in self.workers)
            t0, busy0 = self._busy_at
            if now - t0 >= 0.5:
                self._busy_share = min(1.0, (busy - busy0) / ((now - t0) * len(self.workers)))
                self._busy_at = (now, busy)
            return self._busy_share

    def capacity_short(self) -> bool:
        """Production is at the machine's limit (shadow scoring then yields: daemon/shadow.py)."""
        s = self.settings.shadow
        if s.yield_backlog and len(self.intake) >= s.yield_backlog:
            return True
        return self.busy_share() >= s.yield_busy

    def queue_depths(self) -> dict[str, int]:
        return {
            "intake": len(self.intake),
            "batch": self.batcher.out.qsize(),
            "publish": self.ledger.out.qsize(),
        }

    def _quiet(self) -> bool:
        """No frame waits in the intake or in an open batch, and the workers were mostly idle of late: a lone
        frame would have the cores to itself (near saturation frames come too often for that, and a batch
        held for the lone frame costs throughput)."""
        return not len(self.intake) and not self.batcher.filling and self.busy_share() < LONE_FRAME_MAX_BUSY

    def _expire(self, job: Job, reason: Reason) -> Verdict:
        detail = self._deadline_detail if reason is Reason.DEADLINE else None
        return self.models.reject(job.frame, reason, detail)

    def _restamp(self, verdict: Verdict) -> Verdict:
        return self.models.restamp(verdict)
