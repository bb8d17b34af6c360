from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from daemon.metrics import Metrics, MetricsServer
from daemon.types import Outcome, Reason, Verdict


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
