"""``inspectd build-engine``: build → parity gate → activate (or refuse), against the fake tensorrt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.backend import create_backend
from engine.package import load_package
from engine.parity import list_images, preprocess_images, verdicts
from engine.trt_build import EngineCache
from inspectd.cli import main
from tests.helpers import drawn_dataset, tiny_package
from tests.unit import fake_cudart, fake_tensorrt


@pytest.fixture()
def fakes(monkeypatch: pytest.MonkeyPatch) -> fake_tensorrt.State:
    fake_cudart.install(monkeypatch)
    return fake_tensorrt.install(monkeypatch)


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[Path, Path]:
    data = drawn_dataset(tmp_path / "data", n_ok=6, n_ng=4, size=128, seed_step=10)
    pkg_dir = tmp_path / "pkg"
    tiny_package(pkg_dir, input_size=(32, 32), seed=4)
    return pkg_dir, data


def _flipping_bias(pkg_dir: Path, data: Path) -> float:
    """A logit shift that pushes the majority verdict across the threshold: many flips."""
    pkg = load_package(pkg_dir)
    with create_backend("onnxruntime", pkg, max_batch=16) as ort:
        ref = ort.infer(preprocess_images(pkg, list_images(data)))
    rejected = int(verdicts(ref, pkg.meta.decision).sum())
    return 50.0 if rejected < len(ref) / 2 else -50.0


def _engine_files(pkg_dir: Path) -> list[str]:
    d = pkg_dir / "engines"
    return (
        sorted(p.name for p in d.glob("*.plan")) + sorted(p.name for p in d.glob("*.json"))
        if d.is_dir()
        else []
    )


def test_gate_passes_activates_and_records(fakes, setup, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    pkg_dir, data = setup
    assert (
        main(["build-engine", str(pkg_dir), "--data", str(data), "--max-batch", "4", "--opt-batch", "2"]) == 0
    )
    out = capsys.readouterr().out
    assert "activated:" in out and "tensorrt fp16" in out
    cache = EngineCache(pkg_dir / "engines")
    (key,) = cache.entries()
    assert key.profile.opt == 2 and key.precision == "fp16"
    record = json.loads(cache.sidecar_path(cache.plan_path(key)).read_text())
    assert (
        record["parity"]["gated"] is True and record["parity"]["flips"] == 0 and record["parity"]["n"] == 10
    )
    assert not any("candidate" in name for name in _engine_files(pkg_dir))
    # The daemon's backend now finds exactly this plan (no rebuild allowed):
    with create_backend("tensorrt", load_package(pkg_dir), max_batch=4, opt_batch=2):
        pass
    assert len(fakes.builds) == 1

    assert (
        main(["build-engine", str(pkg_dir), "--data", str(data), "--max-batch", "4", "--opt-batch", "2"]) == 0
    )
    assert "cache hit" in capsys.readouterr().out and len(fakes.builds) == 1


def test_gate_refuses_an_engine_that_flips_verdicts(fakes, setup, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    pkg_dir, data = setup
    fakes.output_bias = _flipping_bias(pkg_dir, data)
    assert main(["build-engine", str(pkg_dir), "--data", str(data), "--max-batch", "4"]) == 1
    out = capsys.readouterr().out
    assert "REFUSED" in out and "FAIL" in out
    assert _engine_files(pkg_dir) == [] or all("timing" in n for n in _engine_files(pkg_dir))
    assert EngineCache(pkg_dir / "engines").entries() == []
    # A tolerance that admits the flips activates it (the operator's explicit choice):
    assert (
        main(["build-engine", str(pkg_dir), "--data", str(data), "--max-batch", "4", "--max-flips", "10"])
        == 0
    )


def test_gate_needs_data_unless_explicitly_skipped(fakes, setup) -> None:  # type: ignore[no-untyped-def]
    pkg_dir, _ = setup
    with pytest.raises(SystemExit, match="parity gate needs validation images"):
        main(["build-engine", str(pkg_dir)])
    assert fakes.builds == []
    assert main(["build-engine", str(pkg_dir), "--no-parity", "--fp32", "--max-batch", "2"]) == 0
    (key,) = EngineCache(pkg_dir / "engines").entries()
    cache = EngineCache(pkg_dir / "engines")
    parity = json.loads(cache.sidecar_path(cache.plan_path(key)).read_text())["parity"]
    assert parity == {"gated": False, "reason": "activated by inspectd build-engine --no-parity"}
    assert key.precision == "fp32" and fakes.builds[0]["fp16"] is False


def test_check_backends_lists_every_backend_and_skips_what_cannot_run(
    setup, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    pkg_dir, data = setup
    assert main(["check-backends", str(pkg_dir), "--data", str(data), "--limit", "6"]) == 0
    out = capsys.readouterr().out
    assert "6 images" in out
    lines = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    assert "0/6" in lines["onnxruntime cpu"] and "ok" in lines["onnxruntime cpu"]
    assert "skipped" in lines["torch cpu"] and "model.pt" in lines["torch cpu"]
    assert "skipped" in lines["tensorrt fp16"]


def test_check_backends_runs_tensorrt_with_an_activated_engine(
    fakes, setup, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    pkg_dir, data = setup
    assert main(["build-engine", str(pkg_dir), "--data", str(data)]) == 0  # default profile: max 32
    capsys.readouterr()
    assert main(["check-backends", str(pkg_dir), "--data", str(data), "--backends", "tensorrt fp16"]) == 0
    out = capsys.readouterr().out
    trt_line = next(line for line in out.splitlines() if line.startswith("tensorrt fp16"))
    assert trt_line.split()[2] == "fp16" and "0/10" in trt_line and trt_line.rstrip().endswith("ok")
    fakes.output_bias = _flipping_bias(pkg_dir, data)  # an engine gone wrong after activation
    assert main(["check-backends", str(pkg_dir), "--data", str(data), "--backends", "tensorrt fp16"]) == 1
    trt_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("tensorrt fp16"))
    assert trt_line.split()[-2:] == ["10/10", "FAIL"]
