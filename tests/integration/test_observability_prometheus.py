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
import math
import socket
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from engine.drift import ScoreReference, logit
from engine.gauges import GaugeSet
from engine.package import ModelPackage, load_package, write_meta
from engine.pose import PoseParams, estimate_pose
from tests.deploy_support import (
    PROMETHEUS_YML,
    RULES_YML,
    dashboard_queries,
    load_dashboard,
    ready_server,
    require_tool,
)
from tests.helpers import wait_until
from tests.integration.daemon_harness import (
    CameraPusher,
    VerdictCollector,
    calibrated_package,
    daemon_settings,
    running_app,
    synth_images,
)
from training.gauge_fit import learn_bands

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


def station_config(
    target: str, line: str, *, rules: Path = RULES_YML, alertmanager: str | None = None
) -> dict[str, Any]:
    """The shipped prometheus.yml for a test: its inspectd scrape job (honor_labels, the target's `line`) and
    external labels as they are, pointed at ``target`` (the daemon of ``line``) and ``alertmanager`` (or none),
    evaluating ``rules`` (the shipped rules.yml by default), with 1 s scrape and evaluation intervals."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))
    interval = f"{EVAL_INTERVAL_S:g}s"
    config["global"].update(scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval)
    config["rule_files"] = [str(rules)]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "inspectd"]
    job["static_configs"] = [{"targets": [target], "labels": {"line": line}}]
    config["scrape_configs"] = [job]
    if alertmanager is None:
        del config["alerting"]
    else:
        config["alerting"]["alertmanagers"] = [{"static_configs": [{"targets": [alertmanager]}]}]
    return config


@contextmanager
def prometheus_server(tmp_path: Path, config: dict[str, Any]) -> Iterator[PrometheusServer]:
    """Prometheus running ``config`` (:func:`station_config`); always killed on exit."""
    binary = require_tool("prometheus")
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    log = tmp_path / "prometheus.log"
    argv = [
        binary,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    base = f"http://127.0.0.1:{port}"
    with ready_server("prometheus", argv, base, log):
        yield PrometheusServer(base, log)


def _grafana_to_promql(expr: str, line: str) -> str:
    # The dashboard's variables, as Grafana would fill them for this line and a 1 s scrape interval.
    return expr.replace("$line", line).replace("$__rate_interval", "1m").replace("$__range", "1m")


def complete_package(directory: Path, images: list[np.ndarray]) -> ModelPackage:
    """The tiny package with everything a production package carries, so every metric and panel has data:
    a threshold at the median score (mixed verdicts), tolerance bands learnt from the OK screws among
    ``images``, and a score reference. The reference is drawn, not calibrated (this test is about plumbing:
    test_drift_replay.py calibrates one): 60 good parts a logit or so below the threshold."""
    pkg = calibrated_package(directory, images)
    ok = [estimate_pose(img).measurements for img in images[::3]]
    gauges = GaugeSet(bands=learn_bands(ok), pose=PoseParams().to_dict(), n_ok=len(ok))
    below = logit(pkg.meta.decision.threshold) - 1.0
    reference = ScoreReference.from_logits(np.random.default_rng(9).normal(below, 0.5, 60), "drawn")
    write_meta(directory, replace(pkg.meta, gauges=gauges.to_dict(), score_reference=reference.to_dict()))
    return load_package(directory)


@pytest.mark.timeout(180)
def test_prometheus_ng_rate_rule_matches_the_subscriber(tmp_path: Path) -> None:
    n_images = 30
    images = synth_images(n_images, size=1024, seed=9)  # production size: the pose finds and measures them
    package_dir = tmp_path / "model"
    complete_package(package_dir, [img for img, _ in images])
    settings = daemon_settings(package_dir, metrics={"port": 0, "drift_min_parts": 5})
    line = settings.line
    with (
        running_app(settings) as app,
        prometheus_server(tmp_path, station_config(f"127.0.0.1:{app.metrics_port}", line)) as prom,
    ):
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
        inspected = [v for v in verdicts if v["reason"] in ("model", "grey_zone", "out_of_tolerance")]
        inspected_rejects = sum(v["verdict"] == "REJECT" for v in inspected)
        assert 0 < inspected_rejects < len(inspected) < n  # the garbled frame is a station fault
        for rule, expected in (
            (RULE_1M, rejects / n),
            (RULE_15M, rejects / n),
            ("line:inspectd_inspected_reject:ratio_rate1m", inspected_rejects / len(inspected)),
            ("line:inspectd_inspected_reject:ratio_rate15m", inspected_rejects / len(inspected)),
            ("line:inspectd_station_faults:ratio_rate15m", (n - len(inspected)) / n),
        ):
            got = prom.scalar(f'{rule}{{line="{line}"}}')
            assert got == pytest.approx(expected, rel=1e-9), (rule, got, rejects, n)
        # The daemon's own NG gauge (last N inspected verdicts, N = 500 > n) agrees with the inspected rule.
        assert prom.scalar(f'inspectd_ng_ratio{{line="{line}"}}') == pytest.approx(
            inspected_rejects / len(inspected)
        )
        # The drift statistic is a number here (reference, enough passed parts), and the shipped scrape config
        # kept the daemon's own `line` (honor_labels): no series was relabelled exported_line, and `up` carries
        # the target's line for InspectdTargetDown.
        psi = prom.scalar(f'inspectd_score_drift_psi{{line="{line}"}}')
        assert psi is not None and math.isfinite(psi)
        assert prom.query('{exported_line!=""}') == []
        assert prom.scalar(f'up{{job="inspectd", line="{line}"}}') == 1

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
