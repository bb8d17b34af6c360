"""The models a running daemon holds, and the one way production changes: between two batches.

Three roles. **Production** decides every frame. A **candidate** is loaded beside it (verified, entered and warmed
up by :mod:`daemon.loading`), may shadow-score production's frames (:mod:`daemon.shadow`) and never decides
anything. **Previous** is the production before the last promote, kept loaded and warm as the rollback target
until it is dropped.

Each inference worker reads production once per batch (:meth:`ModelSlots.serving`), so a batch is decided by
exactly one model. A change of production (:meth:`ModelSlots.switch`) waits until no batch is in flight and
lets none start, then makes the change under the ledger's lock (:meth:`daemon.ledger.Ledger.exclusive`): every
verdict published with a ``seq`` below the one it returns names the old model, every later one the new model.
Fail-safe REJECTs made outside a batch (decode errors, overload, deadlines, pose failures) go through this
object too (:meth:`ModelSlots.reject`) and are stamped under the ledger's lock (:meth:`ModelSlots.restamp`), so
no verdict names a model that was not production at its ``seq``. The switch itself is a few pointer and gauge
assignments: production never stops deciding, and the longest a batch waits for a switch is the batch in flight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.decision import Decider
from daemon.drift import DriftMonitor
from daemon.ledger import Ledger
from daemon.logs import get_logger
from daemon.types import Frame, Reason, Verdict
from engine.backend import Backend
from engine.gauges import GaugeSet
from engine.package import META_NAME, ModelMeta, ModelPackage, sha256_file

if TYPE_CHECKING:
    from daemon.decision import Rejecter

log = get_logger(__name__)

DISAGREEMENT_KINDS = ("pass_reject", "reject_pass", "score")  # production's verdict → the candidate's


class Role(enum.StrEnum):
    PRODUCTION = "production"
    CANDIDATE = "candidate"
    PREVIOUS = "previous"


class ModelError(RuntimeError):
    """A model operation refused (bad package, failed warm-up, nothing to promote, …); the message says why, for
    the operator. Production is untouched whenever this is raised."""


class LoadInProgress(ModelError):
    """Another load runs; this one was not started (the package watcher tries again at its next look)."""


class ShadowTally:
    """What one candidate's shadow scoring found so far (thread-safe: the shadow thread adds, others read)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.offered = 0  # frames production scored while this candidate was shadowing
        self.scored = 0  # of those, frames the candidate scored (the rest were skipped: no capacity)
        self.errors = 0  # frames the candidate could not score (its backend failed, or an implausible logit)
        self.disagreements = dict.fromkeys(DISAGREEMENT_KINDS, 0)
        self.core_s = 0.0  # CPU time of the shadow thread scoring them

    def add_offered(self, n: int) -> None:
        with self._lock:
            self.offered += n

    def add_scored(self, n: int, errors: int, kinds: list[str], core_s: float) -> None:
        with self._lock:
            self.scored += n
            self.errors += errors
            self.core_s += core_s
            for kind in kinds:
                self.disagreements[kind] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            offered, scored = self.offered, self.scored
            return {
                "offered": offered,
                "scored": scored,
                "sampled_share": round(scored / offered, 4) if offered else None,
                "errors": self.errors,
                "disagreements": dict(self.disagreements),
                "core_ms_per_frame": round(1000.0 * self.core_s / scored, 3) if scored else None,
            }


@dataclass(eq=False)
class ServedModel:
    """A model package ready to decide: its decider (operating point and gauge bands) and one entered backend
    per inference worker (index = worker). Identity is the object: the same package loaded twice is two."""

    package: ModelPackage
    model_id: (
        str  # what every verdict it makes names (engine.package.ModelMeta.model_id, + a suffix, see loading)
    )
    decider: Decider
    backends: list[Backend]
    json_sha256: str  # model.json as loaded: with the ONNX sha256, what the package on disk is compared with
    drift: DriftMonitor | None = None  # its drift windows (against its own score reference)
    origin: str = "start"  # start | control | watcher
    loaded_at: float = field(default_factory=time.time)
    shadow: ShadowTally = field(default_factory=ShadowTally)
    lone: Backend | None = None  # its lone-frame session, entered (daemon/lone_frame.py); None = none

    @property
    def sessions(self) -> list[Backend]:
        """Every backend it holds: one per worker, then the lone-frame session if any."""
        return [*self.backends, *([self.lone] if self.lone is not None else [])]

    @property
    def meta(self) -> ModelMeta:
        return self.package.meta

    @property
    def gauges(self) -> GaugeSet | None:
        return self.decider.gauges

    def labels(self) -> dict[str, str]:
        """The labels of ``inspectd_model_info`` for this model (with its role added by the caller)."""
        h, w = self.meta.preprocess.input_size
        gauges = ",".join(b.name for b in self.gauges.bands) if self.gauges else ""
        return {
            **self.backends[0].describe(),
            "model": self.model_id,
            "sha256": self.meta.onnx_sha256,
            "input": f"{h}x{w}",
            "gauges": gauges or "none",
        }

    def summary(self) -> dict[str, Any]:
        """What ``inspectd model status`` shows of it."""
        d = self.decider.decision
        return {
            "model": self.model_id,
            "name": self.meta.name,
            "sha256": self.meta.onnx_sha256,
            "json_sha256": self.json_sha256,
            "path": str(self.package.directory),
            "origin": self.origin,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
            "threshold": d.threshold,
            "grey_zone": list(d.grey_zone) if d.grey_zone else None,
            "gauges": [b.name for b in self.gauges.bands] if self.gauges else [],
            # the measurements whose margins add to the score (engine.gauges.Margins)
            "score_margins": [m.name for m in self.gauges.margins.margins]
            if self.gauges and self.gauges.margins
            else [],
            "backend": self.backends[0].describe(),
            "lone_frame_threads": getattr(self.lone.options, "intra_op_threads", 0) if self.lone else 0,
        }

    def close(self) -> None:
        """Exit every backend (a backend that never entered, or failed to re-enter, exits harmlessly)."""
        for backend in self.sessions:
            try:
                backend.__exit__(None, None, None)
            except Exception:
                log.exception("backend exit failed", model=self.model_id)


