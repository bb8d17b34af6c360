"""torch backend: every package export writes runs on it, both model kinds (the patch memory and the ResNet18),
matching ONNX Runtime on the CPU; the torch state is recorded, checked and refused clearly when it is wrong; the
patch memory's FP16 path keeps its verdicts (its distance stays FP32)."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine.backend import BackendError, InputError, create_backend  # noqa: E402
from engine.backends.torch import bucket_for, default_buckets  # noqa: E402
from engine.model import build_model, load_state  # noqa: E402
from engine.package import TORCH_VARIANT, load_package, write_meta  # noqa: E402
from engine.parity import compare, verdicts  # noqa: E402
from engine.patch_model import Fp32Island, has_fp32_islands  # noqa: E402
from inspectd.cli import main  # noqa: E402
from tests.model_support import Screws, network_input, patch_package, resnet_package, write_images  # noqa: E402

SIZE = (64, 64)


def _enter(kind: str, package: Any, **options: Any) -> None:
    """Open and close a backend: what is under test happens in ``__enter__``."""
    with create_backend(kind, package, **options):
        pass


@pytest.fixture(scope="module")
def random_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resnet_package(tmp_path_factory.mktemp("random") / "pkg", input_size=SIZE)


@pytest.fixture(scope="module")
def trained_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few optimizer steps: weights and BatchNorm running statistics move away from initialisation."""
    from engine.package import Decision
    from engine.preprocess import PreprocessParams
    from training.export import export_package

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
    out = tmp_path_factory.mktemp("trained") / "pkg"
    export_package(
        model, out, preprocess=PreprocessParams(input_size=SIZE), decision=Decision(threshold=0.5), name="r18"
    )
    return out


@pytest.fixture(scope="module")
def patch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Screws]:
    return patch_package(tmp_path_factory.mktemp("patch") / "pkg")


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


def test_the_patch_memory_serves_on_torch_like_onnxruntime(patch: tuple[Path, Screws]) -> None:
    pkg_dir, screws = patch
    pkg = load_package(pkg_dir)
    x = network_input(screws, pkg.meta.preprocess)
    with create_backend("onnxruntime", pkg, max_batch=8) as ort:
        ref = np.concatenate([ort.infer(x[i : i + 8]) for i in range(0, len(x), 8)])
    with create_backend("torch", pkg, max_batch=8) as tb:
        got = np.concatenate([tb.infer(x[i : i + 8]) for i in range(0, len(x), 8)])
    cmp = compare(ref, got, pkg.meta.decision)
    assert cmp.flips == 0 and cmp.max_abs_logit <= 1e-4 + 1e-5 * float(np.abs(ref).max())
    calls = verdicts(ref, pkg.meta.decision)
    assert 0 < int((calls == 1).sum()) < len(calls)  # the threshold splits them: flips were possible


def test_export_records_the_torch_state_and_it_loads_weights_only(patch: tuple[Path, Screws]) -> None:
    pkg_dir, _ = patch
    pkg = load_package(pkg_dir)
    rec = pkg.meta.variant(TORCH_VARIANT)
    assert rec is not None and rec["file"] == "model.pt" and rec["network"] == "PatchEnsemble"
    data = (pkg_dir / "model.pt").read_bytes()
    assert rec["sha256"] == hashlib.sha256(data).hexdigest() and rec["bytes"] == len(data)
    assert rec["source_onnx_sha256"] == pkg.meta.onnx_sha256
    raw = json.loads((pkg_dir / "model.json").read_text())
    assert raw["variants"]["torch"] == rec  # written where older inspectd already look (variants)
    state = torch.load(pkg_dir / "model.pt", weights_only=True)  # tensors only: no code can ride along
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert type(load_state(data)).__name__ == "PatchEnsemble"
    assert has_fp32_islands(load_state(data))


