"""A real Prometheus server scrapes a real daemon and evaluates deploy/prometheus/rules.yml as shipped.

Debian's `prometheus` runs on a free loopback port with a temporary config (1 s scrape and evaluation
intervals) and storage dir, and is killed afterwards. The NG-rate recording rules must equal the REJECT share
the ZeroMQ subscriber saw. That equality is exact, not approximate: every verdict series exists at 0 before
the first scrape (the daemon pre-initialises them) and all of them are scraped at the same instants, so
rate()'s extrapolation scales numerator and denominator alike. Then every rule must evaluate without error
and every dashboard query must return data from what the daemon really exports.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy_support import RULES_YML, dashboard_queries, load_dashboard, require_tool
from tests.helpers import wait_until
from tests.integration.daemon_harness import (
    CameraPusher,
    VerdictCollector,
    calibrated_package,
    daemon_settings,
    running_app,
    synth_images,
)

pytestmark = pytest.mark.integration

RULE_1M = "line:inspectd_verdicts_reject:ratio_rate1m"
RULE_15M = "line:inspectd_verdicts_reject:ratio_rate15m"
EVAL_INTERVAL_S = 1.0  # scrape and rule evaluation interval of the test's Prometheus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrometheusServer:
    def __init__(self, base: str, log: Path) -> None:
        self.base = base
        self.log = log

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.base}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        result: list[dict[str, Any]] = data["result"]
        return result

    def scalar(self, expr: str) -> float | None:
        """The value of a one-series result; None while there is none."""
        result = self.query(expr)
        assert len(result) <= 1, (expr, result)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
        wait_until(check, timeout, lambda: f"Prometheus: {what}\n{self.log_tail()}", poll_s=0.2)

    def log_tail(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-3000:]


@contextmanager
def prometheus_server(tmp_path: Path, target: str) -> Iterator[PrometheusServer]:
    """Prometheus scraping ``target`` every second with the shipped rules; always killed on exit."""
    binary = require_tool("prometheus")
    config = {
        "global": {
            "scrape_interval": f"{EVAL_INTERVAL_S:g}s",
            "scrape_timeout": f"{EVAL_INTERVAL_S:g}s",
            "evaluation_interval": f"{EVAL_INTERVAL_S:g}s",
        },
        "rule_files": [str(RULES_YML)],  # as shipped: the recording rules and alerts under test
        "scrape_configs": [{"job_name": "inspectd", "static_configs": [{"targets": [target]}]}],
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as log_out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log_out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            server = PrometheusServer(f"http://127.0.0.1:{port}", log)

            def ready() -> bool:
                assert proc.poll() is None, f"prometheus exited ({proc.returncode})\n{server.log_tail()}"
                try:
                    with urllib.request.urlopen(f"{server.base}/-/ready", timeout=1) as resp:
                        return bool(resp.status == 200)
                except OSError:
                    return False

            server.wait_for("ready", ready)
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _grafana_to_promql(expr: str, line: str) -> str:
    # The dashboard's variables, as Grafana would fill them for this line and a 1 s scrape interval.
    return expr.replace("$line", line).replace("$__rate_interval", "1m").replace("$__range", "1m")


@pytest.mark.timeout(180)
def test_prometheus_ng_rate_rule_matches_the_subscriber(tmp_path: Path) -> None:
    n_images = 30
    images = synth_images(n_images, size=128, seed=9)
    package_dir = tmp_path / "model"
    calibrated_package(package_dir, [img for img, _ in images])
    settings = daemon_settings(package_dir)
    line = settings.line
    with running_app(settings) as app, prometheus_server(tmp_path, f"127.0.0.1:{app.metrics_port}") as prom:
        t0 = time.monotonic()
        # The first scrape must see all counters at 0, before any frame: the exactness argument above.
        prom.wait_for(
            "first scrape", lambda: prom.scalar(f'up{{instance="127.0.0.1:{app.metrics_port}"}}') == 1
        )

        publisher, camera = app.publisher_endpoint, app.camera_endpoint

        assert publisher and camera

        with VerdictCollector(publisher, line) as collector, CameraPusher(camera) as cam:
            cam.stream([(f"part-{i:03d}", img) for i, (img, _) in enumerate(images)], fps=60)
            cam.send("garbled", b"not an image", encoding="png")  # REJECT decode_error: a non-model reason
            verdicts = collector.wait_verdicts(n_images + 1, timeout=30)
        n = len(verdicts)
        rejects = sum(v["verdict"] == "REJECT" for v in verdicts)
        assert 0 < rejects < n  # a ratio of 0 or 1 would not show a wrong numerator or denominator

        # Prometheus has scraped every verdict …
        selector = f'inspectd_verdicts_total{{line="{line}"}}'
        prom.wait_for("all verdicts scraped", lambda: prom.scalar(f"sum({selector})") == n)
        t_scraped = prom.scalar(f"max(timestamp({selector}))")
        assert t_scraped is not None
        # … and evaluated the rules a full evaluation interval after that scrape (a sample is stamped with the
        # scrape's start, so an evaluation in the few ms before it was stored could carry a later stamp).
        prom.wait_for(
            "rule evaluated after the last scrape",
            lambda: (
                (prom.scalar(f'timestamp({RULE_1M}{{line="{line}"}})') or 0) > t_scraped + EVAL_INTERVAL_S
            ),
        )
        # Both windows reach back before the first scrape, so both hold the whole run.
        assert time.monotonic() - t0 < 55, (
            "the test outran the 1m window; the comparison would be meaningless"
        )
        expected = rejects / n
        for rule in (RULE_1M, RULE_15M):
            got = prom.scalar(f'{rule}{{line="{line}"}}')
            assert got == pytest.approx(expected, rel=1e-9), (rule, got, rejects, n)
        # The daemon's own NG gauge (last N verdicts, N = 500 > n) agrees as well.
        assert prom.scalar(f'inspectd_ng_ratio{{line="{line}"}}') == pytest.approx(expected)

        # Every rule of rules.yml evaluates cleanly against real data (no type or label errors).
        groups = prom.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        shipped = yaml.safe_load(RULES_YML.read_text(encoding="utf-8"))
        assert len(rules) == sum(len(g["rules"]) for g in shipped["groups"])
        bad = [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        assert not bad, bad

        # Every dashboard panel query returns data from this daemon: no typo survives as "No data".
        empty = [
            q
            for q in dashboard_queries(load_dashboard(), templating=False)
            if not prom.query(_grafana_to_promql(q, line))
        ]
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
        # The $line variable's values come from inspectd_ready's line label.
        assert line in prom.api("label/line/values", **{"match[]": "inspectd_ready"})
