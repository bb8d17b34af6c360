"""The cyclic garbage collector on the frame path: what its pauses cost, and how little it has to look at.

CPython frees almost everything by reference counting; its cyclic collector runs besides, triggered by
allocation counts, and holds the GIL while it walks every tracked container of the generations it collects.
A full (generation 2) collection walks everything the process holds: after start-up that is the imported
modules, the settings, the model's metadata, ONNX Runtime's, OpenCV's and ZeroMQ's Python objects. Measured
with the default package on the 2-core development machine: 83 k tracked objects, a full collection 14-16 ms
(a whole frame's service time, every Python thread of the daemon stopped meanwhile).

In steady serving the collector barely runs: the bench counted 4 young collections (≤ 0.25 ms each) in a 10 s
saturation phase of ~800 frames and none at 5 or 20 fps, because a frame's objects are freed by reference
counting. A full collection is then rare, but when one comes (after a model change, a burst of new objects) it
falls on whichever frame is in flight. Two parts:

- :func:`freeze_startup` collects once and then ``gc.freeze()``s what start-up left alive: those objects move
  to the permanent generation, which no later collection walks (they are still freed by reference counting if
  they ever become garbage). A full collection of the same daemon then takes 0.01 ms instead of 14-16.
  :func:`unfreeze` gives them back when the daemon stops (an in-process restart, the tests). This is the use
  the ``gc.freeze`` documentation describes for long-running servers.
- :class:`GcPauses` times every collection (``gc.callbacks``) into ``inspectd_gc_pause_seconds{generation}``,
  so a tail-latency question ("was it the collector?") is answered from the metrics, not assumed. The
  callback costs two ``perf_counter`` calls and one histogram observation per collection.
"""

from __future__ import annotations

import contextlib
import gc
import time
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

# 50 µs … 100 ms: a young collection takes tens of µs, a full one of a loaded daemon tens of ms.
PAUSE_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 1e-1)


def freeze_startup() -> dict[str, Any]:
    """Collect what start-up left as garbage, then freeze every object still alive; returns what was done
    (``frozen`` objects, the collection's ``collected`` objects and ``ms``) for the ready line."""
    t0 = time.perf_counter()
    collected = gc.collect()
    gc.freeze()
    return {
        "frozen": gc.get_freeze_count(),
        "collected": collected,
        "ms": round(1000 * (time.perf_counter() - t0), 1),
    }


def unfreeze() -> None:
    """Give the frozen objects back to the collector (the oldest generation)."""
    gc.unfreeze()


class GcPauses:
    """``inspectd_gc_pause_seconds{line, generation}``: how long each cyclic collection held the GIL. Installed
    with :meth:`install`, removed with :meth:`remove` (idempotent)."""

    def __init__(self, registry: CollectorRegistry, line: str) -> None:
        self._hist = Histogram(
            "inspectd_gc_pause_seconds",
            "Cyclic garbage collections, by generation: how long each held the GIL (every daemon thread "
            "waits meanwhile).",
            ["line", "generation"],
            buckets=PAUSE_BUCKETS,
            registry=registry,
        )
        self._by_gen = [self._hist.labels(line, str(g)) for g in range(3)]
        self._t0 = 0.0
        self._installed = False

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        # Collections never overlap (the collector holds the GIL and does not re-enter), so one start time will do.
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0:
            self._by_gen[min(max(info.get("generation", 2), 0), 2)].observe(time.perf_counter() - self._t0)
            self._t0 = 0.0

    def install(self) -> None:
        """Called by the daemon's start (one thread), like :meth:`remove` by its stop."""
        if not self._installed:
            gc.callbacks.append(self._callback)
            self._installed = True

    def remove(self) -> None:
        if self._installed:
            with contextlib.suppress(ValueError):  # somebody else cleared gc.callbacks
                gc.callbacks.remove(self._callback)
            self._installed = False
