from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from daemon.metrics import Metrics, MetricsServer, MetricsSink
from daemon.types import Frame, Outcome, Reason, Verdict


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

    def named(self, name: str) -> list[tuple[object, ...]]:
        return [args for n, args in self.calls if n == name]


if TYPE_CHECKING:  # `mypy tests/unit/test_metrics.py` proves both are what the stages report to
    _PROMETHEUS: type[MetricsSink] = Metrics
    _DOUBLE: type[MetricsSink] = RecordingMetrics


def _verdict(outcome: Outcome, reason: Reason) -> Verdict:
    return Verdict(
        frame_id="f", source="camera", outcome=outcome, reason=reason, score=0.1, threshold=0.5, model="m",
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
        (Outcome.REJECT, Reason.DEADLINE),
        (Outcome.PASS, Reason.MODEL),
    ]:
        m.observe_verdict(_verdict(outcome, reason), 0.02)
    assert reg.get_sample_value("inspectd_ng_ratio", {"line": "L1"}) == 0.5
    m.observe_verdict(_verdict(Outcome.PASS, Reason.MODEL), 0.02)  # pushes the first PASS out of the window
    assert reg.get_sample_value("inspectd_ng_ratio", {"line": "L1"}) == 0.5
    m.observe_verdict(_verdict(Outcome.PASS, Reason.MODEL), 0.02)  # pushes REJECT model out
    assert reg.get_sample_value("inspectd_ng_ratio", {"line": "L1"}) == 0.25
    assert reg.get_sample_value("inspectd_deadline_misses_total", {"line": "L1"}) == 1
    assert reg.get_sample_value("inspectd_latency_seconds_count", {"line": "L1"}) == 6
    assert reg.get_sample_value("inspectd_latency_seconds_bucket", {"line": "L1", "le": "0.01"}) == 0
    assert reg.get_sample_value("inspectd_latency_seconds_bucket", {"line": "L1", "le": "0.02"}) == 6
    assert (
        reg.get_sample_value("inspectd_verdicts_total", {"line": "L1", "verdict": "PASS", "reason": "model"})
        == 4
    )


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
            'inspectd_model_info{backend="onnxruntime",line="L1",model="tiny@abc",precision="fp32"} 1.0'
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


@pytest.mark.timeout(30)
def test_the_pipeline_reports_to_any_metrics_sink(tmp_path: Path) -> None:
    from daemon.settings import Backpressure, Settings
    from engine.backend import create_backend
    from engine.package import load_package
    from tests.helpers import pipeline_for, tiny_package

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
        items = [p.settled.get(timeout=10) for _ in range(2)]
    finally:
        p.drain(5.0)
    assert sorted(i.verdict.reason for i in items if i is not None) == sorted(
        [Reason.MODEL, Reason.DECODE_ERROR]
    )
    assert sink.named("frame_received") == [("camera",), ("camera",)]
    assert sink.named("message_error") == [("header",)]
    assert sink.named("observe_batch") == [(1,)]
    assert {s for (s,) in sink.named("observe_stage")} == {"decode", "preprocess", "queue", "infer"}
