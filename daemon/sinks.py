"""After-publish work (audit archive, folder moves, in-process listeners) on its own thread.

Slow disks must never delay a verdict: the publisher only offers items here. When the bounded queue is full an
item is skipped with a warning and a count — the verdict itself has already gone out.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from typing import Any

from daemon.logs import get_logger
from daemon.publisher import AfterPublish
from daemon.types import Frame, Verdict

log = get_logger(__name__)


class AfterPublishWorker:
    def __init__(self, handlers: Sequence[AfterPublish], *, queue_size: int = 1024) -> None:
        self.handlers = list(handlers)
        self._q: queue.Queue[tuple[Verdict, Frame, dict[str, Any]] | None] = queue.Queue(queue_size)
        self._thread: threading.Thread | None = None
        self.skipped = 0

    def offer(self, verdict: Verdict, frame: Frame, message: dict[str, Any]) -> None:
        try:
            self._q.put_nowait((verdict, frame, message))
        except queue.Full:
            self.skipped += 1
            log.warning(
                "after-publish queue full; entry skipped", frame_id=verdict.frame_id, skipped=self.skipped
            )

    @property
    def alive(self) -> bool:
        """Whether the stage's thread runs (the supervisor stops the daemon when it does not)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="after-publish", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Finish what is queued, then end."""
        if self._thread is None:
            return
        try:
            self._q.put(None, timeout=timeout)
        except queue.Full:
            log.warning("after-publish stage did not drain in time", queued=self._q.qsize())
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            verdict, frame, message = item
            for handler in self.handlers:
                try:
                    handler(verdict, frame, message)
                except Exception:
                    log.exception(
                        "after-publish handler failed", frame_id=verdict.frame_id, handler=repr(handler)
                    )
