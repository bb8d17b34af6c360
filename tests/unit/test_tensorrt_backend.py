"""TensorRT builder, engine cache and runner control flow against the fake tensorrt + fake CUDA runtime.

The fakes compute for real (the "plan" runs its ONNX with ONNX Runtime on the memory behind the tensor
addresses), so results are compared with the reference, not just call sequences.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.backend import BackendError, InputError, create_backend
from engine.package import load_package
from engine.trt_build import EngineBuildError, EngineCache, EngineKeyMismatch, build_plan
from tests.helpers import tiny_package
from tests.unit import fake_cudart, fake_tensorrt

SIZE = (32, 32)


def _enter(kind: str, package: Any, **options: Any) -> None:
    """Open and close a backend: what is under test happens in ``__enter__``."""
    with create_backend(kind, package, **options):
        pass


@pytest.fixture()
def fakes(monkeypatch: pytest.MonkeyPatch) -> tuple[fake_tensorrt.State, fake_cudart.CudaState]:
    return fake_tensorrt.install(monkeypatch), fake_cudart.install(monkeypatch)


@pytest.fixture()
def pkg_dir(tmp_path: Path) -> Path:
    tiny_package(tmp_path / "pkg", input_size=SIZE, seed=1)
    return tmp_path / "pkg"


def _batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 1, *SIZE)).astype(np.float32)


def _reference(pkg_dir: Path, batch: np.ndarray) -> np.ndarray:
    with create_backend("onnxruntime", load_package(pkg_dir), max_batch=len(batch)) as ort:
        return ort.infer(batch)


def test_no_engine_is_a_clear_error_naming_the_key_and_nothing_leaks(fakes, pkg_dir: Path) -> None:  # type: ignore[no-untyped-def]
    trt, cuda = fakes
    with pytest.raises(EngineKeyMismatch) as exc:
        _enter("tensorrt", load_package(pkg_dir), max_batch=4)
    msg = str(exc.value)
    assert "TensorRT 10.3.0" in msg and "NVIDIA H200 (sm 9.0)" in msg and "fp16" in msg
    assert "batch 1/4/4" in msg and "engine cache is empty" in msg and "inspectd build-engine" in msg
    assert trt.builds == [] and trt.deserialized == []
    assert cuda.live == 0  # the stream created before the lookup was destroyed


def test_rebuild_then_cache_hit_with_sidecar_key(fakes, pkg_dir: Path) -> None:  # type: ignore[no-untyped-def]
    trt, cuda = fakes
    pkg = load_package(pkg_dir)
    batch = _batch(5)
    with create_backend("tensorrt", pkg, max_batch=8, rebuild=True, allow_ungated=True) as be:
        got = be.infer(batch)
        key = be.key
    assert len(trt.builds) == 1 and cuda.live == 0
    np.testing.assert_allclose(got, _reference(pkg_dir, batch), rtol=1e-2, atol=1e-2)  # FP16 rounding
    assert key is not None
    plan = EngineCache(pkg.engine_cache_dir).plan_path(key)
    sidecar = json.loads(plan.with_suffix(".json").read_text())
    assert sidecar["key"]["onnx_sha256"] == pkg.meta.onnx_sha256
    assert sidecar["key"]["tensorrt_version"] == "10.3.0" and sidecar["key"]["compute_capability"] == "9.0"
    assert sidecar["parity"]["gated"] is False  # built by the backend: not parity-gated
    assert "rebuild" in sidecar["parity"]["reason"]

    with create_backend("tensorrt", pkg, max_batch=8, rebuild=True, allow_ungated=True) as be:
        np.testing.assert_array_equal(be.infer(batch), got)
    assert len(trt.builds) == 1, "second load must hit the cache, not rebuild"
    assert trt.deserialized == ["10.3.0", "10.3.0"] and cuda.live == 0


def test_profile_precision_workspace_reach_the_builder(fakes, pkg_dir: Path) -> None:  # type: ignore[no-untyped-def]
    trt, _ = fakes
    pkg = load_package(pkg_dir)
    with create_backend("tensorrt", pkg, max_batch=16, rebuild=True, allow_ungated=True, workspace_mb=256):
        pass
    with create_backend(
        "tensorrt", pkg, max_batch=16, opt_batch=4, precision="fp32", rebuild=True, allow_ungated=True
    ) as be:
        assert be.precision == "fp32"
    first, second = trt.builds
    assert first["profile"] == {"input": [[1, 1, 32, 32], [8, 1, 32, 32], [16, 1, 32, 32]]}
    assert first["fp16"] is True and first["workspace"] == 256 << 20
    assert second["profile"]["input"][1] == [4, 1, 32, 32] and second["fp16"] is False
    assert len(EngineCache(pkg.engine_cache_dir).entries()) == 2  # different keys, different plans


def test_warm_up_runs_every_batch_size_before_enter_returns(fakes, pkg_dir: Path) -> None:  # type: ignore[no-untyped-def]
    trt, _ = fakes
    be = create_backend("tensorrt", load_package(pkg_dir), max_batch=6, rebuild=True, allow_ungated=True)
    with be:
        assert trt.executed_batches == [1, 2, 3, 4, 5, 6]
        assert be.warmed_batch_sizes == (1, 2, 3, 4, 5, 6)
        be.infer(_batch(3))
        assert trt.executed_batches[-1] == 3


def test_changed_onnx_misses_the_cache(fakes, pkg_dir: Path) -> None:  # type: ignore[no-untyped-def]
    trt, _ = fakes
    with create_backend("tensorrt", load_package(pkg_dir), max_batch=4, rebuild=True, allow_ungated=True):
        pass
    old_sha = load_package(pkg_dir).meta.onnx_sha256
    tiny_package(pkg_dir, input_size=SIZE, seed=2)  # retrained model, same package folder
    new = load_package(pkg_dir)
    assert new.meta.onnx_sha256 != old_sha
    with pytest.raises(EngineKeyMismatch, match=f"onnx_sha256: {old_sha} → {new.meta.onnx_sha256}"):
        _enter("tensorrt", new, max_batch=4)
    assert trt.deserialized == ["10.3.0"]  # the stale plan was never loaded
    batch = _batch(4, seed=3)
    with create_backend("tensorrt", new, max_batch=4, rebuild=True, allow_ungated=True) as be:
        got = be.infer(batch)
    assert len(trt.builds) == 2
    np.testing.assert_allclose(got, _reference(pkg_dir, batch), rtol=1e-2, atol=1e-2)


def test_plan_from_another_tensorrt_version_is_never_deserialized(
    fakes, pkg_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    pkg = load_package(pkg_dir)
    with create_backend("tensorrt", pkg, max_batch=4, rebuild=True, allow_ungated=True):
        pass
    trt = fake_tensorrt.install(monkeypatch, version="10.4.0")  # the station's TensorRT was upgraded
    with pytest.raises(EngineKeyMismatch, match=r"tensorrt_version: 10\.3\.0 → 10\.4\.0"):
        _enter("tensorrt", pkg, max_batch=4)
    # A plan copied under the new key's file name (someone "fixing" the cache by hand) is refused too:
    cache = EngineCache(pkg.engine_cache_dir)
    (old,) = cache.entries()
    from dataclasses import replace

    new_key = replace(old, tensorrt_version="10.4.0")
    cache.plan_path(old).rename(cache.plan_path(new_key))
    cache.sidecar_path(cache.plan_path(old)).rename(cache.sidecar_path(cache.plan_path(new_key)))
    with pytest.raises(EngineKeyMismatch), create_backend("tensorrt", pkg, max_batch=4):
        pass
    assert trt.deserialized == []
    with create_backend("tensorrt", pkg, max_batch=4, rebuild=True, allow_ungated=True):
        pass
    assert trt.deserialized == ["10.4.0"] and len(trt.builds) == 1


def test_explicit_engine_file_with_foreign_sidecar_is_refused(fakes, pkg_dir: Path) -> None:  # type: ignore[no-untyped-def]
    trt, _ = fakes
    pkg = load_package(pkg_dir)
    with create_backend("tensorrt", pkg, max_batch=4, rebuild=True, allow_ungated=True) as be:
        key = be.key
    assert key is not None
    plan = EngineCache(pkg.engine_cache_dir).plan_path(key)
    with pytest.raises(EngineKeyMismatch, match=r"batch 1/4/4.*needs .*batch 1/8/8"):
        _enter("tensorrt", pkg, max_batch=8, engine_file=plan)  # wants profile 1/8/8
    plan.with_suffix(".json").unlink()
    with pytest.raises(EngineKeyMismatch, match="no readable key sidecar"):
        _enter("tensorrt", pkg, max_batch=4, engine_file=plan)
    assert trt.deserialized == ["10.3.0"]


def test_timing_cache_is_persisted_and_fed_to_the_next_build(fakes, pkg_dir: Path) -> None:  # type: ignore[no-untyped-def]
    trt, _ = fakes
    pkg = load_package(pkg_dir)
    with create_backend("tensorrt", pkg, max_batch=4, rebuild=True, allow_ungated=True) as be:
        key = be.key
    assert key is not None
    cache_file = EngineCache(pkg.engine_cache_dir).timing_cache_path(key)
    assert "10.3.0" in cache_file.name and "H200" in cache_file.name and cache_file.stat().st_size > 0
    with create_backend("tensorrt", pkg, max_batch=4, precision="fp32", rebuild=True, allow_ungated=True):
        pass
    assert trt.timing_cache_inputs[0] == b""  # first build: empty cache
    assert json.loads(trt.timing_cache_inputs[1])["n"] == 1  # second build starts from the first's timings
    assert json.loads(cache_file.read_bytes())["n"] == 2  # and the file holds both


def test_infer_checks_and_execute_failure(fakes, pkg_dir: Path) -> None:  # type: ignore[no-untyped-def]
    trt, cuda = fakes
    with create_backend(
        "tensorrt", load_package(pkg_dir), max_batch=4, rebuild=True, allow_ungated=True
    ) as be:
        with pytest.raises(InputError, match="batch size 5 outside 1..4"):
            be.infer(_batch(5))
        with pytest.raises(InputError, match="dtype"):
            be.infer(_batch(2).astype(np.float16))
        trt.fail_execute = True
        with pytest.raises(BackendError, match="execute_async_v3 failed at batch 2"):
            be.infer(_batch(2))
    assert cuda.live == 0


@pytest.mark.parametrize("failing", ["cudaHostAlloc", "cudaMalloc", "build"])
def test_failed_open_releases_what_it_made(fakes, pkg_dir: Path, failing: str) -> None:  # type: ignore[no-untyped-def]
    trt, cuda = fakes
    if failing == "build":
        trt.fail_build = True
    else:
        cuda.fail.add(failing)
    with pytest.raises(BackendError, match="failed"):
        _enter("tensorrt", load_package(pkg_dir), max_batch=4, rebuild=True, allow_ungated=True)
    assert cuda.live == 0
    if failing == "build":
        assert list(load_package(pkg_dir).engine_cache_dir.glob("*.plan")) == []


def test_old_tensorrt_and_unparsable_onnx_are_clear_errors(
    fakes, pkg_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from engine.backends.tensorrt import make_key
    from engine.trt_build import BatchProfile, sha256_bytes

    key = make_key(load_package(pkg_dir), "10.3.0", "NVIDIA H200", "9.0", "fp16", BatchProfile(1, 2, 4))
    garbage = tmp_path / "bad.onnx"
    garbage.write_bytes(b"not onnx")
    with pytest.raises(EngineBuildError, match="cannot parse .*bad.onnx"):  # keyed by its sha: it is parsed
        build_plan(
            garbage,
            replace(key, onnx_sha256=sha256_bytes(b"not onnx")),
            input_name="input",
            timing_cache=None,
        )
    with pytest.raises(
        EngineBuildError, match=r"input 'input' has shape \(-1, 1, 32, 32\); expected \(N, 1, 64, 64\)"
    ):
        build_plan(
            pkg_dir / "model.onnx",
            replace(key, input_shape=(1, 64, 64)),
            input_name="input",
            timing_cache=None,
        )
    fake_tensorrt.install(monkeypatch, version="8.6.1")
    with pytest.raises(BackendError, match="TensorRT 8.6.1 is too old"):
        _enter("tensorrt", load_package(pkg_dir), max_batch=4, rebuild=True, allow_ungated=True)


def test_a_misspelt_option_is_refused_by_name(
    fakes: tuple[fake_tensorrt.State, fake_cudart.CudaState], pkg_dir: Path
) -> None:
    from engine.backend import OptionsError
    from engine.backends.tensorrt import TensorRTBackend, TensorRTOptions

    state, _ = fakes
    pkg = load_package(pkg_dir)
    with pytest.raises(OptionsError) as exc:
        create_backend("tensorrt", pkg, max_batch=4, rebuild=True, allow_ungated=True, opt_bach=2)
    assert str(exc.value) == (
        "unknown option 'opt_bach' for the tensorrt backend (did you mean 'opt_batch'?); its options are: "
        "allow_ungated, device, engine_file, opt_batch, precision, rebuild, warmup_batch_sizes, workspace_mb"
    )
    assert exc.value.key == "opt_bach"
    with pytest.raises(
        OptionsError, match="option 'precision' of the tensorrt backend: Input should be 'fp16' or 'fp32'"
    ):
        create_backend("tensorrt", pkg, max_batch=4, precision="int8")
    with pytest.raises(OptionsError, match="option 'workspace_mb' of the tensorrt backend: .*valid integer"):
        create_backend("tensorrt", pkg, max_batch=4, workspace_mb="lots")
    assert state.builds == []  # refused before anything was built
    # Every default as before; the strings an environment variable gives are typed ("false" is False).
    d = TensorRTOptions()
    assert (d.precision, d.opt_batch, d.rebuild, d.engine_file, d.device) == ("fp16", None, False, None, 0)
    assert (d.workspace_mb, d.warmup_batch_sizes, d.allow_ungated) == (1024, None, False)
    with create_backend(
        "tensorrt", pkg, max_batch=4, options={"opt_batch": "2", "rebuild": "true", "allow_ungated": "yes"}
    ) as be:
        assert isinstance(be, TensorRTBackend) and be.profile.opt == 2 and be.options.rebuild is True
        assert be.options.allow_ungated is True
    assert len(state.builds) == 1
