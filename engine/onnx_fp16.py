"""An FP16 copy of an ONNX graph, for TensorRT's strongly typed networks (TensorRT 11 has no other FP16 route:
it removed ``BuilderFlag.FP16``; a strongly typed network computes each tensor in the type the graph gives it).

What stays FP32:

- the graph's inputs and outputs (the backend's buffers, the parity gate and the daemon see float32);
- every node the model marks as precision-critical: nodes in an ONNX scope named :data:`FP32_SCOPE` (the
  TorchScript exporter names a node ``/fp32/MatMul`` after the module that ran it: the patch memory's
  ``Fp32Island``, engine.patch_model; ``/fp32_2/MatMul`` for a further call). There the patch memory
  subtracts large, nearly equal sums (its residual norm and its |q|² + |b|² − 2q·b distance), which FP16
  would turn into noise;
- the inputs that ONNX requires to be float32 whatever the data type (``Resize``'s roi and scales).

Everything else becomes FP16: float initializers used there (an FP16 copy when FP32 nodes use them too),
``Constant``/``ConstantOfShape`` values, ``Cast(to=FLOAT)``. A ``Cast`` is inserted wherever a tensor crosses
between the two precisions. The result is checked with ``onnx.checker`` (full, with type inference) before it is
returned; a graph this module cannot convert faithfully (control flow, a float tensor whose type cannot be
inferred) is refused with :class:`Fp16Error`, never converted approximately.

The onnx package is imported inside the functions (the ``gpu`` extra has it): importing this module is cheap,
and engine.patch_model takes :data:`FP32_SCOPE` from here.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

FP32_SCOPE = "fp32"  # the module name whose ONNX scope is kept FP32 (engine.patch_model.Fp32Island)
FP16_MAX = 65504.0
# (op type, input index) that ONNX types as float32 whatever the data's type.
_FP32_INPUTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}
_CONTROL_FLOW = {"If", "Loop", "Scan"}
# A scope component ``fp32``, or ``fp32_3``: the exporter numbers the scope of each further call of a module.
_SCOPE = re.compile(rf"(^|/){FP32_SCOPE}(_\d+)?(/|$)")


class Fp16Error(ValueError):
    """The graph cannot be converted faithfully; the message says which node or tensor and why."""


def in_fp32_scope(node_name: str) -> bool:
    """True for a node the model computes in FP32: its name has a scope component ``fp32`` (``fp32_N`` for the
    N-th further call of an island), as the TorchScript exporter writes ``/fp32_2/MatMul``."""
    return bool(_SCOPE.search(node_name.rsplit("/", 1)[0])) if "/" in node_name else False


@dataclass(frozen=True, slots=True)
class Fp16Graph:
    data: bytes  # the serialized FP16 model
    sha256: str
    fp16_nodes: int  # nodes computing in FP16
    fp32_nodes: int  # nodes kept in FP32 (the model's scopes), casts not counted
    casts: int  # Cast nodes inserted at the precision boundaries
    clipped: int  # initializer/constant values beyond ±65504, saturated

    def summary(self) -> dict[str, Any]:
        return {
            "fp16_onnx_sha256": self.sha256,
            "fp16_nodes": self.fp16_nodes,
            "fp32_nodes": self.fp32_nodes,
            "casts": self.casts,
            "clipped_values": self.clipped,
        }


def to_fp16(model_bytes: bytes, *, keep_fp32: Callable[[str], bool] = in_fp32_scope) -> Fp16Graph:
    """The FP16 graph of ``model_bytes`` (a serialized ONNX model with float32 inputs and outputs), keeping the
    nodes ``keep_fp32`` names (by node name) in FP32.

    Only *image* values go FP16: tensors computed from a graph input's values. Arithmetic on shapes and
    constants (sizes, scales, indices the exporter computes in float) stays FP32, where FP16 would round a
    size above 2048."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    for node in graph.node:
        if node.op_type in _CONTROL_FLOW or any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute):
            raise Fp16Error(f"node {node.name or node.op_type!r} holds a subgraph; not converted")
    types = _elem_types(onnx.shape_inference.infer_shapes(model, strict_mode=False))
    float32 = TensorProto.FLOAT

    def is_float(name: str) -> bool:
        return types.get(name) == float32

    initializers = {init.name: init for init in graph.initializer}
    graph_inputs = [vi.name for vi in graph.input if vi.name not in initializers]
    outputs = {vi.name for vi in graph.output}
    image = set(graph_inputs)  # tensors whose values come from the image (not from shapes or constants)
    precision: dict[str, str] = dict.fromkeys(graph_inputs, "fp32")  # float tensors as they now exist
    plan: list[tuple[Any, str | None]] = []  # (node, the precision it computes in; None: it makes no floats)
    for node in graph.node:
        unknown = [name for name in node.output if name and name not in types]
        if unknown:
            raise Fp16Error(f"node {node.name or node.op_type!r}: no inferable type for output(s) {unknown}")
        if node.op_type not in ("Shape", "Size") and any(name in image for name in node.input):
            image.update(name for name in node.output if name)
        makes_image_floats = any(is_float(name) and name in image for name in node.output if name)
        makes_floats = any(is_float(name) for name in node.output if name)
        if not makes_floats:
            plan.append((node, None))
        else:
            fp16 = makes_image_floats and not keep_fp32(node.name)
            plan.append((node, "fp16" if fp16 else "fp32"))
    # A graph output computed in FP16 is renamed; a Cast back to FP32 gives it its name again at the end.
    renamed = {
        name: f"{name}__fp16"
        for node, target in plan
        if target == "fp16"
        for name in node.output
        if name in outputs
    }

    cast_cache: dict[tuple[str, str], str] = {}
    new_nodes: list[Any] = []
    new_inits: dict[str, Any] = {}
    used_fp32_inits: set[str] = set()
    counts = {"fp16": 0, "fp32": 0, "casts": 0, "clipped": 0}

    def as_fp16_array(array: np.ndarray) -> np.ndarray:
        a = np.asarray(array, dtype=np.float32)
        counts["clipped"] += int(np.count_nonzero(np.abs(a) > FP16_MAX))
        return np.clip(a, -FP16_MAX, FP16_MAX).astype(np.float16)

    def current(name: str) -> str:
        if name in initializers:
            return "fp32"
        found = precision.get(name)
        if found is None:
            raise Fp16Error(f"float tensor {name!r} is used before it is produced")
        return found

    def version(name: str, target: str) -> str:
        """The name of ``name`` in precision ``target``, making an initializer copy or a Cast as needed."""
        if name in initializers:
            if target == "fp32":
                used_fp32_inits.add(name)
                return name
            half = f"{name}__fp16"
            if half not in new_inits:
                new_inits[half] = numpy_helper.from_array(
                    as_fp16_array(numpy_helper.to_array(initializers[name])), half
                )
            return half
        if current(name) == target:
            return name
        key = (name, target)
        if key not in cast_cache:
            out = f"{name}__to_{target}"
            to = TensorProto.FLOAT16 if target == "fp16" else TensorProto.FLOAT
            counts["casts"] += 1
            new_nodes.append(
                helper.make_node("Cast", [name], [out], name=f"fp16_cast_{counts['casts']}", to=to)
            )
            cast_cache[key] = out
            precision[out] = target
        return cast_cache[key]

    for node, target in plan:
        floats_in = [i for i, name in enumerate(node.input) if name and is_float(name)]
        if target is None:
            # Makes no floats (Shape, a Cast to int, a comparison): its float inputs as they are, in FP32
            # when they differ (an op's inputs share one type).
            kinds = {current(node.input[i]) for i in floats_in}
            if len(kinds) > 1:
                for i in floats_in:
                    node.input[i] = version(node.input[i], "fp32")
            else:
                for i in floats_in:
                    if node.input[i] in initializers:
                        used_fp32_inits.add(node.input[i])
            new_nodes.append(node)
            continue
        counts[target] += 1
        for i in floats_in:
            node.input[i] = version(node.input[i], "fp32" if (node.op_type, i) in _FP32_INPUTS else target)
        if target == "fp16":
            _retype_attributes(node, as_fp16_array)
        for j, name in enumerate(node.output):
            if name in renamed:
                node.output[j] = renamed[name]
                precision[renamed[name]] = target
            elif name and is_float(name):
                precision[name] = target
        new_nodes.append(node)

    for original, half in renamed.items():
        counts["casts"] += 1
        new_nodes.append(
            helper.make_node("Cast", [half], [original], name=f"fp16_cast_{counts['casts']}", to=float32)
        )
    kept = [init for name, init in initializers.items() if not is_float(name) or name in used_fp32_inits]
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend([*kept, *new_inits.values()])
    del graph.value_info[:]  # intermediate types changed; the checker infers them again
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # onnx raises ValidationError and InferenceError
        raise Fp16Error(f"the FP16 graph does not check: {exc}") from None
    data = model.SerializeToString()
    return Fp16Graph(
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        fp16_nodes=counts["fp16"],
        fp32_nodes=counts["fp32"],
        casts=counts["casts"],
        clipped=counts["clipped"],
    )


def _elem_types(model: Any) -> dict[str, int]:
    """Element type of every named tensor the (shape-inferred) model knows."""
    g = model.graph
    out: dict[str, int] = {}
    for vi in [*g.input, *g.output, *g.value_info]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            out[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        out[init.name] = init.data_type
    return out


def _retype_attributes(node: Any, as_fp16: Callable[[np.ndarray], np.ndarray]) -> None:
    """A node that makes float32 values from its attributes makes FP16 ones (in the FP16 part of the graph)."""
    from onnx import TensorProto, helper, numpy_helper

    if node.op_type == "Cast":
        for a in node.attribute:
            if a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16
        return
    if node.op_type not in ("Constant", "ConstantOfShape"):
        return
    for a in list(node.attribute):
        if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
            a.t.CopyFrom(numpy_helper.from_array(as_fp16(numpy_helper.to_array(a.t)), a.t.name))
        elif a.name in ("value_float", "value_floats"):
            values = np.asarray([a.f] if a.name == "value_float" else list(a.floats), dtype=np.float32)
            if a.name == "value_float":
                values = values.reshape(())
            node.attribute.remove(a)
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(as_fp16(values))))
