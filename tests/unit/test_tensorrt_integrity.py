"""The GPU path is integrity-checked like the CPU path (issue 16, finding 7), against the fake tensorrt + CUDA
runtime, for both TensorRT API generations (10.x names; 11.x builds fp32 here, so the bytes parsed are the
package's own: its FP16 route parses an FP16 copy of them, tests/unit/test_tensorrt_fp16.py):

- a plan's sha256 is recorded when it is built; the plan is read once, those bytes are hashed and only those
  bytes are deserialized; a swapped or corrupted plan is refused (never deserialized, never rebuilt over);
- a build reads model.onnx once, checks its sha256 against the package's and parses those bytes, not the path;
- a plan that has not passed build-engine's parity gate is refused unless ``allow_ungated``, and when accepted
  it is logged and visible in ``describe()`` (the labels of ``inspectd_model_info``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from engine.backend import create_backend
from engine.backends.tensorrt import TensorRTBackend
from engine.package import load_package
from engine.trt_build import (
    EngineBuildError,
    EngineCache,
    PlanIntegrityError,
    UngatedPlanError,
    build_plan,
)
from inspectd.cli import main
from tests.helpers import drawn_dataset, tiny_package
from tests.unit import fake_cudart, fake_tensorrt

SIZE = (32, 32)
# (TensorRT version, precision): 11.x at fp32, where the parsed bytes are the package's own ONNX.
GENERATIONS = [pytest.param("10.3.0", "fp16", id="trt10"), pytest.param("11.1.0", "fp32", id="trt11")]
UNGATED = {"rebuild": True, "allow_ungated": True}


@pytest.fixture()
def pkg_dir(tmp_path: Path) -> Path:
    tiny_package(tmp_path / "pkg", input_size=SIZE, seed=1)
    return tmp_path / "pkg"


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return drawn_dataset(tmp_path / "data", n_ok=5, n_ng=3, size=96, seed_step=7)


def _install(monkeypatch: pytest.MonkeyPatch, version: str) -> tuple[Any, Any]:
    return fake_tensorrt.install(monkeypatch, version=version), fake_cudart.install(monkeypatch)


def _enter(pkg: Any, **options: Any) -> TensorRTBackend:
    with create_backend("tensorrt", pkg, max_batch=4, **options) as be:
        assert isinstance(be, TensorRTBackend)
        return be


def _only_plan(pkg: Any) -> tuple[EngineCache, Path, dict[str, Any]]:
    cache = EngineCache(pkg.engine_cache_dir)
    (key,) = cache.entries()
    plan = cache.plan_path(key)
    return cache, plan, json.loads(cache.sidecar_path(plan).read_text())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ── plan integrity ────────────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(("version", "precision"), GENERATIONS)
def test_plan_sha256_is_recorded_and_exactly_the_hashed_bytes_are_deserialized(
    monkeypatch: pytest.MonkeyPatch, pkg_dir: Path, version: str, precision: str
) -> None:
    trt, cuda = _install(monkeypatch, version)
    pkg = load_package(pkg_dir)
    _enter(pkg, precision=precision, **UNGATED)
    _, plan, record = _only_plan(pkg)
    on_disk = plan.read_bytes()
    assert record["plan_sha256"] == _sha(on_disk) and record["plan_bytes"] == len(on_disk)
    _enter(pkg, precision=precision, allow_ungated=True)  # the cache hit
    assert trt.deserialized_sha256 == [record["plan_sha256"]] * 2
    assert len(trt.builds) == 1 and cuda.live == 0


@pytest.mark.parametrize(("version", "precision"), GENERATIONS)
def test_a_swapped_or_corrupted_plan_is_refused_never_deserialized_nor_rebuilt_over(
    monkeypatch: pytest.MonkeyPatch, pkg_dir: Path, tmp_path: Path, version: str, precision: str
) -> None:
    trt, cuda = _install(monkeypatch, version)
    pkg = load_package(pkg_dir)
    be = _enter(pkg, precision=precision, **UNGATED)
    assert be.key is not None
    _, plan, _ = _only_plan(pkg)
    # A valid plan of another model (same TensorRT, same profile) copied over this one: it would deserialize
    # and run fine, judging parts with the wrong network.
    tiny_package(tmp_path / "other", input_size=SIZE, seed=9)
    other = load_package(tmp_path / "other")
    foreign = build_plan(
        other.onnx_path,
        replace(be.key, onnx_sha256=other.meta.onnx_sha256),
        input_name="input",
        timing_cache=None,
    )
    plan.write_bytes(foreign)
    seen, builds = list(trt.deserialized_sha256), len(trt.builds)
    for options in ({"allow_ungated": True}, UNGATED, {"allow_ungated": True, "engine_file": plan}):
        with pytest.raises(
            PlanIntegrityError, match=r"has sha256 .* but its sidecar recorded .*replaced or corrupted"
        ):
            _enter(pkg, precision=precision, **options)
    corrupted = bytearray(foreign)
    corrupted[-1] ^= 0xFF
    plan.write_bytes(bytes(corrupted))
    with pytest.raises(PlanIntegrityError, match="Refusing to deserialize it"):
        _enter(pkg, precision=precision, **UNGATED)
    assert trt.deserialized_sha256 == seen, "a plan that fails its hash must never reach TensorRT"
    assert len(trt.builds) == builds and plan.read_bytes() == bytes(corrupted), "kept as evidence"
    assert cuda.live == 0


def test_a_sidecar_without_plan_sha256_is_refused(monkeypatch: pytest.MonkeyPatch, pkg_dir: Path) -> None:
    trt, _ = _install(monkeypatch, "10.3.0")
    pkg = load_package(pkg_dir)
    _enter(pkg, **UNGATED)
    cache, plan, record = _only_plan(pkg)
    del record["plan_sha256"]  # written by an inspectd before plan hashing
    cache.sidecar_path(plan).write_text(json.dumps(record))
    with pytest.raises(PlanIntegrityError, match="records no plan_sha256"):
        _enter(pkg, **UNGATED)
    assert len(trt.deserialized_sha256) == 1


# ── the ONNX a rebuild parses ─────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(("version", "precision"), GENERATIONS)
def test_a_build_parses_the_verified_onnx_bytes_not_the_path(
    monkeypatch: pytest.MonkeyPatch, pkg_dir: Path, tmp_path: Path, version: str, precision: str
) -> None:
    trt, _ = _install(monkeypatch, version)
    pkg = load_package(pkg_dir)
    _enter(pkg, precision=precision, **UNGATED)
    assert trt.parsed == [("bytes", pkg.meta.onnx_sha256)]  # hashed bytes, never parse_from_file(path)

    # model.onnx swapped after load_package checked it (the time-of-check/time-of-use gap): refused, and no
    # plan of the new network is stored under the old network's key.
    tiny_package(tmp_path / "swap", input_size=SIZE, seed=5)
    (pkg_dir / "model.onnx").write_bytes((tmp_path / "swap" / "model.onnx").read_bytes())
    for p in pkg.engine_cache_dir.glob("*.plan"):
        p.unlink()
    with pytest.raises(EngineBuildError, match="does not match the package's onnx_sha256"):
        _enter(pkg, precision=precision, **UNGATED)
    assert len(trt.builds) == 1 and len(trt.parsed) == 1
    assert list(pkg.engine_cache_dir.glob("*.plan")) == []


# ── the parity gate ───────────────────────────────────────────────────────────────────────────────────────


def test_rebuild_at_start_without_allow_ungated_refuses_before_building(
    monkeypatch: pytest.MonkeyPatch, pkg_dir: Path
) -> None:
    trt, cuda = _install(monkeypatch, "10.3.0")
    with pytest.raises(
        UngatedPlanError, match=r"rebuild=true would build one now.*allow_ungated=true"
    ) as exc:
        _enter(load_package(pkg_dir), rebuild=True)
    assert "inspectd build-engine" in str(exc.value)
    assert trt.builds == [] and cuda.live == 0  # no minutes spent on a plan it would then refuse


@pytest.mark.parametrize(("version", "precision"), GENERATIONS)
def test_an_ungated_plan_is_refused_unless_accepted_and_then_visible(
    monkeypatch: pytest.MonkeyPatch,
    pkg_dir: Path,
    caplog: pytest.LogCaptureFixture,
    version: str,
    precision: str,
) -> None:
    trt, cuda = _install(monkeypatch, version)
    pkg = load_package(pkg_dir)
    assert main(["build-engine", str(pkg_dir), "--no-parity", f"--{precision}", "--max-batch", "4"]) == 0
    with pytest.raises(
        UngatedPlanError, match=r"has not passed the parity gate .*--no-parity.*allow_ungated"
    ):
        _enter(pkg, precision=precision)
    assert trt.deserialized_sha256 == []
    with pytest.raises(UngatedPlanError):  # rebuild would only make another ungated plan: no way around
        _enter(pkg, precision=precision, rebuild=True)

    be = create_backend("tensorrt", pkg, max_batch=4, precision=precision, allow_ungated=True)
    assert be.describe()["gate"] == "ungated-allowed"  # before entering: what the configuration admits
    with caplog.at_level(logging.WARNING, logger="engine.trt_build"), be:
        pass
    assert be.describe() == {
        "backend": "tensorrt",
        "precision": precision,
        "model": pkg.meta.model_id,
        "gate": "ungated-accepted",
    }
    assert any("NOT passed the parity gate" in r.getMessage() for r in caplog.records)
    assert len(trt.deserialized_sha256) == 1 and cuda.live == 0


def test_a_plan_built_at_start_with_allow_ungated_is_recorded_and_visible(
    monkeypatch: pytest.MonkeyPatch, pkg_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _install(monkeypatch, "10.3.0")
    pkg = load_package(pkg_dir)
    with caplog.at_level(logging.WARNING, logger="engine.trt_build"):
        be = _enter(pkg, **UNGATED)
    assert be.describe()["gate"] == "ungated-accepted"
    assert any("allow_ungated=true" in r.getMessage() for r in caplog.records)
    _, _, record = _only_plan(pkg)
    assert record["parity"] == {"gated": False, "reason": "built by the backend at start (rebuild=true)"}


def test_a_gated_plan_records_the_gate_for_its_bytes_and_is_served(
    monkeypatch: pytest.MonkeyPatch, pkg_dir: Path, data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trt, _ = _install(monkeypatch, "10.3.0")
    pkg = load_package(pkg_dir)
    assert main(["build-engine", str(pkg_dir), "--data", str(data), "--max-batch", "4"]) == 0
    cache, plan, record = _only_plan(pkg)
    parity = record["parity"]
    assert parity["gated"] is True and parity["plan_sha256"] == record["plan_sha256"] == _sha(
        plan.read_bytes()
    )
    assert parity["n"] == 8 and parity["flips"] == 0 and parity["max_abs_logit_delta"] < 0.05
    assert parity["tolerance"] == {"max_flips": 0, "max_score_delta": None} and parity["data"] == str(data)

    be = create_backend("tensorrt", pkg, max_batch=4)  # no allow_ungated, no rebuild
    assert be.describe()["gate"] == "required"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine.trt_build"), be:
        pass
    assert be.describe()["gate"] == "passed" and not caplog.records

    # The gate's result belongs to those bytes: a new plan with a freshly "fixed" sidecar hash is not gated.
    key = cache.entries()[0]
    cache.store(key, plan.read_bytes() + b"\0", {"parity": parity})
    with pytest.raises(UngatedPlanError):
        _enter(pkg)
    assert len(trt.builds) == 1


def test_build_engine_gates_an_ungated_hit_and_refuses_a_corrupted_one(
    monkeypatch: pytest.MonkeyPatch, pkg_dir: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trt, _ = _install(monkeypatch, "10.3.0")
    pkg = load_package(pkg_dir)
    _enter(pkg, **UNGATED)  # the daemon built one at start
    capsys.readouterr()
    args = ["build-engine", str(pkg_dir), "--data", str(data), "--max-batch", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ungated plan" in out and "cache hit" not in out and "activated:" in out
    assert len(trt.builds) == 2
    _, plan, record = _only_plan(pkg)
    assert record["parity"]["gated"] is True
    _enter(pkg)  # now served without allow_ungated

    plan.write_bytes(plan.read_bytes()[:-1])  # truncated on disk
    assert main(args) == 1
    assert "REFUSED" in capsys.readouterr().out and len(trt.builds) == 2
    assert main([*args, "--force"]) == 0 and len(trt.builds) == 3
    _enter(pkg)
