"""The benchmark's daemon configuration; the daemon runs as :class:`tools.daemon_process.DaemonProcess`.

Every endpoint is ephemeral (``tcp://127.0.0.1:*``, metrics port 0): the bound addresses are read from the
daemon's ``ready`` log line, so there is no port race with anyone else on the machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon.settings import Settings, deep_update

EPHEMERAL = "tcp://127.0.0.1:*"


def bench_settings(model_dir: Path, overrides: dict[str, Any]) -> Settings:
    """Production defaults, plus: ephemeral endpoints, JSON logs, and the benchmark's tuning overrides."""
    base: dict[str, Any] = {
        "model": {"path": str(model_dir)},
        "sources": {"camera": {"endpoint": EPHEMERAL}},
        "publisher": {"endpoint": EPHEMERAL},
        "control": {"endpoint": EPHEMERAL},  # the ready line says where (the shadow phase loads a candidate)
        "metrics": {"port": 0},
        "logging": {"format": "json"},
    }
    return Settings(**deep_update(base, overrides))
