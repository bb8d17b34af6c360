"""Issue 16, finding 8: a dead stage is noticed, whichever it is. When any stage thread has ended — a source (camera,
folder), the pipeline (batcher, inference, deadline watchdog), or a sink (publisher, the after-publish stage that
writes the audit archive) — the supervisor sends no WATCHDOG=1 from then on (systemd's WatchdogSec restarts a
daemon whose stop stalls), readiness drops, and the daemon stops with exit code 1 (Restart=on-failure).

systemd's side is a real datagram socket (NOTIFY_SOCKET). To make "from then on" exact, the test holds the
supervisor inside a ping (the notifier below), kills the stage while it is held, and lets it go on only once the
stage is dead: every supervisor round after that one must see the death.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.app import App
from daemon.systemd_notify import SystemdNotifier
from engine.package import ModelPackage
from tests.helpers import wait_until
from tests.integration.daemon_harness import CameraPusher, ScriptedBackend, daemon_settings
from tests.integration.test_daemon_lifecycle import NotifyListener

pytestmark = [
    pytest.mark.integration,
    # The stages die of an exception on their own thread, which is the point; pytest would report each.
    pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning"),
]

IMG = np.full((32, 32), 128, np.uint8)


class StageKilled(Exception):
    """Raised inside a stage thread by the test: a bug that escapes the stage's loop."""


class SinkKilled(BaseException):
    """The after-publish stage survives every Exception of a handler; only this ends its thread."""


def _boom(*_: Any, **__: Any) -> Any:
    raise StageKilled("killed by the test")


class _Raising:
    """Stands in for a queue the stage reads from: the next read kills the stage."""

    def get(self, *_: Any, **__: Any) -> Any:
        raise StageKilled("killed by the test")

    def put(self, *_: Any) -> None:
        pass


class HoldingNotifier(SystemdNotifier):
    """The real sd_notify datagrams, plus a way to hold the supervisor thread right after one WATCHDOG=1."""

    def __init__(self, environ: dict[str, str]) -> None:
        super().__init__(environ)
        self.hold = threading.Event()
        self.held = threading.Event()
        self.release = threading.Event()

    def watchdog(self) -> bool:
        sent = super().watchdog()
        if self.hold.is_set():
            self.hold.clear()
            self.held.set()
            self.release.wait(30)
        return sent


# -- how each stage is killed (from the test thread, while the supervisor is held) ------------------------------
def kill_batcher(app: App, _: Path) -> None:
    assert app.pipeline is not None
    app.pipeline.batcher._fill = _boom  # type: ignore[method-assign]


def kill_inference(app: App, _: Path) -> None:
    assert app.pipeline is not None
    app.pipeline.worker.batches = _Raising()  # type: ignore[assignment]


def kill_deadline_watchdog(app: App, _: Path) -> Callable[[], None]:
    assert app.pipeline is not None
    ledger = app.pipeline.ledger
    now = ledger._now
    ledger._now = _boom
    with ledger._lock:
        ledger._wake.notify()
    # Restored once the thread is dead: settling at shutdown reads the same clock.
    return lambda: setattr(ledger, "_now", now)


def kill_publisher(app: App, _: Path) -> None:
    assert app.publisher is not None
    app.publisher._settled = _Raising()  # type: ignore[assignment]


class _DyingStop:
    """Stands in for a source's stop event: the receive loop's next look at it kills the source thread (a bug
    outside the per-message handling, which the sources survive by design)."""

    def is_set(self) -> bool:
        raise StageKilled("killed by the test")


def _kill_source(app: App) -> Callable[[], None]:
    (source,) = app.sources
    stop_event = source._stop  # type: ignore[attr-defined]
    source._stop = _DyingStop()  # type: ignore[attr-defined]
    return lambda: setattr(source, "_stop", stop_event)  # stop() must be able to set it again


def kill_camera(app: App, _: Path) -> Callable[[], None]:
    return _kill_source(app)


def kill_folder(app: App, _: Path) -> Callable[[], None]:
    restore = _kill_source(app)
    app.sources[0]._wake.set()  # type: ignore[attr-defined]  # the pump looks at once instead of in 0.5 s
    return restore


