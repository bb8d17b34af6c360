"""The camera feed end to end: real PULL/PUB sockets, real ONNX Runtime, verdicts checked against offline."""

from __future__ import annotations

import os
from typing import Any

import cv2
import numpy as np
import pytest
from structlog.testing import capture_logs

import daemon.sources.camera as camera_module
from daemon.image_policy import InputPolicy
from daemon.settings import AUTO_CPU_WORKERS
from daemon.sources.camera import CameraSource
from daemon.types import Reason
from engine.package import ModelPackage
from tests.hostile_inputs import HOSTILE_HEADERS, TOLERATED_HEADERS, UNNAMED_HEADERS
from tests.integration.daemon_harness import (
    CameraPusher,
    VerdictCollector,
    calibrated_package,
    daemon_settings,
    offline_scores,
    running_app,
    synth_images,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [img for img, _ in synth_images(200, size=128, seed=1)]


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory, images: list[np.ndarray]) -> ModelPackage:
    return calibrated_package(tmp_path_factory.mktemp("pkg") / "tiny", images[:50])


@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", [1, "auto"])
def test_200_frames_at_a_steady_rate(
    package: ModelPackage, images: list[np.ndarray], workers: int | str
) -> None:
    settings = daemon_settings(
        package.directory,
        batching={"max_batch": 8, "max_wait_ms": 2, "inference_workers": workers, "buffers": "auto"},
    )
    with (
        running_app(settings) as app,
        VerdictCollector(app.publisher_endpoint, settings.line) as sub,
        CameraPusher(app.camera_endpoint) as cam,
    ):
        assert app.pipeline is not None
        layout = app.pipeline.layout
        if workers == "auto":  # the production default: one single-threaded ONNX Runtime session per core
            cores = len(os.sched_getaffinity(0))
            assert layout.inference_workers == min(cores, AUTO_CPU_WORKERS) == len(app.pipeline.workers)
        assert layout.buffers == layout.inference_workers + 2
        cam.stream([(f"part-{i:04d}", img) for i, img in enumerate(images)], fps=150, label="OK")
        verdicts = sub.wait_verdicts(200, timeout=30)
        registry = app.registry
    assert [v["seq"] for v in verdicts] == list(range(1, 201))
    assert len({v["boot_id"] for v in verdicts}) == 1
    ids = [v["frame_id"] for v in verdicts]
    assert sorted(ids) == sorted(f"part-{i:04d}" for i in range(200))  # each exactly once
    assert {v["reason"] for v in verdicts} == {Reason.MODEL.value}
    by_id = {v["frame_id"]: v for v in verdicts}
    offline = offline_scores(package, images)
    threshold = package.meta.decision.threshold
    for i, expected in enumerate(offline):
        v = by_id[f"part-{i:04d}"]
        assert v["score"] == pytest.approx(expected, abs=1e-5)
        if abs(expected - threshold) > 1e-5:
            assert v["verdict"] == ("REJECT" if expected >= threshold else "PASS")
        assert v["threshold"] == threshold and v["model"] == package.meta.model_id
        assert v["t_capture"] is not None and 0 <= v["latency_ms"] < settings.deadlines.max_latency_ms
    assert {v["verdict"] for v in verdicts} == {"PASS", "REJECT"}  # the calibrated threshold splits them
    total = sum(
        registry.get_sample_value(
            "inspectd_verdicts_total", {"line": settings.line, "verdict": o, "reason": "model"}
        )
        or 0
        for o in ("PASS", "REJECT")
    )
    assert total == 200
    assert (
        registry.get_sample_value(
            "inspectd_frames_received_total", {"line": settings.line, "source": "camera"}
        )
        == 200
    )


