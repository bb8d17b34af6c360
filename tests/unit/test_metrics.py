from __future__ import annotations

import math
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from daemon.drift import PartImage
from daemon.metrics import (
    SCORE_BUCKETS,
    Metrics,
    MetricsServer,
    MetricsSink,
    ThreadCpuCollector,
    score_buckets,
    thread_role,
)
from daemon.types import Frame, Outcome, Reason, Verdict
from engine.package import Decision


class RecordingMetrics:
    """A MetricsSink double: records every call (mypy checks it is one, below)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[object, ...]]] = []

    def frame_received(self, source: str) -> None:
        self.calls.append(("frame_received", (source,)))

    def message_error(self, kind: str) -> None:
        self.calls.append(("message_error", (kind,)))

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.calls.append(("observe_stage", (stage,)))

    def observe_batch(self, size: int) -> None:
        self.calls.append(("observe_batch", (size,)))

    def late_result(self, n: int) -> None:
        self.calls.append(("late_result", (n,)))

    def observe_verdict(self, v: Verdict, latency_s: float) -> None:
        self.calls.append(("observe_verdict", (v.reason,)))

    def observe_parts(self, logits: Sequence[float], images: Sequence[PartImage]) -> None:
        self.calls.append(("observe_parts", (len(logits), len(images))))

    def named(self, name: str) -> list[tuple[object, ...]]:
        return [args for n, args in self.calls if n == name]


if TYPE_CHECKING:  # `mypy tests/unit/test_metrics.py` proves both are what the stages report to
    _PROMETHEUS: type[MetricsSink] = Metrics
    _DOUBLE: type[MetricsSink] = RecordingMetrics


def _verdict(outcome: Outcome, reason: Reason, score: float | None = 0.1) -> Verdict:
    return Verdict(
        frame_id="f", source="camera", outcome=outcome, reason=reason, score=score, threshold=0.5, model="m",
        t_capture=None, t_arrival=time.monotonic(),
    )  # fmt: skip


def test_label_values_exist_before_first_event() -> None:
    reg = CollectorRegistry()
    Metrics(reg, "L1", sources=("camera", "folder"))
    assert (
        reg.get_sample_value(
            "inspectd_verdicts_total", {"line": "L1", "verdict": "REJECT", "reason": "deadline"}
        )
        == 0
    )
    assert reg.get_sample_value("inspectd_frames_received_total", {"line": "L1", "source": "folder"}) == 0
    assert reg.get_sample_value("inspectd_ready", {"line": "L1"}) == 0
    assert reg.get_sample_value("inspectd_latency_seconds_count", {"line": "L1"}) == 0


def test_verdicts_latency_and_ng_ratio_window() -> None:
    reg = CollectorRegistry()
    m = Metrics(reg, "L1", ng_window=4)
    for outcome, reason in [
        (Outcome.PASS, Reason.MODEL),
        (Outcome.REJECT, Reason.MODEL),
        (Outcome.REJECT, Reason.GREY_ZONE),
        (Outcome.PASS, Reason.MODEL),
    ]:
        m.observe_verdict(_verdict(outcome, reason), 0.02)
    assert reg.get_sample_value("inspectd_ng_ratio", {"line": "L1"}) == 0.5
    m.observe_verdict(_verdict(Outcome.PASS, Reason.MODEL), 0.02)  # pushes the first PASS out of the window
    assert reg.get_sample_value("inspectd_ng_ratio", {"line": "L1"}) == 0.5
    m.observe_verdict(_verdict(Outcome.PASS, Reason.MODEL), 0.02)  # pushes REJECT model out
    assert reg.get_sample_value("inspectd_ng_ratio", {"line": "L1"}) == 0.25
    m.observe_verdict(_verdict(Outcome.REJECT, Reason.DEADLINE, None), 0.3)
    assert reg.get_sample_value("inspectd_deadline_misses_total", {"line": "L1"}) == 1
    assert reg.get_sample_value("inspectd_latency_seconds_count", {"line": "L1"}) == 7
    assert reg.get_sample_value("inspectd_latency_seconds_bucket", {"line": "L1", "le": "0.01"}) == 0
    assert reg.get_sample_value("inspectd_latency_seconds_bucket", {"line": "L1", "le": "0.02"}) == 6
    assert (
        reg.get_sample_value("inspectd_verdicts_total", {"line": "L1", "verdict": "PASS", "reason": "model"})
        == 4
    )


def test_ng_ratio_counts_inspection_outcomes_only() -> None:
    # A camera cable fault (decode errors), an overload or a deadline is the station's problem, not the parts':
    # the NG ratio is REJECT among the parts the model and the gauges judged.
    reg = CollectorRegistry()
    m = Metrics(reg, "L1", ng_window=100)
    for reason in (Reason.MODEL, Reason.GREY_ZONE, Reason.OUT_OF_TOLERANCE):
        m.observe_verdict(_verdict(Outcome.REJECT, reason), 0.01)
    for _ in range(5):
        m.observe_verdict(_verdict(Outcome.PASS, Reason.MODEL), 0.01)
    assert reg.get_sample_value("inspectd_ng_ratio", {"line": "L1"}) == 3 / 8
    for reason in (Reason.DECODE_ERROR, Reason.NO_PART, Reason.POSE_ERROR, Reason.DEADLINE, Reason.OVERLOAD,
                   Reason.ENGINE_ERROR, Reason.SHUTDOWN):  # fmt: skip
        for _ in range(10):
            m.observe_verdict(_verdict(Outcome.REJECT, reason, None), 0.01)
    assert reg.get_sample_value("inspectd_ng_ratio", {"line": "L1"}) == 3 / 8
    assert (
        sum(
            reg.get_sample_value(
                "inspectd_verdicts_total", {"line": "L1", "verdict": "REJECT", "reason": r.value}
            )
            or 0
            for r in Reason
        )
        == 73
    )  # every verdict is still counted by its reason


def test_score_histogram_has_bucket_edges_at_the_operating_point() -> None:
    decision = Decision(threshold=0.87, grey_zone=(0.87, 0.95))
    edges = score_buckets(decision)
    assert {0.87, 0.95} <= set(edges) and set(SCORE_BUCKETS) <= set(edges)
    assert edges == tuple(sorted(set(edges))) and all(0 < e <= 1 for e in edges)
    # a logit step either side of the threshold: 0.87 → logit 1.90; ±1 → 0.711 and 0.948
    assert 0.711 in {round(e, 3) for e in edges} and 0.948 in {round(e, 3) for e in edges}
    assert score_buckets(None) == SCORE_BUCKETS
    assert score_buckets(Decision(threshold=1.0)) == (*SCORE_BUCKETS, 1.0)  # no logit of 1: just the edge

    reg = CollectorRegistry()
    m = Metrics(reg, "L1", decision=decision)
    scores = [0.02, 0.5, 0.86, 0.87, 0.9, 0.99]
    for s in scores:
        m.observe_verdict(_verdict(Outcome.PASS, Reason.MODEL, s), 0.01)
    m.observe_verdict(_verdict(Outcome.REJECT, Reason.DEADLINE, None), 0.01)  # no score: not observed

    def bucket(le: float) -> float | None:
        return reg.get_sample_value("inspectd_score_bucket", {"line": "L1", "le": repr(le)})

    assert reg.get_sample_value("inspectd_score_count", {"line": "L1"}) == len(scores)
    assert reg.get_sample_value("inspectd_score_sum", {"line": "L1"}) == pytest.approx(sum(scores))
    for le in edges:
        assert bucket(le) == sum(s <= le for s in scores), le


def test_drift_gauges_exist_without_a_package_and_say_no_reference() -> None:
    reg = CollectorRegistry()
    m = Metrics(reg, "L1")
    m.observe_parts([-3.0, -2.5], [PartImage(120.0, 30.0), PartImage(130.0, 40.0)])
    assert reg.get_sample_value("inspectd_score_reference_parts", {"line": "L1"}) == 0
    psi = reg.get_sample_value("inspectd_score_drift_psi", {"line": "L1"})
    assert psi is not None and math.isnan(psi)
    assert reg.get_sample_value("inspectd_score_drift_parts", {"line": "L1"}) == 2
    assert reg.get_sample_value("inspectd_crop_brightness", {"line": "L1"}) == 125.0
    assert reg.get_sample_value("inspectd_crop_contrast", {"line": "L1"}) == 35.0


@pytest.mark.timeout(20)
def test_http_endpoint_serves_metrics_and_probes() -> None:
    reg = CollectorRegistry()
    m = Metrics(reg, "L1")
    m.set_model_info({"model": "tiny@abc", "backend": "onnxruntime", "precision": "fp32"})
    ready = {"v": False}
    server = MetricsServer(reg, "127.0.0.1", 0, ready=lambda: ready["v"])
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        body = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
        assert (
            'inspectd_model_info{backend="onnxruntime",line="L1",model="tiny@abc",precision="fp32",role="production"} 1.0'
            in body
        )
        assert urllib.request.urlopen(f"{base}/healthz", timeout=5).status == 200
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(f"{base}/readyz", timeout=5)
        assert exc.value.code == 503
        ready["v"] = True
        assert urllib.request.urlopen(f"{base}/readyz", timeout=5).status == 200
    finally:
        server.stop()


def _thread_cpu(body: str) -> dict[str, float]:
    pairs = re.findall(r'inspectd_thread_cpu_seconds_total\{line="L1",thread="([^"]+)"\} (\S+)', body)
    return {name: float(v) for name, v in pairs}


@pytest.mark.skipif(not ThreadCpuCollector.available(), reason="needs Linux /proc/self/task")
def test_cpu_time_is_scraped_by_the_thread_that_spent_it() -> None:
    """A pool's threads are counted under one role; the roles add up to the process's CPU time."""
    assert [thread_role(n) for n in ("inference", "inference-1", "preprocess_0", "source-camera")] == [
        "inference", "inference", "preprocess", "source-camera",
    ]  # fmt: skip
    reg = CollectorRegistry()
    Metrics(reg, "L1")
    server = MetricsServer(reg, "127.0.0.1", 0, ready=lambda: True)
    server.start()
    stop = threading.Event()
    spun = [threading.Event(), threading.Event()]

    def spin(done: threading.Event) -> None:
        t0 = time.thread_time()
        while time.thread_time() - t0 < 0.3 and not stop.is_set():
            pass
        done.set()
        stop.wait()  # stays alive, idle, until scraped

    names = ("inference", "inference-1")
    workers = [threading.Thread(target=spin, args=(e,), name=n) for n, e in zip(names, spun, strict=True)]
    try:
        for w in workers:
            w.start()
        assert all(e.wait(30) for e in spun)  # each has spent its 0.3 s of CPU
        url = f"http://127.0.0.1:{server.port}/metrics"
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        by_thread = _thread_cpu(body)
        process = float(re.findall(r"^process_cpu_seconds_total (\S+)", body, re.M)[0])
        assert 0.55 <= by_thread["inference"] <= 0.9  # the two threads' 0.3 s each, in one role
        assert "inference-1" not in by_thread and "other" in by_thread
        assert sum(by_thread.values()) == pytest.approx(process, abs=0.05)
    finally:
        stop.set()
        for w in workers:
            w.join()
        server.stop()


@pytest.mark.timeout(30)
def test_the_pipeline_reports_to_any_metrics_sink(tmp_path: Path) -> None:
    from daemon.settings import Backpressure, Settings
    from engine.backend import create_backend
    from engine.package import load_package
    from tests.helpers import next_settled, pipeline_for, tiny_package

    tiny_package(tmp_path / "pkg", input_size=(16, 16))
    package = load_package(tmp_path / "pkg")
    settings = Settings.model_validate(
        {
            "batching": {"max_batch": 2, "max_wait_ms": 1.0, "preprocess_threads": 1},
            "deadlines": {"max_latency_ms": 10_000},
            "model": {"warmup": False},
        }
    )
    sink = RecordingMetrics()
    backend = create_backend("onnxruntime", package, max_batch=2, intra_op_threads=1)
    p = pipeline_for(settings, package, backend, metrics=sink)
    p.start()
    try:
        img = np.full((32, 32), 128, np.uint8)
        p.submit(Frame("camera", 0, "f0", time.monotonic(), time.time(), image=img), Backpressure.BLOCK)
        p.submit(Frame("camera", 1, "f1", time.monotonic(), time.time(), error="bad"), Backpressure.BLOCK)
        p.message_error("header")
        items = [next_settled(p.settled) for _ in range(2)]
    finally:
        p.drain(5.0)
    assert sorted(i.verdict.reason for i in items if i is not None) == sorted(
        [Reason.MODEL, Reason.DECODE_ERROR]
    )
    assert sink.named("frame_received") == [("camera",), ("camera",)]
    assert sink.named("message_error") == [("header",)]
    assert sink.named("observe_batch") == [(1,)]
    assert sink.named("observe_parts") == [(1, 1)]  # per batch: the decided logit, the crop's statistics
    assert {s for (s,) in sink.named("observe_stage")} == {"decode", "preprocess", "queue", "infer"}
