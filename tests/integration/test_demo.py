"""``inspectd demo`` on a tiny synthetic set with a one-epoch training: every step runs for real (synth, the
train and export subprocesses, the daemon, the simulated camera, the live view), and a second run reuses the
cached package instead of training again."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.package import load_package
from inspectd.cli import main

pytest.importorskip("torch")  # the demo trains; the train extra must be installed
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

ARGS = ["--synthetic", "--ok", "12", "--ng", "6", "--epochs", "1", "--train-minutes", "1", "--input-size", "32x96",
        "--seconds", "3", "--fps", "8", "--pool", "4", "--metrics-port", "0"]  # fmt: skip


def verdict_counts(text: str) -> tuple[int, int, int]:
    m = re.search(r"verdicts\s+(\d+): PASS (\d+), REJECT (\d+)", text)
    assert m, text
    return int(m[1]), int(m[2]), int(m[3])


def test_demo_trains_serves_and_reuses_its_package(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "demo"
    assert main(["demo", "--workdir", str(work), *ARGS]) == 0
    first = capsys.readouterr().out
    assert "reduced input size 32×96" in first  # said on screen
    assert "$ inspectd train --data" in first and "$ inspectd export" in first
    n, passed, rejected = verdict_counts(first)
    assert n >= 1 and passed + rejected == n
    assert re.search(r"\n\s+1  (PASS|REJECT) ", first)  # the live view printed verdict seq 1
    assert "first verdict" in first and "http://127.0.0.1:" in first
    (pkg_dir,) = (work / "models").iterdir()
    assert load_package(pkg_dir).meta.preprocess.input_size == (32, 96)

    assert main(["demo", "--workdir", str(work), *ARGS]) == 0
    second = capsys.readouterr().out
    assert "model package: cached" in second and "synthetic screws: cached" in second
    assert "$ inspectd train" not in second
    assert verdict_counts(second)[0] >= 1
    assert [p.name for p in (work / "models").iterdir()] == [pkg_dir.name]
