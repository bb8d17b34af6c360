"""TensorRT backend (GPU stations): runs a cached FP16 plan with named I/O tensors and ``execute_async_v3``.

CUDA memory and the stream come from cuda-python's runtime bindings (``cuda.bindings.runtime``), not torch:
the daemon must not import torch, NVIDIA's TensorRT container ships without it, and cuda-python is a ~10 MB
wheel (the ``gpu`` extra) instead of a 2 GB one. The backend owns one stream, one device buffer per I/O
tensor (sized for ``max_batch``) and pinned host staging for the input and the logit, all created in
``__enter__`` on the calling thread and freed in ``__exit__``. Before ``__enter__`` returns, every batch size
of the profile has run once (TensorRT does per-shape work on the first run of each shape).

Before a plan is deserialized: its sidecar key must be this station's, its bytes (read once) must hash to the
sha256 recorded when it was built, and it must have passed ``inspectd build-engine``'s parity gate — unless
``allow_ungated`` accepts an ungated plan, which is logged and shown by :meth:`TensorRTBackend.describe`
(``gate``, a label of ``inspectd_model_info``).

Options: :class:`TensorRTOptions`.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field

from engine import trt_build
from engine.backend import Backend, BackendError, BackendOptions
from engine.trt_build import BatchProfile, EngineCache, EngineKey, Precision

if TYPE_CHECKING:  # engine.package loads OpenCV: imported where a package is opened, not to check options
    from engine.package import ModelPackage

log = logging.getLogger(__name__)


def import_cudart() -> Any:
    """The CUDA runtime bindings; cuda-python ≥ 12.6 moved them to ``cuda.bindings`` (one place handles it)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            raise BackendError(
                f"cuda-python is not importable here (pip install cuda-python): {exc}"
            ) from None
    return cudart


