"""TEST DOUBLE of the part of the TensorRT ≥ 10 Python API that inspectd uses — never shipped in engine/.

It is strict where the real library is strict (explicit-batch only, profile bounds on ``set_input_shape``,
every I/O tensor needs an address before ``execute_async_v3``, a plan only deserializes under the TensorRT
version that built it) and it really computes: the "plan" embeds the ONNX bytes and the execution context runs
them with ONNX Runtime on the memory behind the tensor addresses (the fake CUDA runtime's "device" memory is
host memory), so results can be checked against the reference. With the FP16 flag, inputs and outputs are
rounded through float16. ``OUTPUT_BIAS`` shifts every logit, to make a parity gate fail on purpose.

Both API generations the code is written against: :func:`make_module` gives TensorRT 10.x names for a 10.x
version and 11.x names for an 11.x one. 11 removed weak typing: ``BuilderFlag`` has no ``FP16``/``INT8`` nor
``OBEY_PRECISION_CONSTRAINTS``, every network is strongly typed (``STRONGLY_TYPED`` is deprecated and ignored,
``EXPLICIT_BATCH`` is gone). As in the real library, a strongly typed network refuses layer precisions and
output types (``set_output_type``, ``precision``), and its tensors have the types of the parsed ONNX: an FP16
graph really runs in FP16 (ONNX Runtime computes it), its I/O types are what the engine reports. In a weakly
typed network the layers the code pins (``precision = FLOAT``) are recorded per build (``fp32_layers``), with
the flags (``fp16``, ``obey``, ``tf32``).
Both have ``OnnxParser.parse(model, path=None)`` (bytes) and ``parse_from_file(path)``, and
``Runtime.deserialize_cuda_engine(buffer)``; ``STATE.parsed`` and ``STATE.deserialized_sha256`` record which
parse was used and the sha256 of every plan buffer handed to TensorRT, so tests can check that exactly the
verified bytes were used.

Install with :func:`install` (monkeypatches ``sys.modules["tensorrt"]``); ``STATE`` records what happened.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import importlib.machinery
import json
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PLAN_MAGIC = b"FAKETRT1"


@dataclass
class State:
    """What the code under test did, for assertions."""

    builds: list[dict[str, Any]] = field(default_factory=list)  # one per build_serialized_network
    deserialized: list[str] = field(default_factory=list)  # versions of plans handed to deserialize
    deserialized_sha256: list[str] = field(
        default_factory=list
    )  # sha256 of every buffer handed to deserialize
    parsed: list[tuple[str, str]] = field(default_factory=list)  # ("bytes", sha256) | ("file", path)
    executed_batches: list[int] = field(default_factory=list)
    contexts_created: int = 0
    timing_cache_inputs: list[bytes] = field(default_factory=list)
    output_bias: float = 0.0
    fail_execute: bool = False
    fail_build: bool = False


STATE = State()


class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class Logger:
    Severity = Severity
    INTERNAL_ERROR = Severity.INTERNAL_ERROR
    ERROR = Severity.ERROR
    WARNING = Severity.WARNING
    INFO = Severity.INFO
    VERBOSE = Severity.VERBOSE

    def __init__(self, min_severity: int = 2) -> None:
        self.min_severity = min_severity


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    BOOL = 4
    INT64 = 8


def nptype(dt: DataType) -> type:
    return {
        DataType.FLOAT: np.float32,
        DataType.HALF: np.float16,
        DataType.INT32: np.int32,
        DataType.BOOL: np.bool_,
        DataType.INT64: np.int64,
    }[dt]


# ONNX TensorProto element types → DataType (1 FLOAT, 10 FLOAT16, 6 INT32, 7 INT64, 9 BOOL)
_ONNX_TYPES = {1: DataType.FLOAT, 10: DataType.HALF, 6: DataType.INT32, 7: DataType.INT64, 9: DataType.BOOL}
_ORT_TYPES = {"tensor(float)": DataType.FLOAT, "tensor(float16)": DataType.HALF}


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class BuilderFlag(enum.IntEnum):
    """TensorRT 10.x: weakly typed precision flags still exist."""

    FP16 = 0
    INT8 = 1
    REFIT = 5
    TF32 = 7
    OBEY_PRECISION_CONSTRAINTS = 10
    PREFER_PRECISION_CONSTRAINTS = 11


class BuilderFlag11(enum.IntEnum):
    """TensorRT 11.x ``BuilderFlag`` (installed under that name): weak typing removed, no FP16/INT8/BF16/FP8 and
    no precision-constraint flags (strong typing always holds)."""

    REFIT = 5
    TF32 = 7


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0  # deprecated and ignored in 10
    STRONGLY_TYPED = 1


class NetworkDefinitionCreationFlag11(enum.IntEnum):
    """TensorRT 11.x: EXPLICIT_BATCH removed; STRONGLY_TYPED deprecated and ignored (always strongly typed)."""

    STRONGLY_TYPED = 1


class Dims(tuple[int, ...]):
    """TensorRT's Dims behaves like a tuple of ints in Python."""


