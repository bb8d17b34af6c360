"""TEST DOUBLE of the CUDA runtime bindings (``cuda.bindings.runtime``) that engine.backends.tensorrt uses.

Same calling convention as cuda-python: every call returns a tuple whose first element is a ``cudaError_t``.
"Device" memory is host memory here (so the fake TensorRT can compute on it), pointers are real addresses,
and every allocation is tracked: tests assert that a backend frees all it allocated, on exit and after a
failed open. ``fail`` makes a named call return an error.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidResourceHandle = 400


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


cudaStreamNonBlocking = 1
cudaHostAllocDefault = 0


class cudaStream_t:
    def __init__(self, handle: int) -> None:
        self._handle = handle

    def __int__(self) -> int:
        return self._handle

    def getPtr(self) -> int:
        return self._handle


@dataclass
class _Props:
    name: bytes
    major: int
    minor: int


@dataclass
class CudaState:
    device: list[np.ndarray] = field(default_factory=list)
    device_live: dict[int, np.ndarray] = field(default_factory=dict)
    host_live: dict[int, np.ndarray] = field(default_factory=dict)
    streams_live: set[int] = field(default_factory=set)
    copies: list[tuple[str, int]] = field(default_factory=list)  # (kind, nbytes)
    fail: set[str] = field(default_factory=set)
    gpu_name: bytes = b"NVIDIA H200"
    cc: tuple[int, int] = (9, 0)
    current_device: int | None = None

    @property
    def live(self) -> int:
        return len(self.device_live) + len(self.host_live) + len(self.streams_live)


STATE = CudaState()
_next_stream = [0x1000]


def _err(name: str) -> cudaError_t | None:
    if name in STATE.fail:
        return (
            cudaError_t.cudaErrorMemoryAllocation
            if "alloc" in name.lower()
            else cudaError_t.cudaErrorInvalidValue
        )
    return None


def cudaSetDevice(device: int) -> tuple[cudaError_t]:
    if (e := _err("cudaSetDevice")) is not None:
        return (e,)
    STATE.current_device = device
    return (cudaError_t.cudaSuccess,)


def cudaGetDeviceProperties(device: int) -> tuple[cudaError_t, Any]:
    return (cudaError_t.cudaSuccess, _Props(STATE.gpu_name + b"\x00" * 4, *STATE.cc))


def cudaGetErrorName(error: cudaError_t) -> tuple[cudaError_t, bytes]:
    return (cudaError_t.cudaSuccess, error.name.encode())


def cudaStreamCreateWithFlags(flags: int) -> tuple[cudaError_t, cudaStream_t | None]:
    if (e := _err("cudaStreamCreateWithFlags")) is not None:
        return (e, None)
    _next_stream[0] += 1
    STATE.streams_live.add(_next_stream[0])
    return (cudaError_t.cudaSuccess, cudaStream_t(_next_stream[0]))


def cudaStreamDestroy(stream: cudaStream_t) -> tuple[cudaError_t]:
    if int(stream) not in STATE.streams_live:
        return (cudaError_t.cudaErrorInvalidResourceHandle,)
    STATE.streams_live.discard(int(stream))
    return (cudaError_t.cudaSuccess,)


def cudaStreamSynchronize(stream: cudaStream_t) -> tuple[cudaError_t]:
    if int(stream) not in STATE.streams_live:
        return (cudaError_t.cudaErrorInvalidResourceHandle,)
    return (cudaError_t.cudaSuccess,)


def _alloc(nbytes: int, table: dict[int, np.ndarray]) -> int:
    buf = np.zeros(max(1, nbytes) + 64, dtype=np.uint8)
    ptr = (buf.ctypes.data + 63) // 64 * 64  # aligned, like cudaMalloc's 256-byte alignment (loosely)
    table[ptr] = buf
    return ptr


def cudaMalloc(size: int) -> tuple[cudaError_t, int]:
    if (e := _err("cudaMalloc")) is not None:
        return (e, 0)
    return (cudaError_t.cudaSuccess, _alloc(size, STATE.device_live))


def cudaFree(ptr: int) -> tuple[cudaError_t]:
    return (
        (cudaError_t.cudaSuccess,)
        if STATE.device_live.pop(int(ptr), None) is not None
        else (cudaError_t.cudaErrorInvalidValue,)
    )


def cudaHostAlloc(size: int, flags: int) -> tuple[cudaError_t, int]:
    if (e := _err("cudaHostAlloc")) is not None:
        return (e, 0)
    return (cudaError_t.cudaSuccess, _alloc(size, STATE.host_live))


def cudaFreeHost(ptr: int) -> tuple[cudaError_t]:
    return (
        (cudaError_t.cudaSuccess,)
        if STATE.host_live.pop(int(ptr), None) is not None
        else (cudaError_t.cudaErrorInvalidValue,)
    )


def cudaMemcpyAsync(
    dst: int, src: int, count: int, kind: cudaMemcpyKind, stream: cudaStream_t
) -> tuple[cudaError_t]:
    if int(stream) not in STATE.streams_live or not isinstance(kind, cudaMemcpyKind):
        return (cudaError_t.cudaErrorInvalidValue,)
    ctypes.memmove(int(dst), int(src), int(count))
    STATE.copies.append((kind.name, int(count)))
    return (cudaError_t.cudaSuccess,)


def install(monkeypatch: Any) -> CudaState:
    """Put the fake at ``cuda.bindings.runtime`` (undone by monkeypatch) and reset ``STATE``."""
    global STATE
    STATE = CudaState()
    runtime = types.ModuleType("cuda.bindings.runtime")
    for name, value in globals().items():
        if name.startswith("cuda"):
            setattr(runtime, name, value)
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = runtime  # type: ignore[attr-defined]
    cuda = types.ModuleType("cuda")
    cuda.bindings = bindings  # type: ignore[attr-defined]
    for mod in (runtime, bindings, cuda):
        mod.__spec__ = importlib.machinery.ModuleSpec(mod.__name__, None)
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", runtime)
    return STATE