class CudaRuntime:
    """The few CUDA runtime calls the backend needs, each checked; every allocation is tracked so
    :meth:`release` frees exactly what was made, even after a failed ``_open``."""

    def __init__(self, cudart: Any, device: int) -> None:
        self.rt = cudart
        self.device = device
        self._device_ptrs: list[int] = []
        self._host_ptrs: list[int] = []
        self.stream: Any = None
        self.call("cudaSetDevice", device)

    def call(self, name: str, *args: Any) -> Any:
        result = getattr(self.rt, name)(*args)
        err, rest = result[0], result[1:]
        if int(err) != 0:
            _, err_name = self.rt.cudaGetErrorName(err)
            text = err_name.decode() if isinstance(err_name, bytes) else str(err_name)
            raise BackendError(f"CUDA {name} failed: {text} ({int(err)})")
        return rest[0] if len(rest) == 1 else (rest or None)

    def identity(self) -> tuple[str, str]:
        """(GPU name, compute capability "major.minor") of this device: part of the engine key."""
        prop = self.call("cudaGetDeviceProperties", self.device)
        name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
        return name.rstrip("\x00").strip(), f"{prop.major}.{prop.minor}"

    def create_stream(self) -> None:
        # Non-blocking: the legacy default stream must not serialise us with other work in the process.
        self.stream = self.call("cudaStreamCreateWithFlags", self.rt.cudaStreamNonBlocking)

    def stream_handle(self) -> int:
        return int(self.stream)

    def malloc(self, nbytes: int) -> int:
        ptr = int(self.call("cudaMalloc", nbytes))
        self._device_ptrs.append(ptr)
        return ptr

    def host_array(self, count: int, dtype: np.dtype[Any]) -> np.ndarray:
        """Pinned (page-locked) host memory as a numpy view: DMA-able, so async copies really are async."""
        nbytes = count * dtype.itemsize
        ptr = int(self.call("cudaHostAlloc", nbytes, self.rt.cudaHostAllocDefault))
        self._host_ptrs.append(ptr)
        buf = (ctypes.c_byte * nbytes).from_address(ptr)
        return np.frombuffer(memoryview(buf), dtype=dtype, count=count)

    def copy_async(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        self.call("cudaMemcpyAsync", dst, src, nbytes, getattr(self.rt.cudaMemcpyKind, kind), self.stream)

    def synchronize(self) -> None:
        self.call("cudaStreamSynchronize", self.stream)

    def release(self) -> list[str]:
        """Free everything; keep going past failures and return them (the caller is shutting down)."""
        errors: list[str] = []

        def attempt(name: str, *args: Any) -> None:
            try:
                self.call(name, *args)
            except BackendError as exc:
                errors.append(str(exc))

        if self.stream is not None:
            attempt("cudaStreamSynchronize", self.stream)
        while self._device_ptrs:
            attempt("cudaFree", self._device_ptrs.pop())
        while self._host_ptrs:
            attempt("cudaFreeHost", self._host_ptrs.pop())
        if self.stream is not None:
            attempt("cudaStreamDestroy", self.stream)
            self.stream = None
        return errors


def make_key(
    package: ModelPackage, trt_version: str, gpu: str, cc: str, precision: str, profile: BatchProfile
) -> EngineKey:
    h, w = package.meta.preprocess.input_size
    return EngineKey(
        onnx_sha256=package.meta.onnx_sha256,
        tensorrt_version=trt_version,
        gpu_name=gpu,
        compute_capability=cc,
        precision=precision,
        profile=profile,
        input_shape=(1, h, w),
    )


def station_key(package: ModelPackage, precision: str, profile: BatchProfile, device: int = 0) -> EngineKey:
    """The key a plan for ``package`` must have on this station (TensorRT version, this GPU)."""
    trt = trt_build.import_tensorrt()
    cuda = CudaRuntime(import_cudart(), device)
    try:
        gpu, cc = cuda.identity()
    finally:
        cuda.release()
    return make_key(package, str(trt.__version__), gpu, cc, precision, profile)


class TensorRTOptions(BackendOptions):
    """``model.options`` of the ``tensorrt`` backend."""

    precision: Precision = "fp16"
    opt_batch: int | None = Field(
        default=None, ge=1
    )  # the profile's opt batch; None = 8 (or max_batch if less)
    # Build a plan when the cache holds none for this station (minutes, not parity-gated, so only together with
    # allow_ungated); False = fail with a message naming the key it needs.
    rebuild: bool = False
    # Serve a plan that has not passed build-engine's parity gate (built by rebuild, or --no-parity): the
    # operator's explicit decision, logged at start and shown as gate=ungated-accepted in describe().
    allow_ungated: bool = False
    engine_file: Path | None = None  # an explicit plan; its sidecar key, sha256 and gate are still checked
    device: int = Field(default=0, ge=0)  # CUDA device ordinal
    workspace_mb: int = Field(default=trt_build.DEFAULT_WORKSPACE_MB, ge=1)  # builder workspace (rebuild)
    warmup_batch_sizes: tuple[int, ...] | None = None  # run at __enter__; None = every size of the profile


class TensorRTBackend(Backend):
    name = "tensorrt"
    options_type = TensorRTOptions
    options: TensorRTOptions

    def __init__(
        self,
        package: ModelPackage,
        *,
        max_batch: int = 32,
        options: TensorRTOptions | Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(package, max_batch=max_batch, options=options)
        self._precision: str = self.options.precision
        self.profile = BatchProfile.for_max(max_batch, self.options.opt_batch)
        self.cache = EngineCache(package.engine_cache_dir)
        self.key: EngineKey | None = None
        self.engine_record: dict[str, Any] = {}
        # Before __enter__: what the configuration admits; after: what the loaded plan is.
        self.gate: str = "ungated-allowed" if self.options.allow_ungated else "required"
        self.warmed_batch_sizes: tuple[int, ...] = ()
        self._cuda: CudaRuntime | None = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._buffers: dict[str, int] = {}
        self._host_in: np.ndarray | None = None
        self._host_out: np.ndarray | None = None
        self._shape_n = 0

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def on_cpu(self) -> bool:
        return False

    def describe(self) -> dict[str, str]:
        """Adds ``gate``: ``passed`` | ``ungated-accepted`` once entered (``required`` | ``ungated-allowed``,
        what the options admit, before)."""
        return {**super().describe(), "gate": self.gate}

    def station_key(self, cuda: CudaRuntime, trt: Any) -> EngineKey:
        return make_key(self.package, str(trt.__version__), *cuda.identity(), self._precision, self.profile)

    def _open(self) -> None:
        try:
            self._open_resources()
            sizes = self.options.warmup_batch_sizes or self.profile.batch_sizes()
            for n in sizes:
                self._infer(np.zeros((n, *self.input_spec.shape), dtype=np.float32))
            self.warmed_batch_sizes = sizes
        except BaseException:
            self._close()  # __exit__ never runs when __enter__ raises: release what was made, then re-raise
            raise

    def _open_resources(self) -> None:
        trt = trt_build.import_tensorrt()
        self._cuda = cuda = CudaRuntime(import_cudart(), self.options.device)
        cuda.create_stream()
        self.key = key = self.station_key(cuda, trt)
        explicit = self.options.engine_file
        if explicit is not None:
            plan = explicit
            record = self.cache.verify(plan, key)  # the key is checked before deserializing
        else:
            cached = trt_build.resolve_plan(
                self.cache,
                key,
                package_dir=self.package.directory,
                rebuild=self.options.rebuild,
                allow_ungated=self.options.allow_ungated,
                build=lambda: trt_build.build_plan(
                    self.package.onnx_path,
                    key,
                    input_name=self.input_spec.name,
                    timing_cache=self.cache.timing_cache_path(key),
                    workspace_mb=self.options.workspace_mb,
                ),
            )
            plan, record = cached.plan, cached.record
        # Read once, hash those bytes, deserialize only those bytes: a swapped plan never reaches TensorRT.
        plan_bytes = self.cache.read_plan(plan, record)
        gate = trt_build.check_gate(
            record, plan, allow_ungated=self.options.allow_ungated, package_dir=self.package.directory
        )
        self.engine_record = record
        self._runtime = trt.Runtime(trt_build.trt_logger())
        self._engine = self._runtime.deserialize_cuda_engine(plan_bytes)
        del plan_bytes  # TensorRT copied what it needs; a plan can be hundreds of MB
        if self._engine is None:
            raise BackendError(f"TensorRT could not deserialize {plan}; see its log above")
        self._check_io(trt)
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BackendError("TensorRT could not create an execution context (out of device memory?)")
        self._allocate(trt)
        self.gate = gate

    def _check_io(self, trt: Any) -> None:
        engine, spec = self._engine, self.input_spec
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        out_name = self.package.meta.output_name
        if inputs != [spec.name] or out_name not in names:
            raise BackendError(f"engine I/O is {names}; expected input {spec.name!r} and output {out_name!r}")
        for n in (spec.name, out_name):
            if engine.get_tensor_dtype(n) != trt.DataType.FLOAT:
                raise BackendError(f"engine tensor {n!r} is {engine.get_tensor_dtype(n)}, expected FLOAT")
        mn, _, mx = engine.get_tensor_profile_shape(spec.name, 0)
        lo, hi = int(mn[0]), int(mx[0])
        if lo > 1 or hi < self.max_batch:
            raise BackendError(f"engine profile batch {lo}..{hi} does not cover 1..{self.max_batch}")

    def _allocate(self, trt: Any) -> None:
        """One device buffer per I/O tensor at max batch (every output must have an address, the CAM
        included), pinned staging for the input and the logit only."""
        assert self._cuda is not None
        engine, ctx, spec = self._engine, self._context, self.input_spec
        self._set_batch(self.max_batch)
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendError(
                    f"engine tensor {name!r} has unresolved shape {shape} at batch {self.max_batch}"
                )
            itemsize = np.dtype(trt.nptype(engine.get_tensor_dtype(name))).itemsize
            ptr = self._cuda.malloc(max(1, int(np.prod(shape, dtype=np.int64))) * itemsize)
            if not ctx.set_tensor_address(name, ptr):
                raise BackendError(f"TensorRT refused the address of tensor {name!r}")
            self._buffers[name] = ptr
        per_image = int(np.prod(spec.shape))
        self._host_in = self._cuda.host_array(self.max_batch * per_image, np.dtype(np.float32))
        self._host_out = self._cuda.host_array(self.max_batch, np.dtype(np.float32))

    def _set_batch(self, n: int) -> None:
        if n != self._shape_n:
            if not self._context.set_input_shape(self.input_spec.name, (n, *self.input_spec.shape)):
                raise BackendError(f"TensorRT refused batch {n} (profile {self.profile})")
            self._shape_n = n

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        cuda, host_in, host_out = self._cuda, self._host_in, self._host_out
        assert cuda is not None and host_in is not None and host_out is not None
        n = batch.shape[0]
        count = batch.size
        host_in[:count] = batch.reshape(-1)
        self._set_batch(n)
        cuda.copy_async(
            self._buffers[self.input_spec.name], host_in.ctypes.data, count * 4, "cudaMemcpyHostToDevice"
        )
        if not self._context.execute_async_v3(cuda.stream_handle()):
            raise BackendError(f"TensorRT execute_async_v3 failed at batch {n}; see its log above")
        out = self._buffers[self.package.meta.output_name]
        cuda.copy_async(host_out.ctypes.data, out, n * 4, "cudaMemcpyDeviceToHost")
        cuda.synchronize()
        return host_out[:n].copy()

    def _close(self) -> None:
        # Order matters: the context uses the engine, the engine the runtime; buffers go once nothing can run.
        errors: list[str] = []
        if self._cuda is not None and self._cuda.stream is not None:
            try:
                self._cuda.synchronize()
            except BackendError as exc:
                errors.append(str(exc))
        self._context = None
        self._engine = None
        self._runtime = None
        self._host_in = self._host_out = None
        self._buffers = {}
        self._shape_n = 0
        if self._cuda is not None:
            errors += self._cuda.release()
            self._cuda = None
        if errors:  # logged, not raised: __exit__ must not mask the exception that may be unwinding
            log.error("TensorRT backend released with errors: %s", "; ".join(errors))

    def warmup(self, batch_sizes: tuple[int, ...] | None = None) -> None:
        """Default: every batch size of the profile (``__enter__`` already did this once)."""
        super().warmup(batch_sizes or self.profile.batch_sizes())
