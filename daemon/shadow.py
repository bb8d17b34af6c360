"""Shadow scoring: a candidate model scores the frames production decided, off the verdict path.

After an inference worker has settled a batch (its verdicts are on their way to the PLC), it offers the batch to
this stage: the rows production inferred (copied: the batch buffer goes back to the pool at once), the frames,
and production's verdicts. The stage's own thread scores them with the candidate, decides them with the
candidate's operating point and gauge bands, and compares:

- ``pass_reject`` / ``reject_pass``: production's verdict → the candidate's, when they differ;
- ``score``: same verdict, NG probabilities further apart than ``shadow.score_tolerance``.

One kind per frame (a flip first). Each disagreement is counted (``inspectd_shadow_disagreements_total{kind}``),
logged with the frame id and both verdicts and scores (one line per shadowed batch), and kept in the audit
archive with both verdicts (``shadow.audit``). Frames the candidate cannot score (its backend fails, or a logit
is implausible) are errors, not disagreements.

Production comes first. The offer comes after settlement and never waits: a full queue skips the batch. While
production is at the machine's limit (its inference workers busy ``shadow.yield_busy`` of the time, or
``shadow.yield_backlog`` frames waiting for it), no batch is shadowed and no queued one is started, so the
candidate's inference (and its Python, under the GIL) does not compete with production for the cores; the thread
also runs at a lower CPU priority (``shadow.nice``). So when
capacity is short the candidate scores a sampled share of the frames, and says which:
``inspectd_shadow_sampled_ratio``, ``inspectd model status``, and a log line (at most one per 10 s) while
batches are being skipped.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from daemon.decision import as_logits
from daemon.logs import get_logger
from daemon.metrics import MetricsSink
from daemon.models import ModelSlots, ServedModel, recreate
from daemon.settings import ShadowSettings
from daemon.threads import StageThread
from daemon.types import Frame, Outcome, Verdict
from engine.backend import sigmoid
from engine.pose import Measurements

log = get_logger(__name__)

_SKIP_LOG_S = 10.0  # at most one "sampled share" line per this many seconds
_LOGGED_FRAMES = 20  # disagreeing frames named per log line
END = None

# (frame, production's verdict, the candidate's verdict, kind): keeps a disagreement (the audit archive)
Keep = Callable[[Frame, Verdict, Verdict, str], None]


@dataclass(frozen=True, slots=True)
class Offered:
    """One decided row of a batch: the frame, its measurements and production's (model) verdict on it."""

    row: int  # index into the rows production inferred
    frame: Frame
    measurements: Measurements | None
    verdict: Verdict


@dataclass(frozen=True, slots=True)
class _Work:
    candidate: ServedModel
    x: np.ndarray  # float32 (n, 1, H, W): exactly what production inferred, copied
    rows: tuple[Offered, ...]


def disagreement(production: Verdict, candidate: Verdict, tolerance: float) -> str | None:
    """The kind of disagreement between two scored verdicts on one frame, or None when they agree."""
    if production.outcome is not candidate.outcome:
        return "pass_reject" if production.outcome is Outcome.PASS else "reject_pass"
    assert production.score is not None and candidate.score is not None
    return "score" if abs(candidate.score - production.score) > tolerance else None


