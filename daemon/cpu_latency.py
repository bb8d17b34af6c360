"""A CPU wake-up latency request (Linux PM QoS, ``/dev/cpu_dma_latency``) held while the daemon runs.

An idle CPU enters an idle state (a C-state on bare metal; on a virtual machine the guest halts the vCPU and the
host deschedules it). Waking it costs that state's exit latency, and on a VM the host's re-scheduling of the
vCPU. A lone frame on an idle daemon wakes every thread it uses: the pool thread that preprocesses it, then the
inference session's threads. Measured on the 2-core development VM (``cpuidle`` driver ``haltpoll``), a batch of
one on the lone-frame session (2 ONNX Runtime threads) every 200 ms: p50 / p90 17.0 / 20.4 ms with idle states
allowed, 13.3 / 13.9 ms while a request of 0 µs was held; only 27-37 % of the frames ran at the session's
two-thread speed, 97-99 % with the request (docs/benchmarks.md run 14).

The kernel keeps a request for as long as its file descriptor is open, and drops it when the descriptor is
closed, by :meth:`CpuLatencyRequest.release` or by the process's exit, a crash included: nothing outlives the
daemon. What a request costs is power: the CPUs poll instead of sleeping while the daemon idles (the tuned
profile ``latency-performance`` holds the same kind of request for the whole machine).

``batching.cpu_latency_us``:

- ``"auto"`` (default): hold 0 µs when the process may (root, or a group the device is granted to: the udev
  rule in deploy/udev/); otherwise log why not, once, and run without it.
- an integer: hold that many µs, and refuse to start when it cannot be held (the setting asked for it).
- ``"off"``: hold none.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from daemon.logs import get_logger

log = get_logger(__name__)

DEVICE = Path("/dev/cpu_dma_latency")


class CpuLatencyError(OSError):
    """The request could not be made (no device, no permission)."""


class CpuLatencyRequest:
    """One PM QoS CPU latency request: :meth:`hold` opens the device and writes the value (a native 32-bit
    integer, in µs); the request stands until :meth:`release` closes it."""

    def __init__(self, device: Path | None = None) -> None:
        self.device = device if device is not None else DEVICE
        self._fd: int | None = None
        self.value_us: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def hold(self, value_us: int) -> None:
        """Hold ``value_us`` (raises :class:`CpuLatencyError` with the reason when it cannot)."""
        if value_us < 0:
            raise ValueError(f"a CPU latency request is ≥ 0 µs, got {value_us}")
        self.release()
        try:
            fd = os.open(self.device, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise CpuLatencyError(exc.errno, f"cannot open {self.device}: {exc.strerror}") from None
        try:
            written = os.write(fd, struct.pack("i", value_us))
        except OSError as exc:
            os.close(fd)
            raise CpuLatencyError(exc.errno, f"cannot write {self.device}: {exc.strerror}") from None
        if written != 4:
            os.close(fd)
            raise CpuLatencyError(f"short write to {self.device}")
        self._fd, self.value_us = fd, value_us

    def release(self) -> None:
        """Close the descriptor: the kernel drops the request (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def describe(self) -> dict[str, Any]:
        return {"held": self.held, "us": self.value_us if self.held else None}


def current_target_us(device: Path | None = None) -> int:
    """The latency the kernel now applies: the smallest standing request, or its default (2000 s) when none."""
    with open(device if device is not None else DEVICE, "rb") as f:
        data = f.read(4)
    return int(struct.unpack("i", data)[0])


def hold_for_setting(setting: int | str, device: Path | None = None) -> tuple[CpuLatencyRequest, str]:
    """The request ``batching.cpu_latency_us`` asks for, held; and a line saying what was done. An explicit value
    that cannot be held raises :class:`CpuLatencyError` (the caller names the setting); ``"auto"`` logs why
    not and goes on; ``"off"`` holds nothing."""
    request = CpuLatencyRequest(device)
    if setting == "off":
        return request, "off (batching.cpu_latency_us)"
    value = 0 if setting == "auto" else int(setting)
    try:
        request.hold(value)
    except CpuLatencyError as exc:
        if setting != "auto":
            raise
        log.info(
            "CPU latency request not held: idle CPUs wake slower for a lone frame "
            "(grant the device to the service's group: deploy/udev/, docs/daemon.md)",
            error=str(exc),
        )
        return request, f"not held: {exc}"
    return request, f"{value} µs held"
