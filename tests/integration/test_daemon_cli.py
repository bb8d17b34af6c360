"""The operator commands against a running daemon: simulated camera, watch, the example subscriber."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from engine.package import ModelPackage
from inspectd.cli import main
from tests.integration.daemon_harness import VerdictCollector, daemon_settings, running_app
from tools.commands import watch

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


class WatchOutput(io.StringIO):
    """``inspectd watch``'s output; ``heartbeat`` is set once it printed one: its subscription is live."""

    def __init__(self) -> None:
        super().__init__()
        self.heartbeat = threading.Event()

    def write(self, s: str) -> int:
        if s.startswith("heartbeat "):
            self.heartbeat.set()
        return super().write(s)


@pytest.mark.timeout(60)
def test_camera_synth_and_watch(package: ModelPackage) -> None:
    settings = daemon_settings(package.directory)
    out = WatchOutput()
    with running_app(settings) as app, VerdictCollector(app.publisher_endpoint, settings.line) as sub:
        args = argparse.Namespace(
            connect=app.publisher_endpoint,
            line=settings.line,
            count=6,
            timeout=30,
            json=False,
            heartbeats=True,
        )
        watcher = threading.Thread(target=watch.run, args=(args, out))
        watcher.start()
        # The first heartbeat it prints: its subscription has reached the PUB socket (nothing sent from now on
        # is lost to the slow joiner).
        assert out.heartbeat.wait(10), "inspectd watch got no heartbeat"
        rc = main(
            [
                "camera",
                "--connect",
                str(app.camera_endpoint),
                "--fps",
                "40",
                "--count",
                "6",
                "--size",
                "128",
                "--pool",
                "3",
            ]
        )
        verdicts = sub.wait_verdicts(6, timeout=20)
        watcher.join(20)
    assert rc == 0
    assert [v["frame_id"].split("-")[:2] for v in verdicts] == [["cam", f"{i:07d}"] for i in range(1, 7)]
    assert all(v["reason"] == "model" for v in verdicts)
    lines = out.getvalue().splitlines()
    assert sum(" model " in ln for ln in lines) == 6
    assert lines[-1] == "6 verdicts, 0 gap(s), 0 restart(s)"


@pytest.mark.timeout(60)
def test_camera_from_a_folder_as_png(package: ModelPackage, tmp_path: Path) -> None:
    from tools.synth import write_dataset

    write_dataset(tmp_path / "ds", n_ok=2, n_ng=2, seed=0, size=96)
    settings = daemon_settings(package.directory)
    with running_app(settings) as app, VerdictCollector(app.publisher_endpoint, settings.line) as sub:
        rc = main(
            ["camera", "--connect", str(app.camera_endpoint), "--fps", "50", "--count", "4", "--source",
             str(tmp_path / "ds"), "--encoding", "png", "--prefix", "dir"]
        )  # fmt: skip
        verdicts = sub.wait_verdicts(4, timeout=20)
    assert rc == 0
    assert len(verdicts) == 4 and all(v["frame_id"].startswith("dir-") for v in verdicts)
    assert all(v["reason"] == "model" for v in verdicts)


@pytest.mark.timeout(60)
def test_example_subscriber_prints_verdicts(package: ModelPackage) -> None:
    settings = daemon_settings(package.directory)
    stop = threading.Event()
    with running_app(settings) as app:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "examples" / "plc_subscriber.py"),
                str(app.publisher_endpoint),
                settings.line,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )

        def feed() -> None:  # until the subscriber has joined and printed (it may join mid-stream)
            while not stop.is_set():
                main(
                    [
                        "camera",
                        "--connect",
                        str(app.camera_endpoint),
                        "--fps",
                        "20",
                        "--count",
                        "2",
                        "--size",
                        "96",
                    ]
                )

        sender = threading.Thread(target=feed)
        sender.start()
        try:
            assert proc.stdout is not None
            lines = [proc.stdout.readline().strip() for _ in range(3)]
        finally:
            stop.set()
            sender.join(10)
            proc.terminate()
            proc.wait(10)
    seqs = [int(ln.split()[0]) for ln in lines]
    assert seqs == list(range(seqs[0], seqs[0] + 3))
    assert all(ln.endswith(("-> pass", "-> divert")) for ln in lines)
