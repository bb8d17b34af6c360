"""The model lifecycle of a running daemon: load a candidate, shadow it, promote it, roll back, drop — while
production decides every frame.

The one API the control socket (daemon/control.py) and the package watcher (daemon/watch_package.py) call.
Role changes are serialised; a load runs on its own thread (``model-loader``) or the caller's, and only a model
that passed every check (daemon/loading.py) is ever installed as the candidate. Production changes only through
:meth:`daemon.models.ModelSlots.switch`, between two batches, with shadow scoring paused for the moment of the
switch; the returned record names the first ``seq`` the new production decided. Every operation is logged and
counted, and ``inspectd_model_info{role}`` follows the roles.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon.loading import CandidateLoader
from daemon.logs import get_logger
from daemon.metrics import Metrics
from daemon.models import LoadInProgress, ModelError, ModelSlots, Role, ServedModel
from daemon.shadow import ShadowScorer

log = get_logger(__name__)

_HISTORY = 20  # switches kept for ``status``


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class ModelLifecycle:
    def __init__(
        self,
        slots: ModelSlots,
        loader: CandidateLoader,
        shadow: ShadowScorer,
        metrics: Metrics,
        *,
        switch_timeout_s: float,
    ) -> None:
        self.slots = slots
        self.loader = loader
        self.shadow = shadow
        self.metrics = metrics
        self.switch_timeout_s = switch_timeout_s
        self._ops = threading.Lock()  # one role change at a time
        self._loading = threading.Lock()  # one load at a time (held by the loading thread)
        self._load_ids = itertools.count(1)
        self._load: dict[str, Any] | None = None  # the load in progress
        self._last_load: dict[str, Any] | None = None
        self._switches: collections.deque[dict[str, Any]] = collections.deque(maxlen=_HISTORY)
        self._loader_thread: threading.Thread | None = None
        self._stopping = False

    # -- loading ---------------------------------------------------------------------------------------------
    def start_load(self, directory: Path, *, shadow: bool = False, origin: str = "control") -> int:
        """Load ``directory`` as the candidate on a thread of its own; returns the load's id (its outcome is
        ``status()["load"]["last"]`` once ``["in_progress"]`` is no longer this id)."""
        load_id = self._begin(directory, shadow)
        self._loader_thread = threading.Thread(
            target=self._load_quietly,
            args=(load_id, directory, shadow, origin),
            name="model-loader",
            daemon=True,
        )
        self._loader_thread.start()
        return load_id

    def load(self, directory: Path, *, shadow: bool = False, origin: str = "control") -> ServedModel:
        """Load ``directory`` as the candidate on this thread; ModelError when refused (production untouched)."""
        return self._load_now(self._begin(directory, shadow), directory, shadow, origin)

    def _begin(self, directory: Path, shadow: bool) -> int:
        if self._stopping:
            raise ModelError("the daemon is stopping")
        if not self._loading.acquire(blocking=False):
            current = self._load or {}
            raise LoadInProgress(f"a load is in progress ({current.get('path')}); try again when it is done")
        load_id = next(self._load_ids)
        self._load = {"id": load_id, "path": str(directory), "shadow": shadow, "since": _now_iso()}
        return load_id

    def _load_quietly(self, load_id: int, directory: Path, shadow: bool, origin: str) -> None:
        try:
            self._load_now(load_id, directory, shadow, origin)
        except ModelError:
            pass  # logged and recorded in status by _load_now
        except Exception:
            log.exception("model load failed unexpectedly", path=str(directory))

    def _load_now(self, load_id: int, directory: Path, shadow: bool, origin: str) -> ServedModel:
        t0 = time.monotonic()
        record: dict[str, Any] = {"id": load_id, "path": str(directory), "shadow": shadow, "origin": origin}
        try:
            model = self.loader.load(directory, loaded=self.slots.loaded(), origin=origin)
            self._install(model, shadow)
        except ModelError as exc:
            record.update(result="refused", error=str(exc), seconds=round(time.monotonic() - t0, 2))
            self.metrics.model_loaded(False)
            log.error("model package refused; production unchanged", **record)
            raise
        except BaseException as exc:
            record.update(result="refused", error=f"internal error: {type(exc).__name__}: {exc}")
            self.metrics.model_loaded(False)
            raise
        else:
            record.update(result="loaded", model=model.model_id, seconds=round(time.monotonic() - t0, 2))
            self.metrics.model_loaded(True)
            log.info("candidate loaded", **record, production=self.slots.production.model_id)
            return model
        finally:
            self._last_load = record
            self._load = None
            self._loading.release()

    def _install(self, model: ServedModel, shadow: bool) -> None:
        with self._ops:
            if self._stopping:
                model.close()
                raise ModelError("the daemon is stopping")
            with self.shadow.idle():
                old = self.slots.candidate
                self.slots.candidate = model
                self.slots.shadowing = shadow
            self.metrics.shadow_share(float("nan"))  # a new candidate: nothing sampled yet
            if old is not None:
                log.info("candidate replaced", old=old.model_id, new=model.model_id)
                old.close()
            self._publish_roles()

    # -- shadow ----------------------------------------------------------------------------------------------
    def set_shadow(self, on: bool) -> dict[str, Any]:
        with self._ops:
            cand = self.slots.candidate
            if cand is None:
                raise ModelError("nothing to shadow: no candidate is loaded (inspectd model load DIR)")
            with self.shadow.idle():
                self.slots.shadowing = on
        log.info("shadow scoring " + ("on" if on else "off"), candidate=cand.model_id)
        return {"candidate": cand.model_id, "shadow": on}

    # -- switching production ---------------------------------------------------------------------------------
    def promote(self) -> dict[str, Any]:
        """The candidate becomes production between two batches; production stays loaded as previous."""
        with self._ops:
            cand = self.slots.candidate
            if cand is None:
                raise ModelError("nothing to promote: no candidate is loaded (inspectd model load DIR)")
            old, retired = self.slots.production, self.slots.previous

            def change() -> None:
                self.slots.set_production(cand)
                self.slots.previous = old
                self.slots.candidate = None
                self.slots.shadowing = False
                self.metrics.set_production(cand.decider.decision, cand.drift)

            record = self._switch("promote", change, old, cand)
            if retired is not None:
                log.info("previous model unloaded", model=retired.model_id)
                retired.close()
            return record

    def rollback(self) -> dict[str, Any]:
        """Previous becomes production again between two batches; the model rolled back from becomes the
        candidate (promote it again, or drop it), unless a candidate is loaded: then it is unloaded."""
        with self._ops:
            prev = self.slots.previous
            if prev is None:
                raise ModelError(
                    "nothing to roll back to: no previous model is loaded (nothing was promoted, or it was dropped)"
                )
            old = self.slots.production
            keep = self.slots.candidate is None

            def change() -> None:
                self.slots.set_production(prev)
                self.slots.previous = None
                if keep:
                    self.slots.candidate = old
                    self.slots.shadowing = False
                self.metrics.set_production(prev.decider.decision, prev.drift)

            record = self._switch("rollback", change, old, prev)
            if not keep:
                log.info("model rolled back from unloaded (a candidate is loaded)", model=old.model_id)
                old.close()
            return record

    def _switch(
        self, action: str, change: Callable[[], None], old: ServedModel, new: ServedModel
    ) -> dict[str, Any]:
        with self.shadow.idle():  # no candidate inference in flight: its backends may become production's
            first_seq = self.slots.switch(change, self.switch_timeout_s)
        self.metrics.model_switched(action)
        self._publish_roles()
        record = {
            "action": action,
            "from": old.model_id,
            "to": new.model_id,
            "first_seq": first_seq,
            "at": _now_iso(),
        }
        self._switches.append(record)
        log.info(f"model {'promoted' if action == 'promote' else 'rolled back'}", **record)
        return record

    def drop(self, role: str = "previous") -> dict[str, Any]:
        """Unload the previous model (no rollback after this) or the candidate."""
        with self._ops:
            if role == Role.PREVIOUS:
                model = self.slots.previous
                if model is None:
                    raise ModelError("nothing to drop: no previous model is loaded")
                self.slots.previous = None
            elif role == Role.CANDIDATE:
                model = self.slots.candidate
                if model is None:
                    raise ModelError("nothing to drop: no candidate is loaded")
                with self.shadow.idle():
                    self.slots.candidate = None
                    self.slots.shadowing = False
            else:
                raise ModelError(
                    f"cannot drop {role!r}: only previous or candidate (production changes by promote or rollback)"
                )
            model.close()
            self._publish_roles()
        log.info("model dropped", role=role, model=model.model_id)
        return {"dropped": role, "model": model.model_id}

    # -- reporting ---------------------------------------------------------------------------------------------
    def publish(self) -> None:
        """``inspectd_model_info{role}`` for every role (after start-up's warm-up, and each change)."""
        with self._ops:
            self._publish_roles()

    def _publish_roles(self) -> None:
        for role, model in self.slots.roles().items():
            if model is None:
                self.metrics.clear_model_info(role.value)
            else:
                self.metrics.set_model_info(model.labels(), role.value)

    def status(self) -> dict[str, Any]:
        with self._ops:
            slots = self.slots
            cand = slots.candidate
            loading = dict(self._load) if self._load else None
            state = (
                "loading"
                if loading
                else "shadow"
                if slots.shadowing
                else "candidate"
                if cand is not None
                else "serving"
            )
            out: dict[str, Any] = {
                "state": state,
                "production": slots.production.summary(),
                "candidate": {**cand.summary(), "shadow": slots.shadowing} if cand is not None else None,
                "previous": slots.previous.summary() if slots.previous is not None else None,
                "shadow": None,
                "load": {"in_progress": loading, "last": self._last_load},
                "switches": list(self._switches),
            }
            if cand is not None:
                out["shadow"] = {
                    "active": slots.shadowing,
                    "candidate": cand.model_id,
                    "score_tolerance": self.shadow.tolerance,
                    "thread_alive": self.shadow.alive,
                    **cand.shadow.snapshot(),
                }
            return out

    def stop(self, timeout: float = 5.0) -> None:
        """No more loads; a load in progress is waited for (briefly) and its model closed."""
        self._stopping = True
        if self._loader_thread is not None:
            self._loader_thread.join(timeout)
