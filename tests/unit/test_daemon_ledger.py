"""The settle-once table: exactly one verdict per admitted frame, whoever races for it."""

from __future__ import annotations

import threading
import time

import pytest

from daemon.decision import Decider
from daemon.ledger import Job, Ledger, Settled
from daemon.types import Frame, Outcome, Reason
from engine.package import Decision

DECIDER = Decider(Decision(threshold=0.5), "m@1")


def frame(i: int, t: float | None = None) -> Frame:
    return Frame("cam", i, f"f{i}", time.monotonic() if t is None else t, time.time())


def make_ledger(max_latency_s: float = 10.0) -> Ledger:
    return Ledger(
        max_latency_s=max_latency_s,
        expire=lambda job, reason: DECIDER.reject(job.frame, reason),
        monotonic=time.monotonic,
    )


def drain(ledger: Ledger) -> list[Settled]:
    out = []
    while not ledger.out.empty():
        item = ledger.out.get()
        assert item is not None
        out.append(item)
    return out


def test_second_settle_loses() -> None:
    ledger = make_ledger()
    job = ledger.admit(frame(1))
    assert ledger.settle(job, DECIDER.decide(job.frame, 0.1, {}))
    assert ledger.settle(job, DECIDER.reject(job.frame, Reason.DEADLINE)) is None
    (item,) = drain(ledger)
    assert item.verdict.outcome is Outcome.PASS and item.job is job


