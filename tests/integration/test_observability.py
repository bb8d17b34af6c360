"""The daemon's metrics tell the truth: what /metrics says equals what a real ZeroMQ subscriber received.

The real App runs in-process on synthetic screws (real ONNX Runtime, real sockets, real HTTP scrape); a few
malformed camera messages add REJECT decode_error verdicts and unattributable message errors, so every
counter family moves. The scrape must also pass `promtool check metrics` (Prometheus' own lint).
"""

from __future__ import annotations

import math
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.app import App
from daemon.metrics import LATENCY_BUCKETS
from engine.package import load_package
from tests.deploy_support import require_tool
from tests.helpers import tiny_package, wait_until
from tests.integration.daemon_harness import (
    CameraPusher,
    ScriptedBackend,
    VerdictCollector,
    calibrated_package,
    daemon_settings,
    running_app,
    synth_images,
)

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str, str]:
    """(status, content type, body); a 503 is an answer here, not an exception."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def parse_samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over every series of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lb), v in samples.items() if n == name and want <= lb)


def feed(app: App, line: str, n_images: int) -> tuple[list[dict[str, Any]], int]:
    """Push ``n_images`` screws, 2 undecodable images (attributable: REJECT decode_error) and 2 messages
    without a frame id (counted errors only). Returns (verdicts the subscriber got, unattributable sent)."""
    images = synth_images(n_images, size=128, seed=5)
    publisher, camera = app.publisher_endpoint, app.camera_endpoint
    assert publisher and camera
    with VerdictCollector(publisher, line) as collector, CameraPusher(camera) as cam:
        cam.stream([(f"part-{i:03d}", img) for i, (img, _) in enumerate(images)], fps=100)
        cam.send("garbled-1", b"this is not a PNG", encoding="png")
        cam.send("garbled-2", b"\x89PNG\r\n\x1a\n truncated", encoding="png")
        cam.send_parts([b"a single part"])  # no header frame at all
        cam.send_parts([b"{not json", b"pixels"])  # a header that cannot be read
        verdicts = collector.wait_verdicts(n_images + 2, timeout=30)
    return verdicts, 2


def scrape_until(port: int, n_verdicts: int, timeout: float = 10.0) -> str:
    """/metrics once it counts every verdict: the publisher updates the metrics just after sending, so a
    scrape racing the last verdict may lag by one. Counters only grow, so waiting cannot hide a surplus."""

    def counted() -> str | None:
        status, ctype, text = http_get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and ctype.startswith("text/plain"), (status, ctype)
        return text if total(parse_samples(text), "inspectd_verdicts_total") >= n_verdicts else None

    return wait_until(counted, timeout, f"/metrics counting all {n_verdicts} verdicts")


@pytest.mark.timeout(120)
def test_metrics_equal_what_the_subscriber_received(tmp_path: Path) -> None:
    n_images = 24
    package_dir = tmp_path / "model"
    calibrated_package(package_dir, [img for img, _ in synth_images(n_images, size=128, seed=5)])
    settings = daemon_settings(package_dir, metrics={"port": 0, "ng_window": 1000})
    line = settings.line
    t_start = time.time()
    with running_app(settings) as app:
        port = app.metrics_port
        assert port
        verdicts, unattributable = feed(app, line, n_images)
        text = scrape_until(port, len(verdicts))
        samples = parse_samples(text)
        assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        assert http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200
        ready_while_running = value(samples, "inspectd_ready", line=line)

    n = len(verdicts)
    by_outcome_reason = Counter((v["verdict"], v["reason"]) for v in verdicts)
    assert by_outcome_reason[("REJECT", "decode_error")] == 2
    assert by_outcome_reason[("PASS", "model")] > 0 and by_outcome_reason[("REJECT", "model")] > 0  # mixed

    # Verdict counter: every (verdict, reason) series equals the subscriber's count, including the zeros.
    for (name, labels), count in samples.items():
        if name == "inspectd_verdicts_total":
            lb = dict(labels)
            assert lb["line"] == line
            assert count == by_outcome_reason[(lb["verdict"], lb["reason"])], lb
    assert total(samples, "inspectd_verdicts_total") == n
    assert set(by_outcome_reason) <= {
        (dict(lb)["verdict"], dict(lb)["reason"]) for (nm, lb) in samples if nm == "inspectd_verdicts_total"
    }

    # Latency histogram: one observation per verdict, the same latency the verdict message carries (which
    # rounds it to the microsecond, hence the tolerance of 1 µs per verdict and at bucket edges).
    latencies = [v["latency_ms"] / 1000.0 for v in verdicts]
    us = 1e-6
    assert value(samples, "inspectd_latency_seconds_count", line=line) == n
    assert value(samples, "inspectd_latency_seconds_sum", line=line) == pytest.approx(
        sum(latencies), abs=n * us
    )
    for le in LATENCY_BUCKETS:
        bucket = value(samples, "inspectd_latency_seconds_bucket", line=line, le=str(le))
        assert sum(s <= le - us for s in latencies) <= bucket <= sum(s <= le + us for s in latencies), le
    assert value(samples, "inspectd_latency_seconds_bucket", line=line, le="+Inf") == n

    # Frames in = verdicts out; unattributable messages are errors, not frames.
    assert value(samples, "inspectd_frames_received_total", line=line, source="camera") == n
    assert total(samples, "inspectd_message_errors_total", line=line) == unattributable
    # Each inferred frame was in exactly one batch and went through every stage; each verdict was published.
    inferred = sum(c for (_, reason), c in by_outcome_reason.items() if reason == "model")
    assert value(samples, "inspectd_batch_size_sum", line=line) == inferred
    for stage in ("decode", "preprocess", "queue", "infer"):
        assert value(samples, "inspectd_stage_seconds_count", line=line, stage=stage) == inferred, stage
    assert value(samples, "inspectd_stage_seconds_count", line=line, stage="publish") == n
    # No deadline was missed on an idle machine, and the counter agrees with the reasons.
    assert (
        value(samples, "inspectd_deadline_misses_total", line=line)
        == by_outcome_reason[("REJECT", "deadline")]
    )

    # Gauges: NG ratio over the window (larger than the run) is the REJECT share of the inspected parts: the
    # decode errors are station faults and stay out of it. Last verdict is recent.
    inspected = [v for v in verdicts if v["reason"] in ("model", "grey_zone", "out_of_tolerance")]
    rejects = sum(v["verdict"] == "REJECT" for v in inspected)
    assert 0 < rejects < len(inspected) < n
    assert value(samples, "inspectd_ng_ratio", line=line) == pytest.approx(rejects / len(inspected))
    # Score histogram: one observation per verdict with a score, each in its bucket; the threshold is an edge.
    scores = [v["score"] for v in verdicts if v["score"] is not None]
    threshold = verdicts[0]["threshold"]
    assert len(scores) == len(inspected)
    assert value(samples, "inspectd_score_count", line=line) == len(scores)
    assert value(samples, "inspectd_score_sum", line=line) == pytest.approx(sum(scores), rel=1e-9)
    buckets = {float(dict(lb)["le"]): c for (nm, lb), c in samples.items() if nm == "inspectd_score_bucket"}
    assert threshold in buckets and len(buckets) > 10
    for le, count in buckets.items():  # the message carries the score as the daemon computed it
        assert count == sum(s <= le for s in scores), le
    # Drift: this package carries no reference, which the gauges say; the crops were measured.
    assert value(samples, "inspectd_score_reference_parts", line=line) == 0
    assert math.isnan(value(samples, "inspectd_score_drift_psi", line=line))
    assert value(samples, "inspectd_score_drift_parts", line=line) == len(inspected)
    assert 0 < value(samples, "inspectd_crop_brightness", line=line) < 255
    assert value(samples, "inspectd_crop_contrast", line=line) > 0
    last = value(samples, "inspectd_last_verdict_timestamp_seconds", line=line)
    assert max(v["t_published"] for v in verdicts) <= last <= time.time() and last >= t_start
    assert ready_while_running == 1.0
    info = [dict(lb) for (nm, lb) in samples if nm == "inspectd_model_info"]
    assert len(info) == 1 and info[0]["backend"] == "onnxruntime" and info[0]["line"] == line

    # Prometheus' own lint: names, units, suffixes, HELP text.
    promtool = require_tool("promtool")
    lint = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


@pytest.mark.timeout(60)
def test_readyz_and_ready_gauge_follow_engine_failures(tmp_path: Path) -> None:
    # /readyz is what the container HEALTHCHECK reads and inspectd_ready what InspectdNotReady alerts on:
    # 200/1 while inspecting; 503/0 once the backend keeps failing (engine_failures_not_ready batches in a
    # row), while /healthz still answers because the process is alive.
    tiny_package(tmp_path / "model")
    backend = ScriptedBackend(load_package(tmp_path / "model"), max_batch=8)
    settings = daemon_settings(None, deadlines={"engine_failures_not_ready": 2})
    with running_app(settings, backend=backend) as app:
        base = f"http://127.0.0.1:{app.metrics_port}"
        line = settings.line
        assert http_get(f"{base}/readyz")[0] == 200
        assert value(parse_samples(http_get(f"{base}/metrics")[2]), "inspectd_ready", line=line) == 1.0
        backend.fail_batches = 100
        publisher, camera = app.publisher_endpoint, app.camera_endpoint
        assert publisher and camera
        with VerdictCollector(publisher, line) as collector, CameraPusher(camera) as cam:
            for i, (img, _) in enumerate(synth_images(3, size=64)):
                cam.send(f"doomed-{i}", img)
                collector.wait_verdicts(i + 1)  # one batch each: consecutive failures, not one big batch
        assert {v["reason"] for v in collector.verdicts} == {"engine_error"}
        # The supervisor re-evaluates readiness every 0.25 s.
        wait_until(lambda: http_get(f"{base}/readyz")[0] == 503, 5, "/readyz answering 503")
        assert http_get(f"{base}/healthz")[0] == 200
        assert value(parse_samples(http_get(f"{base}/metrics")[2]), "inspectd_ready", line=line) == 0.0
