"""The lone-frame session: a frame that arrives on an idle CPU daemon uses every core, not one.

On a CPU the daemon runs one single-threaded ONNX Runtime session per core (``batching.inference_workers``),
which is what saturation wants: N batches side by side, no intra-op barriers. A frame that arrives while every
worker is idle then runs alone on one core and the others wait. The lone-frame session is one more session of
the same model with one thread per inference worker. A worker that takes a batch of one while every other worker
waits with nothing queued, no other frame is in the intake or an open batch, and the workers were busy less than
:data:`LONE_FRAME_MAX_BUSY` of the last half second (:meth:`daemon.batcher.BatchQueue.take_alone`,
``Pipeline._quiet``) infers it there; until it is done the batcher counts every worker busy, so no second batch
competes for those cores unless a deadline needs it. Near saturation batches never run alone, and the session is
idle memory (one more copy of the weights).

``batching.lone_frame_threads``: "auto" keeps the session only where its batch of one, timed at start-up against
a worker's, is at least :data:`MIN_GAIN` faster (on the 2-core machine of docs/benchmarks.md, 18.8 → 11.8 ms);
an explicit N keeps it whatever it measures; 0 is off. The verdict is the same either way: the same model file,
the same graph optimizations; only the thread count of the session differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from engine.backend import Backend

MIN_GAIN = 0.10  # "auto" keeps the session if its batch of one takes at most 90 % of a worker's
# A frame runs alone only while the workers were busy less than this share of the last half second: near
# saturation (PNG frames at their limit: 45.8 → 41.8 img/s measured without it) holding the next batch for a lone
# frame leaves a worker idle that the next batch needed (docs/benchmarks.md, run 12).
LONE_FRAME_MAX_BUSY = 0.5
_RUNS = 7  # timed batch-1 runs of each session (after a warm-up run)


class LoneFrameError(ValueError):
    """``batching.lone_frame_threads`` asks for a session this backend or layout cannot have."""


def lone_frame_threads(
    setting: int | Literal["auto"], backend: Backend, inference_workers: int, warmup: bool
) -> int:
    """How many threads the lone-frame session gets (0 = none), for production's first ``backend`` and the
    resolved worker count. An explicit N the backend cannot honour raises :class:`LoneFrameError`."""
    intra = getattr(backend.options, "intra_op_threads", None)
    fits = backend.on_cpu and intra == 1 and inference_workers > 1
    if setting == "auto":
        # Timed at start-up, so it needs the warm-up; a multi-threaded or single worker has no idle cores.
        return inference_workers if fits and warmup else 0
    if setting == 0:
        return 0
    if not (backend.on_cpu and intra is not None):
        raise LoneFrameError(
            f"a lone-frame session is a multi-threaded ONNX Runtime session on the CPU, which the "
            f"{backend.name} backend{'' if backend.on_cpu else ' on its device'} cannot make: use 0 or 'auto'"
        )
    if setting < 2:
        raise LoneFrameError(f"{setting} thread is what every inference worker has already: use 0 or ≥ 2")
    return setting


def lone_like(template: Backend, threads: int) -> Backend:
    """``template``'s kind and options for batches of one, on ``threads`` intra-op threads."""
    options = template.options.model_copy(update={"intra_op_threads": threads})
    return type(template)(template.package, max_batch=1, options=options)


def time_one(backend: Backend) -> float:
    """Median seconds of a batch of one (after one untimed run)."""
    return backend.time_batches(float("inf"), repeats=_RUNS, untimed=1, largest=1)[1]


@dataclass(frozen=True, slots=True)
class LoneFrameStart:
    """What start-up decided: the session (None = none) and why."""

    session: Backend | None
    threads: int
    worker_ms: float | None = None
    lone_ms: float | None = None
    reason: str = ""

    def describe(self) -> dict[str, Any]:
        return {
            "threads": self.threads if self.session is not None else 0,
            "worker_b1_ms": None if self.worker_ms is None else round(self.worker_ms, 2),
            "lone_b1_ms": None if self.lone_ms is None else round(self.lone_ms, 2),
            "reason": self.reason,
        }


def start_lone_frame(worker: Backend, threads: int, *, explicit: bool) -> LoneFrameStart:
    """Create, enter and time the lone-frame session against ``worker`` (an entered worker backend, idle).
    Kept when ``explicit`` or at least :data:`MIN_GAIN` faster; otherwise closed again."""
    if threads == 0:
        return LoneFrameStart(None, 0, reason="off")
    session = lone_like(worker, threads)
    session.__enter__()
    try:
        lone_s = time_one(session)
        worker_s = time_one(worker)
    except BaseException:
        session.__exit__(None, None, None)
        raise
    keep = explicit or lone_s <= (1.0 - MIN_GAIN) * worker_s
    reason = (
        "configured"
        if explicit
        else f"{'at least' if keep else 'less than'} {MIN_GAIN * 100:.0f} % faster than a worker's batch of one"
    )
    if not keep:
        session.__exit__(None, None, None)
    return LoneFrameStart(session if keep else None, threads, worker_s * 1000.0, lone_s * 1000.0, reason)
