"""Loading a candidate model beside production: every check before it becomes eligible, none on a worker thread.

In order, each refusal a :class:`~daemon.models.ModelError` whose first words say what is wrong:

1. ``no such package``: the directory does not exist;
2. ``bad sha256``: ``model.onnx`` is not the file ``model.json`` vouches for (``model.verify_sha256``);
   ``bad package``: any other reason ``engine.package.load_package`` refuses it, or gauges / a score reference
   the daemon cannot apply;
3. ``incompatible input``: the daemon preprocesses (and measures) every frame once, for production, so a
   candidate must want exactly production's preprocessing (``model.json`` ``preprocess``) and measurement
   (the gauges' pose parameters, gauges or none). Its operating point, gauge bands and network may differ;
4. ``already loaded``: the very same package (ONNX and model.json) is production, the candidate or previous;
5. ``candidate failed warm-up``: its backends (production's kind, options and batch size, one per inference
   worker, and a lone-frame session if production has one) are entered and run at the batch sizes the daemon
   forms; a batch at the largest of them must fit the inference budget (``batching.max_infer_share`` ×
   ``deadlines.max_latency_ms``) as production's did at start.

The loader runs on the thread that asks (the control socket's loader thread, the package watcher); production
decides every frame meanwhile, on cores the loader shares with it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np

from daemon.decision import Decider
from daemon.drift import DriftMonitor
from daemon.logs import get_logger
from daemon.models import ModelError, Role, ServedModel, backend_like, json_sha256
from engine.backend import Backend
from engine.gauges import GaugeSet, load_gauges
from engine.package import IntegrityError, ModelMeta, PackageError, load_package

log = get_logger(__name__)

_TIMED_RUNS = 3


class CandidateLoader:
    def __init__(
        self,
        *,
        template: Callable[[], Backend],
        workers: int,
        batch_sizes: Callable[[], tuple[int, ...]],
        budget_s: float | None,
        verify: bool,
        drift: Callable[[ModelMeta], DriftMonitor],
        lone: Callable[[], Backend | None] = lambda: None,
    ) -> None:
        """``template``: production's first backend now (kind, options, batch size to copy); ``batch_sizes``:
        the sizes the daemon forms now (1 and the capped max_batch); ``drift``: a drift monitor for a package's
        score reference (ValueError when it has none the daemon can use); ``lone``: production's lone-frame
        session now (None = none), which a candidate gets a copy of."""
        self._template = template
        self._workers = workers
        self._batch_sizes = batch_sizes
        self._budget_s = budget_s
        self._verify = verify
        self._drift = drift
        self._lone = lone

    def load(
        self, directory: Path, *, loaded: Sequence[tuple[Role, ServedModel]], origin: str
    ) -> ServedModel:
        """The package in ``directory`` as an entered, warmed-up model; ModelError naming what is wrong."""
        d = Path(directory)
        if not d.is_dir():
            raise ModelError(f"no such package: {d} is not a directory")
        d = d.resolve()  # a later symlink flip (current -> v8) must not change what this model reads
        try:
            package = load_package(d, verify=self._verify)
        except IntegrityError as exc:
            raise ModelError(f"bad sha256: {exc}") from None
        except PackageError as exc:
            raise ModelError(f"bad package: {exc}") from None
        meta = package.meta
        try:
            gauges = load_gauges(meta.gauges, meta.preprocess.pose)
        except ValueError as exc:
            raise ModelError(f"bad package: {d}: gauges: {exc}") from None
        production = next(m for role, m in loaded if role is Role.PRODUCTION)
        problems = incompatibilities(production, meta, gauges)
        if problems:
            raise ModelError(
                "incompatible input: "
                + "; ".join(problems)
                + " (the daemon preprocesses and measures each frame once, as production's package says)"
            )
        digest = json_sha256(package)
        model_id = meta.model_id
        for role, m in loaded:
            if m.meta.onnx_sha256 == meta.onnx_sha256 and m.json_sha256 == digest:
                raise ModelError(f"already loaded: {d} is the {role.value} model ({m.model_id})")
        if any(m.model_id == model_id for _, m in loaded):
            # Same name and network, another model.json (new bands, a new threshold): another model, and every
            # verdict must say which made it.
            model_id = f"{model_id}+{digest[:8]}"
        try:
            drift = self._drift(meta)
        except ValueError as exc:
            raise ModelError(f"bad package: {d}: {exc}") from None
        template = self._template()
        try:
            backends = [backend_like(template, package) for _ in range(self._workers)]
            lone_template = self._lone()
            lone = backend_like(lone_template, package) if lone_template is not None else None
        except Exception as exc:  # e.g. production's options refused for this package
            raise ModelError(f"candidate failed warm-up: {type(exc).__name__}: {exc}") from None
        model = ServedModel(
            package,
            model_id,
            Decider(meta.decision, model_id, gauges=gauges),
            backends,
            digest,
            drift=drift,
            origin=origin,
            lone=lone,
        )
        self._warm_up(model)
        return model

    def _warm_up(self, model: ServedModel) -> None:
        """Enter and run every backend at the daemon's batch sizes, and time the largest; closes them and
        raises ModelError when that fails."""
        backends = model.backends
        sizes = self._batch_sizes()
        t0 = time.monotonic()
        try:
            for backend in backends:
                backend.__enter__()
                backend.warmup(sizes)
            if model.lone is not None:
                model.lone.__enter__()
                model.lone.warmup((1,))
            largest = max(sizes)
            x = np.zeros((largest, *backends[0].input_spec.shape), np.float32)
            runs = []
            for _ in range(_TIMED_RUNS):
                t = time.perf_counter()
                backends[0].infer(x)
                runs.append(time.perf_counter() - t)
            batch_s = statistics.median(runs)
        except Exception as exc:
            model.close()
            raise ModelError(f"candidate failed warm-up: {type(exc).__name__}: {exc}") from None
        if self._budget_s is not None and batch_s > self._budget_s:
            model.close()
            raise ModelError(
                f"candidate failed warm-up: a batch of {largest} takes {batch_s * 1000:.1f} ms, above the "
                f"inference budget of {self._budget_s * 1000:.1f} ms (batching.max_infer_share × "
                "deadlines.max_latency_ms): it would miss deadlines in production"
            )
        log.info(
            "candidate warmed up",
            model=model.model_id,
            batch_sizes=list(sizes),
            batch_ms=round(batch_s * 1000, 2),
            ms=round((time.monotonic() - t0) * 1000, 1),
        )


def incompatibilities(production: ServedModel, meta: ModelMeta, gauges: GaugeSet | None) -> list[str]:
    """How a package's preprocessing and measurement differ from production's ([] = it can be served)."""
    ours = production.meta.preprocess
    theirs = meta.preprocess
    out = [
        f"preprocess.{f.name} {_show(getattr(theirs, f.name))} (production: {_show(getattr(ours, f.name))})"
        for f in fields(ours)
        if getattr(ours, f.name) != getattr(theirs, f.name)
    ]
    prod_gauges = production.gauges
    if (prod_gauges is None) != (gauges is None):
        out.append(
            "gauges: the candidate has tolerance bands and production measures no part"
            if prod_gauges is None
            else "gauges: production measures every part (its bands) and the candidate has no gauges"
        )
    elif prod_gauges is not None and gauges is not None and prod_gauges.pose != gauges.pose:
        differ = sorted(
            k
            for k in prod_gauges.pose.keys() | gauges.pose.keys()
            if prod_gauges.pose.get(k) != gauges.pose.get(k)
        )
        out.append(f"gauges.pose {', '.join(differ)} differ from production's (parts are measured once)")
    return out


def _show(value: object) -> str:
    return str(list(value)) if isinstance(value, tuple) else repr(value)