@pytest.mark.timeout(30)
def test_racing_result_and_deadline_paths_publish_exactly_once() -> None:
    """Two threads settle the same 20 000 jobs concurrently: each job comes out exactly once."""
    ledger = make_ledger()
    jobs = [ledger.admit(frame(i)) for i in range(20_000)]
    wins = [0, 0]
    start = threading.Barrier(2)

    def racer(idx: int, order: list[Job]) -> None:
        start.wait()
        for j in order:
            if ledger.settle(j, DECIDER.reject(j.frame, Reason.DEADLINE if idx else Reason.ENGINE_ERROR)):
                wins[idx] += 1

    threads = [
        threading.Thread(target=racer, args=(0, jobs)),
        threading.Thread(target=racer, args=(1, list(reversed(jobs)))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    items = drain(ledger)
    assert sum(wins) == len(jobs) == len(items)
    assert sorted(i.job.key for i in items) == [j.key for j in jobs]
    assert min(wins) > 0  # the race really happened from both ends
    assert ledger.pending_count == 0


@pytest.mark.timeout(30)
def test_deadline_watchdog_fires_on_time_and_only_for_pending() -> None:
    ledger = make_ledger(max_latency_s=0.05)
    ledger.start()
    try:
        t0 = time.monotonic()
        decided = ledger.admit(frame(1, t0))
        expiring = ledger.admit(frame(2, t0))
        assert ledger.settle(decided, DECIDER.decide(decided.frame, 0.9, {}))
        first = ledger.out.get(timeout=5)
        second = ledger.out.get(timeout=5)
        t_fired = time.monotonic()
    finally:
        ledger.stop()
    assert first is not None and first.job is decided and first.verdict.reason is Reason.MODEL
    assert second is not None and second.job is expiring and second.verdict.reason is Reason.DEADLINE
    assert second.t_settled >= expiring.deadline
    assert second.t_settled - expiring.deadline < 0.02, "deadline verdict settled too late"
    assert t_fired - t0 < 1.0
    assert ledger.out.empty()


def test_settle_all_and_close_end_the_stream() -> None:
    ledger = make_ledger()
    jobs = [ledger.admit(frame(i)) for i in range(3)]
    ledger.settle(jobs[1], DECIDER.decide(jobs[1].frame, 0.2, {}))
    assert ledger.settle_all(Reason.SHUTDOWN) == 2
    ledger.close()
    items = []
    while (item := ledger.out.get(timeout=1)) is not None:
        items.append(item)
    assert [i.job.key for i in items] == [jobs[1].key, jobs[0].key, jobs[2].key]
    assert [i.verdict.reason for i in items] == [Reason.MODEL, Reason.SHUTDOWN, Reason.SHUTDOWN]
    with pytest.raises(RuntimeError):
        ledger.admit(frame(9))


class FakeClock:
    """The ledger's monotonic clock, moved by the test (daemon.clock: injectable for deadline logic)."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def fake_ledger(clock: FakeClock, max_latency_s: float = 0.25) -> Ledger:
    return Ledger(
        max_latency_s=max_latency_s,
        expire=lambda job, reason: DECIDER.reject(job.frame, reason, {"max_latency_ms": 250}),
        monotonic=clock,
    )


@pytest.mark.parametrize("score", [0.1, 0.9], ids=["pass", "reject"])
def test_a_model_result_settled_after_the_deadline_is_a_deadline_reject(score: float) -> None:
    """Issue 16, finding 4: the watchdog has not run (it is late: not even started here), the deadline has
    passed by the ledger's clock, and the model's result arrives: it must not be published as its verdict."""
    clock = FakeClock()
    ledger = fake_ledger(clock)
    job = ledger.admit(frame(1, clock.t))
    result = DECIDER.decide(job.frame, score, {"infer": 3.0})
    clock.t = job.deadline + 0.040  # 40 ms late
    published = ledger.settle(job, result)
    (item,) = drain(ledger)
    assert published is item.verdict and published is not result
    v = item.verdict
    assert (v.outcome, v.reason, v.score) == (Outcome.REJECT, Reason.DEADLINE, None)
    assert v.detail == {
        "max_latency_ms": 250,
        "late_result": {
            "outcome": result.outcome.value,
            "reason": "model",
            "score": score,
            "detail": None,
            "ms_after_deadline": 40.0,
        },
    }
    assert v.timings_ms == {"infer": 3.0} and item.t_settled == clock.t
    assert ledger.pending_count == 0 and ledger.settle(job, result) is None  # still exactly one verdict


def test_at_the_deadline_is_too_late_and_just_before_it_is_not() -> None:
    """The same boundary as the watchdog's (a deadline <= now has expired)."""
    clock = FakeClock()
    ledger = fake_ledger(clock)
    on_time, at_deadline = ledger.admit(frame(1, clock.t)), ledger.admit(frame(2, clock.t))
    clock.t = on_time.deadline - 1e-6
    ok = DECIDER.decide(on_time.frame, 0.1, {})
    assert ledger.settle(on_time, ok) is ok
    clock.t = at_deadline.deadline
    late = ledger.settle(at_deadline, DECIDER.decide(at_deadline.frame, 0.1, {}))
    assert late is not None and late.reason is Reason.DEADLINE
    assert [i.verdict.outcome for i in drain(ledger)] == [Outcome.PASS, Outcome.REJECT]


def test_a_late_fail_safe_reject_keeps_its_reason() -> None:
    """Only model results are turned into deadline rejects: a late engine error is a REJECT already, and its
    reason says more than ``deadline`` would."""
    clock = FakeClock()
    ledger = fake_ledger(clock)
    job = ledger.admit(frame(1, clock.t))
    clock.t += 10.0
    error = DECIDER.reject(job.frame, Reason.ENGINE_ERROR, {"error": "boom"})
    assert ledger.settle(job, error) is error
    (item,) = drain(ledger)
    assert item.verdict is error


@pytest.mark.parametrize("keep", [True, False])
def test_a_settled_frame_lets_its_pixels_go_unless_something_after_publish_needs_them(keep: bool) -> None:
    """Without an after-publish handler (audit, folder journal, replay listener) nothing reads a settled frame's
    pixels: settling drops them, so a publish queue that falls behind holds verdicts, not images. The frame's
    identity (id, source, times, path, label) stays; a stage reading the frame after that sees it settled."""
    import numpy as np

    ledger = make_ledger(max_latency_s=0.05)
    ledger.keep_frames = keep
    pixels, data = np.ones((64, 64), np.uint8), b"\x89PNG...."
    decided = ledger.admit(
        Frame("cam", 1, "f1", time.monotonic(), time.time(), image=pixels, path="/x/f1.png")
    )
    refused = ledger.admit(Frame("cam", 2, "f2", time.monotonic(), time.time(), data=data, label="NG"))
    expiring = ledger.admit(Frame("cam", 3, "f3", time.monotonic(), time.time(), image=pixels))
    ledger.start()
    try:
        ledger.settle(decided, DECIDER.decide(decided.frame, 0.1, {}))
        ledger.settle(refused, DECIDER.reject(refused.frame, Reason.OVERLOAD))
        items = [ledger.out.get(timeout=5) for _ in range(3)]  # the third: the watchdog's deadline REJECT
    finally:
        ledger.stop()
    assert [i.job.frame.frame_id for i in items if i is not None] == ["f1", "f2", "f3"]
    for job in (decided, refused, expiring):
        assert not ledger.is_pending(job)
        held = job.frame.image is not None or job.frame.data is not None
        assert held is keep
    assert decided.frame.path == "/x/f1.png" and refused.frame.label == "NG" and expiring.frame.seq == 3


def test_work_after_published_queues_behind_the_verdicts_and_takes_no_seq() -> None:
    ledger = make_ledger()
    jobs = [ledger.admit(frame(i)) for i in range(2)]
    ledger.settle(jobs[0], DECIDER.reject(jobs[0].frame, Reason.DEADLINE))
    ledger.after_published(lambda: None)
    ledger.settle(jobs[1], DECIDER.reject(jobs[1].frame, Reason.DEADLINE))
    items = [ledger.out.get_nowait() for _ in range(3)]
    assert [type(i).__name__ for i in items] == ["Settled", "Deferred", "Settled"]
    with ledger.exclusive() as seq:
        assert seq == 2  # the two verdicts only