def volume(shape: Any) -> int:
    return int(np.prod(tuple(shape), dtype=np.int64))


# ── builder side ──────────────────────────────────────────────────────────────────────────────────────────


@dataclass
class _Tensor:
    name: str
    shape: Dims
    dtype: DataType = DataType.FLOAT


class ILayer:
    """One layer per parsed ONNX node, named after it (as TensorRT's ONNX parser names its layers)."""

    def __init__(self, network: INetworkDefinition, name: str, op_type: str, outputs: list[_Tensor]) -> None:
        self._network = network
        self.name = name
        self.type = op_type
        self._outputs = outputs
        self._precision: DataType | None = None
        self.output_types: dict[int, DataType] = {}

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_output(self, index: int) -> _Tensor:
        return self._outputs[index]

    def _refuse_if_strongly_typed(self, what: str) -> None:
        if self._network.strongly_typed:
            raise RuntimeError(
                f"FAKE TensorRT: {what} is not allowed in a strongly typed network ({self.name})"
            )

    @property
    def precision(self) -> DataType | None:
        return self._precision

    @precision.setter
    def precision(self, dtype: DataType) -> None:
        self._refuse_if_strongly_typed("setting a layer precision")
        self._precision = dtype

    def set_output_type(self, index: int, dtype: DataType) -> None:
        self._refuse_if_strongly_typed("setting a layer output type")
        if self._outputs[index].dtype not in (DataType.FLOAT, DataType.HALF):
            raise RuntimeError(f"FAKE TensorRT: output {index} of {self.name} is not a float tensor")
        self.output_types[index] = dtype


class INetworkDefinition:
    def __init__(self, flags: int, strongly_typed: bool) -> None:
        self.flags = flags
        self.strongly_typed = strongly_typed
        self.onnx_bytes = b""
        self._inputs: list[_Tensor] = []
        self._outputs: list[_Tensor] = []
        self._layers: list[ILayer] = []

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def get_layer(self, index: int) -> ILayer:
        return self._layers[index]

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_input(self, i: int) -> _Tensor:
        return self._inputs[i]

    def get_output(self, i: int) -> _Tensor:
        return self._outputs[i]