def kill_folder_observer(app: App, _: Path) -> None:
    # The watchdog observer thread that notices new files ends (its own bug, or an inotify failure): the pump
    # thread still runs, but no new part would ever be read.
    observer = app.sources[0]._observer  # type: ignore[attr-defined]
    observer.stop()
    observer.join(5)


def kill_after_publish(app: App, _: Path) -> None:
    assert app.after_publish is not None

    def die(*_: Any) -> None:
        raise SinkKilled

    app.after_publish.handlers.insert(0, die)  # before the audit archive's handler
    with CameraPusher(app.camera_endpoint) as cam:
        cam.send("part-for-the-audit", IMG)  # its verdict goes out, then the after-publish stage dies on it


STAGES: dict[str, tuple[Callable[[App, Path], Any], dict[str, Any]]] = {
    "batcher": (kill_batcher, {}),
    "inference": (kill_inference, {}),
    "deadline-watchdog": (kill_deadline_watchdog, {}),
    "publisher": (kill_publisher, {}),
    "source-camera": (kill_camera, {}),
    "source-folder": (kill_folder, {"folder": True}),
    "source-folder-observer": (kill_folder_observer, {"folder": True, "stage": "source-folder"}),
    "after-publish": (kill_after_publish, {"audit": True}),
}


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    lst = NotifyListener(tmp_path / "notify")
    yield lst
    lst.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("stage", list(STAGES))
def test_any_dead_stage_stops_the_watchdog_drops_readiness_and_exits_1(
    stage: str, package: ModelPackage, tmp_path: Path, listener: NotifyListener
) -> None:
    kill, needs = STAGES[stage]
    stage = needs.get("stage", stage)  # the name the supervisor knows the stage by
    folder = tmp_path / "in"
    folder.mkdir()
    overrides: dict[str, Any] = {
        "batching": {"max_batch": 1, "max_wait_ms": 0},
        "deadlines": {"max_latency_ms": 10_000},
    }
    if needs.get("folder"):
        overrides["sources"] = {
            "camera": {"enabled": False},
            "folder": {"enabled": True, "path": str(folder), "stable_ms": 50},
        }
    if needs.get("audit"):
        overrides["audit"] = {"enabled": True, "path": str(tmp_path / "audit")}
    settings = daemon_settings(package.directory, **overrides)
    notifier = HoldingNotifier(
        {"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    )
    app = App(settings, backend=ScriptedBackend(package, max_batch=1), notifier=notifier)
    app.start()
    try:
        assert stage in app.stages_alive(), f"{stage} is not supervised: {sorted(app.stages_alive())}"
        wait_until(lambda: listener.states().count("WATCHDOG=1") >= 2, 10, "WATCHDOG=1 while healthy")
        assert app.is_ready() and all(app.stages_alive().values())

        notifier.hold.set()
        wait_until(notifier.held.is_set, 10, "the supervisor held inside a WATCHDOG=1")
        restore = kill(app, folder)
        wait_until(lambda: not app.stages_alive()[stage], 10, f"the {stage} thread to die")
        if callable(restore):
            restore()
        dead = listener.mark()  # every datagram sent so far (the held ping included) has been read
        notifier.release.set()

        wait_until(app.stop_requested.is_set, 10, "the supervisor to ask for a stop")
        assert app.exit_code == 1
        # stop() has not run yet (it would drop readiness anyway): the supervisor dropped it for the dead stage.
        assert not app.is_ready()
        assert app.registry.get_sample_value("inspectd_ready", {"line": settings.line}) == 0
        before_stop = listener.mark()
        assert "WATCHDOG=1" not in listener.states_after(dead)[: before_stop - dead - 1]
        assert app.run_until_stopped() == 1
    finally:
        notifier.release.set()
        app.stop()
    end = listener.mark()
    after = [m.split("\n")[0] for _, m in list(listener.messages)[dead + 1 : end]]
    assert "WATCHDOG=1" not in after, f"pinged systemd after {stage} died: {after}"
    assert "STOPPING=1" in after
