"""The Backend protocol: one boundary between the pipeline and whatever runs the network.

A backend is a context manager. Runtime resources (sessions, CUDA streams, device buffers) are created in
``__enter__`` on the thread that will call ``infer`` and released in ``__exit__`` — never in ``__del__``.
``infer`` checks the batch against the input spec in one place, then calls the backend's ``_infer``.
Heavy imports (onnxruntime, torch, tensorrt) happen inside the backend modules, only when chosen.

Each backend has its own typed, frozen options (a :class:`BackendOptions` subclass in the backend's module,
named by its ``options_type``), made only by :func:`backend_options`: an unknown key or a value of the wrong
type is refused with the key, the backend and the keys it knows. Importing a backend module is cheap (numpy,
pydantic, the engine's own modules; never onnxruntime, torch, tensorrt or OpenCV), so configuration can be
checked when it is loaded, long before a backend is created.
"""

from __future__ import annotations

import abc
import difflib
import importlib
import importlib.util
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:  # engine.package loads OpenCV: not for checking a configuration file
    from engine.package import ModelPackage

BACKENDS: dict[str, str] = {
    "onnxruntime": "engine.backends.onnxruntime:OnnxRuntimeBackend",
    "tensorrt": "engine.backends.tensorrt:TensorRTBackend",
    "torch": "engine.backends.torch:TorchBackend",
}


class BackendError(RuntimeError):
    """The backend failed (or cannot be created); the pipeline turns it into REJECT ``engine_error``."""


class InputError(ValueError):
    """A batch that does not match the backend's input spec: a caller bug, reported clearly."""


class BackendOptions(BaseModel):
    """Base of every backend's options: frozen, and unknown keys are refused (a misspelt option must never be
    silently ignored). A backend's module subclasses it with its own fields and defaults; make instances
    with :func:`backend_options` (or the subclass itself, in code that mypy checks)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class OptionsError(ValueError):
    """Options a backend does not accept. ``problems`` holds (key, message) pairs; the key is None for a
    problem of several options together (e.g. fp16 on a CPU device)."""

    def __init__(self, backend: str, problems: tuple[tuple[str | None, str], ...]) -> None:
        self.backend = backend
        self.problems = problems
        super().__init__("; ".join(msg for _, msg in problems))

    @property
    def key(self) -> str | None:
        """The first option named by a problem."""
        return next((k for k, _ in self.problems if k is not None), None)


@dataclass(frozen=True, slots=True)
class InputSpec:
    name: str
    shape: tuple[int, int, int]  # (C, H, W); the batch dimension is dynamic, 1..max_batch
    dtype: str = "float32"


class Backend(abc.ABC):
    """Base class of every backend. Subclasses implement ``_open``, ``_close`` and ``_infer``."""

    name: ClassVar[str]
    options_type: ClassVar[type[BackendOptions]] = BackendOptions  # a backend with options names its own

    def __init__(
        self,
        package: ModelPackage,
        *,
        max_batch: int = 32,
        options: BackendOptions | Mapping[str, object] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be ≥ 1, got {max_batch}")
        self.package = package
        self.max_batch = max_batch  # the largest batch this instance accepts (profiles, buffers)
        self.options: BackendOptions = backend_options(type(self), options)
        h, w = package.meta.preprocess.input_size
        self.input_spec = InputSpec(name=package.meta.input_name, shape=(1, h, w))
        self._active = False

    @property
    def precision(self) -> str:
        return "fp32"

    @property
    def on_cpu(self) -> bool:
        """Whether inference runs on this machine's CPU cores (the daemon's thread layout follows it)."""
        return True

    def describe(self) -> dict[str, str]:
        """Labels for ``inspectd_model_info`` and logs."""
        return {"backend": self.name, "precision": self.precision, "model": self.package.meta.model_id}

    def __enter__(self) -> Backend:
        self._open()
        self._active = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._active = False
        self._close()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, C, H, W), 1 ≤ N ≤ max_batch → NG logits, float32 (N,)."""
        if not self._active:
            raise BackendError(f"{self.name} backend used outside its context (enter it first)")
        if not isinstance(batch, np.ndarray):
            raise InputError(f"batch must be a numpy array, got {type(batch).__name__}")
        if batch.dtype != np.float32:
            raise InputError(f"batch dtype must be float32, got {batch.dtype}")
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_spec.shape:
            raise InputError(
                f"batch shape must be (N, {', '.join(map(str, self.input_spec.shape))}), got {batch.shape}"
            )
        n = batch.shape[0]
        if not 1 <= n <= self.max_batch:
            raise InputError(f"batch size {n} outside 1..{self.max_batch}")
        out = self._infer(np.ascontiguousarray(batch))
        if out.shape != (n,):
            raise BackendError(f"{self.name} returned shape {out.shape}, expected ({n},)")
        return out

    def warmup(self, batch_sizes: tuple[int, ...] | None = None) -> None:
        """Run every batch size once so the first real frame does not pay for lazy initialisation."""
        sizes = batch_sizes or tuple(sorted({1, self.max_batch}))
        for n in sizes:
            self.infer(np.zeros((n, *self.input_spec.shape), dtype=np.float32))

    def time_batches(
        self,
        budget_s: float,
        repeats: int = 3,
        clock: Callable[[], float] = time.perf_counter,
        untimed: int = 2,
        largest: int | None = None,
    ) -> dict[int, float]:
        """Median seconds per call at batch 1, 2, 4, … and ``largest`` (default and at most ``max_batch``),
        stopping after the first size over ``budget_s`` (a CPU need not spend seconds timing batches it will
        never run). Call after warmup."""
        top = self.max_batch if largest is None else max(1, min(largest, self.max_batch))
        sizes = sorted({1 << k for k in range(top.bit_length())} | {top})
        timings: dict[int, float] = {}
        for n in sizes:
            x = np.zeros((n, *self.input_spec.shape), dtype=np.float32)
            # The first runs at a new size grow the allocator (ONNX Runtime's arena, twice: the patch memory's
            # batch 2 took 108 and 206 ms, then 57–68 ms): not what the daemon will see.
            for _ in range(untimed):
                self.infer(x)
            runs = []
            for _ in range(repeats):
                t0 = clock()
                self.infer(x)
                runs.append(clock() - t0)
            timings[n] = float(np.median(runs))
            if timings[n] > budget_s:
                break
        return timings

    def trim(self) -> None:
        """Give back memory that batches larger than the ones to come left behind (an allocator's arena), e.g.
        after :meth:`time_batches` ran a size the daemon will not use. Default: nothing to give back."""
        return None

    @abc.abstractmethod
    def _open(self) -> None: ...

    @abc.abstractmethod
    def _close(self) -> None: ...

    @abc.abstractmethod
    def _infer(self, batch: np.ndarray) -> np.ndarray: ...


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """NG probability from the NG logit, numerically safe for large |logit|."""
    return (0.5 * (1.0 + np.tanh(0.5 * logits.astype(np.float64)))).astype(np.float32)