class _ParserError:
    def __init__(self, text: str) -> None:
        self.text = text

    def desc(self) -> str:
        return self.text

    def __str__(self) -> str:
        return self.text


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
        self.network = network
        self._errors: list[_ParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, i: int) -> _ParserError:
        return self._errors[i]

    def parse(self, model: bytes, path: str | None = None) -> bool:
        """Parse a serialized ONNX model from memory (``path`` would only locate external weights)."""
        data = bytes(model)
        STATE.parsed.append(("bytes", hashlib.sha256(data).hexdigest()))
        return self._parse(data, "<bytes>")

    def parse_from_file(self, path: str) -> bool:
        STATE.parsed.append(("file", str(path)))
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            self._errors.append(_ParserError(f"ModelImporter: cannot read {path}: {exc}"))
            return False
        return self._parse(data, path)

    def _parse(self, data: bytes, where: str) -> bool:
        import onnx

        try:
            model = onnx.load_from_string(data)
        except Exception as exc:
            self._errors.append(_ParserError(f"ModelImporter: cannot read {where}: {exc}"))
            return False
        init = {i.name for i in model.graph.initializer}
        inferred = onnx.shape_inference.infer_shapes(model).graph
        types = {
            vi.name: _ONNX_TYPES.get(vi.type.tensor_type.elem_type, DataType.FLOAT)
            for vi in [*inferred.input, *inferred.output, *inferred.value_info]
        }

        def dims(vi: Any) -> Dims:
            return Dims(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)

        net = self.network
        net.onnx_bytes = data
        net._inputs = [
            _Tensor(v.name, dims(v), types[v.name]) for v in model.graph.input if v.name not in init
        ]
        net._outputs = [_Tensor(v.name, dims(v), types[v.name]) for v in model.graph.output]
        net._layers = [
            ILayer(
                net,
                node.name or f"{node.op_type}_{i}",
                node.op_type,
                [_Tensor(o, Dims(), types.get(o, DataType.FLOAT)) for o in node.output],
            )
            for i, node in enumerate(model.graph.node)
        ]
        return True


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[Dims, Dims, Dims]] = {}

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:
        mn, op, mx = Dims(min), Dims(opt), Dims(max)
        if not all(a <= b <= c for a, b, c in zip(mn, op, mx, strict=True)):
            raise ValueError(f"profile for {input}: need min ≤ opt ≤ max, got {mn} {op} {mx}")
        self.shapes[input] = (mn, op, mx)


class IHostMemory(bytes):
    """Supports the buffer protocol like the real one (here by being bytes)."""

    @property
    def nbytes(self) -> int:
        return len(self)


class ITimingCache:
    def __init__(self, data: bytes) -> None:
        self.entries = json.loads(data) if data else {"version": sys.modules["tensorrt"].__version__, "n": 0}

    def serialize(self) -> IHostMemory:
        return IHostMemory(json.dumps(self.entries).encode())


class IBuilderConfig:
    def __init__(self) -> None:
        self.flags: set[enum.IntEnum] = {sys.modules["tensorrt"].BuilderFlag.TF32}  # TF32 is on by default
        self.pools: dict[MemoryPoolType, int] = {}
        self.profiles: list[IOptimizationProfile] = []
        self.timing_cache: ITimingCache | None = None

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        self.pools[pool] = pool_size

    def set_flag(self, flag: enum.IntEnum) -> None:
        if not isinstance(flag, sys.modules["tensorrt"].BuilderFlag):
            raise TypeError(f"FAKE TensorRT: {flag!r} is not a BuilderFlag of this TensorRT")
        self.flags.add(flag)

    def clear_flag(self, flag: enum.IntEnum) -> None:
        self.flags.discard(flag)

    def get_flag(self, flag: enum.IntEnum) -> bool:
        return flag in self.flags

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache:
        STATE.timing_cache_inputs.append(bytes(serialized_timing_cache))
        return ITimingCache(bytes(serialized_timing_cache))

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self.timing_cache