@pytest.mark.timeout(60)
def test_malformed_messages_then_the_next_good_frame(package: ModelPackage, images: list[np.ndarray]) -> None:
    settings = daemon_settings(package.directory)
    good = images[0]
    ok, png = cv2.imencode(".png", good)
    assert ok
    with (
        running_app(settings) as app,
        VerdictCollector(app.publisher_endpoint, settings.line) as sub,
        CameraPusher(app.camera_endpoint) as cam,
    ):
        cam.send_parts([b"{not json", b"x"])  # no frame id: counted, logged, no verdict
        cam.send_parts([b'{"frame_id": "bad-shape", "encoding": "raw", "shape": [128, 128]}', b"short"])
        cam.send_parts([b'{"frame_id": "bad-png", "encoding": "png"}', b"\x89PNG\r\n\x1a\n truncated"])
        cam.send_parts([b'{"frame_id": "three", "encoding": "png"}', b"a", b"b"])
        cam.send("good-raw", good)
        cam.send("good-png", png.tobytes(), encoding="png")
        cam.send("uint16", good.astype(np.uint16) * 257)  # 16-bit camera: same picture, scaled
        verdicts = sub.wait_verdicts(6, timeout=20)
        assert app.pipeline is not None and app.pipeline.threads_alive()
        errors = app.registry.get_sample_value(
            "inspectd_message_errors_total", {"line": settings.line, "kind": "header"}
        )
    by_id = {v["frame_id"]: v for v in verdicts}
    assert sorted(by_id) == ["bad-png", "bad-shape", "good-png", "good-raw", "three", "uint16"]
    for fid in ("bad-shape", "bad-png", "three"):
        assert (by_id[fid]["verdict"], by_id[fid]["reason"], by_id[fid]["score"]) == (
            "REJECT",
            "decode_error",
            None,
        )
        assert by_id[fid]["detail"]["error"]
    expected = offline_scores(package, [good])[0]
    for fid in ("good-raw", "good-png", "uint16"):
        assert by_id[fid]["reason"] == "model"
        assert by_id[fid]["score"] == pytest.approx(expected, abs=1e-5)
    assert errors == 1


def _message_errors(app: Any, line: str, kind: str) -> float:
    key = {"line": line, "kind": kind}
    return app.registry.get_sample_value("inspectd_message_errors_total", key) or 0.0


def _camera(app: Any) -> CameraSource:
    return next(s for s in app.sources if isinstance(s, CameraSource))


