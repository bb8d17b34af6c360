"""ONNX Runtime backend beyond the lead's basics: model checks at open, IO binding, device selection."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.backend import BackendError, create_backend
from engine.package import ModelMeta, load_package, write_meta
from engine.preprocess import PreprocessParams
from tests.helpers import tiny_package


def _enter(kind: str, package: Any, **options: Any) -> None:
    """Open and close a backend: what is under test happens in ``__enter__``."""
    with create_backend(kind, package, **options):
        pass


def _rank3_package(d: Path) -> Path:
    """A valid ONNX model whose input has no channel axis: (N, H, W) → mean → (N,)."""
    import onnx
    from onnx import TensorProto, helper

    d.mkdir(parents=True)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["logit"], axes=[1, 2], keepdims=0)],
        "rank3",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 32, 32])],
        [helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["N"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(d / "model.onnx"))
    write_meta(d, ModelMeta(name="rank3", preprocess=PreprocessParams(input_size=(32, 32))))
    return d


def test_wrong_input_rank_is_refused_at_open(tmp_path: Path) -> None:
    pkg = load_package(_rank3_package(tmp_path / "pkg"))
    with pytest.raises(BackendError, match=r"input rank is 3 .*expected 4 \(N, C, H, W\)"):
        _enter("onnxruntime", pkg)


def test_input_size_disagreeing_with_model_json_is_refused(tmp_path: Path) -> None:
    from dataclasses import replace

    tiny_package(tmp_path / "pkg", input_size=(32, 32))
    meta = load_package(tmp_path / "pkg").meta
    write_meta(tmp_path / "pkg", replace(meta, preprocess=PreprocessParams(input_size=(32, 48))))
    with pytest.raises(BackendError, match="does not match model.json"):
        _enter("onnxruntime", load_package(tmp_path / "pkg"))


def test_io_binding_gives_identical_logits(tmp_path: Path) -> None:
    tiny_package(tmp_path / "pkg", input_size=(32, 32))
    pkg = load_package(tmp_path / "pkg")
    rng = np.random.default_rng(1)
    batches = [rng.normal(0, 1, (n, 1, 32, 32)).astype(np.float32) for n in (3, 1, 4)]
    with create_backend("onnxruntime", pkg, max_batch=4) as plain:
        ref = [plain.infer(b) for b in batches]
    with create_backend("onnxruntime", pkg, max_batch=4, io_binding=True) as bound:
        got = [bound.infer(b) for b in batches]
        first = got[0].copy()
        bound.infer(batches[2])  # the preallocated buffer is reused: earlier results must not change
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_array_equal(r, g)
    np.testing.assert_array_equal(got[0], first)


def test_cuda_device_without_the_provider_is_a_clear_error(tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    tiny_package(tmp_path / "pkg", input_size=(32, 32))
    with pytest.raises(BackendError, match="device 'cuda' asked for, but this onnxruntime offers only"):
        _enter("onnxruntime", load_package(tmp_path / "pkg"), device="cuda")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        create_backend("onnxruntime", load_package(tmp_path / "pkg"), device="tpu")


def test_unrecorded_model_file_is_refused(tmp_path: Path) -> None:
    import shutil

    tiny_package(tmp_path / "pkg", input_size=(32, 32))
    shutil.copy(tmp_path / "pkg" / "model.onnx", tmp_path / "pkg" / "model.int8.onnx")
    with pytest.raises(BackendError, match="model.int8.onnx is not recorded in .*inspectd quantize"):
        _enter("onnxruntime", load_package(tmp_path / "pkg"), model_file="model.int8.onnx")


def test_a_misspelt_option_is_refused_by_name(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from engine.backend import OptionsError, backend_options
    from engine.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeOptions
    from engine.backends.tensorrt import TensorRTOptions

    tiny_package(tmp_path / "pkg", input_size=(32, 32))
    pkg = load_package(tmp_path / "pkg")
    known = "cuda_device_id, device, disabled_optimizers, intra_op_threads, io_binding, model_file, providers"
    with pytest.raises(OptionsError) as exc:
        create_backend("onnxruntime", pkg, intra_op_thread=1)
    assert str(exc.value) == (
        "unknown option 'intra_op_thread' for the onnxruntime backend (did you mean 'intra_op_threads'?); "
        f"its options are: {known}"
    )
    assert (exc.value.key, exc.value.backend) == ("intra_op_thread", "onnxruntime")
    with pytest.raises(OptionsError, match="option 'io_binding' of the onnxruntime backend: .*valid boolean"):
        create_backend("onnxruntime", pkg, io_binding="perhaps")
    with pytest.raises(OptionsError, match="are not options of the onnxruntime backend"):
        create_backend("onnxruntime", pkg, options=TensorRTOptions())
    # Typed, frozen, every default as before; values as configuration gives them are converted.
    opts = backend_options("onnxruntime")
    assert isinstance(opts, OnnxRuntimeOptions)
    assert (opts.intra_op_threads, opts.device, opts.cuda_device_id) == (0, "cpu", 0)
    assert (opts.providers, opts.model_file, opts.io_binding) == (None, None, None)
    with pytest.raises(ValidationError):
        opts.device = "cuda"
    assert backend_options("onnxruntime", {"intra_op_threads": "2", "providers": "CPUExecutionProvider"}) == (
        OnnxRuntimeOptions(intra_op_threads=2, providers=("CPUExecutionProvider",))
    )
    with create_backend(
        "onnxruntime", pkg, max_batch=2, options={"intra_op_threads": 1}, io_binding=True
    ) as b:
        assert isinstance(b, OnnxRuntimeBackend) and isinstance(b.options, OnnxRuntimeOptions)
        assert (b.options.intra_op_threads, b.io_binding) == (1, True)
        b.infer(np.zeros((2, 1, 32, 32), np.float32))


def test_the_layout_is_timed_once_per_model_and_the_faster_graph_is_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``disabled_optimizers`` unset, a CPU session is opened both ways and timed; the faster choice is kept
    for every backend on that model file (the workers' replicas, a re-created backend), and a configured list is
    used as given, untimed. Either graph gives the same logits."""
    import engine.backends.onnxruntime as ort_backend

    tiny_package(tmp_path / "pkg", input_size=(32, 32))
    pkg = load_package(tmp_path / "pkg")
    timed: list[int] = []
    costs = iter([0.020, 0.012])  # with NCHWc, then without: without is faster here

    def fake_median(session: Any, feed: dict[str, np.ndarray]) -> float:
        timed.append(1)
        return next(costs)

    monkeypatch.setattr(ort_backend, "_median_run_s", fake_median)
    monkeypatch.setattr(ort_backend, "_LAYOUT", {})
    x = np.random.default_rng(0).normal(size=(3, 1, 32, 32)).astype(np.float32)
    with (
        create_backend("onnxruntime", pkg, max_batch=4) as a,
        create_backend("onnxruntime", pkg, max_batch=4) as b,
    ):
        assert a.disabled_optimizers == b.disabled_optimizers == (ort_backend.NCHWC,)
        assert a.describe()["disabled_optimizers"] == "NchwcTransformer"
        fast = a.infer(x)
    assert len(timed) == 2  # once per model, not per backend
    with create_backend("onnxruntime", pkg, max_batch=4, disabled_optimizers=[]) as full:
        assert full.disabled_optimizers == () and "disabled_optimizers" not in full.describe()
        np.testing.assert_allclose(full.infer(x), fast, rtol=1e-5, atol=1e-5)
    assert len(timed) == 2


def test_a_multi_threaded_session_stops_spinning_when_a_run_returns(tmp_path: Path) -> None:
    """Its pool's threads would otherwise keep spinning after a lone frame's run and hold the CPUs the
    publisher needs (docs/benchmarks.md, run 15); a 1-thread session has no pool to stop."""
    tiny_package(tmp_path / "pkg", input_size=(32, 32))
    pkg = load_package(tmp_path / "pkg")
    x = np.zeros((1, 1, 32, 32), np.float32)
    for threads, expected in ((2, "1"), (0, "1"), (1, None)):
        with create_backend("onnxruntime", pkg, max_batch=1, intra_op_threads=threads) as b:
            b.infer(x)
            entries = b._session.get_session_options().get_session_config_entry  # type: ignore[attr-defined]
            if expected is None:
                with pytest.raises(Exception, match="force_spinning_stop"):
                    entries("session.force_spinning_stop")
            else:
                assert entries("session.force_spinning_stop") == expected
