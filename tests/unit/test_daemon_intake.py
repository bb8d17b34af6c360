from __future__ import annotations

import sys
import threading
import time

import pytest

from daemon.intake import IntakeQueue
from daemon.ledger import Job
from daemon.settings import Backpressure
from daemon.types import Frame
from tests.helpers import wait_until


def job(i: int) -> Job:
    return Job(i, Frame("cam", i, f"f{i}", time.monotonic(), time.time()), time.monotonic() + 1)


def waiting_in(thread: threading.Thread, function: str) -> bool:
    """True while ``thread`` waits inside ``threading`` (a Condition) called from ``function``: where a
    blocking call is once it has found that it must wait."""
    top = sys._current_frames().get(thread.ident) if thread.ident is not None else None
    frame = top
    while frame is not None and frame.f_code.co_filename == threading.__file__:
        frame = frame.f_back
    return frame is not None and frame is not top and frame.f_code.co_name == function


def keys(q: IntakeQueue) -> list[int]:
    out = []
    while (j := q.get(timeout=0)) is not None:
        out.append(j.key)
    return out


def test_reject_newest_refuses_the_arriving_frame() -> None:
    q = IntakeQueue(2)
    assert q.put(job(1), Backpressure.REJECT_NEWEST) is None
    assert q.put(job(2), Backpressure.REJECT_NEWEST) is None
    refused = q.put(job(3), Backpressure.REJECT_NEWEST)
    assert refused is not None and refused.key == 3
    assert keys(q) == [1, 2]


def test_reject_oldest_refuses_the_head_and_keeps_order() -> None:
    q = IntakeQueue(2)
    q.put(job(1), Backpressure.REJECT_OLDEST)
    q.put(job(2), Backpressure.REJECT_OLDEST)
    refused = q.put(job(3), Backpressure.REJECT_OLDEST)
    assert refused is not None and refused.key == 1
    assert keys(q) == [2, 3]


@pytest.mark.timeout(10)
def test_block_waits_for_room_and_close_releases_it() -> None:
    q = IntakeQueue(1)
    q.put(job(1), Backpressure.BLOCK)
    results: list[object] = []
    t = threading.Thread(target=lambda: results.append(q.put(job(2), Backpressure.BLOCK)))
    t.start()
    wait_until(lambda: waiting_in(t, "put"), 5, "a BLOCK put into a full queue to wait for room")
    assert t.is_alive() and results == []
    assert q.get(timeout=0).key == 1  # type: ignore[union-attr]
    t.join(2)
    assert results == [None] and len(q) == 1
    # Full again: a blocked put is released by close() and refused (the caller settles it as shutdown).
    t2 = threading.Thread(target=lambda: results.append(q.put(job(3), Backpressure.BLOCK)))
    t2.start()
    wait_until(lambda: waiting_in(t2, "put"), 5, "the second BLOCK put to wait for room")
    q.close()
    t2.join(2)
    assert isinstance(results[-1], Job) and results[-1].key == 3
    assert q.get(timeout=0).key == 2  # type: ignore[union-attr]  # what was queued still drains
    assert q.get(timeout=0) is None and q.drain_closed()


def test_wait_for_room_times_out_when_full() -> None:
    q = IntakeQueue(1)
    assert q.wait_for_room(0.0)
    q.put(job(1), Backpressure.BLOCK)
    t0 = time.monotonic()
    assert not q.wait_for_room(0.05)
    assert time.monotonic() - t0 >= 0.04
