"""ONNX Runtime backend: the embedded CPU default; CUDA execution provider when present and asked for.

Options: :class:`OnnxRuntimeOptions`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from engine.backend import Backend, BackendError, BackendOptions

if TYPE_CHECKING:  # engine.package loads OpenCV: imported where a package is opened, not to check options
    from engine.package import ModelPackage

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"

# An execution provider as onnxruntime takes it: its name, or (name, provider options).
Provider = str | tuple[str, dict[str, str | int | float | bool]]

# ONNX Runtime's CPU layout transformer (blocked NCHWc convolutions): 1.4 × faster for the ResNet18, 1.15 × slower
# for the patch memory, whose thread registration is one convolution with a 160 × 714 kernel (docs/benchmarks.md,
# run 9). With ``disabled_optimizers`` unset, a CPU session is timed both ways once per model file and process.
NCHWC = "NchwcTransformer"
_LAYOUT: dict[str, tuple[str, ...]] = {}  # model sha256 → the optimizers to disable, as measured
_LAYOUT_LOCK = threading.Lock()


class OnnxRuntimeOptions(BackendOptions):
    """``model.options`` of the ``onnxruntime`` backend."""

    intra_op_threads: int = Field(default=0, ge=0)  # 0 = ORT's choice: one per physical core
    device: Literal["cpu", "cuda"] = "cpu"
    cuda_device_id: int = Field(default=0, ge=0)
    # An explicit provider list instead of the one ``device`` implies; one name is a list of one.
    providers: tuple[Provider, ...] | None = None
    # Another ONNX file of the package, e.g. ``model.int8.onnx``; it must be recorded in ``model.json`` (by
    # ``inspectd quantize``) with its sha256 and the sha256 of the model.onnx it was made from, so a stale or
    # swapped INT8 file is refused like a swapped model.onnx. None = model.onnx.
    model_file: str | None = None
    # Bind input and a preallocated output buffer instead of ``session.run``. None = on with CUDA (the output
    # is copied straight into our host buffer), off on CPU, where measurement showed no gain (``session.run``
    # already wraps the numpy input without a copy; see docs/gpu.md).
    io_binding: bool | None = None
    # ONNX Runtime graph optimizers to switch off, by name (e.g. ["NchwcTransformer"]). None = automatic: on the
    # CPU, whichever of with and without the NCHWc layout transformer runs the model faster, timed at load (a few
    # batch-1 runs each, once per model file in the process); [] = ONNX Runtime's full set.
    disabled_optimizers: tuple[str, ...] | None = None

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, v: object) -> object:
        if v not in ("cpu", "cuda"):
            raise ValueError(f"onnxruntime device must be 'cpu' or 'cuda', got {v!r}")
        return v

    @field_validator("providers", mode="before")
    @classmethod
    def _one_provider(cls, v: object) -> object:
        return (v,) if isinstance(v, str) else v


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    options_type = OnnxRuntimeOptions
    options: OnnxRuntimeOptions

    def __init__(
        self,
        package: ModelPackage,
        *,
        max_batch: int = 32,
        options: OnnxRuntimeOptions | Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(package, max_batch=max_batch, options=options)
        self._session: Any = None
        self._binding: Any = None
        self._out_buf: np.ndarray | None = None
        self._model_file = self.options.model_file or package.onnx_path.name
        self.device = self.options.device
        self.disabled_optimizers: tuple[str, ...] = ()  # as opened (chosen at load when not configured)
        io_binding = self.options.io_binding
        self.io_binding = self.device == "cuda" if io_binding is None else io_binding

    @property
    def precision(self) -> str:
        return "int8" if "int8" in self._model_file else "fp32"

    def describe(self) -> dict[str, str]:
        out = {**super().describe(), "device": self.device}
        if self.disabled_optimizers:
            out["disabled_optimizers"] = ",".join(self.disabled_optimizers)
        return out

    def _providers(self, ort: Any) -> list[Any]:
        if self.options.providers:
            return list(self.options.providers)
        if self.device == "cpu":
            return [CPU_EP]
        if CUDA_EP not in ort.get_available_providers():
            raise BackendError(
                f"onnxruntime device 'cuda' asked for, but this onnxruntime offers only "
                f"{ort.get_available_providers()} (install onnxruntime-gpu)"
            )
        return [(CUDA_EP, {"device_id": self.options.cuda_device_id}), CPU_EP]

    def _model_path(self) -> Path:
        from engine.package import PackageError, verify_variant_file

        path = self.package.directory / self._model_file
        if path.name == self.package.onnx_path.name:
            return path  # verified by load_package
        try:
            verify_variant_file(self.package, path)
        except PackageError as exc:
            raise BackendError(str(exc)) from None
        return path

    def _open(self) -> None:
        import onnxruntime as ort

        path = self._model_path()
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = self.options.intra_op_threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        if self.options.intra_op_threads != 1:
            # The pool's threads spin while a Run() lasts (its many small parallel regions need them awake) but
            # stop when it returns: a session's threads that kept spinning after a lone frame's Run() held both
            # of a 2-core machine's CPUs, so the publisher thread waited 2–3 ms (p90) for a CPU to send the
            # verdict on (docs/benchmarks.md, run 15). The next Run() wakes them again (µs).
            so.add_session_config_entry("session.force_spinning_stop", "1")
        providers = self._providers(ort)
        model_bytes = path.read_bytes()
        if path.name == self.package.onnx_path.name:
            # Load exactly the bytes that are verified: a backend re-created after an engine error must not
            # pick up a model.onnx swapped on disk under the old threshold and model id.
            actual = hashlib.sha256(model_bytes).hexdigest()
            if actual != self.package.meta.onnx_sha256:
                raise BackendError(
                    f"{path} changed on disk since the package was loaded (sha256 {actual[:16]}… ≠ "
                    f"{self.package.meta.onnx_sha256[:16]}…); restart inspectd to serve the new package"
                )
        disabled = self.options.disabled_optimizers
        try:
            session = ort.InferenceSession(
                model_bytes, sess_options=so, providers=providers, disabled_optimizers=list(disabled or ())
            )
        except Exception as exc:  # ORT raises its own exception types for bad models
            raise BackendError(f"ONNX Runtime cannot load {path}: {exc}") from None
        if self.device == "cuda" and session.get_providers()[0] != CUDA_EP:
            raise BackendError(f"ONNX Runtime fell back to {session.get_providers()} instead of CUDA")
        inputs = session.get_inputs()
        names = [i.name for i in inputs]
        if names != [self.input_spec.name]:
            raise BackendError(f"{path} inputs are {names}; model.json says [{self.input_spec.name!r}]")
        shape = inputs[0].shape
        if len(shape) != 4:
            raise BackendError(f"{path} input rank is {len(shape)} ({shape}); expected 4 (N, C, H, W)")
        fixed = [d if isinstance(d, int) else None for d in shape[1:]]
        if any(d is not None and d != want for d, want in zip(fixed, self.input_spec.shape, strict=True)):
            raise BackendError(
                f"{path} input shape {shape} does not match model.json (N, {self.input_spec.shape})"
            )
        if isinstance(shape[0], int) and shape[0] < self.max_batch:
            raise BackendError(f"{path} has a fixed batch of {shape[0]} < max_batch {self.max_batch}")
        outputs = [o.name for o in session.get_outputs()]
        if self.package.meta.output_name not in outputs:
            raise BackendError(
                f"{path} outputs are {outputs}; model.json says {self.package.meta.output_name!r}"
            )
        if disabled is None:  # the model is checked: now time its layouts (and reopen it if the other wins)
            disabled, timed = self._fastest_layout(ort, model_bytes, so, providers, session)
            if disabled:
                session = timed or ort.InferenceSession(
                    model_bytes, sess_options=so, providers=providers, disabled_optimizers=list(disabled)
                )
        self.disabled_optimizers = tuple(disabled)
        self._session = session
        self._outputs = [self.package.meta.output_name]
        if self.io_binding:
            self._binding = session.io_binding()
            self._out_buf = np.empty((self.max_batch,), dtype=np.float32)

    def _fastest_layout(
        self, ort: Any, model: bytes, so: Any, providers: list[Any], full: Any
    ) -> tuple[tuple[str, ...], Any]:
        """The optimizers to disable for this model on this machine, NCHWc or none, whichever runs batch 1 faster
        (median of 5 runs after 2 warm-up runs each; ``full`` is the session with every optimizer), and the
        session without NCHWc when it was opened here to time it (else None). Decided once per model file in the
        process, so the inference workers' replicas and a backend re-created after an error open the same
        graph."""
        if self.device != "cpu":
            return (), None  # the layout transformer is the CPU provider's
        key = hashlib.sha256(model).hexdigest()
        with _LAYOUT_LOCK:
            if key in _LAYOUT:
                return _LAYOUT[key], None
            x = {self.input_spec.name: np.zeros((1, *self.input_spec.shape), np.float32)}
            try:
                with_nchwc = _median_run_s(full, x)
                other = ort.InferenceSession(
                    model, sess_options=so, providers=providers, disabled_optimizers=[NCHWC]
                )
                without = _median_run_s(other, x)
            except Exception:  # a model that cannot run: the warm-up reports it, with its own message
                return (), None
            _LAYOUT[key] = (NCHWC,) if without < with_nchwc else ()
            return _LAYOUT[key], other

    def _close(self) -> None:
        self._binding = None
        self._out_buf = None
        self._session = None

    def trim(self) -> None:
        """One batch-1 run with arena shrinkage: ONNX Runtime keeps the peak of every batch it ever ran (the
        patch memory: ~200 MB per image in the batch) until a run asks it to release what is free."""
        import onnxruntime as ort

        if self._session is None:
            return
        arenas = "cpu:0" + (f";gpu:{self.options.cuda_device_id}" if self.device == "cuda" else "")
        ro = ort.RunOptions()
        ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", arenas)
        x = np.zeros((1, *self.input_spec.shape), dtype=np.float32)
        self._session.run(self._outputs, {self.input_spec.name: x}, ro)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        try:
            if self._binding is not None:
                return self._infer_bound(batch)
            (logits,) = self._session.run(self._outputs, {self.input_spec.name: batch})
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"ONNX Runtime inference failed: {exc}") from exc
        return np.asarray(logits, dtype=np.float32).reshape(batch.shape[0])

    def _infer_bound(self, batch: np.ndarray) -> np.ndarray:
        """Input bound from host memory, the logit written into a preallocated host buffer (no output
        allocation per call; with CUDA the device→host copy lands directly in it)."""
        assert self._out_buf is not None
        n = batch.shape[0]
        b = self._binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        b.bind_cpu_input(self.input_spec.name, batch)
        out = self._out_buf[:n]
        b.bind_output(self._outputs[0], "cpu", 0, np.float32, [n], out.ctypes.data)
        self._session.run_with_iobinding(b)
        return out.copy()


def _median_run_s(session: Any, feed: dict[str, np.ndarray], warmup: int = 2, runs: int = 5) -> float:
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return sorted(times)[runs // 2]
