"""daemon.cpu_latency: the PM QoS CPU latency request. Against the real /dev/cpu_dma_latency where this process
may write it (root: CI), else skipped; the refusals against a device path that does not exist."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from daemon.cpu_latency import (
    DEVICE,
    CpuLatencyError,
    CpuLatencyRequest,
    current_target_us,
    hold_for_setting,
)
from daemon.settings import ConfigError, load_settings

writable = pytest.mark.skipif(
    not (DEVICE.exists() and os.access(DEVICE, os.W_OK)), reason=f"{DEVICE} is not writable here"
)


@writable
def test_the_kernel_applies_the_request_while_it_is_held_and_drops_it_on_release() -> None:
    before = current_target_us()
    request = CpuLatencyRequest()
    request.hold(0)
    try:
        assert request.held and request.describe() == {"held": True, "us": 0}
        assert current_target_us() == 0  # the smallest standing request wins
    finally:
        request.release()
    assert not request.held and request.describe() == {"held": False, "us": None}
    assert current_target_us() == before
    request.release()  # idempotent


@writable
def test_holding_again_replaces_the_request() -> None:
    before = current_target_us()
    request = CpuLatencyRequest()
    try:
        request.hold(0)
        request.hold(min(before, 5))
        assert request.value_us == min(before, 5) and current_target_us() == min(before, 5)
    finally:
        request.release()
    assert current_target_us() == before


@writable
def test_auto_holds_zero_where_the_device_may_be_written() -> None:
    request, line = hold_for_setting("auto")
    try:
        assert request.held and line == "0 µs held" and current_target_us() == 0
    finally:
        request.release()


def test_a_missing_device_refuses_an_explicit_request_and_auto_runs_without(tmp_path: Path) -> None:
    missing = tmp_path / "cpu_dma_latency"
    with pytest.raises(CpuLatencyError, match=r"cannot open .*cpu_dma_latency"):
        CpuLatencyRequest(missing).hold(0)
    with pytest.raises(CpuLatencyError):
        hold_for_setting(20, missing)
    request, line = hold_for_setting("auto", missing)
    assert not request.held and line.startswith("not held: ") and "cpu_dma_latency" in line
    request, line = hold_for_setting("off", missing)
    assert not request.held and line.startswith("off")


def test_a_negative_request_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="≥ 0"):
        CpuLatencyRequest(tmp_path / "x").hold(-1)


def test_the_value_is_written_as_one_native_int(tmp_path: Path) -> None:
    # A regular file stands in for the device: what the kernel reads is exactly 4 bytes, the value.
    device = tmp_path / "device"
    device.write_bytes(b"")
    request = CpuLatencyRequest(device)
    request.hold(123)
    request.release()
    assert device.read_bytes() == struct.pack("i", 123)


@pytest.mark.parametrize("value", ["sometimes", -1, 1.5])
def test_a_bad_setting_fails_naming_the_field(value: object) -> None:
    with pytest.raises(ConfigError, match=r"batching\.cpu_latency_us"):
        load_settings(None, {"batching": {"cpu_latency_us": value}})
