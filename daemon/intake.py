"""The intake queue: bounded, and the one place where the backpressure policy is applied.

``queue.Queue`` cannot drop its *oldest* item atomically with a put, and a consumer racing between the two
would make ``reject_oldest`` lose or double-handle frames; hence this small deque + condition.
"""

from __future__ import annotations

import collections
import threading
import time

from daemon.ledger import Job
from daemon.settings import Backpressure


class IntakeQueue:
    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be ≥ 1, got {maxsize}")
        self.maxsize = maxsize
        self._items: collections.deque[Job] = collections.deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._closed = False
        self._woken = False  # wake() was called: the next get returns at once (None when nothing is queued)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, job: Job, policy: Backpressure) -> Job | None:
        """Queue ``job``; returns the job the policy refused (the new one or the oldest), or None.

        After :meth:`close` every put is refused: the caller settles it (a shutdown verdict).
        """
        with self._lock:
            if policy is Backpressure.BLOCK:
                while len(self._items) >= self.maxsize and not self._closed:
                    self._not_full.wait()
            if self._closed:
                return job
            refused: Job | None = None
            if len(self._items) >= self.maxsize:
                if policy is Backpressure.REJECT_NEWEST:
                    return job
                refused = self._items.popleft()  # REJECT_OLDEST
            self._items.append(job)
            self._not_empty.notify()
            return refused

    def wait_for_room(self, timeout: float) -> bool:
        """For BLOCK sources: wait until a put would not block, before creating the frame (its clock starts
        at arrival, and a file waiting on disk has not arrived yet). False on timeout or when closed."""
        end = time.monotonic() + timeout
        with self._lock:
            while len(self._items) >= self.maxsize and not self._closed:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return False
                self._not_full.wait(remaining)
            return not self._closed

    def get(self, timeout: float | None = None) -> Job | None:
        """Next job in arrival order; None on timeout, after :meth:`wake`, or when closed and empty (end of
        stream)."""
        with self._lock:
            if not self._items and not self._closed and not self._woken:
                self._not_empty.wait(timeout)
            self._woken = False
            if not self._items:
                return None
            job = self._items.popleft()
            self._not_full.notify()
            return job

    def wake(self) -> None:
        """Make the getter return now, with or without a job, so it can look again at why it was waiting (the
        batcher: an inference worker became free). Not lost when nobody waits yet: the next get returns."""
        with self._lock:
            self._woken = True
            self._not_empty.notify_all()

    def close(self) -> None:
        """No more puts; getters drain what is queued and then see end of stream; blocked putters return."""
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()

    def drain_closed(self) -> bool:
        return self._closed and not self._items
