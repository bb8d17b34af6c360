"""Hostile, broken and unusual input through the real sockets and a real folder (issue 9, item 2).

Each broken or hostile input gets a REJECT with a reason, a log line naming it and a count in
``inspectd_verdicts_total{reason="decode_error"}`` (or, for what cannot be attributed to a part, a peer or
message-error counter), and the daemon goes on serving. Unusual but valid images are inspected exactly like
the offline reference, or refused by an explicit ``decode.formats`` policy.

Already covered elsewhere and not repeated here: zero-byte/truncated/random/text files, a symlink out of the
folder and a directory in it (test_daemon_folder.py); malformed headers, torn raw payloads and wrong part
counts (test_daemon_camera.py, unit/test_daemon_wire.py); headers that parse as JSON but break the schema
(type confusion, 5000-digit integers, 1e999, repeated keys: test_daemon_camera.py, unit/test_wire_schema.py,
with their catalogue in tests/hostile_inputs.py); many-part and maximum-size floods and the memory they cost
(test_reliability_camera_memory.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

from engine.package import ModelPackage
from tests.helpers import wait_until
from tests.hostile_inputs import BOMBS, encode, gray, png_declaring, unusual_valid
from tests.integration.daemon_harness import (
    CameraPusher,
    VerdictCollector,
    daemon_settings,
    offline_scores,
    running_app,
)

pytestmark = pytest.mark.integration

ENCODING = {".png": "png", ".jpg": "jpeg", ".tif": "tiff", ".bmp": "bmp"}


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with capture_logs() as captured:
        yield captured


def decode_errors(app: Any, line: str) -> float:
    return app.registry.get_sample_value(
        "inspectd_verdicts_total", {"line": line, "verdict": "REJECT", "reason": "decode_error"}
    )


def peer_events(app: Any, line: str, event: str) -> float:
    key = {"line": line, "socket": "camera", "event": event}
    return app.registry.get_sample_value("inspectd_peer_events_total", key) or 0.0


def logged_ids(logs: list[MutableMapping[str, Any]]) -> set[str]:
    return {e["frame_id"] for e in logs if e.get("log_level") == "warning" and "frame_id" in e}


@pytest.mark.timeout(90)
def test_camera_hostile_and_unusual_payloads(
    package: ModelPackage, logs: list[MutableMapping[str, Any]]
) -> None:
    settings = daemon_settings(
        package.directory,
        sources={"camera": {"endpoint": "tcp://127.0.0.1:*", "max_message_bytes": 1 << 20}},
    )
    hostile: dict[str, tuple[str, bytes | np.ndarray]] = {
        **{f"bomb-{fmt}": (fmt, build(30000, 30000)) for fmt, build in BOMBS.items()},
        "huge-20000": ("png", png_declaring(20000, 20000)),
        "tiny-1x1": ("png", encode(gray(1, 1), ".png")),
        "raw-1x1": ("raw", np.zeros((1, 1), np.uint8)),
        "raw-8x300": ("raw", np.zeros((8, 300), np.uint8)),
        "lies-about-format": ("png", encode(gray(), ".jpg")),
        "random-png": ("png", os.urandom(3000)),
        "text-as-tiff": ("tiff", b"II*\x00 this is not really a tiff\n" * 10),
    }
    valid = unusual_valid()
    with (
        running_app(settings) as app,
        VerdictCollector(app.publisher_endpoint, settings.line) as sub,
        CameraPusher(app.camera_endpoint) as cam,
    ):
        for fid, (enc, payload) in hostile.items():
            cam.send(fid, payload, encoding=enc)
        for name, data in valid.items():
            cam.send(name, data, encoding=ENCODING[Path(name).suffix])
        n = len(hostile) + len(valid)
        sub.wait_verdicts(n, timeout=30)
        # Oversized: libzmq drops the connection before buffering it (no verdict: never accepted) ...
        cam.send_parts([b'{"frame_id": "oversized", "encoding": "png"}', b"\x89PNG" + bytes(2 << 20)])
        wait_until(
            lambda: peer_events(app, settings.line, "disconnected") >= 1,
            10,
            "the oversized message to drop the camera's connection",
        )
        # ... and the camera's socket reconnects by itself (a second handshake): the next good frame is inspected.
        wait_until(
            lambda: peer_events(app, settings.line, "connected") >= 2, 10, "the camera to reconnect by itself"
        )
        cam.send("after-oversize", gray(64, 64))
        verdicts = sub.wait_verdicts(n + 1, timeout=20)
        errors = decode_errors(app, settings.line)
        alive = app.pipeline is not None and app.pipeline.threads_alive()
    assert alive
    by_id = {v["frame_id"]: v for v in verdicts}
    assert len(verdicts) == n + 1 and "oversized" not in by_id
    for fid in hostile:
        v = by_id[fid]
        assert (v["verdict"], v["reason"], v["score"]) == ("REJECT", "decode_error", None), v
    for fmt in BOMBS:
        assert "decode.max_pixels" in by_id[f"bomb-{fmt}"]["detail"]["error"]
    assert "decode.max_pixels" in by_id["huge-20000"]["detail"]["error"]
    assert "decode.min_side" in by_id["tiny-1x1"]["detail"]["error"]
    assert "decode.min_side" in by_id["raw-1x1"]["detail"]["error"]
    assert "header says 'png'" in by_id["lies-about-format"]["detail"]["error"]
    assert errors == len(hostile)
    assert set(hostile) <= logged_ids(logs)
    assert any("camera connection closed" in e["event"] for e in logs)
    expected = offline_scores(package, list(valid.values()))
    for (name, _), score in zip(valid.items(), expected, strict=True):
        assert by_id[name]["reason"] == "model", by_id[name]
        assert by_id[name]["score"] == pytest.approx(score, abs=1e-5)
    assert by_id["after-oversize"]["reason"] == "model"


@pytest.mark.timeout(60)
def test_a_format_policy_rejects_with_a_reason(package: ModelPackage) -> None:
    settings = daemon_settings(package.directory, decode={"formats": ["png"]})
    valid = unusual_valid()
    with (
        running_app(settings) as app,
        VerdictCollector(app.publisher_endpoint, settings.line) as sub,
        CameraPusher(app.camera_endpoint) as cam,
    ):
        for name, data in valid.items():
            cam.send(name, data, encoding=ENCODING[Path(name).suffix])
        verdicts = sub.wait_verdicts(len(valid), timeout=20)
    for v in verdicts:
        if v["frame_id"].endswith(".png"):
            assert v["reason"] == "model"
        else:
            assert (v["verdict"], v["reason"]) == ("REJECT", "decode_error")
            assert "not accepted here (decode.formats = ['png'])" in v["detail"]["error"]


@pytest.mark.timeout(90)
def test_folder_hostile_names_links_and_images(
    package: ModelPackage, tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    settings = daemon_settings(
        package.directory,
        sources={
            "camera": {"enabled": False},
            "folder": {"enabled": True, "path": str(folder), "stable_ms": 200},
        },
    )
    good = encode(gray(64, 64, seed=5), ".png")
    rejected = {f"bomb.{fmt}": build(30000, 30000) for fmt, build in BOMBS.items()} | {
        "huge.png": png_declaring(20000, 20000),
        "one-pixel.png": encode(gray(1, 1), ".png"),
        "webp-ish.png": b"RIFF\x10\x00\x00\x00WEBPVP8 " + os.urandom(64),
    }
    names = ["with space.png", "ünïcödé-名前.png", "a..b.png", "..double-dot-start.png", "new\nline.png"]
    weird_bytes_name = os.fsdecode(b"caf\xe9-latin1.png")  # not UTF-8: a surrogate-escaped str
    valid = unusual_valid()
    with running_app(settings) as app, VerdictCollector(app.publisher_endpoint, settings.line) as sub:
        for name, data in rejected.items():
            (folder / name).write_bytes(data)
        for name in [*names, weird_bytes_name]:
            (folder / name).write_bytes(good)
        for name, data in valid.items():
            (folder / name).write_bytes(data)
        os.symlink("loop.png", folder / "loop.png")  # a link to itself
        os.symlink(folder / "with space.png", folder / "inside-link.png")  # even inside: never followed
        expected_n = len(rejected) + len(names) - 1 + 1 + len(valid) + 2  # "..x" is hidden: ignored
        sub.wait_verdicts(expected_n, timeout=30)
        # Behaviour, not synchronisation: proving that nothing is looked at twice (stable_ms is 200 ms).
        time.sleep(0.5)
        verdicts = list(sub.verdicts)
        errors = decode_errors(app, settings.line)
        alive = app.pipeline is not None and app.pipeline.threads_alive()
    assert alive
    by_id = {v["frame_id"]: v for v in verdicts}
    assert len(verdicts) == expected_n == len(by_id)
    for fid in [*rejected, "loop.png", "inside-link.png"]:
        assert (by_id[fid]["verdict"], by_id[fid]["reason"]) == ("REJECT", "decode_error"), by_id[fid]
    assert "symbolic link not followed" in by_id["loop.png"]["detail"]["error"]
    assert errors == len(rejected) + 2
    assert {*rejected, "loop.png", "inside-link.png"} <= logged_ids(logs)
    good_score = offline_scores(package, [good])[0]
    for name in [n for n in names if not n.startswith(".")] + [weird_bytes_name]:
        assert by_id[name]["reason"] == "model" and by_id[name]["score"] == pytest.approx(
            good_score, abs=1e-5
        )
    assert "..double-dot-start.png" not in by_id  # dot files are ignored by pattern: documented, not a part
    for (name, _), score in zip(valid.items(), offline_scores(package, list(valid.values())), strict=True):
        assert by_id[name]["reason"] == "model" and by_id[name]["score"] == pytest.approx(score, abs=1e-5)
