"""bench/gpu_check.sh --cpu-dry-run: the GPU station's one measurement command runs every phase end to end on
the CPU (packages made and exported, engine-only timings, verdict flips, the real daemon over ZeroMQ with the
torch backend, where the time goes) and writes JSON and markdown of the documented shape. It needs none of the
carried wheels. Structure only: speed is never asserted in tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_the_dry_run_writes_every_section(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--cpu-dry-run", "--seconds", "1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert {
        "environment", "images", "packages", "engine_only", "flips", "cpu_stages", "device_preprocessing",
        "daemon", "where_the_time_goes", "targets", "command",
    } <= set(result)  # fmt: skip
    assert set(result["packages"]) == {"patch_memory", "resnet18"}
    for kind in ("patch_memory", "resnet18"):
        assert "error" not in result["engine_only"][kind]["torch-fp32"]
        backends = result["flips"][kind]["backends"]
        assert backends["torch fp32"]["flips"] == 0 and backends["torch fp32"]["status"] == "ok"
        assert result["flips"][kind]["device_preprocessing"]["flips"] == 0
    sat = result["daemon"]["cpu"]["saturation"]
    assert sat["img_s"] > 0 and sat["missing"] == 0
    assert set(result["where_the_time_goes"]["cpu"]["stage_wall_ms_per_frame"]) >= {"preprocess", "infer"}
    assert result["targets"]["targets"] == {
        "e2e_img_s": 3000.0,
        "p99_ms_at_100fps": 10.0,
        "flips_fp16_vs_fp32": 0,
    }
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "## Engine only" in md and "## Where the time goes" in md and "--cpu-dry-run" in md


def test_the_gpu_machines_imports_need_none_of_the_training_extras() -> None:
    """The GPU machine has torch, numpy, OpenCV and onnxruntime, plus the carried wheels; not these."""
    code = (
        "import sys\n"
        "for m in ('matplotlib', 'tqdm', 'torchvision', 'onnxscript', 'hypothesis'): sys.modules[m] = None\n"
        "import bench.gpu, bench.run, training.export, training.patch_memory, training.config\n"
        "import engine.preprocess_torch, engine.onnx_fp16, engine.backends.torch, daemon.app, inspectd.cli\n"
        "from engine.model import build_model; build_model(None)\n"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
