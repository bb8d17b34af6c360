"""torch backend: the reference (CPU, FP32) and the GPU path where TensorRT is absent (CUDA, FP16, one CUDA
graph per batch bucket), for both model kinds (the ResNet18 and the patch memory).

The package's serving artefact is ONNX, which torch cannot run; this backend rebuilds the network from the torch
state ``inspectd export`` writes beside it (``model.pt``, recorded in ``model.json`` as the variant ``torch``
with its sha256 and the model.onnx it belongs to). The file is read once, its bytes are checked against the
record and exactly those bytes are loaded, with ``weights_only=True`` (tensors and plain values, never code),
by ``engine.model.load_state``. A package exported before the torch state existed still serves on ONNX
Runtime and TensorRT; here it is refused with a message saying so. ``weights`` names a state file explicitly
(the operator's choice: loaded without a record to check it against, and logged).

Precision on CUDA: FP16 by default. A conv net (the ResNet18) is converted to FP16 and channels-last (cuDNN's
fast NHWC tensor-core kernels). A model with FP32 islands (the patch memory: its distance must not be computed
in FP16, engine.patch_model) keeps its FP32 weights and runs under autocast: FP16 for its projection, FP32
inside its islands. On the CPU everything runs in FP32 (the reference ``check-backends`` compares with ONNX
Runtime).

CUDA graphs need static shapes, so the profile is a set of batch buckets (default: powers of two up to
``max_batch``, plus ``max_batch``); a batch of n runs in the smallest bucket ≥ n, zero-padded (the network is
per-image: BatchNorm in eval mode, no cross-batch ops, so padding never changes a real image's logit).

Options: :class:`TorchOptions`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from engine.backend import Backend, BackendError, BackendOptions

if TYPE_CHECKING:  # engine.package loads OpenCV: imported where a package is opened, not to check options
    from engine.package import ModelPackage

log = logging.getLogger(__name__)

STATE_DICT_NAME = "model.pt"  # engine.package.TORCH_NAME (not imported here: checking options stays cheap)


class TorchOptions(BackendOptions):
    """``model.options`` of the ``torch`` backend."""

    device: str = "cpu"  # "cpu" | "cuda" | "cuda:N"
    threads: int | None = Field(default=None, ge=0)  # CPU intra-op threads; None or 0 = torch's choice
    weights: Path | None = None  # a state file named explicitly (not checked); None = the package's model.pt
    cuda_graphs: bool = True  # one CUDA graph per batch bucket (CUDA only)
    batch_buckets: tuple[int, ...] | None = None  # None = powers of two up to max_batch, plus max_batch
    precision: Literal["fp16", "fp32"] | None = None  # None = fp16 on CUDA, fp32 on the CPU

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @field_validator("precision")
    @classmethod
    def _fp16_needs_cuda(cls, v: str | None, info: ValidationInfo) -> str | None:
        device = info.data.get("device")  # absent when the device itself was refused
        if v == "fp16" and device is not None and not str(device).startswith("cuda"):
            raise ValueError(
                "fp16 is only supported on CUDA (CPU half-precision convolutions are slow/partial)"
            )
        return v


def default_buckets(max_batch: int) -> tuple[int, ...]:
    sizes = {1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch}
    return tuple(sorted(sizes | {max_batch}))


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"batch {n} exceeds the largest bucket {buckets[-1]}")


class TorchBackend(Backend):
    name = "torch"
    options_type = TorchOptions
    options: TorchOptions

    def __init__(
        self,
        package: ModelPackage,
        *,
        max_batch: int = 32,
        options: TorchOptions | Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(package, max_batch=max_batch, options=options)
        opts = self.options
        self.device_name = opts.device
        self._precision: str = opts.precision or ("fp16" if opts.on_cuda else "fp32")
        self.buckets = tuple(sorted(opts.batch_buckets or default_buckets(max_batch)))
        if self.buckets[-1] < max_batch:
            raise ValueError(f"batch_buckets {self.buckets} must include max_batch {max_batch}")
        self.use_graphs = opts.on_cuda and opts.cuda_graphs
        self._torch: Any = None
        self._model: Any = None
        self._device: Any = None
        self._stream: Any = None
        self._graphs: dict[int, tuple[Any, Any, Any]] = {}  # bucket → (graph, static input, static output)
        self._pinned_in: Any = None
        self._pinned_out: Any = None
        self._autocast = False  # FP16 through autocast (a model with FP32 islands) instead of FP16 weights

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def on_cpu(self) -> bool:
        return not self.options.on_cuda

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "device": self.device_name}

    def _open(self) -> None:
        try:
            import torch
        except ImportError as exc:
            raise BackendError(f"torch is not importable here: {exc}") from None
        self._torch = torch
        try:
            self._device = torch.device(self.device_name)
        except RuntimeError as exc:
            raise BackendError(f"torch device {self.device_name!r}: {exc}") from None
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError(f"torch device {self.device_name!r} asked for, but CUDA is not available here")
        if self._device.type not in ("cpu", "cuda"):
            raise BackendError(f"torch backend supports cpu and cuda devices, got {self.device_name!r}")
        if self._device.type == "cpu" and self.options.threads:
            torch.set_num_threads(self.options.threads)
        try:
            self._model = self._load_model(torch)
            if self._device.type == "cuda":
                self._open_cuda(torch)
        except BaseException:
            self._close()
            raise

    def _load_model(self, torch: Any) -> Any:
        from engine.model import load_state
        from engine.package import TORCH_VARIANT, PackageError, read_variant

        if self.options.weights is not None:
            path = Path(self.options.weights)
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise BackendError(f"torch backend weights {path}: {exc}") from None
            log.warning("torch backend: loading %s as named by the weights option, unchecked", path)
            source = str(path)
        elif self.package.meta.variant(TORCH_VARIANT) is None:
            raise BackendError(
                f"no {STATE_DICT_NAME} (state dict) for the torch backend: {self.package.directory}/model.json "
                "records no torch state (a package exported before inspectd wrote one, or made without torch); "
                "re-export it with 'inspectd export', or choose onnxruntime/tensorrt"
            )
        else:
            try:
                rec, data = read_variant(self.package, TORCH_VARIANT)
            except PackageError as exc:
                raise BackendError(f"torch backend: {exc}") from None
            source = str(self.package.directory / str(rec["file"]))
        try:
            return load_state(data, source=source)
        except ValueError as exc:
            raise BackendError(str(exc)) from None

    def _open_cuda(self, torch: Any) -> None:
        from engine.patch_model import has_fp32_islands

        fp16 = self._precision == "fp16"
        self._autocast = fp16 and has_fp32_islands(self._model)
        if self._autocast:  # weights stay FP32: the islands need them so
            self._model = self._model.to(self._device)
        else:
            dtype = torch.float16 if fp16 else torch.float32
            self._model = self._model.to(self._device, dtype=dtype, memory_format=torch.channels_last)
        c, h, w = self.input_spec.shape
        self._stream = torch.cuda.Stream(device=self._device)
        self._pinned_in = torch.empty((self.max_batch, c, h, w), dtype=torch.float32).pin_memory()
        self._pinned_out = torch.empty((self.max_batch,), dtype=torch.float32).pin_memory()
        with torch.cuda.stream(self._stream), torch.inference_mode():
            for b in self.buckets:
                static_in = torch.zeros((b, c, h, w), dtype=torch.float32, device=self._device)
                # Warm up on this stream before capture (cuDNN picks its kernels on the first runs).
                for _ in range(3):
                    self._forward(static_in)
                if not self.use_graphs:
                    self._graphs[b] = (None, static_in, None)
                    continue
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self._stream):
                    static_out = self._forward(static_in)
                self._graphs[b] = (graph, static_in, static_out)
        self._stream.synchronize()

    def _forward(self, x: Any) -> Any:
        """float32 (N, C, H, W) on the model's device → float32 logits (N,); casts inside (and so inside a
        captured graph)."""
        torch = self._torch
        if self._autocast:
            with torch.autocast(device_type="cuda", dtype=torch.float16):
                return self._model(x)[:, 0].float()
        if self._device.type == "cuda":
            dtype = torch.float16 if self._precision == "fp16" else torch.float32
            x = x.to(dtype=dtype).contiguous(memory_format=torch.channels_last)
        return self._model(x)[:, 0].float()

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        if self._device.type == "cpu":
            with torch.inference_mode():
                return np.asarray(self._forward(torch.from_numpy(batch)).numpy(), dtype=np.float32)
        n = batch.shape[0]
        b = bucket_for(n, self.buckets)
        graph, static_in, static_out = self._graphs[b]
        pin_in, pin_out = self._pinned_in[:n], self._pinned_out[:n]
        pin_in.numpy()[...] = batch
        with torch.cuda.stream(self._stream), torch.inference_mode():
            static_in[:n].copy_(pin_in, non_blocking=True)
            if b > n:
                static_in[n:].zero_()
            if graph is not None:
                graph.replay()
                out = static_out
            else:
                out = self._forward(static_in)
            pin_out.copy_(out[:n], non_blocking=True)
        self._stream.synchronize()
        logits: np.ndarray = pin_out.numpy().copy()
        return logits

    def _close(self) -> None:
        torch = self._torch
        if self._stream is not None:
            self._stream.synchronize()
        self._graphs = {}
        self._model = None
        self._pinned_in = self._pinned_out = None
        self._stream = None
        if torch is not None and self._device is not None and self._device.type == "cuda":
            torch.cuda.empty_cache()  # hand the graphs' memory pool back (explicitly here, never in __del__)

    def warmup(self, batch_sizes: tuple[int, ...] | None = None) -> None:
        """Default: every bucket (on CUDA each has a captured graph)."""
        super().warmup(batch_sizes or self.buckets)
