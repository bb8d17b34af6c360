"""systemd/ and the Dockerfile: the files a GPU station runs inspectd from.

systemd-analyze and hadolint check what they can (syntax, resolvable paths, exposure, Dockerfile lint); the
rest checks the contract between the files: the unit starts the entry point the Dockerfile installs, with
the config file the example provides, stops within the daemon's drain budget, and the example config and
environment file are valid for daemon/settings.py.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from daemon.settings import MetricsSettings, load_settings
from tests.deploy_support import (
    REPO,
    SHIPPED_ENTRY_POINT,
    assert_exposure_at_most,
    assert_unit_verifies,
    require_tool,
)

UNIT = REPO / "systemd" / "inspectd.service"
EXAMPLE_TOML = REPO / "systemd" / "inspectd.toml"
EXAMPLE_ENV = REPO / "systemd" / "inspectd.env.example"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
MAX_EXPOSURE = 4.0


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; repeated keys (DeviceAllow=, …) stay separate."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), "keep unit lines unbroken, so they can be grepped"
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_values(section: str, key: str) -> list[str]:
    return [v for s, k, v in unit_entries(UNIT.read_text(encoding="utf-8")) if s == section and k == key]


def unit_value(section: str, key: str) -> str:
    values = unit_values(section, key)
    assert len(values) == 1, f"[{section}] {key}= set {len(values)} times"
    return values[0]


def _seconds(value: str) -> float:
    units = {"min": 60.0, "ms": 0.001, "s": 1.0, "h": 3600.0, "": 1.0}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(min|ms|s|h|)", value)
    assert match, f"unsupported time span {value!r}"
    return float(match.group(1)) * units[match.group(2)]


# --- the unit ------------------------------------------------------------------------------------------


def test_unit_runs_the_daemon_as_the_issue_requires() -> None:
    assert unit_value("Service", "Type") == "notify"
    assert _seconds(unit_value("Service", "WatchdogSec")) > 0
    assert unit_value("Service", "Restart") == "on-failure"
    assert int(unit_value("Unit", "StartLimitBurst")) >= 1  # a crash loop ends in "failed", not forever
    assert _seconds(unit_value("Unit", "StartLimitIntervalSec")) > 0
    assert (
        unit_value("Service", "ExecStart")
        == f"{SHIPPED_ENTRY_POINT} serve --config /etc/inspectd/inspectd.toml"
    )
    assert unit_value("Service", "User") not in ("", "root", "0")
    for key, value in {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "DevicePolicy": "closed",
    }.items():
        assert unit_value("Service", key) == value, key
    assert unit_values("Service", "ReadWritePaths"), "the watched folder must stay writable"


def test_unit_lets_the_gpu_and_zeromq_through_its_hardening() -> None:
    allowed = {v.split()[0] for v in unit_values("Service", "DeviceAllow")}
    # CUDA opens /dev/nvidiaN + /dev/nvidiactl (major "nvidia", "nvidia-frontend" on older drivers) and
    # /dev/nvidia-uvm; without them the daemon would find no GPU.
    assert {"char-nvidia", "char-nvidia-frontend", "char-nvidia-uvm"} <= allowed
    # batching.cpu_latency_us = "auto" holds a PM QoS request: DevicePolicy=closed must let that one node through.
    assert "/dev/cpu_dma_latency w" in unit_values("Service", "DeviceAllow")
    families = unit_value("Service", "RestrictAddressFamilies").split()
    # libzmq aborts on bind when getifaddrs() cannot open a netlink socket (zeromq/libzmq#4737).
    assert {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"} <= set(families)
    assert "PrivateDevices" not in {k for _, k, _ in unit_entries(UNIT.read_text(encoding="utf-8"))}


def test_unit_timeouts_fit_the_daemons_settings() -> None:
    settings = load_settings(EXAMPLE_TOML)
    # systemd kills at TimeoutStopSec; the daemon must have drained (shutdown_timeout_s) well before that.
    assert _seconds(unit_value("Service", "TimeoutStopSec")) >= 2 * settings.deadlines.shutdown_timeout_s
    # The watchdog must outlast the daemon's own stall detection, or systemd kills a daemon that is about to
    # report itself not ready.
    assert _seconds(unit_value("Service", "WatchdogSec")) > settings.deadlines.stall_s


GiB = 1 << 30
# The daemon's own peak (docs/benchmarks.md: ≤ 1.5 GiB on CPU) plus CUDA/TensorRT host memory on a GPU station.
DAEMON_BASE_BYTES = int(2.5 * GiB)
MODEL_UPDATE_BYTES = 1 * GiB  # a candidate and a previous model loaded beside production (issue 15)
DECODE_BYTES_PER_PIXEL = 4  # a 16-bit decode (2 B/pixel) and its 8-bit copies, per preprocessing thread


def _bytes(value: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)", value)
    assert match, f"MemoryMax={value}: give bytes with K/M/G/T (a percentage does not follow the settings)"
    return int(float(match.group(1)) * units[match.group(2)])


def test_unit_memory_max_is_set_and_covers_what_the_example_settings_allow() -> None:
    """MemoryMax= is the one hard bound on memory (ZeroMQ buffers a whole message of any number of parts
    before the daemon can refuse it): high enough for everything the example configuration lets the daemon
    hold, so it is never hit in operation, and not so high that it bounds nothing."""
    memory_max = _bytes(unit_value("Service", "MemoryMax"))
    s = load_settings(EXAMPLE_TOML)
    cam, b = s.sources.camera, s.batching
    assert cam.rcvhwm * cam.max_message_bytes <= cam.max_buffered_bytes  # load_settings checked it too
    # The station's layout: a GPU backend, so "auto" is one inference worker and its buffers.
    buffers = b.layout(on_cpu=False).buffers
    frames = (b.queue_size + buffers * b.max_batch + s.audit.queue_size) * cam.max_message_bytes
    decode = max(b.preprocess_threads, 1) * s.decode.max_pixels * DECODE_BYTES_PER_PIXEL
    needed = DAEMON_BASE_BYTES + MODEL_UPDATE_BYTES + cam.max_buffered_bytes + frames + decode
    assert needed <= memory_max <= 2 * needed, (needed / GiB, memory_max / GiB)


@pytest.mark.timeout(60)
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    assert_unit_verifies(UNIT, tmp_path)


@pytest.mark.timeout(60)
def test_systemd_security_exposure_is_low() -> None:
    assert_exposure_at_most(UNIT, MAX_EXPOSURE)


# --- example configuration -----------------------------------------------------------------------------


def test_example_config_is_valid_and_matches_the_unit_and_prometheus() -> None:
    settings = load_settings(EXAMPLE_TOML)  # raises ConfigError naming any unknown or invalid key
    assert settings.model.backend == "tensorrt"  # the example is for a GPU station
    # The unit makes /var/lib/inspectd (StateDirectory) and /srv/inspectd (ReadWritePaths) writable: the
    # engine cache next to the model, the audit archive and the watched folder must lie inside them.
    writable = ("/var/lib/inspectd/", "/var/cache/inspectd/", "/srv/inspectd/")
    assert unit_value("Service", "StateDirectory") == "inspectd"
    assert "-/srv/inspectd" in unit_values("Service", "ReadWritePaths")
    for path in (settings.model.path, settings.audit.path, settings.sources.folder.path):
        assert path is not None and str(path).startswith(writable), path
    # deploy/prometheus/prometheus.yml scrapes the default metrics address.
    defaults = MetricsSettings()
    assert (settings.metrics.host, settings.metrics.port) == (defaults.host, defaults.port)


def _env_example_assignments() -> dict[str, str]:
    # Every commented-out assignment is a suggestion an operator will uncomment; each must be valid.
    pairs = re.findall(r"^#\s*([A-Z][A-Z0-9_]*)=(\S+)\s*$", EXAMPLE_ENV.read_text(encoding="utf-8"), re.M)
    return dict(pairs)


def test_env_example_overrides_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assignments = _env_example_assignments()
    inspectd_keys = {k: v for k, v in assignments.items() if k.startswith("INSPECTD_")}
    assert len(inspectd_keys) >= 3
    for key, value in assignments.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(EXAMPLE_TOML)
    dumped = settings.model_dump(mode="json")
    for key, value in inspectd_keys.items():
        node = dumped
        for part in key.removeprefix("INSPECTD_").lower().split("__"):
            node = node[part]  # KeyError: the variable names no setting, and pydantic would ignore it
        assert str(node) == value, key


# --- the container image -------------------------------------------------------------------------------


def _dockerfile() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


@pytest.mark.timeout(60)
def test_hadolint_passes() -> None:
    hadolint = require_tool("hadolint")
    out = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_contract() -> None:
    text = _dockerfile()
    assert re.search(r"^FROM nvcr\.io/nvidia/tensorrt:\$\{TENSORRT_TAG\}$", text, re.M)
    assert re.search(r"^ARG TENSORRT_TAG=\d\d\.\d\d-py3$", text, re.M)
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0"), "must run as a non-root user"
    assert re.search(r'pip install [^\n]*"[^"]*\[gpu\]"', text), "installs the package with the gpu extra"
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)
    assert entry and entry.group(1) == f'["{SHIPPED_ENTRY_POINT}", "serve"]'  # same path as the unit
    health = re.search(r"^HEALTHCHECK .*(?:\n\s+.*)*", text, re.M)
    defaults = MetricsSettings()
    assert health and f"http://{defaults.host}:{defaults.port}/readyz" in health.group(0)


def test_dockerignore_admits_exactly_what_the_build_needs() -> None:
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*", "an allow-list: everything out, then what the build needs back in"
    admitted = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= admitted, "every installed package's source must reach the build"
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= admitted
    for copied in re.findall(r"^COPY (?!\. )(\S+) ", _dockerfile(), re.M):
        assert copied in admitted, f"COPY {copied} is excluded by .dockerignore"


@pytest.mark.timeout(60)
def test_healthcheck_command_fails_on_not_ready() -> None:
    # The HEALTHCHECK runs Python's urlopen against /readyz: it must exit non-zero on a 503, which urlopen
    # raises as HTTPError. Shown against the real MetricsServer with a readiness of False, then True.
    from prometheus_client import CollectorRegistry

    from daemon.metrics import MetricsServer

    health = re.search(r"^HEALTHCHECK .*CMD (\[.*\])$", _dockerfile().replace("\\\n", ""), re.M)
    assert health
    argv = [a.strip('"') for a in re.findall(r'"(?:[^"\\]|\\.)*"', health.group(1))]
    assert argv[0] == "python3" and argv[1] == "-c"
    ready = {"value": False}
    server = MetricsServer(CollectorRegistry(), "127.0.0.1", 0, ready=lambda: ready["value"])
    server.start()
    try:
        code = argv[2].replace("127.0.0.1:9108", f"127.0.0.1:{server.port}")
        cmd = [sys.executable, "-c", code]
        assert subprocess.run(cmd, capture_output=True, timeout=20).returncode != 0, shlex.join(cmd)
        ready["value"] = True
        assert subprocess.run(cmd, capture_output=True, timeout=20).returncode == 0
    finally:
        server.stop()


UDEV_RULE = REPO / "deploy" / "udev" / "60-inspectd-cpu-latency.rules"


def test_udev_rule_grants_the_cpu_latency_device_to_the_services_group() -> None:
    """systemd 252 has no ``udevadm verify``: the rule is parsed here, key by key (a udev rule is one line of
    ``KEY=="match"`` and ``KEY="assignment"`` pairs; a misspelt key or a group that is not the unit's would leave
    the device root's, and the daemon would run without its request)."""
    rules = [
        ln
        for ln in UDEV_RULE.read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert len(rules) == 1
    pairs = re.findall(r'([A-Z]+)(==|=)"([^"]*)"', rules[0])
    assert ", ".join(f'{k}{op}"{v}"' for k, op, v in pairs) == rules[0].strip()  # nothing else on the line
    matches = {k: v for k, op, v in pairs if op == "=="}
    assigns = {k: v for k, op, v in pairs if op == "="}
    assert matches == {"KERNEL": "cpu_dma_latency", "SUBSYSTEM": "misc"}
    assert assigns["GROUP"] == unit_value("Service", "Group") and assigns["MODE"] == "0660"
