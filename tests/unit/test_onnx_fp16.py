"""engine.onnx_fp16: the FP16 graph TensorRT 11 builds from keeps the I/O, the model's fp32 scopes and shape
arithmetic in FP32, runs (ONNX Runtime computes it here) and keeps the verdicts of the FP32 graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine.onnx_fp16 import Fp16Error, in_fp32_scope, to_fp16
from engine.package import load_package
from engine.parity import compare


def _types(model_bytes: bytes) -> dict[str, int]:
    g = onnx.shape_inference.infer_shapes(onnx.load_from_string(model_bytes), strict_mode=True).graph
    return {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.output, *g.value_info]}


def _run(model_bytes: bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return list(ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"]).run(None, feeds))


def test_the_scope_rule() -> None:
    assert in_fp32_scope("/fp32/MatMul") and in_fp32_scope("/fp32_12/Add") and in_fp32_scope("/a/fp32/b/Conv")
    for name in ("", "fp32", "/fp32x/Conv", "/conv/Conv", "/layer1/fp32_/Conv", "fp16_cast_3"):
        assert not in_fp32_scope(name), name


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, np.ndarray]]:
    pytest.importorskip("torch")
    from tests.model_support import network_input, patch_package, resnet_package

    root = tmp_path_factory.mktemp("pkgs")
    patch_dir, screws = patch_package(root / "patch")
    x_patch = network_input(screws, load_package(patch_dir).meta.preprocess)
    x_r18 = np.random.default_rng(1).normal(0, 1, (16, 1, 64, 64)).astype(np.float32)
    return {"patch": (patch_dir, x_patch), "resnet": (resnet_package(root / "r18"), x_r18)}


@pytest.mark.parametrize("kind", ["patch", "resnet"])
def test_fp16_graph_keeps_io_and_fp32_scopes_and_the_verdicts(
    kind: str, packages: dict[str, tuple[Path, np.ndarray]]
) -> None:
    pkg_dir, x = packages[kind]
    pkg = load_package(pkg_dir)
    fp32 = pkg.onnx_path.read_bytes()
    fp16 = to_fp16(fp32)
    model = onnx.load_from_string(fp16.data)
    io = [*model.graph.input, *model.graph.output]
    assert {vi.name: vi.type.tensor_type.elem_type for vi in io} == dict.fromkeys(
        ["input", "logit", "cam"], TensorProto.FLOAT
    )
    types = _types(fp16.data)
    scoped = [n for n in model.graph.node if in_fp32_scope(n.name)]
    assert (len(scoped) > 0) is (kind == "patch")  # the patch memory marks its distance; the ResNet18 nothing
    for node in scoped:
        for out in node.output:
            assert types.get(out) != TensorProto.FLOAT16, f"{node.name} computes in FP16"
    half = [n for n in model.graph.node if any(types.get(o) == TensorProto.FLOAT16 for o in n.output)]
    assert any(n.op_type == "Conv" for n in half)  # the projection / the conv trunk did go FP16
    ref = _run(fp32, {"input": x})[0]
    got = _run(fp16.data, {"input": x})[0]
    cmp = compare(ref, got, pkg.meta.decision)
    print(f"{kind}: FP16 graph vs FP32 max |Δlogit| {cmp.max_abs_logit:.3g} ({fp16.summary()})")
    assert cmp.flips == 0 and 0 < cmp.max_abs_logit < 0.05 * max(1.0, float(np.abs(ref).max()))
    assert fp16.clipped == 0


def _graph(nodes: list, inputs: list, outputs: list, inits: list) -> bytes:  # type: ignore[type-arg]
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def test_shape_arithmetic_stays_fp32_and_a_shared_weight_gets_an_fp16_copy() -> None:
    f = TensorProto.FLOAT
    data = _graph(
        [
            helper.make_node("Mul", ["input", "w"], ["scaled"], name="/scale/Mul"),
            helper.make_node("Add", ["scaled", "w"], ["logit"], name="/out/Add"),
            helper.make_node("Mul", ["input", "w"], ["kept"], name="/fp32/Mul"),
            helper.make_node("Shape", ["input"], ["shape"], name="/size/Shape"),
            helper.make_node("Cast", ["shape"], ["shape_f"], name="/size/Cast", to=f),
            helper.make_node("Add", ["shape_f", "one"], ["size"], name="/size/Add"),  # 2049 + 1 in float
        ],
        [helper.make_tensor_value_info("input", f, [1, 2049])],
        [
            helper.make_tensor_value_info("logit", f, [1, 2049]),
            helper.make_tensor_value_info("kept", f, [1, 2049]),
            helper.make_tensor_value_info("size", f, [2]),
        ],
        [
            numpy_helper.from_array(np.full((1, 2049), 1.0001, np.float32), "w"),
            numpy_helper.from_array(np.array([1.0], np.float32), "one"),
        ],
    )
    g = to_fp16(data)
    inits = {i.name: i.data_type for i in onnx.load_from_string(g.data).graph.initializer}
    assert inits == {"w": TensorProto.FLOAT, "w__fp16": TensorProto.FLOAT16, "one": TensorProto.FLOAT}
    x = np.random.default_rng(0).normal(0, 1, (1, 2049)).astype(np.float32)
    ref, got = _run(data, {"input": x}), _run(g.data, {"input": x})
    assert got[2].tolist() == ref[2].tolist() == [2.0, 2050.0]  # FP16 would have said 2048 + 1 = 2048
    np.testing.assert_array_equal(got[1], ref[1])  # the fp32 scope: bit for bit
    assert 0 < float(np.abs(got[0] - ref[0]).max()) < 5e-3  # the image path did run in FP16
    assert g.fp16_nodes == 2 and g.casts >= 2


def test_what_cannot_be_converted_faithfully_is_refused() -> None:
    f = TensorProto.FLOAT
    branch = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["y"])],
        "b",
        [],
        [helper.make_tensor_value_info("y", f, [1])],
    )
    data = _graph(
        [
            helper.make_node("ReduceSum", ["input"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["c"]),
            helper.make_node("If", ["c"], ["logit"], then_branch=branch, else_branch=branch),
        ],
        [helper.make_tensor_value_info("input", f, [1])],
        [helper.make_tensor_value_info("logit", f, [1])],
        [numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
    )
    with pytest.raises(Fp16Error, match="subgraph"):
        to_fp16(data)
