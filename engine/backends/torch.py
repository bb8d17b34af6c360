"""torch backend: the reference (CPU, FP32) and a measurable GPU path where TensorRT is absent (CUDA, FP16,
channels-last, one CUDA graph per batch bucket).

The package's serving artefact is ONNX, which torch cannot run; this backend needs the network's weights as
a state dict, ``model.pt`` beside ``model.onnx`` (the ``engine.model.build_model`` network, loaded with
``weights_only=True`` so a package cannot carry code). When ``model.json`` records its sha256
(``training.state_dict.sha256``) the file is checked against it.

CUDA graphs need static shapes, so the profile is a set of batch buckets (default: powers of two up to
``max_batch``, plus ``max_batch``); a batch of n runs in the smallest bucket ≥ n, zero-padded (the network is
per-image: BatchNorm in eval mode, no cross-batch ops, so padding never changes a real image's logit).

Options: :class:`TorchOptions`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from engine.backend import Backend, BackendError, BackendOptions

if TYPE_CHECKING:  # engine.package loads OpenCV: imported where a package is opened, not to check options
    from engine.package import ModelPackage

STATE_DICT_NAME = "model.pt"


class TorchOptions(BackendOptions):
    """``model.options`` of the ``torch`` backend."""

    device: str = "cpu"  # "cpu" | "cuda" | "cuda:N"
    threads: int | None = Field(default=None, ge=0)  # CPU intra-op threads; None or 0 = torch's choice
    weights: Path | None = None  # the state dict; None = <package>/model.pt
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


def state_dict_path(package: ModelPackage, override: str | Path | None = None) -> Path:
    return Path(override) if override is not None else package.directory / STATE_DICT_NAME


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
        from engine.model import model_from_state

        path = state_dict_path(self.package, self.options.weights)
        if not path.is_file():
            raise BackendError(
                f"no {path.name} (state dict) for the torch backend: the package holds only ONNX otherwise; "
                f"export it with its {STATE_DICT_NAME}, or choose onnxruntime/tensorrt ({path})"
            )
        recorded = (self.package.meta.training.get("state_dict") or {}).get("sha256")
        if recorded:
            actual = hashlib.sha256(path.read_bytes()).hexdigest()
            if actual != recorded:
                raise BackendError(
                    f"{path} sha256 {actual[:16]}… does not match model.json training.state_dict.sha256 "
                    f"{str(recorded)[:16]}…; the weights are not the ones this package was exported from"
                )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors come in many types
            raise BackendError(f"cannot load {path} as a weights-only state dict: {exc}") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]  # a training checkpoint {"model": ..., "optimizer": ...}
        if not isinstance(state, dict) or not state:
            raise BackendError(f"{path} does not hold a state dict")
        if all(k.startswith("net.") for k in state):
            state = {k[4:]: v for k, v in state.items()}  # saved from the CamHead/logit-only export wrapper
        try:
            model = model_from_state(state)
        except (RuntimeError, ValueError) as exc:
            raise BackendError(f"{path} does not fit engine.model's network: {exc}") from None
        model.eval().requires_grad_(False)
        return model

    def _open_cuda(self, torch: Any) -> None:
        dtype = torch.float16 if self._precision == "fp16" else torch.float32
        model = self._model.to(self._device, dtype=dtype, memory_format=torch.channels_last)
        self._model = model
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
