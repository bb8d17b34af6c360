"""export_package: one-file ONNX with the recorded opset, a loadable package, and refusal on any mismatch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from engine.backend import create_backend, sigmoid  # noqa: E402
from engine.model import build_model  # noqa: E402
from engine.package import Decision, load_package  # noqa: E402
from engine.preprocess import PreprocessParams  # noqa: E402
from training import export as export_mod  # noqa: E402
from training.export import ExportError, export_package  # noqa: E402

SIZE = (64, 64)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(None).eval()


@pytest.fixture(scope="module")
def small() -> torch.nn.Module:
    """A tiny conv net (N, 1, H, W) → (N, 1): the refusal logic does not need ResNet18's export time."""
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1)
    ).eval()


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return np.random.default_rng(3).normal(0, 1, (5, 1, *SIZE)).astype(np.float32)


def test_export_writes_one_loadable_file_with_the_real_opset(tmp_path: Path, model, batch) -> None:  # type: ignore[no-untyped-def]
    meta = export_package(
        model,
        tmp_path / "pkg",
        preprocess=PreprocessParams(input_size=SIZE),
        decision=Decision(threshold=0.5),
        name="unit",
        verify_batch=batch,
        metrics={"auroc": 0.5},
    )
    assert sorted(p.name for p in (tmp_path / "pkg").iterdir()) == ["model.json", "model.onnx", "model.pt"]
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]  # no temporary directory left behind
    assert meta.variants["torch"]["file"] == "model.pt" and meta.variants["torch"]["network"] == "ResNet"
    saved = onnx.load(str(tmp_path / "pkg" / "model.onnx"))
    assert meta.opset == next(o.version for o in saved.opset_import if o.domain in ("", "ai.onnx"))
    assert meta.heatmap_output == "cam" and meta.created_by["parity"]["verdicts_equal"] is True
    assert {"torch", "onnx", "onnxruntime", "inspectd"} <= set(meta.created_by)

    pkg = load_package(tmp_path / "pkg")
    assert pkg.meta.metrics == {"auroc": 0.5}
    with torch.no_grad():
        ref = model(torch.from_numpy(batch))[:, 0].numpy()
    with create_backend("onnxruntime", pkg, max_batch=8) as backend:
        got = backend.infer(batch)  # dynamic batch: 5 was never the traced size
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert ((sigmoid(got) >= 0.5) == (sigmoid(ref) >= 0.5)).all()


def test_export_without_heatmap_has_one_output(tmp_path: Path, small) -> None:  # type: ignore[no-untyped-def]
    meta = export_package(
        small,
        tmp_path / "p",
        preprocess=PreprocessParams(input_size=SIZE),
        decision=Decision(),
        name="u",
        heatmap=False,
    )
    saved = onnx.load(str(tmp_path / "p" / "model.onnx"))
    assert [o.name for o in saved.graph.output] == ["logit"] and meta.heatmap_output is None
    assert meta.created_by["parity"]["source"] == "random"
    # A network engine.model cannot rebuild gets no torch state (it serves on ONNX Runtime and TensorRT).
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["model.json", "model.onnx"]
    assert meta.variants == {}


def test_a_re_export_replaces_the_torch_state_and_never_leaves_a_stale_one(
    tmp_path: Path, model, small
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "pkg"
    kw = {"preprocess": PreprocessParams(input_size=SIZE), "decision": Decision(), "name": "u"}
    export_package(model, out, **kw)
    first = (out / "model.pt").read_bytes()
    export_package(small, out, heatmap=False, **kw)  # into the same folder: a network without a torch state
    assert not (out / "model.pt").exists() and load_package(out).meta.variants == {}
    export_package(model, out, **kw)
    assert (out / "model.pt").read_bytes() == first
    assert load_package(out).meta.variants["torch"]["sha256"] != ""


def _shifted(delta: float):  # type: ignore[no-untyped-def]
    real = export_mod._torch_outputs

    def fake(net, batch):  # type: ignore[no-untyped-def]
        out = real(net, batch)
        out[0] = out[0] + np.float32(delta)
        return out

    return fake


def test_export_refuses_a_logit_mismatch_and_writes_nothing(
    tmp_path: Path, small, batch, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(export_mod, "_torch_outputs", _shifted(1e-3))
    with pytest.raises(ExportError, match="disagree"):
        export_package(
            small,
            tmp_path / "pkg",
            preprocess=PreprocessParams(input_size=SIZE),
            decision=Decision(),
            name="bad",
            verify_batch=batch,
            heatmap=False,
        )
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_verdict_flip_within_the_logit_tolerance(
    tmp_path: Path, small, batch, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        logits = small(torch.from_numpy(batch))[:, 0].numpy()
    # Threshold half-way across a 5e-5 logit shift (< the 1e-4 tolerance): torch REJECTs image 2, ORT PASSes it.
    threshold = float(sigmoid(logits[2:3] + np.float32(2.5e-5))[0])
    monkeypatch.setattr(export_mod, "_torch_outputs", _shifted(5e-5))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "keep.txt").write_text("old")
    with pytest.raises(ExportError, match="different verdicts"):
        export_package(
            small,
            tmp_path / "pkg",
            preprocess=PreprocessParams(input_size=SIZE),
            decision=Decision(threshold=threshold),
            name="bad",
            verify_batch=batch,
            heatmap=False,
        )
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]
    assert [p.name for p in (tmp_path / "pkg").iterdir()] == ["keep.txt"]


def test_export_refuses_a_batch_of_the_wrong_size(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ExportError, match="input_size"):
        export_package(
            small,
            tmp_path / "pkg",
            preprocess=PreprocessParams(input_size=SIZE),
            decision=Decision(),
            name="bad",
            verify_batch=np.zeros((2, 1, 32, 32), np.float32),
            heatmap=False,
        )
    assert list(tmp_path.iterdir()) == []