def json_sha256(package: ModelPackage) -> str:
    """sha256 of the package's model.json on disk ("" when it cannot be read: a package made in memory)."""
    try:
        return sha256_file(Path(package.directory) / META_NAME)
    except OSError:
        return ""


def backend_like(template: Backend, package: ModelPackage | None = None) -> Backend:
    """Another instance of ``template``'s kind, batch size and options, for ``package`` (default: the same):
    another inference worker's session, or a candidate's, created exactly as production's was."""
    return type(template)(package or template.package, max_batch=template.max_batch, options=template.options)


def recreate(backend: Backend) -> None:
    """Exit and enter ``backend`` again after a failed batch. One that cannot enter stays inactive: its next
    batch fails fast (and is counted as failed) and it is tried again then."""
    try:
        backend.__exit__(None, None, None)
    except Exception as exc:
        log.warning("backend exit failed during reset", error=str(exc))
    try:
        backend.__enter__()
    except Exception as exc:
        log.error("backend re-create failed", error=str(exc))


class ModelSlots:
    """Production, candidate and previous; the batch gate the inference workers pass; the switch."""

    def __init__(self, production: ServedModel, *, ledger: Ledger) -> None:
        self._production = production
        self.candidate: ServedModel | None = None
        self.previous: ServedModel | None = None
        self.shadowing = False  # the candidate scores production's frames
        self._ledger = ledger
        self._cv = threading.Condition()
        self._in_flight = 0  # batches being decided now
        self._switching = False

    @property
    def production(self) -> ServedModel:
        return self._production

    @property
    def shadow_candidate(self) -> ServedModel | None:
        """The candidate when it shadows production, else None."""
        return self.candidate if self.shadowing else None

    def roles(self) -> dict[Role, ServedModel | None]:
        return {
            Role.PRODUCTION: self._production,
            Role.CANDIDATE: self.candidate,
            Role.PREVIOUS: self.previous,
        }

    def loaded(self) -> list[tuple[Role, ServedModel]]:
        return [(role, m) for role, m in self.roles().items() if m is not None]

    # -- the inference workers' side ------------------------------------------------------------------------
    @contextlib.contextmanager
    def serving(self) -> Iterator[tuple[ServedModel, ServedModel | None]]:
        """For one batch, decided and settled inside the block: (production, the candidate to shadow-score it
        with or None). No switch happens while a batch is inside; a pending switch holds new batches back."""
        with self._cv:
            while self._switching:
                self._cv.wait()
            self._in_flight += 1
            served, shadow = self._production, self.shadow_candidate
        try:
            yield served, shadow
        finally:
            with self._cv:
                self._in_flight -= 1
                if not self._in_flight:
                    self._cv.notify_all()

    # -- the switch --------------------------------------------------------------------------------------------
    def switch(self, change: Callable[[], None], timeout_s: float) -> int:
        """Run ``change`` (which reassigns the roles) between two batches and two ``seq``; returns the ``seq``
        of the first verdict after it. Raises ModelError, changing nothing, if the batches in flight do not
        finish within ``timeout_s``."""
        end = time.monotonic() + timeout_s
        with self._cv:
            while self._switching:  # one switch at a time (the lifecycle serialises them anyway)
                self._cv.wait()
            self._switching = True
            try:
                while self._in_flight:
                    left = end - time.monotonic()
                    if left <= 0:
                        raise ModelError(
                            f"a batch in flight did not finish within {timeout_s:g} s; production unchanged"
                        )
                    self._cv.wait(left)
            except BaseException:
                self._switching = False
                self._cv.notify_all()
                raise
        try:
            with self._ledger.exclusive() as last_seq:
                change()
            return last_seq + 1
        finally:
            with self._cv:
                self._switching = False
                self._cv.notify_all()

    def set_production(self, model: ServedModel) -> None:
        """Only inside :meth:`switch`'s ``change``."""
        self._production = model

    # -- fail-safe REJECTs name production (daemon.decision.Rejecter) ------------------------------------------
    @property
    def gauges(self) -> GaugeSet | None:
        return self._production.decider.gauges

    def reject(
        self,
        frame: Frame,
        reason: Reason,
        detail: dict[str, Any] | None = None,
        timings_ms: dict[str, float] | None = None,
    ) -> Verdict:
        return self._production.decider.reject(frame, reason, detail, timings_ms)

    def restamp(self, verdict: Verdict) -> Verdict:
        """With the ledger's lock held, for a fail-safe REJECT about to be queued: made (outside the lock) by a
        model that has since stopped being production, it is made by production instead."""
        d = self._production.decider
        if verdict.model == d.model_id:
            return verdict
        return dataclasses.replace(verdict, model=d.model_id, threshold=d.threshold)

    def close(self) -> None:
        """Exit every loaded model's backends (at shutdown, once no batch runs)."""
        for _, model in self.loaded():
            model.close()


if TYPE_CHECKING:  # mypy proves that the slots stand in for a Decider where only rejects are made
    _SLOTS_REJECT: type[Rejecter] = ModelSlots