class Builder:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        if not isinstance(flags, int):
            raise TypeError("create_network(flags: int)")
        trt = sys.modules["tensorrt"]
        known = {1 << int(f) for f in trt.NetworkDefinitionCreationFlag}
        if flags & ~sum(known):
            raise TypeError(f"FAKE TensorRT {trt.__version__}: unknown network creation flags {flags:#x}")
        strongly = _major() >= 11 or bool(
            flags & (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        )
        return INetworkDefinition(flags, strongly_typed=strongly)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(
        self, network: INetworkDefinition, config: IBuilderConfig
    ) -> IHostMemory | None:
        if STATE.fail_build:
            return None
        dynamic = [t.name for t in network._inputs if any(d < 0 for d in t.shape)]
        if len(config.profiles) != 1 or set(dynamic) - set(config.profiles[0].shapes):
            return None  # real TensorRT: a dynamic input without a profile fails the build
        if config.timing_cache is not None:
            config.timing_cache.entries["n"] = config.timing_cache.entries.get("n", 0) + 1
        flags = {f.name for f in config.flags}
        if network.strongly_typed and "FP16" in flags:
            return (
                None  # real TensorRT 10: weak-typing precision flags are an error on a strongly typed network
            )
        header = {
            "version": sys.modules["tensorrt"].__version__,
            "fp16": "FP16" in flags,
            "obey": "OBEY_PRECISION_CONSTRAINTS" in flags,
            "tf32": "TF32" in flags,
            "strongly_typed": network.strongly_typed,
            "fp32_layers": [layer.name for layer in network._layers if layer.precision == DataType.FLOAT],
            "io_dtypes": {t.name: t.dtype.name for t in [*network._inputs, *network._outputs]},
            "profile": {k: [list(s) for s in v] for k, v in config.profiles[0].shapes.items()},
            "inputs": [t.name for t in network._inputs],
            "outputs": [t.name for t in network._outputs],
        }
        STATE.builds.append({**header, "workspace": config.pools.get(MemoryPoolType.WORKSPACE)})
        blob = json.dumps(header).encode()
        return IHostMemory(PLAN_MAGIC + len(blob).to_bytes(4, "little") + blob + network.onnx_bytes)


# ── runtime side ──────────────────────────────────────────────────────────────────────────────────────────


class Runtime:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> ICudaEngine | None:
        data = bytes(serialized_engine)
        STATE.deserialized_sha256.append(hashlib.sha256(data).hexdigest())
        if not data.startswith(PLAN_MAGIC):
            return None  # real TensorRT logs an error and returns None for garbage
        n = int.from_bytes(data[8:12], "little")
        header = json.loads(data[12 : 12 + n])
        STATE.deserialized.append(header["version"])
        if header["version"] != sys.modules["tensorrt"].__version__:
            # What the real library does here is abort on its version-tag assertion; callers must never get here.
            raise AssertionError(
                f"FAKE TensorRT: plan built by {header['version']} fed to {sys.modules['tensorrt'].__version__} "
                "(the real library asserts on the version tag)"
            )
        return ICudaEngine(header, data[12 + n :])


class ICudaEngine:
    def __init__(self, header: dict[str, Any], onnx_bytes: bytes) -> None:
        import onnxruntime as ort

        self.header = header
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.session = ort.InferenceSession(onnx_bytes, sess_options=so, providers=["CPUExecutionProvider"])
        self._names = header["inputs"] + header["outputs"]
        self._meta = {m.name: m for m in [*self.session.get_inputs(), *self.session.get_outputs()]}

    @property
    def num_io_tensors(self) -> int:
        return len(self._names)

    @property
    def num_optimization_profiles(self) -> int:
        return 1

    def get_tensor_name(self, index: int) -> str:
        return self._names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        if name in self.header["inputs"]:
            return TensorIOMode.INPUT
        return TensorIOMode.OUTPUT if name in self.header["outputs"] else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> DataType:
        return _ORT_TYPES.get(self._meta[name].type, DataType.FLOAT)

    def get_tensor_shape(self, name: str) -> Dims:
        return Dims(d if isinstance(d, int) else -1 for d in self._meta[name].shape)

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
        if profile_index != 0 or name not in self.header["profile"]:
            raise RuntimeError(f"no profile {profile_index} for {name}")
        return [Dims(s) for s in self.header["profile"][name]]

    def create_execution_context(self) -> IExecutionContext:
        STATE.contexts_created += 1
        return IExecutionContext(self)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self._input_shapes: dict[str, Dims] = {}
        self._addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: Any) -> bool:
        mn, _, mx = self.engine.get_tensor_profile_shape(name, 0)
        s = Dims(shape)
        if len(s) != len(mn) or not all(a <= b <= c for a, b, c in zip(mn, s, mx, strict=True)):
            return False  # real TensorRT: logs an error, returns False
        self._input_shapes[name] = s
        return True

    def get_tensor_shape(self, name: str) -> Dims:
        if name in self._input_shapes:
            return self._input_shapes[name]
        base = self.engine.get_tensor_shape(name)
        n = next(iter(self._input_shapes.values()), Dims((-1,)))[0]
        return Dims(n if d < 0 else d for d in base)

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if name not in self.engine._names or not isinstance(memory, int) or memory == 0:
            return False
        self._addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        if STATE.fail_execute or not isinstance(stream_handle, int):
            return False
        if set(self._addresses) != set(self.engine._names) or set(self._input_shapes) != set(
            self.engine.header["inputs"]
        ):
            return False  # real TensorRT: every I/O tensor needs an address and every input a shape
        fp16 = self.engine.header["fp16"]
        feeds = {}
        for name, shape in self._input_shapes.items():
            x = _view(self._addresses[name], shape).copy()
            feeds[name] = x.astype(np.float16).astype(np.float32) if fp16 else x
        outs = self.engine.session.run(self.engine.header["outputs"], feeds)
        for name, y in zip(self.engine.header["outputs"], outs, strict=True):
            y = np.asarray(y, np.float32)
            if fp16:
                y = y.astype(np.float16).astype(np.float32)
            if name == self.engine.header["outputs"][0]:
                y = y + np.float32(STATE.output_bias)
            _view(self._addresses[name], y.shape)[...] = y
        STATE.executed_batches.append(int(next(iter(self._input_shapes.values()))[0]))
        return True


