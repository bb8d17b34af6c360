"""``batching.cpu_latency_us``: the daemon holds a CPU wake-up latency request while it runs and drops it at stop
(real /dev/cpu_dma_latency where writable: CI runs as root); an explicit value it cannot hold stops the start,
naming the setting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import daemon.cpu_latency as cpu_latency
from daemon.settings import ConfigError
from tests.helpers import tiny_package
from tests.integration.daemon_harness import daemon_settings, running_app

pytestmark = pytest.mark.integration


@pytest.mark.timeout(60)
@pytest.mark.skipif(
    not (cpu_latency.DEVICE.exists() and os.access(cpu_latency.DEVICE, os.W_OK)),
    reason=f"{cpu_latency.DEVICE} is not writable here",
)
def test_the_request_stands_while_the_daemon_runs(tmp_path: Path) -> None:
    tiny_package(tmp_path / "pkg", input_size=(32, 32))
    before = cpu_latency.current_target_us()
    with running_app(daemon_settings(tmp_path / "pkg")) as app:
        assert app.cpu_latency is not None and app.cpu_latency.describe() == {"held": True, "us": 0}
        assert cpu_latency.current_target_us() == 0
    assert not app.cpu_latency.held and cpu_latency.current_target_us() == before
    with running_app(daemon_settings(tmp_path / "pkg", batching={"cpu_latency_us": "off"})) as app:
        assert app.cpu_latency is not None and not app.cpu_latency.held
        assert cpu_latency.current_target_us() == before


@pytest.mark.timeout(60)
def test_an_explicit_request_that_cannot_be_held_fails_the_start_naming_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny_package(tmp_path / "pkg", input_size=(32, 32))
    monkeypatch.setattr(cpu_latency, "DEVICE", tmp_path / "no-such-device")
    with (
        pytest.raises(ConfigError, match=r"batching\.cpu_latency_us = 10: .*no-such-device"),
        running_app(daemon_settings(tmp_path / "pkg", batching={"cpu_latency_us": 10})),
    ):
        pass
    # "auto" runs without it, and says so in the ready line's field.
    with running_app(daemon_settings(tmp_path / "pkg")) as app:
        assert app.cpu_latency is not None and not app.cpu_latency.held
        assert app._cpu_latency_line is not None and app._cpu_latency_line.startswith("not held")
