"""The folder source across restarts and over a long shift: the verdict journal, bounded memory, races.

Semantics under test (docs/reliability.md): a restart re-inspects exactly the files without a recorded
verdict — new ones, rewritten ones, and any whose verdict was published but not yet journaled (the crash
window, at-least-once). Inspected names are forgotten when their file goes, so memory follows the folder.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.settings import Backpressure, FolderSettings
from daemon.sources.folder import FolderSource
from daemon.types import Frame, Verdict
from engine.package import ModelPackage, load_package
from tests.helpers import tiny_package, wait_until
from tests.hostile_inputs import encode, gray
from tests.integration.daemon_harness import daemon_settings, running_app

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    d = tmp_path_factory.mktemp("pkg") / "tiny"
    tiny_package(d, input_size=(32, 32))
    return load_package(d)


class Seen:
    """An in-process verdict listener (no slow-joiner window: it sees every verdict of the run)."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self._cv = threading.Condition()

    def __call__(self, v: Verdict, f: Frame, msg: dict[str, Any]) -> None:
        with self._cv:
            self.ids.append(v.frame_id)
            self._cv.notify_all()

    def wait(self, n: int, timeout: float = 20) -> list[str]:
        with self._cv:
            assert self._cv.wait_for(lambda: len(self.ids) >= n, timeout), f"{len(self.ids)} of {n} verdicts"
            return list(self.ids)


def folder_app_settings(package: ModelPackage, folder: Path, **folder_kw: Any) -> Any:
    return daemon_settings(
        package.directory,
        sources={
            "camera": {"enabled": False},
            "folder": {"enabled": True, "path": str(folder), "stable_ms": 100, **folder_kw},
        },
    )


@pytest.mark.timeout(60)
def test_restart_reinspects_only_files_without_a_recorded_verdict(
    package: ModelPackage, tmp_path: Path
) -> None:
    folder, journal = (
        tmp_path / "in",
        tmp_path / "in" / ".inspectd-journal",
    )  # inside the folder: never a part
    folder.mkdir()
    for i in range(6):
        (folder / f"f{i}.png").write_bytes(encode(gray(64, 64, seed=i), ".png"))
    old = time.time() - 60
    for p in folder.iterdir():
        os.utime(p, (old, old))
    settings = folder_app_settings(package, folder, journal=str(journal), ignore_patterns=["*.tmp"])
    first = Seen()
    with running_app(settings, listeners=[first]):
        first.wait(6)
    assert sorted(first.ids) == [f"f{i}.png" for i in range(6)]
    assert sorted(json.loads(line)["name"] for line in journal.read_text().splitlines()) == sorted(first.ids)

    # Between the runs: f0 rewritten (a new part under an old name), f1 deleted, f6 new, and the crash window:
    # f2's verdict was published but its journal line never written; a torn line at the end.
    (folder / "f0.png").write_bytes(encode(gray(64, 64, seed=40), ".png"))
    (folder / "f1.png").unlink()
    (folder / "f6.png").write_bytes(encode(gray(64, 64, seed=6), ".png"))
    kept = [line for line in journal.read_text().splitlines() if json.loads(line)["name"] != "f2.png"]
    journal.write_text("\n".join(kept) + '\n{"name": "f3.png", "si')
    second = Seen()
    with running_app(settings, listeners=[second]):
        second.wait(3)
        # And nothing else. Behaviour, not synchronisation: a late second look (say the journal's own appends
        # taken for a part) would show up within this window.
        time.sleep(0.5)
    assert sorted(second.ids) == ["f0.png", "f2.png", "f6.png"]
    names = [json.loads(line)["name"] for line in journal.read_text().splitlines()]
    assert "f1.png" not in names  # compacted: the journal follows the folder
    assert sorted(set(names)) == sorted(f"f{i}.png" for i in (0, 2, 3, 4, 5, 6))
    third = Seen()
    with running_app(settings, listeners=[third]) as app:
        # Every file found at start is either recorded or read; stopping then drains whatever was read.
        source = app.sources[0]
        assert isinstance(source, FolderSource)
        wait_until(lambda: source.waiting == 0, 10, "the files found at start to be recorded or read")
    assert third.ids == []  # everything has a recorded verdict now


@pytest.mark.timeout(60)
def test_inspected_names_are_forgotten_when_their_files_go(package: ModelPackage, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    settings = folder_app_settings(package, folder)
    seen = Seen()
    with running_app(settings, listeners=[seen]) as app:
        source = app.sources[0]
        assert isinstance(source, FolderSource)
        for i in range(30):
            (folder / f"p{i}.png").write_bytes(encode(gray(40, 40, seed=i), ".png"))
        seen.wait(30)
        assert source.remembered == 30
        for i in range(30):
            (folder / f"p{i}.png").unlink()
        wait_until(
            lambda: source.remembered == 0,
            10,
            lambda: f"the names forgotten ({source.remembered} still remembered)",
        )
        (folder / "p7.png").write_bytes(encode(gray(40, 40, seed=77), ".png"))  # same name, new part
        ids = seen.wait(31)
    assert ids[-1] == "p7.png"


class FakeIntake:
    def __init__(self) -> None:
        self.frames: list[Frame] = []

    def submit(self, frame: Frame, policy: Backpressure) -> None:
        self.frames.append(frame)

    def wait_for_room(self, timeout: float) -> bool:
        return True

    def message_error(self, kind: str) -> None:
        raise AssertionError(kind)


@pytest.mark.timeout(30)
def test_a_file_deleted_before_it_is_read(tmp_path: Path) -> None:
    """Both sides of the race, deterministically (the source's steps called in order, no threads)."""
    source = FolderSource(FolderSettings(enabled=True, path=tmp_path, stable_ms=1))
    intake = FakeIntake()
    gone_early, gone_late = tmp_path / "early.png", tmp_path / "late.png"
    for p in (gone_early, gone_late):
        p.write_bytes(encode(gray(), ".png"))
        source.note(str(p), closed=True)
    gone_early.unlink()  # before it was found complete: not a part here, nothing to say
    ready = source._ready()
    assert ready == ["late.png"]
    gone_late.unlink()  # found complete, deleted before the read: a part that was not inspected
    source._emit("late.png", intake)
    assert [(f.frame_id, f.error) for f in intake.frames] == [
        ("late.png", "file vanished before it could be read")
    ]
    assert source._ready() == []  # and never retried