@pytest.mark.timeout(90)
def test_hostile_headers_are_refused_and_the_camera_thread_lives_on(
    package: ModelPackage, images: list[np.ndarray]
) -> None:
    """Issue 16: a header whose JSON parses but whose values break the schema (a 5000-digit t_capture, 1e999,
    ``"dtype": []``, …) raised ValueError/OverflowError/TypeError out of the camera thread, and the supervisor
    stopped the daemon. Now each is a REJECT naming its part, or a count when the part cannot be named; the
    camera thread lives and the next good frame is decided by the model."""
    settings = daemon_settings(package.directory)
    good = images[0]
    ok, png = cv2.imencode(".png", good)
    assert ok
    many = [b'{"frame_id": "many-parts", "encoding": "png"}', *([b"p" * 1024] * 2000)]
    with (
        running_app(settings) as app,
        VerdictCollector(app.publisher_endpoint, settings.line) as sub,
        CameraPusher(app.camera_endpoint) as cam,
    ):
        for raw in (*HOSTILE_HEADERS.values(), *UNNAMED_HEADERS.values(), *TOLERATED_HEADERS.values()):
            cam.send_parts([raw, png.tobytes()])
        cam.send_parts(many)  # names its part: REJECT
        cam.send_parts([b"[]", *([b""] * 5000)])  # names none: counted
        cam.send("good-after", good)
        n = len(HOSTILE_HEADERS) + len(TOLERATED_HEADERS) + 2
        verdicts = sub.wait_verdicts(n, timeout=30)
        alive = app.stages_alive()
        source_alive = _camera(app).alive
        header_errors = _message_errors(app, settings.line, "header")
        multipart_errors = _message_errors(app, settings.line, "multipart")
    assert source_alive and all(alive.values()), alive
    by_id = {v["frame_id"]: v for v in verdicts}
    assert len(verdicts) == n == len(by_id)  # each named part exactly once, nothing for the unnamed ones
    for fid in [*HOSTILE_HEADERS, "many-parts"]:
        v = by_id[fid]
        assert (v["verdict"], v["reason"], v["score"]) == ("REJECT", "decode_error", None), v
        assert 0 < len(v["detail"]["error"]) <= 200, v
    assert "got 2001" in by_id["many-parts"]["detail"]["error"]
    assert (header_errors, multipart_errors) == (len(UNNAMED_HEADERS), 1)
    expected = offline_scores(package, [good])[0]
    for fid in [*TOLERATED_HEADERS, "good-after"]:  # unknown keys with extreme values are only metadata
        assert by_id[fid]["reason"] == "model"
        assert by_id[fid]["score"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.timeout(60)
def test_an_unexpected_exception_costs_one_message_not_the_camera(
    package: ModelPackage, images: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever a bug raises while one message is handled — before its part can be named, or after — is that
    message's error (a count, or a REJECT), logged with the exception; the camera thread goes on."""
    parse, check = camera_module.parse_message, InputPolicy.check_encoded

    def parse_with_a_bug(parts: Any, **kw: Any) -> Any:
        if bytes(parts[0].buffer).startswith(b'{"frame_id": "bug-in-parse"'):
            raise RuntimeError("a bug before the frame id is known")
        return parse(parts, **kw)

    def check_with_a_bug(self: InputPolicy, data: Any, declared: str | None = None) -> Any:
        if bytes(data[:4]) == b"BUG!":
            raise KeyError("a bug after the frame id is known")
        return check(self, data, declared=declared)

    monkeypatch.setattr(camera_module, "parse_message", parse_with_a_bug)
    monkeypatch.setattr(InputPolicy, "check_encoded", check_with_a_bug)
    settings = daemon_settings(package.directory)
    good = images[0]
    with (
        capture_logs() as logs,
        running_app(settings) as app,
        VerdictCollector(app.publisher_endpoint, settings.line) as sub,
        CameraPusher(app.camera_endpoint) as cam,
    ):
        cam.send_parts([b'{"frame_id": "bug-in-parse", "encoding": "png"}', b"x"])
        cam.send_parts([b'{"frame_id": "bug-in-check", "encoding": "png"}', b"BUG!"])
        cam.send("good-after-bugs", good)
        verdicts = sub.wait_verdicts(2, timeout=20)
        source_alive = _camera(app).alive
        unattributed = _message_errors(app, settings.line, "unattributed")
    assert source_alive
    by_id = {v["frame_id"]: v for v in verdicts}
    assert sorted(by_id) == ["bug-in-check", "good-after-bugs"]
    assert (by_id["bug-in-check"]["verdict"], by_id["bug-in-check"]["reason"]) == ("REJECT", "decode_error")
    assert "internal error" in by_id["bug-in-check"]["detail"]["error"]
    assert by_id["good-after-bugs"]["reason"] == "model"
    assert unattributed == 1
    errors = [e for e in logs if e.get("log_level") == "error"]
    assert any("RuntimeError" in e.get("error", "") and e.get("exc_info") for e in errors), errors
    assert any(e.get("frame_id") == "bug-in-check" and "KeyError" in e.get("error", "") for e in errors)


@pytest.mark.timeout(60)
def test_rejects_are_archived_with_their_verdict(
    package: ModelPackage, images: list[np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> None:
    import json

    archive = tmp_path_factory.mktemp("audit")
    settings = daemon_settings(package.directory, audit={"enabled": True, "path": str(archive)})
    with (
        running_app(settings) as app,
        VerdictCollector(app.publisher_endpoint, settings.line) as sub,
        CameraPusher(app.camera_endpoint) as cam,
    ):
        for i, img in enumerate(images[:12]):
            cam.send(f"../a{i}", img)  # a hostile id must not leave the archive
        cam.send_parts([b'{"frame_id": "torn", "encoding": "raw", "shape": [4, 4]}', b"123"])
        verdicts = sub.wait_verdicts(13, timeout=20)
    rejects = {v["seq"] for v in verdicts if v["verdict"] == "REJECT"}
    assert 0 < len(rejects) < 13
    sidecars = [json.loads(p.read_text()) for p in archive.glob("*.json")]
    assert {s["seq"] for s in sidecars} == rejects  # after stop() the after-publish stage has drained
    assert all(p.parent == archive for p in archive.rglob("*"))
    images_written = [p for p in archive.iterdir() if p.suffix == ".png"]
    assert len(images_written) == len(rejects) - 1  # the torn message had no image to keep
