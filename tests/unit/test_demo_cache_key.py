"""The demo's cached package is keyed by what made it: the data and the effective training configuration."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tools import demo


def test_train_prints_the_effective_configuration(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "inspectd.cli",
        "train",
        "--data",
        str(tmp_path),
        "--out",
        str(tmp_path / "r"),
    ]
    default = json.loads(
        subprocess.run([*cmd, "--print-config"], capture_output=True, text=True, check=True).stdout
    )
    seeded = subprocess.run(
        [*cmd, "--seed", "7", "--print-config"], capture_output=True, text=True, check=True
    )
    assert default["arch"] == "patch_memory" and len(default["patch_members"]) == 3
    assert json.loads(seeded.stdout) == {**default, "seed": 7}
    assert not (tmp_path / "r").exists()  # printed, nothing trained


def test_a_changed_configuration_trains_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"x")
    cfg = demo.DemoConfig(workdir=tmp_path / "work")
    key = demo.package_key(cfg, data)
    assert demo.package_key(cfg, data) == key  # stable: a second run reuses the package
    assert demo.package_key(replace(cfg, seed=1), data) != key
    # An upgrade that changes the preset must not serve the old package: the key follows the printed config.
    real_run = subprocess.run

    def changed(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        done: subprocess.CompletedProcess[str] = real_run(cmd, **kw)  # type: ignore[call-overload]
        conf = json.loads(done.stdout)
        return subprocess.CompletedProcess(cmd, 0, json.dumps({**conf, "patch_top_k": 8}), "")

    monkeypatch.setattr(demo.subprocess, "run", changed)
    assert demo.package_key(cfg, data) != key