def _view(address: int, shape: Any) -> np.ndarray:
    count = volume(shape)
    buf = (ctypes.c_float * count).from_address(address)
    return np.frombuffer(memoryview(buf), dtype=np.float32, count=count).reshape(tuple(shape))


# ── installation ──────────────────────────────────────────────────────────────────────────────────────────


def _major() -> int:
    return int(str(sys.modules["tensorrt"].__version__).split(".")[0])


def make_module(version: str = "10.3.0") -> types.ModuleType:
    """A ``tensorrt`` module with the names of ``version``'s API generation (10.x or 11.x)."""
    mod = types.ModuleType("tensorrt")
    mod.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    mod.__version__ = version  # type: ignore[attr-defined]
    for name in (
        "Logger", "Builder", "Runtime", "OnnxParser", "DataType", "TensorIOMode", "MemoryPoolType",
        "BuilderFlag", "NetworkDefinitionCreationFlag", "Dims", "nptype", "volume", "ICudaEngine",
        "IExecutionContext", "IBuilderConfig", "ITimingCache", "IHostMemory", "ILayer",
    ):  # fmt: skip
        setattr(mod, name, globals()[name])
    if int(version.split(".")[0]) >= 11:
        mod.BuilderFlag = BuilderFlag11  # type: ignore[attr-defined]
        mod.NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag11  # type: ignore[attr-defined]
    return mod


def install(monkeypatch: Any, version: str = "10.3.0") -> State:
    """Put the fake in ``sys.modules['tensorrt']`` (undone by monkeypatch) and reset ``STATE``."""
    global STATE
    STATE = State()
    monkeypatch.setitem(sys.modules, "tensorrt", make_module(version))
    from engine import trt_build

    trt_build.trt_logger.cache_clear()  # the cached logger belonged to whatever module was there before
    return STATE


def state() -> State:
    return STATE
