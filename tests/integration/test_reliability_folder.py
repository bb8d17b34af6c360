"""The folder source across restarts and over a long shift: the verdict journal, bounded memory, races.

Semantics under test (docs/reliability.md): a restart re-inspects exactly the files without a recorded
verdict — new ones, rewritten ones, and any whose verdict was published but not yet journaled (the crash
window, at-least-once). Inspected names are forgotten when their file goes, so memory follows the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.settings import Backpressure, FolderSettings
from daemon.sources.folder import FolderSource
from daemon.sources.journal import EDGE_BYTES, FileIdentity, edge_digest, same_file
from daemon.types import Frame, Outcome, Reason, Verdict
from engine.package import ModelPackage
from tests.helpers import wait_until
from tests.hostile_inputs import encode, gray
from tests.integration.daemon_harness import daemon_settings, offline_scores, running_app

pytestmark = pytest.mark.integration


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
    # f0 holds a new part under a name inspected before: the next generation, a frame id of its own.
    assert sorted(second.ids) == ["f0.png/2", "f2.png", "f6.png"]
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


# -- a new part under a name inspected before (issue 16, finding 2) -------------------------------------------
class Verdicts:
    """In-process listener keeping (frame_id, reason, score) of every verdict."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, float | None]] = []
        self._cv = threading.Condition()

    def __call__(self, v: Verdict, f: Frame, msg: dict[str, Any]) -> None:
        with self._cv:
            self.items.append((v.frame_id, v.reason.value, v.score))
            self._cv.notify_all()

    def wait(self, n: int, timeout: float = 20) -> list[tuple[str, str, float | None]]:
        with self._cv:
            assert self._cv.wait_for(lambda: len(self.items) >= n, timeout), f"{self.items}, wanted {n}"
            return list(self.items)

    @property
    def ids(self) -> list[str]:
        with self._cv:
            return [i for i, _, _ in self.items]


def bmp(seed: int) -> bytes:
    """Same size for every seed (a BMP's size is its header plus rows): rewrites that keep the size."""
    return encode(gray(48, 48, seed=seed), ".bmp")


def rewrite_in_place_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    """A new image written over the old bytes (no truncation, no new inode), then the old mtime put back, as a
    file system with coarse timestamps would leave it: only ctime (and the content) tell."""
    before = os.stat(path)
    assert before.st_size == len(data)
    with open(path, "r+b") as fh:
        fh.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )


