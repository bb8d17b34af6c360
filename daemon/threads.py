"""The one thread of a pipeline stage: started once, joined with a bound, asked whether it still runs."""

from __future__ import annotations

import threading
from collections.abc import Callable


class StageThread:
    """Mixin for the stages that own a thread (batcher, inference, publisher, watchdog, sources).

    Daemon threads, so a stage wedged in native code cannot keep the process alive after ``stop()`` gave up
    on it; the supervisor reads ``alive`` to report not-ready when a stage died.
    """

    _thread: threading.Thread | None = None

    def _spawn(self, target: Callable[[], object], name: str) -> None:
        self._thread = threading.Thread(target=target, name=name, daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> bool:
        """True when the thread has ended (or never started) within ``timeout`` seconds."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
