"""The settle-once table: the one place that guarantees exactly one verdict per admitted frame.

Every frame is *admitted* here first (it gets an internal key and a deadline). After that, any stage may try
to *settle* it — the model result, a decode error, the backpressure policy, the deadline watchdog, shutdown —
but only the first attempt wins: ``settle`` pops the key under a lock and, still under that lock, puts the
verdict on the publish queue. A losing attempt gets ``None`` (a late model result is counted, not sent). A model
result that wins but comes at or after the frame's deadline (the watchdog ran late) is published as REJECT
``deadline``, never as its own verdict: the deadline is checked against the ledger's clock at settle time too.
So two verdicts are impossible (one pop per key) and zero verdicts are impossible (every key has a deadline,
and shutdown settles whatever is left). The publisher thread is the only consumer of the queue and assigns
``seq`` there, so sequence order = settlement order, and the n-th item put on the queue is published as
``seq`` n.

That makes the ledger's lock the place where a model switch falls between two ``seq``: a switch made under
:meth:`Ledger.exclusive` knows the last ``seq`` of the old model, and a fail-safe REJECT made by a stage outside
the lock is stamped with the model in production when it is settled (``restamp``, under the lock), so every
verdict names the model that was production at its ``seq``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import itertools
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from daemon.drift import PartImage
from daemon.threads import StageThread
from daemon.types import Frame, Reason, Verdict


class Job:
    """A frame in flight: the immutable frame plus what the pipeline learns about it on the way."""

    __slots__ = ("deadline", "frame", "image", "key", "ok", "staged", "t_decode_ms", "t_pre_ms")

    def __init__(self, key: int, frame: Frame, deadline: float) -> None:
        self.key = key
        self.frame = frame
        self.deadline = deadline
        self.ok = False  # preprocessed into its batch row
        self.t_decode_ms = 0.0
        self.t_pre_ms = 0.0
        # The crop's light and, with gauges, the part's measurements: the drift statistics', and what the model
        # deciding the batch checks against its bands (daemon.inference).
        self.image: PartImage | None = None
        # With batching.preprocess_device on a GPU: the decoded frame and its pose, left for the batch's device
        # stage (daemon.prep.DevicePreprocessing), which fills the row; None once it has.
        self.staged: Any = None


class Settled:
    """One item of the publish queue: the verdict, its job, and when it was settled (publish-stage timing)."""

    __slots__ = ("job", "t_settled", "verdict")

    def __init__(self, verdict: Verdict, job: Job, t_settled: float) -> None:
        self.verdict = verdict
        self.job = job
        self.t_settled = t_settled


class Deferred:
    """An item of the publish queue that is not a verdict: work for the publisher's thread once the verdicts
    queued before it are published (:meth:`Ledger.after_published`)."""

    __slots__ = ("run",)

    def __init__(self, run: Callable[[], None]) -> None:
        self.run = run


class Ledger(StageThread):
    """Admission, settle-once, and the deadline watchdog (a thread that settles expired frames)."""

    def __init__(
        self,
        *,
        max_latency_s: float,
        expire: Callable[[Job, Reason], Verdict],
        monotonic: Callable[[], float],
        restamp: Callable[[Verdict], Verdict] | None = None,
    ) -> None:
        self.max_latency_s = max_latency_s
        # None = end of stream; Deferred = the publisher's work between verdicts (after_published)
        self.out: queue.SimpleQueue[Settled | Deferred | None] = queue.SimpleQueue()
        self._expire = expire
        self._restamp = restamp  # a fail-safe REJECT made outside the lock → the model in production now
        self._now = monotonic
        self._queued = 0  # items put on ``out``: the seq of the last one
        self._keys = itertools.count(1)
        self._pending: dict[int, Job] = {}
        self._admitted = 0
        self._heap: list[tuple[float, int]] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Whether a settled frame keeps its pixels until it is published: only an after-publish handler (the
        # audit archive, a folder source's journal, a replay listener) looks at them then. Without one, settling
        # lets them go at once, so what waits for the publisher is verdicts, not images: under overload the
        # refused frames' pixels do not pile up behind a publisher that two busy cores starve (the App sets it).
        self.keep_frames = True

    # -- admission and settlement ------------------------------------------------------------------------
    def admit(self, frame: Frame) -> Job:
        job = Job(next(self._keys), frame, frame.t_arrival + self.max_latency_s)
        with self._lock:
            if self._closed:
                raise RuntimeError("frame admitted after the ledger closed (a source outlived shutdown)")
            self._admitted += 1
            self._pending[job.key] = job
            heapq.heappush(self._heap, (job.deadline, job.key))
            if self._heap[0][1] == job.key:  # a new earliest deadline: the watchdog must re-arm
                self._wake.notify()
        return job

    def settle(self, job: Job, verdict: Verdict) -> Verdict | None:
        """Publish a verdict for ``job`` unless the job already has one; returns what was published (None when
        this call lost).

        That is ``verdict`` itself, except for a model result (``verdict.inspected``) settled at or after the
        frame's deadline by this ledger's clock: the watchdog was merely late (a loaded machine), and a result
        after the deadline must not PASS, so it is published as REJECT ``deadline`` with the model's outcome,
        reason, score and detail under ``detail.late_result``. Fail-safe REJECTs keep their own reason.
        """
        with self._lock:
            if self._pending.pop(job.key, None) is None:
                return None
            now = self._now()
            if verdict.inspected:
                if now >= job.deadline:
                    verdict = self._late(job, verdict, now)
            elif self._restamp is not None:
                verdict = self._restamp(verdict)
            self._put(Settled(verdict, job, now))
            return verdict

    def _put(self, item: Settled) -> None:
        """Queue one settled verdict for publication (with the lock held). Without ``keep_frames`` the job's
        frame loses its pixels here; the job is no longer pending by then, so the one stage that reads pixels
        (daemon.prep, which checks :meth:`is_pending` after reading ``job.frame``) leaves it, and the others read
        only the frame's identity (id, source, times, path, label), which stays."""
        self._queued += 1
        frame = item.job.frame
        if not self.keep_frames and (frame.image is not None or frame.data is not None):
            item.job.frame = dataclasses.replace(frame, image=None, data=None)
        self.out.put(item)

    def after_published(self, run: Callable[[], None]) -> None:
        """Run ``run`` on the publisher's thread after every verdict this thread settled before it is published:
        bookkeeping that must not delay them (an inference batch's log line costs 0.6 ms of a cold lone frame,
        which the publisher would otherwise wait for: the GIL). Not a verdict: it takes no ``seq``."""
        self.out.put(Deferred(run))

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[int]:
        """Hold the lock: nothing settles meanwhile. Yields the ``seq`` the last settled verdict will be
        published with (0 before any)."""
        with self._lock:
            yield self._queued

    def _late(self, job: Job, result: Verdict, now: float) -> Verdict:
        expired = self._expire(job, Reason.DEADLINE)
        late = {
            "outcome": result.outcome.value,
            "reason": result.reason.value,
            "score": result.score,
            "detail": result.detail,
            "ms_after_deadline": round((now - job.deadline) * 1000.0, 3),
        }
        return dataclasses.replace(
            expired, detail={**(expired.detail or {}), "late_result": late}, timings_ms=result.timings_ms
        )

    def is_pending(self, job: Job) -> bool:
        return job.key in self._pending  # a dict lookup is atomic under the GIL; used to skip settled work

    @property
    def admitted(self) -> int:
        return self._admitted

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def settle_all(self, reason: Reason) -> int:
        """Settle everything still pending (shutdown). Returns how many frames that was."""
        with self._lock:
            jobs = sorted(self._pending.values(), key=lambda j: j.key)
            self._pending.clear()
            now = self._now()
            for job in jobs:
                self._put(Settled(self._expire(job, reason), job, now))
        return len(jobs)

    def close(self) -> None:
        """No more admissions; ends the publish stream after everything already settled."""
        with self._lock:
            self._closed = True
            self.out.put(None)

    # -- deadline watchdog -------------------------------------------------------------------------------
    def start(self) -> None:
        self._spawn(self._watch, "deadline-watchdog")

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _watch(self) -> None:
        with self._lock:
            while not self._stopping:
                now = self._now()
                heap, pending = self._heap, self._pending
                # Entries whose frame already settled are dropped without sleeping until their deadline,
                # so the thread wakes only for the oldest frame still pending (a few times a second).
                while heap and (heap[0][1] not in pending or heap[0][0] <= now):
                    _, key = heapq.heappop(heap)
                    job = pending.pop(key, None)
                    if job is not None:
                        self._put(Settled(self._expire(job, Reason.DEADLINE), job, now))
                self._wake.wait(heap[0][0] - now if heap else None)
