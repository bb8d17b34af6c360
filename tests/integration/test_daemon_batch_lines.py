"""An inference batch's log line is written by the publisher after the batch's verdicts are sent
(``Ledger.after_published``): the line costs a cold lone frame ~0.6 ms of Python, which the publisher would
otherwise wait for (docs/benchmarks.md, run 15). Every batch still gets its line, and every line its frames."""

from __future__ import annotations

import contextlib
import io
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from daemon.logs import configure_logging
from tests.integration.daemon_harness import calibrated_package, daemon_settings, serving, synth_images

pytestmark = pytest.mark.integration


class _Batches(logging.Handler):
    """The daemon's "batch" lines as emitted: the event dict, the thread and the time."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[dict[str, Any], str, float]] = []
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        event = record.msg if isinstance(record.msg, dict) else {}
        if event.get("event") == "batch":
            with self._lock2:
                self.lines.append((dict(event), record.threadName or "", record.created))


@contextlib.contextmanager
def stdlib_logging(handler: logging.Handler) -> Iterator[None]:
    """structlog through stdlib logging, as the CLI runs it, with ``handler`` on the root logger; the test
    process's logging as it was afterwards."""
    saved = structlog.get_config()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    configure_logging(fmt="json", stream=io.StringIO())
    root.addHandler(handler)
    try:
        yield
    finally:
        structlog.configure(**saved)
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.timeout(60)
def test_each_batch_line_is_logged_by_the_publisher_after_its_verdicts_went_out(tmp_path: Path) -> None:
    package = calibrated_package(tmp_path / "pkg", [img for img, _ in synth_images(8)])
    frames = [(f"f{i}", img) for i, (img, _) in enumerate(synth_images(12, seed=5))]
    handler = _Batches()
    settings = daemon_settings(
        package.directory,
        batching={"max_batch": 4, "max_wait_ms": 2},
        logging={"format": "json", "batch_lines": True},  # the harness turns them off
    )
    with stdlib_logging(handler), serving(settings) as (_, sub, cam):
        cam.stream(frames, fps=20)
        verdicts = {v["frame_id"]: v for v in sub.wait_verdicts(len(frames), timeout=30)}
    assert len(verdicts) == len(frames)
    lines = handler.lines
    assert lines and sum(e["n"] for e, _, _ in lines) == len(frames)  # every frame in exactly one batch line
    for event, thread, created in lines:
        assert thread.startswith("publisher"), (thread, event)
        last = verdicts[event["last"]]
        assert created >= last["t_published"], (event, last)  # written once its verdicts were out


@pytest.mark.timeout(60)
def test_deferred_work_that_fails_is_logged_and_the_verdicts_keep_flowing(tmp_path: Path) -> None:
    package = calibrated_package(tmp_path / "pkg", [img for img, _ in synth_images(8)])
    frames = [(f"f{i}", img) for i, (img, _) in enumerate(synth_images(6, seed=7))]
    ran: list[str] = []

    def broken() -> None:
        ran.append(threading.current_thread().name)
        raise RuntimeError("a log line that cannot be written")

    settings = daemon_settings(package.directory)
    with serving(settings) as (app, sub, cam):
        assert app.pipeline is not None
        app.pipeline.ledger.after_published(broken)
        cam.stream(frames, fps=20)
        verdicts = sub.wait_verdicts(len(frames), timeout=30)
        assert app.publisher is not None and app.publisher.alive
    assert len(verdicts) == len(frames) and [v["seq"] for v in verdicts] == list(range(1, len(frames) + 1))
    assert len(ran) == 1 and ran[0].startswith("publisher")  # on the publisher's thread, once