def test_a_missing_swapped_or_unrecorded_torch_state_is_a_clear_error(
    random_pkg: Path, tmp_path: Path
) -> None:
    d = tmp_path / "pkg"
    shutil.copytree(random_pkg, d)
    good = (d / "model.pt").read_bytes()
    (d / "model.pt").unlink()
    with pytest.raises(BackendError, match=r"model.pt is recorded in model.json but missing"):
        _enter("torch", load_package(d))
    torch.save(build_model(None).state_dict(), d / "model.pt")  # another network's weights
    with pytest.raises(BackendError, match=r"does not match its model.json record .*replaced or corrupted"):
        _enter("torch", load_package(d))
    (d / "model.pt").write_bytes(good)
    _enter("torch", load_package(d))  # back to the recorded bytes
    onnxruntime_only = replace(load_package(d).meta, variants={})  # exported before the torch state existed
    write_meta(d, onnxruntime_only)
    with pytest.raises(BackendError, match=r"no model.pt \(state dict\) for the torch backend.*re-export"):
        _enter("torch", load_package(d))
    with create_backend("onnxruntime", load_package(d), max_batch=2):  # the other backends do not care
        pass


def test_named_weights_are_loaded_as_given_and_refused_when_not_a_network(
    random_pkg: Path, tmp_path: Path
) -> None:
    pkg = load_package(random_pkg)
    junk = tmp_path / "junk.pt"
    torch.save({"conv1.weight": torch.zeros(3)}, junk)
    with pytest.raises(BackendError, match="does not fit engine.model's network"):
        _enter("torch", pkg, weights=str(junk))
    junk.write_bytes(b"not a pickle")
    with pytest.raises(BackendError, match="cannot load .* as a weights-only state dict"):
        _enter("torch", pkg, weights=str(junk))
    checkpoint = tmp_path / "ck.pt"  # a training checkpoint is accepted too
    torch.save({"model": torch.load(random_pkg / "model.pt", weights_only=True), "epoch": 3}, checkpoint)
    with create_backend("torch", pkg, max_batch=2, weights=str(checkpoint)) as tb:
        tb.infer(np.zeros((2, 1, *SIZE), np.float32))


def test_fp16_keeps_the_patch_memorys_verdicts_because_its_distance_stays_fp32(
    patch: tuple[Path, Screws],
) -> None:
    """FP16 as the torch CUDA backend runs it (autocast: the projection in FP16, the islands in FP32), simulated
    on the CPU, against FP32: no verdict flips, and an error well below what converting the whole network to
    FP16 (the distance's |q|² + |b|² − 2q·b in FP16 too) gives on the same screws."""
    pkg_dir, screws = patch
    pkg = load_package(pkg_dir)
    model = load_state((pkg_dir / "model.pt").read_bytes())
    x = torch.from_numpy(network_input(screws, pkg.meta.preprocess))
    with torch.no_grad():
        fp32 = model(x)[:, 0].numpy()
        with torch.autocast("cpu", dtype=torch.float16):
            mixed = model(x)[:, 0].float().numpy()
        naive = _without_islands(model).half()(x.half())[:, 0].float().numpy()
    cmp = compare(fp32, mixed, pkg.meta.decision)
    assert cmp.flips == 0, cmp
    err_mixed = float(np.max(np.abs(mixed - fp32)))
    err_naive = float(np.max(np.abs(naive - fp32)))
    print(f"patch memory FP16 max |Δlogit|: islands {err_mixed:.3g}, everything FP16 {err_naive:.3g}")
    assert 0 < err_mixed < 0.02 and err_naive > 3 * err_mixed  # FP16 did run; the islands are what keeps it


def _without_islands(model: torch.nn.Module) -> torch.nn.Module:
    class Plain(torch.nn.Module):
        def forward(self, fn: Any, *args: Any) -> Any:
            return fn(*args)

    naive = copy.deepcopy(model)
    for module in list(naive.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Fp32Island):
                setattr(module, name, Plain())
    for module in naive.modules():
        if hasattr(module, "bank_m2"):
            module.bank_m2 = module.bank_m2.half()  # a non-persistent buffer .half() would miss otherwise
    return naive


@pytest.mark.parametrize("kind", ["patch", "resnet"])
def test_check_backends_gates_torch_on_the_cpu_with_no_flips(
    kind: str,
    patch: tuple[Path, Screws],
    random_pkg: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pkg_dir, screws = patch
    if kind == "resnet":
        pkg_dir = random_pkg
    data = write_images(screws, tmp_path / "data")
    code = main(
        ["check-backends", str(pkg_dir), "--data", str(data), "--limit", "0", "--backends", "torch cpu"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    line = next(row for row in out.splitlines() if row.startswith("torch cpu"))
    n = len(screws.frames)
    assert line.split()[2] == "fp32" and f"0/{n}" in line and line.rstrip().endswith("ok")


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
