"""The folder source with real files and real writers: complete files only, each exactly once."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import pytest

from daemon.settings import Settings
from daemon.sources.folder import FolderSource
from daemon.types import Frame, Verdict
from engine.package import ModelPackage
from engine.preprocess import decode
from tests.helpers import wait_until
from tests.integration.daemon_harness import (
    VerdictCollector,
    calibrated_package,
    daemon_settings,
    offline_scores,
    running_app,
    synth_images,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    out = []
    for img, _ in synth_images(12, size=160, seed=2):
        ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 0])  # big enough to tear
        assert ok
        out.append(buf.tobytes())
    return out


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory, pngs: list[bytes]) -> ModelPackage:
    imgs = [decode(b) for b in pngs]
    return calibrated_package(tmp_path_factory.mktemp("pkg") / "tiny", imgs)


def folder_settings(package: ModelPackage, folder: Path, **folder_kw: Any) -> Settings:
    return daemon_settings(
        package.directory,
        sources={"camera": {"enabled": False}, "folder": {"enabled": True, "path": str(folder), **folder_kw}},
    )


def slow_write(path: Path, data: bytes, chunks: int = 6, pause_s: float = 0.06) -> None:
    """One open, several writes with pauses: the file is visible (and growing) long before it is complete."""
    step = -(-len(data) // chunks)
    with open(path, "wb") as fh:
        for i in range(0, len(data), step):
            fh.write(data[i : i + step])
            fh.flush()
            os.fsync(fh.fileno())
            time.sleep(pause_s)  # behaviour, not synchronisation: a writer that takes its time


def tmp_then_rename(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    slow_write(tmp, data, chunks=3, pause_s=0.04)
    os.rename(tmp, path)


def assert_each_once_and_equal_to_offline(
    verdicts: list[dict[str, Any]], expected: dict[str, bytes], package: ModelPackage
) -> None:
    ids = [v["frame_id"] for v in verdicts]
    assert sorted(ids) == sorted(expected), "every file exactly once, nothing else"
    offline = dict(zip(expected, offline_scores(package, list(expected.values())), strict=True))
    for v in verdicts:
        assert v["reason"] == "model", v  # a torn read would be a decode_error or a different score
        assert v["score"] == pytest.approx(offline[v["frame_id"]], abs=1e-5)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("use_polling", [False, True], ids=["inotify", "polling"])
def test_slow_and_renaming_writers_are_read_once_complete(
    package: ModelPackage, pngs: list[bytes], tmp_path: Path, use_polling: bool
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    settings = folder_settings(package, folder, use_polling=use_polling, stable_ms=400, poll_ms=20)
    expected = {f"slow{i}.png": pngs[i] for i in range(4)} | {
        f"renamed{i}.png": pngs[4 + i] for i in range(4)
    }
    with running_app(settings) as app, VerdictCollector(app.publisher_endpoint, settings.line) as sub:
        writers = [
            threading.Thread(
                target=slow_write if n.startswith("slow") else tmp_then_rename, args=(folder / n, d)
            )
            for n, d in expected.items()
        ]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        verdicts = sub.wait_verdicts(len(expected), timeout=30)
        # Behaviour, not synchronisation: proving that no file is looked at twice. Longer than stable_ms, so a
        # second look at any file would show up now.
        time.sleep(0.6)
        verdicts = list(sub.verdicts)
    assert_each_once_and_equal_to_offline(verdicts, expected, package)


@pytest.mark.timeout(60)
def test_broken_files_are_rejected_once_and_the_daemon_goes_on(
    package: ModelPackage, pngs: list[bytes], tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    settings = folder_settings(package, folder, stable_ms=200)
    broken = {
        "empty.png": b"",
        "random.png": os.urandom(2000),
        "notes.txt": b"not an image at all\n",
        "truncated.png": pngs[0][: len(pngs[0]) // 2],
    }
    with running_app(settings) as app, VerdictCollector(app.publisher_endpoint, settings.line) as sub:
        for name, data in broken.items():
            (folder / name).write_bytes(data)
        os.symlink("/etc/hostname", folder / "link.png")
        (folder / "subdir").mkdir()  # a directory is not a part
        (folder / ".hidden.png").write_bytes(pngs[1])  # ignored by pattern
        sub.wait_verdicts(5, timeout=20)
        (folder / "good.png").write_bytes(pngs[2])
        verdicts = sub.wait_verdicts(6, timeout=20)
        # Behaviour, not synchronisation: proving that nothing is retried in a loop (stable_ms is 200 ms).
        time.sleep(0.5)
        verdicts = list(sub.verdicts)
        alive = app.pipeline is not None and app.pipeline.threads_alive()
    assert alive
    by_id = {v["frame_id"]: v for v in verdicts}
    assert len(verdicts) == 6 and sorted(by_id) == sorted([*broken, "link.png", "good.png"])
    for name in [*broken, "link.png"]:
        assert (by_id[name]["verdict"], by_id[name]["reason"]) == ("REJECT", "decode_error"), by_id[name]
    assert "symbolic link" in by_id["link.png"]["detail"]["error"]
    assert by_id["good.png"]["reason"] == "model"
    assert by_id["good.png"]["score"] == pytest.approx(offline_scores(package, [pngs[2]])[0], abs=1e-5)


@pytest.mark.timeout(60)
def test_existing_files_then_moved_after_verdict_and_not_reinspected_on_restart(
    package: ModelPackage, pngs: list[bytes], tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    expected = {f"existing{i}.png": pngs[i] for i in range(5)}
    for name, data in expected.items():
        (folder / name).write_bytes(data)
    (folder / "broken.png").write_bytes(b"junk")
    old = time.time() - 60
    for p in folder.iterdir():
        os.utime(p, (old, old))
    settings = folder_settings(package, folder, move_after_verdict=True, process_existing=True)
    seen: list[Verdict] = []
    done = threading.Event()

    def listener(v: Verdict, f: Frame, msg: dict[str, Any]) -> None:  # in-process, like replay will be
        seen.append(v)
        if len(seen) == 6:
            done.set()

    with running_app(settings, listeners=[listener]):
        assert done.wait(20)
        # Moves happen after publish, on the after-publish thread.
        wait_until(
            lambda: not any(p.is_file() for p in folder.iterdir()),
            5,
            "every file moved to done/ or rejected/",
        )
    assert sorted(v.frame_id for v in seen) == sorted([*expected, "broken.png"])
    moved = {p.name: p.parent.name for p in folder.rglob("*.png")}
    for v in seen:
        assert moved[v.frame_id] == ("done" if v.outcome.value == "PASS" else "rejected")
    # A restart finds nothing left to inspect: a moved file has its published verdict.
    again: list[Verdict] = []
    with running_app(settings, listeners=[lambda v, f, m: again.append(v)]) as app:
        # Every file found at start is read (none should be); stopping then drains whatever was read.
        source = app.sources[0]
        assert isinstance(source, FolderSource)
        wait_until(lambda: source.waiting == 0, 10, "the files found at start to be read")
    assert again == []
