"""ONNX Runtime backend: the embedded CPU default (CUDA execution provider when present and asked for)."""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.backend import Backend, BackendError
from engine.package import ModelPackage


class OnnxRuntimeBackend(Backend):
    """Options: ``intra_op_threads`` (0 = ORT's choice), ``providers`` (default CPU only),
    ``model_file`` (e.g. ``model.int8.onnx`` inside the package)."""

    name = "onnxruntime"

    def __init__(self, package: ModelPackage, *, max_batch: int = 32, **options: Any) -> None:
        super().__init__(package, max_batch=max_batch, **options)
        self._session: Any = None
        self._model_file = options.get("model_file") or package.onnx_path.name

    @property
    def precision(self) -> str:
        return "int8" if "int8" in str(self._model_file) else "fp32"

    def _open(self) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = int(self.options.get("intra_op_threads", 0))
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        providers = list(self.options.get("providers") or ["CPUExecutionProvider"])
        path = self.package.directory / self._model_file
        try:
            self._session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for bad models
            raise BackendError(f"ONNX Runtime cannot load {path}: {exc}") from None
        names = [i.name for i in self._session.get_inputs()]
        if names[:1] != [self.input_spec.name]:
            raise BackendError(f"{path} input is {names}, model.json says {self.input_spec.name!r}")
        shape = self._session.get_inputs()[0].shape
        if len(shape) != 4:
            raise BackendError(f"{path} input rank is {len(shape)} ({shape}); expected 4 (N, C, H, W)")
        self._outputs = [self.package.meta.output_name]

    def _close(self) -> None:
        self._session = None

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        try:
            (logits,) = self._session.run(self._outputs, {self.input_spec.name: batch})
        except Exception as exc:
            raise BackendError(f"ONNX Runtime inference failed: {exc}") from exc
        return np.asarray(logits, dtype=np.float32).reshape(batch.shape[0])