def rename_over(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.rename(tmp, path)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("use_polling", [False, True], ids=["inotify", "polling"])
def test_a_file_renamed_over_an_inspected_one_is_the_next_part(
    package: ModelPackage, tmp_path: Path, use_polling: bool
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    settings = folder_app_settings(package, folder, use_polling=use_polling)
    seen = Verdicts()
    images = [bmp(1), bmp(2), bmp(3)]
    with running_app(settings, listeners=[seen]):
        (folder / "part.bmp").write_bytes(images[0])
        seen.wait(1)
        rename_over(folder / "part.bmp", images[1])
        seen.wait(2)
        rename_over(folder / "part.bmp", images[2])
        got = seen.wait(3)
        time.sleep(0.5)  # behaviour, not synchronisation: a further look would show up now (stable_ms 100)
        got = seen.wait(3)
    assert [i for i, _, _ in got] == ["part.bmp", "part.bmp/2", "part.bmp/3"]
    offline = offline_scores(package, images)
    for (_, reason, score), expected in zip(got, offline, strict=True):
        assert reason == "model" and score == pytest.approx(expected, abs=1e-5)


@pytest.mark.timeout(60)
def test_an_in_place_rewrite_with_the_same_size_and_mtime_is_the_next_part_and_a_touch_is_not(
    package: ModelPackage, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    settings = folder_app_settings(package, folder)
    seen = Verdicts()
    a, b = bmp(4), bmp(5)
    path = folder / "part.bmp"
    with running_app(settings, listeners=[seen]):
        path.write_bytes(a)
        seen.wait(1)
        rewrite_in_place_keeping_size_and_mtime(path, b)
        seen.wait(2)
        # No new part: a touch, a chmod, the same bytes written again (each an event for the name).
        os.utime(path)
        os.chmod(path, 0o640)
        rewrite_in_place_keeping_size_and_mtime(path, b)
        path.write_bytes(b)
        time.sleep(0.6)  # behaviour, not synchronisation: a look taken for a part would show up now
        got = seen.wait(2)
    assert [i for i, _, _ in got] == ["part.bmp", "part.bmp/2"]
    assert got[1][2] == pytest.approx(offline_scores(package, [b])[0], abs=1e-5)


@pytest.mark.timeout(90)
def test_restart_skips_unchanged_files_and_inspects_replaced_ones_as_the_next_part(
    package: ModelPackage, tmp_path: Path
) -> None:
    folder, journal = tmp_path / "in", tmp_path / "journal.jsonl"
    folder.mkdir()
    names = ["unchanged.bmp", "touched.bmp", "renamed-over.bmp", "rewritten.bmp"]
    for i, name in enumerate(names):
        (folder / name).write_bytes(bmp(10 + i))
    settings = folder_app_settings(package, folder, journal=str(journal))
    first = Verdicts()
    with running_app(settings, listeners=[first]):
        first.wait(len(names))
    assert sorted(first.ids) == sorted(names)

    # While the daemon is down: a touch (new mtime and ctime, same bytes), a rename over (new inode, same size),
    # an in-place rewrite keeping size and mtime (a coarse-timestamp file system).
    os.utime(folder / "touched.bmp", ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
    rename_over(folder / "renamed-over.bmp", bmp(20))
    rewrite_in_place_keeping_size_and_mtime(folder / "rewritten.bmp", bmp(21))
    second = Verdicts()
    with running_app(settings, listeners=[second]) as app:
        source = app.sources[0]
        assert isinstance(source, FolderSource)
        got = second.wait(2)
        time.sleep(0.5)  # behaviour, not synchronisation: a third inspection would show up now
        got = second.wait(2)
    assert sorted(i for i, _, _ in got) == ["renamed-over.bmp/2", "rewritten.bmp/2"]
    records = {json.loads(line)["name"]: json.loads(line) for line in journal.read_text().splitlines()}
    assert {n: r["generation"] for n, r in records.items()} == {
        "unchanged.bmp": 1,
        "touched.bmp": 1,
        "renamed-over.bmp": 2,
        "rewritten.bmp": 2,
    }
    assert all(len(r["sha256"]) == 64 and r["v"] == 2 for r in records.values())

    third = Verdicts()
    with running_app(settings, listeners=[third]) as app:
        source = app.sources[0]
        assert isinstance(source, FolderSource)
        wait_until(lambda: source.waiting == 0, 10, "the files found at start to be recorded or read")
    assert third.ids == []  # every file has its verdict on record now


@pytest.mark.timeout(60)
def test_an_old_journal_is_migrated_and_nothing_is_reinspected_for_it(
    package: ModelPackage, tmp_path: Path
) -> None:
    """A version-1 journal (name, size, mtime_ns): matching files are not inspected again (as before), their
    records are rewritten with hashes; a record whose file changed meanwhile means the next generation."""
    folder, journal = tmp_path / "in", tmp_path / "journal.jsonl"
    folder.mkdir()
    v1 = []
    for i, name in enumerate(["a.bmp", "b.bmp", "changed.bmp"]):
        (folder / name).write_bytes(bmp(30 + i))
        st = os.stat(folder / name)
        v1.append({"name": name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "boot_id": "old", "seq": i + 1,
                   "verdict": "PASS", "reason": "model"})  # fmt: skip
    journal.write_text("".join(json.dumps(r) + "\n" for r in v1))
    rename_over(folder / "changed.bmp", bmp(39))
    seen = Verdicts()
    with running_app(folder_app_settings(package, folder, journal=str(journal)), listeners=[seen]):
        got = seen.wait(1)
        time.sleep(0.5)  # behaviour, not synchronisation: a re-inspection of a.bmp or b.bmp would show up now
        got = seen.wait(1)
    assert [i for i, _, _ in got] == ["changed.bmp/2"]
    records = {json.loads(line)["name"]: json.loads(line) for line in journal.read_text().splitlines()}
    for name in ("a.bmp", "b.bmp"):
        data = (folder / name).read_bytes()
        assert records[name]["sha256"] == hashlib.sha256(data).hexdigest()
        assert (records[name]["boot_id"], records[name]["generation"]) == (
            "old",
            1,
        )  # the same record, upgraded
    assert records["changed.bmp"]["generation"] == 2


def test_a_rewrite_within_one_tick_of_a_coarse_clock_is_caught_by_the_edges(tmp_path: Path) -> None:
    """All of size, mtime, ctime and inode equal to the record (what a 1–2 s timestamp granularity allows):
    the hash of the first and last KiB tells the new image from the inspected one; an equal file passes."""
    path = tmp_path / "x.bmp"
    old, new = bmp(1), bmp(2)
    path.write_bytes(new)
    st = os.stat(path)
    recorded_old = FileIdentity.of(st, old)  # the inspected bytes, with the stat the rewrite left behind
    assert recorded_old.stat_matches(st) and recorded_old.sha256 != FileIdentity.of(st, new).sha256
    assert same_file(path, recorded_old, 1 << 20) is None  # a new part
    recorded_new = FileIdentity.of(st, new)
    assert same_file(path, recorded_new, 1 << 20) == recorded_new  # the inspected file: not again
    assert recorded_new.edges == edge_digest(len(new), new[:EDGE_BYTES], new[-EDGE_BYTES:])


def test_a_file_replaced_before_its_move_is_left_for_its_own_verdict(tmp_path: Path) -> None:
    """move_after_verdict: the move after a verdict must not carry off a new part renamed over the inspected
    file in the meantime (it would land in done/ without a verdict of its own)."""
    (tmp_path / "done").mkdir()
    (tmp_path / "rejected").mkdir()
    source = FolderSource(FolderSettings(enabled=True, path=tmp_path, stable_ms=1, move_after_verdict=True))
    intake = FakeIntake()
    for name in ("kept.bmp", "moved.bmp"):
        (tmp_path / name).write_bytes(bmp(40))
        source.note(str(tmp_path / name), closed=True)
        source._emit(name, intake)
    rename_over(tmp_path / "kept.bmp", bmp(41))
    for frame in intake.frames:
        verdict = Verdict(frame.frame_id, "folder", Outcome.PASS, Reason.MODEL, 0.1, 0.5, "m", None, 0.0)
        source.on_verdict(verdict, frame, {})
    assert (tmp_path / "kept.bmp").read_bytes() == bmp(41) and not (tmp_path / "done" / "kept.bmp").exists()
    assert (tmp_path / "done" / "moved.bmp").exists() and not (tmp_path / "moved.bmp").exists()
    source.note(str(tmp_path / "kept.bmp"), closed=True)  # what the watcher does in a running daemon
    assert source._ready() == ["kept.bmp"]
    source._emit("kept.bmp", intake)
    assert [f.frame_id for f in intake.frames] == ["kept.bmp", "moved.bmp", "kept.bmp/2"]
