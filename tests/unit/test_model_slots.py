"""The model slots and the switch (daemon/models.py), and shadow scoring's bookkeeping (daemon/shadow.py).

A production change waits for the batch in flight and holds the next one back, falls between two ``seq``, and
every fail-safe REJECT names the model in production when it was settled, wherever it was made. Real threads,
a real ledger; the models are deciders without a network (the switch never runs one).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from daemon.decision import Decider
from daemon.ledger import Ledger
from daemon.metrics import Metrics
from daemon.models import ModelError, ModelSlots, ServedModel
from daemon.settings import ShadowSettings
from daemon.shadow import Offered, ShadowScorer, disagreement
from daemon.types import Frame, Outcome, Reason, Verdict
from engine.backend import create_backend
from engine.package import Decision, load_package
from tests.helpers import tiny_package


def model(
    name: str, threshold: float = 0.5, backends: list[Any] | None = None, package: Any = None
) -> ServedModel:
    return ServedModel(package, name, Decider(Decision(threshold=threshold), name), backends or [], "")


def frame(fid: str) -> Frame:
    return Frame("camera", 1, fid, time.monotonic(), time.time(), image=np.zeros((8, 8), np.uint8))


class Line:
    """Slots over a real ledger, as the pipeline wires them."""

    def __init__(self, production: ServedModel) -> None:
        self.ledger = Ledger(
            max_latency_s=60.0,
            expire=lambda job, reason: self.slots.reject(job.frame, reason),
            monotonic=time.monotonic,
            restamp=lambda v: self.slots.restamp(v),
        )
        self.slots = ModelSlots(production, ledger=self.ledger)

    def published(self) -> list[tuple[int, str, float]]:
        """(seq, model, threshold) of everything settled so far, in publication order (seq = position)."""
        out = []
        while not self.ledger.out.empty():
            item = self.ledger.out.get()
            assert item is not None
            out.append((len(out) + 1, item.verdict.model, item.verdict.threshold))
        return out


def promote_to(line: Line, new: ServedModel) -> None:
    line.slots.set_production(new)


@pytest.mark.timeout(20)
def test_a_switch_waits_for_the_batch_in_flight_holds_the_next_back_and_falls_between_two_seq() -> None:
    a, b = model("A", 0.5), model("B", 0.7)
    line = Line(a)
    jobs = [line.ledger.admit(frame(f"f{i}")) for i in range(4)]
    line.ledger.settle(jobs[0], line.slots.reject(jobs[0].frame, Reason.DECODE_ERROR))  # seq 1, by A

    in_batch, finish = threading.Event(), threading.Event()

    def batch() -> None:  # an inference worker deciding jobs[1] with the model it read at the batch's start
        with line.slots.serving() as (served, _):
            in_batch.set()
            finish.wait(10)
            line.ledger.settle(jobs[1], served.decider.decide(jobs[1].frame, 0.1, {}))

    seen: dict[str, Any] = {}

    def switch() -> None:
        seen["first_seq"] = line.slots.switch(lambda: promote_to(line, b), timeout_s=10)

    def next_batch() -> None:
        with line.slots.serving() as (served, _):
            seen["next"] = served.model_id
            line.ledger.settle(jobs[2], served.decider.decide(jobs[2].frame, 0.1, {}))

    worker = threading.Thread(target=batch)
    worker.start()
    assert in_batch.wait(10)
    switcher = threading.Thread(target=switch)
    switcher.start()
    switcher.join(0.3)
    assert switcher.is_alive(), "the switch did not wait for the batch in flight"
    late = threading.Thread(target=next_batch)
    late.start()
    late.join(0.3)
    assert late.is_alive() and "next" not in seen, "a batch started while a switch was pending"
    finish.set()
    for t in (worker, switcher, late):
        t.join(10)
        assert not t.is_alive()
    line.ledger.settle(jobs[3], line.slots.reject(jobs[3].frame, Reason.OVERLOAD))
    assert seen == {"first_seq": 3, "next": "B"}
    assert line.published() == [(1, "A", 0.5), (2, "A", 0.5), (3, "B", 0.7), (4, "B", 0.7)]


def test_a_reject_made_before_a_switch_and_settled_after_it_names_the_new_production() -> None:
    a, b = model("A", 0.5), model("B", 0.7)
    line = Line(a)
    job = line.ledger.admit(frame("f1"))
    made = line.slots.reject(job.frame, Reason.DECODE_ERROR, {"error": "truncated"})  # on a pool thread
    assert made.model == "A"
    assert line.slots.switch(lambda: promote_to(line, b), timeout_s=1) == 1
    published = line.ledger.settle(job, made)  # settled after the switch
    assert published is not None and (published.model, published.threshold) == ("B", 0.7)
    assert published.reason is Reason.DECODE_ERROR and published.detail == {"error": "truncated"}
    assert line.published() == [(1, "B", 0.7)]


def test_rejects_the_ledger_makes_itself_name_the_production_of_their_moment() -> None:
    a, b = model("A"), model("B", 0.7)
    line = Line(a)
    line.ledger.admit(frame("f1"))
    line.slots.switch(lambda: promote_to(line, b), timeout_s=1)
    assert line.ledger.settle_all(Reason.SHUTDOWN) == 1  # as the deadline watchdog's, made under its lock
    assert line.published() == [(1, "B", 0.7)]


@pytest.mark.timeout(20)
def test_a_switch_that_cannot_happen_in_time_changes_nothing_and_leaves_the_gate_open() -> None:
    a, b = model("A"), model("B")
    line = Line(a)
    release = threading.Event()
    entered = threading.Event()

    def stuck_batch() -> None:
        with line.slots.serving():
            entered.set()
            release.wait(10)

    t = threading.Thread(target=stuck_batch)
    t.start()
    assert entered.wait(10)
    with pytest.raises(ModelError, match="production unchanged"):
        line.slots.switch(lambda: promote_to(line, b), timeout_s=0.2)
    assert line.slots.production is a
    release.set()
    t.join(10)
    with line.slots.serving() as (served, _):  # batches flow again
        assert served is a


def verdict(outcome: Outcome, score: float) -> Verdict:
    reason = Reason.MODEL
    return Verdict("f", "camera", outcome, reason, score, 0.5, "m", None, 0.0)


@pytest.mark.parametrize(
    ("prod", "cand", "kind"),
    [
        ((Outcome.PASS, 0.2), (Outcome.REJECT, 0.6), "pass_reject"),
        ((Outcome.REJECT, 0.6), (Outcome.PASS, 0.55), "reject_pass"),  # a flip, however close the scores
        ((Outcome.PASS, 0.1), (Outcome.PASS, 0.25), "score"),
        ((Outcome.PASS, 0.1), (Outcome.PASS, 0.2), None),  # within the tolerance
        ((Outcome.REJECT, 0.9), (Outcome.REJECT, 0.95), None),
    ],
)
def test_disagreement_kinds(
    prod: tuple[Outcome, float], cand: tuple[Outcome, float], kind: str | None
) -> None:
    assert disagreement(verdict(*prod), verdict(*cand), tolerance=0.1) == kind


@pytest.mark.timeout(60)
def test_shadow_skips_what_it_has_no_room_for_and_reports_the_sampled_share(tmp_path: Path) -> None:
    """queue_batches = 1 and the scorer not yet running: of two batches offered, one waits, one is skipped; once
    the scorer runs it scores the one, and the share it reports is 1/2 (counter, gauge and tally agree)."""
    tiny_package(tmp_path / "pkg", input_size=(16, 16))
    package = load_package(tmp_path / "pkg")
    backend = create_backend("onnxruntime", package, max_batch=4, intra_op_threads=1)
    registry = CollectorRegistry()
    metrics = Metrics(registry, "t", process_collector=False)
    prod, cand = model("A"), model("B", backends=[backend], package=package)
    line = Line(prod)
    line.slots.candidate, line.slots.shadowing = cand, True
    shadow = ShadowScorer(line.slots, metrics, ShadowSettings(queue_batches=1, nice=0))
    x = np.zeros((2, 1, 16, 16), np.float32)
    rows = [Offered(i, frame(f"f{i}"), None, verdict(Outcome.REJECT, 0.99)) for i in range(2)]
    with backend:
        # What the candidate will say of these rows, and so the kind each scored row must be counted under.
        score = float(1 / (1 + np.exp(-float(backend.infer(x[:1])[0]))))
        expected = "reject_pass" if score < 0.5 else "score" if 0.99 - score > 0.1 else None
        shadow.offer(cand, x, rows)
        shadow.offer(cand, x, rows)  # no room: skipped, never waited for
        assert cand.shadow.snapshot()["offered"] == 4
        shadow.start()
        try:
            deadline = time.monotonic() + 30
            while cand.shadow.snapshot()["scored"] < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            assert shadow.stop(10)
    tally = cand.shadow.snapshot()
    assert (tally["offered"], tally["scored"], tally["sampled_share"], tally["errors"]) == (4, 2, 0.5, 0)

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"line": "t", **labels})

    assert sample("inspectd_shadow_offered_frames_total") == 4
    assert sample("inspectd_shadow_frames_total") == 2
    assert sample("inspectd_shadow_sampled_ratio") == 0.5
    for kind, n in tally["disagreements"].items():  # each scored row under one kind (or none), both places
        assert n == (2 if kind == expected else 0) == sample("inspectd_shadow_disagreements_total", kind=kind)
    assert sample("inspectd_shadow_score_difference_count") == 2


def test_shadow_yields_to_production_at_the_limit_of_the_machine() -> None:
    """While production is short of capacity every batch offered is skipped, never queued (and so never
    scored): the share says so."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, "t", process_collector=False)
    cand = model("B")
    line = Line(model("A"))
    line.slots.candidate, line.slots.shadowing = cand, True
    short = {"now": True}
    shadow = ShadowScorer(
        line.slots, metrics, ShadowSettings(queue_batches=8), capacity_short=lambda: short["now"]
    )
    rows = [Offered(0, frame("f0"), None, verdict(Outcome.PASS, 0.01))]
    x = np.zeros((1, 1, 16, 16), np.float32)
    for _ in range(3):
        shadow.offer(cand, x, rows)
    assert shadow._q.qsize() == 0
    short["now"] = False
    shadow.offer(cand, x, rows)
    assert shadow._q.qsize() == 1
    assert cand.shadow.snapshot()["offered"] == 4
    assert registry.get_sample_value("inspectd_shadow_offered_frames_total", {"line": "t"}) == 4
