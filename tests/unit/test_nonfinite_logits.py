"""Issue 16, finding 3: the logit is checked before its sigmoid is believed. ``sigmoid(-inf)`` is exactly 0.0 (a
confident PASS) and ``sigmoid(+inf)`` 1.0; an FP16 engine that overflows returns exactly those. A non-finite or
implausibly large logit (|logit| > ``MAX_ABS_LOGIT`` = 1e4) is REJECT ``engine_error`` for its own frame, counted;
an output that is not one number per frame fails the whole batch."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.decision import MAX_ABS_LOGIT, Decider
from daemon.pipeline import Pipeline
from daemon.settings import Backpressure, Settings
from daemon.types import Frame, Outcome, Reason
from engine.backend import Backend, sigmoid
from engine.package import Decision, ModelPackage, load_package
from tests.helpers import next_settled, pipeline_for, tiny_package

FRAME = Frame("cam", 1, "part-1", time.monotonic(), time.time())
DECIDER = Decider(Decision(threshold=0.5), "m@1")


def _score(logit: float) -> float:
    """The score the inference stage computes for this logit (the same sigmoid, float32)."""
    return float(sigmoid(np.array([logit], np.float32))[0])


# ------------------------------------------------------------------------------------------------ Decider
@pytest.mark.parametrize(
    "logit",
    [-math.inf, math.inf, math.nan, -65504.0, 65504.0, MAX_ABS_LOGIT * 1.0001, -2e4],
    ids=["-inf", "+inf", "nan", "fp16-min", "fp16-max", "just-above-limit", "-2e4"],
)
def test_an_implausible_logit_is_an_engine_error_whatever_its_score(logit: float) -> None:
    score = _score(logit)
    v = DECIDER.decide(FRAME, score, {"infer": 1.0}, logit=logit)
    assert (v.outcome, v.reason, v.score) == (Outcome.REJECT, Reason.ENGINE_ERROR, None)
    assert v.detail is not None and repr(logit) in v.detail["error"] and "10000" in v.detail["error"]
    json.dumps(v.detail, allow_nan=False)  # what the publisher sends: the logit is text, not a bare NaN/inf
    assert v.timings_ms == {"infer": 1.0}


def test_the_fp16_overflow_that_motivated_it_would_otherwise_pass() -> None:
    """The bug itself: -inf → score exactly 0.0, which the score check alone accepts as a PASS."""
    assert _score(-math.inf) == 0.0 and _score(math.inf) == 1.0
    assert DECIDER.decide(FRAME, 0.0, {}).outcome is Outcome.PASS  # without the logit: nothing to see
    assert DECIDER.decide(FRAME, 0.0, {}, logit=-math.inf).reason is Reason.ENGINE_ERROR


@pytest.mark.parametrize(
    ("logit", "outcome"),
    [
        (-MAX_ABS_LOGIT, Outcome.PASS),
        (-20.0, Outcome.PASS),
        (0.0, Outcome.REJECT),
        (MAX_ABS_LOGIT, Outcome.REJECT),
    ],
)
def test_plausible_logits_are_decided_by_the_threshold(logit: float, outcome: Outcome) -> None:
    v = DECIDER.decide(FRAME, _score(logit), {}, logit=logit)
    assert (v.outcome, v.reason, v.score) == (outcome, Reason.MODEL, _score(logit))


# ------------------------------------------------------------------------------------------ the pipeline
class LogitScript(Backend):
    """Returns the next scripted output per row, in arrival order (one worker: row order = submit order).
    ``outputs`` entries are logits; a whole-batch ``override`` replaces the output of the next call."""

    name = "logit-script"

    def __init__(self, package: ModelPackage, **kw: Any) -> None:
        super().__init__(package, **kw)
        self.logits: list[float] = []
        self.override: Any = None
        self.entered = 0
        self._lock = threading.Lock()

    def _open(self) -> None:
        self.entered += 1

    def _close(self) -> None:
        pass

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            if self.override is not None:
                out, self.override = self.override, None
                return np.asarray(out)
            n = batch.shape[0]
            taken, self.logits = self.logits[:n], self.logits[n:]
        return np.asarray(taken, np.float32)


@pytest.fixture
def package(tmp_path: Path) -> ModelPackage:
    tiny_package(tmp_path / "pkg", input_size=(16, 16))
    return load_package(tmp_path / "pkg")


def _pipeline(package: ModelPackage, backend: Backend) -> Pipeline:
    settings = Settings(
        # One worker: the scripted backend answers its batches in order.
        batching={"max_batch": 4, "max_wait_ms": 50.0, "preprocess_threads": 1, "inference_workers": 1},
        deadlines={"max_latency_ms": 10_000},
        model={"warmup": False},
    )
    return pipeline_for(settings, package, backend)


def _run(p: Pipeline, n: int) -> dict[str, Any]:
    img = np.full((32, 32), 128, np.uint8)
    p.start()
    try:
        for i in range(n):
            p.submit(
                Frame("camera", i, f"f{i}", time.monotonic(), time.time(), image=img), Backpressure.BLOCK
            )
        items = [next_settled(p.settled) for _ in range(n)]
    finally:
        p.drain(5.0)
    return {i.verdict.frame_id: i.verdict for i in items if i is not None}


@pytest.mark.timeout(30)
def test_each_implausible_logit_rejects_its_own_frame_and_is_counted(package: ModelPackage) -> None:
    backend = LogitScript(package, max_batch=4)
    backend.logits = [-math.inf, -3.0, math.nan, math.inf, 65504.0, 3.0]
    p = _pipeline(package, backend)
    verdicts = _run(p, 6)
    got = {fid: (v.outcome, v.reason) for fid, v in verdicts.items()}
    assert got == {
        "f0": (Outcome.REJECT, Reason.ENGINE_ERROR),  # -inf: score 0.0, a PASS without the check
        "f1": (Outcome.PASS, Reason.MODEL),
        "f2": (Outcome.REJECT, Reason.ENGINE_ERROR),
        "f3": (Outcome.REJECT, Reason.ENGINE_ERROR),
        "f4": (Outcome.REJECT, Reason.ENGINE_ERROR),
        "f5": (Outcome.REJECT, Reason.MODEL),
    }
    assert "-inf" in verdicts["f0"].detail["error"]  # type: ignore[index]
    assert verdicts["f1"].score == _score(-3.0)
    assert p.worker.invalid_logits == 4  # and each is an engine_error verdict, counted as such when published
    # Per frame, not per batch: the backend was not re-created, the worker does not count a failure.
    assert backend.entered == 1 and p.worker.consecutive_failures == 0 and p.worker.frames_inferred == 6


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "output",
    [np.array(["oops"], dtype=object), np.array([[0.5]], np.float32)],
    ids=["string", "2-d"],
)
def test_an_output_that_is_not_one_number_per_frame_rejects_the_batch_and_the_worker_goes_on(
    package: ModelPackage, output: np.ndarray
) -> None:
    backend = LogitScript(package, max_batch=4)
    backend.override = output
    backend.logits = [-2.0]
    p = _pipeline(package, backend)
    img = np.full((32, 32), 128, np.uint8)
    p.start()
    try:
        p.submit(Frame("camera", 0, "f0", time.monotonic(), time.time(), image=img), Backpressure.BLOCK)
        first = next_settled(p.settled)
        p.submit(Frame("camera", 1, "f1", time.monotonic(), time.time(), image=img), Backpressure.BLOCK)
        after = next_settled(p.settled)
        assert p.worker.alive  # the malformed output did not kill the inference stage
    finally:
        p.drain(5.0)
    assert first is not None and (first.verdict.outcome, first.verdict.reason) == (
        Outcome.REJECT,
        Reason.ENGINE_ERROR,
    )
    assert after is not None and (after.verdict.outcome, after.verdict.reason) == (Outcome.PASS, Reason.MODEL)
    assert backend.entered == 2  # the failed batch re-created the backend, as for an exception
