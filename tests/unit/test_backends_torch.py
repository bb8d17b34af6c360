"""torch backend: the reference must match ONNX Runtime on the exported package (random and trained weights),
and refuse packages it cannot serve with a clear message."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine.backend import BackendError, InputError, create_backend  # noqa: E402
from engine.backends.torch import bucket_for, default_buckets  # noqa: E402
from engine.model import build_model  # noqa: E402
from engine.package import Decision, load_package, write_meta  # noqa: E402
from engine.preprocess import PreprocessParams  # noqa: E402

SIZE = (64, 64)


def _enter(kind: str, package: Any, **options: Any) -> None:
    """Open and close a backend: what is under test happens in ``__enter__``."""
    with create_backend(kind, package, **options):
        pass


def _export(model: torch.nn.Module, out: Path) -> Path:
    """The package as training exports it, plus the state dict the torch backend needs (model.pt)."""
    from training.export import export_package

    export_package(
        model, out, preprocess=PreprocessParams(input_size=SIZE), decision=Decision(threshold=0.5), name="r18"
    )
    torch.save(model.state_dict(), out / "model.pt")
    return out


@pytest.fixture(scope="module")
def random_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return _export(build_model(None).eval(), tmp_path_factory.mktemp("random") / "pkg")


@pytest.fixture(scope="module")
def trained_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few optimizer steps: weights and BatchNorm running statistics move away from initialisation."""
    torch.manual_seed(1)
    model = build_model(None).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(2)
    for _ in range(4):
        x = torch.randn(8, 1, *SIZE, generator=gen)
        y = (x.mean(dim=(1, 2, 3)) > 0).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert not torch.allclose(model.bn1.running_mean, torch.zeros(64))
    return _export(model, tmp_path_factory.mktemp("trained") / "pkg")


@pytest.mark.parametrize("which", ["random_pkg", "trained_pkg"])
def test_torch_matches_onnxruntime(which: str, request: pytest.FixtureRequest) -> None:
    pkg = load_package(request.getfixturevalue(which))
    batch = np.random.default_rng(5).normal(0, 1, (6, 1, *SIZE)).astype(np.float32)
    with create_backend("onnxruntime", pkg, max_batch=8) as ort:
        ref = ort.infer(batch)
    with create_backend("torch", pkg, max_batch=8) as tb:
        assert tb.precision == "fp32" and tb.describe()["device"] == "cpu"
        got = tb.infer(batch)
        single = tb.infer(batch[2:3])
    assert got.dtype == np.float32 and got.shape == (6,)
    assert float(np.max(np.abs(got - ref))) <= 1e-4
    assert abs(float(single[0]) - float(ref[2])) <= 1e-4
    assert np.ptp(ref) > 1e-3  # the images give different logits: the comparison means something


def test_missing_or_wrong_state_dict_is_a_clear_error(random_pkg: Path, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "pkg"
    shutil.copytree(random_pkg, d)
    (d / "model.pt").unlink()
    with pytest.raises(BackendError, match=r"no model.pt \(state dict\) for the torch backend"):
        _enter("torch", load_package(d))
    torch.save({"conv1.weight": torch.zeros(3)}, d / "model.pt")
    with pytest.raises(BackendError, match="does not fit engine.model's network"):
        _enter("torch", load_package(d))
    (d / "model.pt").write_bytes(b"not a pickle")
    with pytest.raises(BackendError, match="cannot load .* as a weights-only state dict"):
        _enter("torch", load_package(d))


def test_recorded_state_dict_hash_is_checked(random_pkg: Path, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "pkg"
    shutil.copytree(random_pkg, d)
    meta = load_package(d).meta
    good = hashlib.sha256((d / "model.pt").read_bytes()).hexdigest()
    write_meta(d, replace(meta, training={"state_dict": {"file": "model.pt", "sha256": good}}))
    with create_backend("torch", load_package(d), max_batch=2):
        pass
    write_meta(d, replace(meta, training={"state_dict": {"file": "model.pt", "sha256": "0" * 64}}))
    with pytest.raises(BackendError, match="does not match model.json training.state_dict.sha256"):
        _enter("torch", load_package(d))


def test_input_checks_and_device_options(random_pkg: Path) -> None:
    pkg = load_package(random_pkg)
    with create_backend("torch", pkg, max_batch=2) as tb:
        with pytest.raises(InputError, match="batch size 3 outside 1..2"):
            tb.infer(np.zeros((3, 1, *SIZE), np.float32))
        with pytest.raises(InputError, match="shape"):
            tb.infer(np.zeros((1, 1, 32, 32), np.float32))
    with pytest.raises(ValueError, match="fp16 is only supported on CUDA"):
        create_backend("torch", pkg, precision="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="CUDA is not available here"):
            _enter("torch", pkg, device="cuda")


def test_cuda_graph_buckets() -> None:
    assert default_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert default_buckets(12) == (1, 2, 4, 8, 12)
    assert default_buckets(1) == (1,)
    assert [bucket_for(n, (1, 2, 4, 8, 12)) for n in (1, 2, 3, 5, 9, 12)] == [1, 2, 4, 8, 12, 12]
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        bucket_for(13, (1, 2, 4, 8, 12))


def test_a_misspelt_option_is_refused_by_name(random_pkg: Path) -> None:
    from engine.backend import OptionsError
    from engine.backends.torch import TorchOptions

    pkg = load_package(random_pkg)
    with pytest.raises(OptionsError) as exc:
        create_backend("torch", pkg, max_batch=2, thread=1)
    assert str(exc.value) == (
        "unknown option 'thread' for the torch backend (did you mean 'threads'?); its options are: "
        "batch_buckets, cuda_graphs, device, precision, threads, weights"
    )
    assert exc.value.key == "thread"
    with pytest.raises(OptionsError, match="option 'cuda_graphs' of the torch backend: .*valid boolean"):
        create_backend("torch", pkg, cuda_graphs="sometimes")
    d = TorchOptions()
    assert (d.device, d.threads, d.weights, d.cuda_graphs, d.batch_buckets, d.precision) == (
        "cpu", None, None, True, None, None,
    )  # fmt: skip
    assert create_backend("torch", pkg, threads="2").options == TorchOptions(threads=2)  # not entered
    with create_backend("torch", pkg, max_batch=2, weights=str(random_pkg / "model.pt")) as tb:
        assert isinstance(tb.options, TorchOptions) and tb.options.weights == random_pkg / "model.pt"
        assert tb.precision == "fp32"
        tb.infer(np.zeros((2, 1, *SIZE), np.float32))