def tensorrt_available() -> bool:
    """True when tensorrt and cuda-python (the TensorRT backend's memory layer) are importable, without importing."""
    return importlib.util.find_spec("tensorrt") is not None and importlib.util.find_spec("cuda") is not None


def resolve_kind(kind: str) -> str:
    """``auto`` → TensorRT where it can run, else ONNX Runtime (the embedded default)."""
    if kind == "auto":
        return "tensorrt" if tensorrt_available() else "onnxruntime"
    if kind not in BACKENDS:
        raise ValueError(f"backend must be one of {['auto', *BACKENDS]}, got {kind!r}")
    return kind


def backend_class(kind: str) -> type[Backend]:
    """The Backend class of ``kind`` (``auto`` resolved), its module imported lazily. Cheap: a backend module
    imports its runtime (onnxruntime, torch, tensorrt) only when an instance is entered."""
    kind = resolve_kind(kind)
    module_name, cls_name = BACKENDS[kind].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendError(f"backend {kind!r} is not available here: {exc}") from None
    cls: type[Backend] = getattr(module, cls_name)
    return cls


def backend_options(
    backend: str | type[Backend],
    options: BackendOptions | Mapping[str, object] | None = None,
    /,
    **more: object,
) -> BackendOptions:
    """The one way a backend's options are made: ``options`` (a mapping from configuration or a command line,
    or options already made) plus ``more``, checked against the options type of ``backend`` (a kind as
    configured, or a Backend class). Raises :class:`OptionsError` naming each unknown key with the backend and
    the keys it knows, and each value of the wrong type with its key."""
    cls = backend_class(backend) if isinstance(backend, str) else backend
    schema = cls.options_type
    label = getattr(cls, "name", cls.__name__)
    if isinstance(options, BackendOptions):
        if type(options) is not schema:
            wrong = f"{type(options).__name__} are not options of the {label} backend ({schema.__name__})"
            raise OptionsError(label, ((None, wrong),))
        if not more:
            return options
        options = options.model_dump(exclude_unset=True)
    raw = {**(options or {}), **more}
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise OptionsError(label, _problems(label, schema, exc)) from None


def _problems(
    label: str, schema: type[BackendOptions], exc: ValidationError
) -> tuple[tuple[str | None, str], ...]:
    """One (key, message) per problem, unknown keys first; a key's first error only (a union reports one per
    member)."""
    known = ", ".join(sorted(schema.model_fields)) or "none"
    unknown: list[tuple[str | None, str]] = []
    wrong: list[tuple[str | None, str]] = []
    for err in exc.errors():
        key = str(err["loc"][0]) if err["loc"] else None
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(key), schema.model_fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            unknown.append(
                (key, f"unknown option {key!r} for the {label} backend{hint}; its options are: {known}")
            )
            continue
        msg = str(err["msg"]).removeprefix("Value error, ")
        if key is None:
            wrong.append((None, f"{label} backend options: {msg}"))
        elif all(k != key for k, _ in wrong):
            got = "" if repr(err["input"]) in msg else f" (got {err['input']!r})"
            wrong.append((key, f"option {key!r} of the {label} backend: {msg}{got}"))
    return (*unknown, *wrong)


def create_backend(
    kind: str,
    package: ModelPackage,
    *,
    max_batch: int = 32,
    options: BackendOptions | Mapping[str, object] | None = None,
    **more: object,
) -> Backend:
    """Instantiate (but do not enter) the backend named by configuration; imports it lazily. ``options``
    and ``more`` (keyword options, merged over them) go through :func:`backend_options`."""
    cls = backend_class(kind)
    return cls(package, max_batch=max_batch, options=backend_options(cls, options, **more))
