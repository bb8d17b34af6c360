"""``torchrun`` runs the unchanged training command with DistributedDataParallel (gloo on CPU here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from tools.synth import write_dataset

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]


def test_torchrun_two_processes_train_one_run(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this python")
    write_dataset(tmp_path / "data", 24, 10, seed=5, size=128)
    out = tmp_path / "run"
    cmd = [
        torchrun,
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "inspectd.cli",
        "train",
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(out),
        "--preset",
        "recipe",
        "--input-size",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--threads",
        "1",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=240, env=env, cwd=Path(__file__).parents[2]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run: ") == 1  # rank 0 alone reports
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # one writer: no duplicated lines from rank 1
    assert json.loads((out / "run.json").read_text())["calibration"]["recall"] == 1.0
