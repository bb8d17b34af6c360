from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.backend import BackendError, InputError, create_backend, resolve_kind, sigmoid
from engine.package import PackageError, load_package
from tests.helpers import tiny_package


@pytest.fixture()
def pkg_dir(tmp_path: Path) -> Path:
    tiny_package(tmp_path / "pkg", input_size=(32, 32))
    return tmp_path / "pkg"


def test_package_roundtrip(pkg_dir: Path) -> None:
    pkg = load_package(pkg_dir)
    assert pkg.meta.preprocess.input_size == (32, 32)
    assert pkg.meta.model_id.startswith("tiny@") and len(pkg.meta.model_id) == len("tiny@") + 12


def test_missing_file_is_named(pkg_dir: Path) -> None:
    (pkg_dir / "model.onnx").unlink()
    with pytest.raises(PackageError, match="has no model.onnx"):
        load_package(pkg_dir)


def test_modified_onnx_is_refused(pkg_dir: Path) -> None:
    with open(pkg_dir / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(PackageError, match="sha256 .* does not match"):
        load_package(pkg_dir)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.update(schema_version=99), "schema_version 99 is not understood"),
        (lambda d: d.update(colour="blue"), r"unknown field\(s\) \['colour'\]"),
        (lambda d: d["preprocess"].update(gamma=1), "unknown preprocess parameter"),
        (lambda d: d.update(class_order=["NG", "OK"]), "class_order"),
        (lambda d: d["decision"].update(threshold=1.5), "threshold must be within"),
    ],
)
def test_bad_model_json_is_refused_with_the_field(pkg_dir: Path, edit, match) -> None:  # type: ignore[no-untyped-def]
    meta = json.loads((pkg_dir / "model.json").read_text())
    edit(meta)
    (pkg_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PackageError, match=match):
        load_package(pkg_dir)


def test_onnxruntime_infer_checks_inputs(pkg_dir: Path) -> None:
    backend = create_backend("onnxruntime", load_package(pkg_dir), max_batch=4)
    with pytest.raises(BackendError, match="outside its context"):
        backend.infer(np.zeros((1, 1, 32, 32), np.float32))
    with backend:
        out = backend.infer(np.random.default_rng(0).normal(size=(3, 1, 32, 32)).astype(np.float32))
        assert out.shape == (3,) and out.dtype == np.float32 and len(set(out.tolist())) == 3
        with pytest.raises(InputError, match="dtype"):
            backend.infer(np.zeros((1, 1, 32, 32), np.float64))
        with pytest.raises(InputError, match="shape"):
            backend.infer(np.zeros((1, 32, 32), np.float32))
        with pytest.raises(InputError, match="batch size 5 outside 1..4"):
            backend.infer(np.zeros((5, 1, 32, 32), np.float32))


def test_auto_picks_onnxruntime_without_tensorrt() -> None:
    if "tensorrt" in sys.modules:
        pytest.skip("tensorrt importable here")
    assert resolve_kind("auto") == "onnxruntime"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_kind("openvino")


def test_sigmoid_is_stable() -> None:
    s = sigmoid(np.array([-1000.0, 0.0, 1000.0], np.float32))
    np.testing.assert_allclose(s, [0.0, 0.5, 1.0], atol=1e-7)


def test_onnxruntime_refuses_a_model_swapped_after_load(pkg_dir: Path, tmp_path: Path) -> None:
    pkg = load_package(pkg_dir)
    tiny_package(tmp_path / "other", input_size=(32, 32), seed=9)
    (pkg_dir / "model.onnx").write_bytes((tmp_path / "other" / "model.onnx").read_bytes())
    with pytest.raises(BackendError, match="changed on disk since the package was loaded"):
        create_backend("onnxruntime", pkg, max_batch=2).__enter__()