class ShadowScorer(StageThread):
    def __init__(
        self,
        models: ModelSlots,
        metrics: MetricsSink,
        settings: ShadowSettings,
        *,
        capacity_short: Callable[[], bool] = lambda: False,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``capacity_short``: whether production is at the machine's limit now (then shadow scoring yields)."""
        self._models = models
        self._capacity_short = capacity_short
        self._metrics = metrics
        self.settings = settings
        self.tolerance = settings.score_tolerance
        self._q: queue.Queue[_Work | None] = queue.Queue(settings.queue_batches)
        self._busy = threading.Lock()  # held while a batch is scored: a switch waits for it (:meth:`idle`)
        self._now = monotonic
        self._last_skip_log = -_SKIP_LOG_S
        self._skipped_since_log = 0
        self.keep: Keep | None = None  # set by the app when the audit archive keeps disagreements
        self._thread: threading.Thread | None = None

    # -- the inference workers' side ------------------------------------------------------------------------
    def offer(self, candidate: ServedModel, x: np.ndarray, rows: Sequence[Offered]) -> None:
        """A settled batch for ``candidate`` (called by an inference worker; never blocks)."""
        if not rows:
            return
        n = len(rows)
        candidate.shadow.add_offered(n)
        self._metrics.shadow_offered(n)
        if not self._q.full() and not self._capacity_short():
            positions = [r.row for r in rows]
            xs = x[positions] if positions != list(range(len(x))) else x.copy()
            with contextlib.suppress(queue.Full):
                self._q.put_nowait(_Work(candidate, xs, tuple(rows)))
                self._share(candidate)
                return
        self._skipped(candidate, n)

    def _skipped(self, candidate: ServedModel, n: int) -> None:
        self._share(candidate)
        self._skipped_since_log += n
        now = self._now()
        if now - self._last_skip_log >= _SKIP_LOG_S:
            log.warning(
                "shadow scoring yields to production (no room, or the station at its limit): a sampled share is scored",
                candidate=candidate.model_id,
                skipped=self._skipped_since_log,
                sampled_share=candidate.shadow.snapshot()["sampled_share"],
            )
            self._last_skip_log, self._skipped_since_log = now, 0

    def _share(self, candidate: ServedModel) -> None:
        share = candidate.shadow.snapshot()["sampled_share"]
        if share is not None:
            self._metrics.shadow_share(share)

    # -- the switch's side -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def idle(self) -> Iterator[None]:
        """No candidate inference runs inside this block (a batch being scored finishes first); queued work
        for a candidate that is no longer shadowing when the block ends is dropped."""
        with self._busy:
            yield

    # -- the thread ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._spawn(self._run, "shadow")

    def stop(self, timeout: float) -> bool:
        """End the thread (at shutdown: work still queued is dropped, it decides nothing)."""
        if self._thread is None:
            return True
        with contextlib.suppress(queue.Empty):
            while True:  # make room for the end marker: what is queued is not worth the wait at shutdown
                self._q.get_nowait()
        with contextlib.suppress(queue.Full):
            self._q.put(END, timeout=timeout)
        return self.join(timeout)

    def _run(self) -> None:
        _lower_priority(self.settings.nice)
        while (work := self._q.get()) is not END:
            with self._busy:
                if work.candidate is not self._models.shadow_candidate:
                    continue  # promoted, replaced or dropped since the offer
                if self._capacity_short():  # production has since reached the machine's limit: yield to it
                    self._skipped(work.candidate, len(work.rows))
                    continue
                try:
                    self._score(work)
                except Exception:  # a bug here must not end shadow scoring, nor ever touch production
                    log.exception("shadow scoring failed", candidate=work.candidate.model_id)

    def _score(self, work: _Work) -> None:
        cand = work.candidate
        backend = cand.backends[0]  # no worker uses a candidate's backends until it is promoted (idle())
        n = len(work.rows)
        t0 = time.thread_time()
        try:
            logits = as_logits(backend.infer(work.x), n)
        except Exception as exc:
            cand.shadow.add_scored(0, n, [], time.thread_time() - t0)
            self._metrics.shadow_errors(n)
            log.error(
                "shadow: the candidate failed on a batch (production unaffected); backend re-created",
                candidate=cand.model_id,
                error=f"{type(exc).__name__}: {exc}",
                frames=[r.frame.frame_id for r in work.rows][:_LOGGED_FRAMES],
            )
            recreate(backend)
            return
        scores = sigmoid(logits).tolist()
        diffs: list[float] = []
        found: list[tuple[Offered, Verdict, str]] = []
        errors = 0
        for offered, score, logit in zip(work.rows, scores, logits.tolist(), strict=True):
            violations = cand.decider.violations(offered.measurements)
            verdict = cand.decider.decide(
                offered.frame, score, {}, violations, logit=logit, measurements=offered.measurements
            )
            if verdict.score is None:  # an implausible logit: the candidate made no decision
                errors += 1
                continue
            prod = offered.verdict
            assert prod.score is not None
            diffs.append(abs(verdict.score - prod.score))
            kind = disagreement(prod, verdict, self.tolerance)
            if kind is not None:
                found.append((offered, verdict, kind))
        kinds = [kind for _, _, kind in found]
        cand.shadow.add_scored(n - errors, errors, kinds, time.thread_time() - t0)
        self._metrics.shadow_scored(diffs)
        self._metrics.shadow_disagreements(kinds)
        if errors:
            self._metrics.shadow_errors(errors)
        self._share(cand)
        if found:
            self._report(cand, found)

    def _report(self, cand: ServedModel, found: list[tuple[Offered, Verdict, str]]) -> None:
        flips = sum(kind != "score" for _, _, kind in found)
        (log.warning if flips else log.info)(
            "shadow disagreements",
            candidate=cand.model_id,
            production=found[0][0].verdict.model,
            n=len(found),
            frames=[
                {
                    "frame_id": o.frame.frame_id,
                    "kind": kind,
                    "production": {"verdict": o.verdict.outcome.value, "score": o.verdict.score},
                    "candidate": {"verdict": v.outcome.value, "score": v.score},
                }
                for o, v, kind in found[:_LOGGED_FRAMES]
            ],
        )
        if self.keep is None or not self.settings.audit:
            return
        for o, v, kind in found:
            try:
                self.keep(o.frame, o.verdict, v, kind)
            except Exception:
                log.exception("shadow: keeping a disagreement in the audit archive failed")


def _lower_priority(nice: int) -> None:
    """Raise this thread's nice value by ``nice`` (Linux: per thread), so production's threads win the cores."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except OSError as exc:
        log.info("shadow thread priority unchanged", error=str(exc))
