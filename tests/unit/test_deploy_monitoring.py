"""deploy/: Prometheus config and rules, Grafana provisioning and dashboard, the compose file.

Two kinds of checks. The tools' own (promtool check config/rules, promtool test rules) catch syntax and alert
logic. Ours catch what the tools cannot: a dashboard or rule that names a metric or label the daemon does not
export (it would show "no data" forever), and files that disagree with each other (ports, paths, uids).
"""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from daemon.metrics import Metrics
from daemon.settings import MetricsSettings
from tests.deploy_support import (
    DEPLOY,
    PROMETHEUS_YML,
    RULES_TEST_YML,
    RULES_YML,
    dashboard_panels,
    dashboard_queries,
    load_dashboard,
    require_tool,
)

DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "inspectd.yaml"
COMPOSE = DEPLOY / "docker-compose.yml"

# Labels that Prometheus adds at scrape time (job, instance) or that histograms carry (le).
SCRAPE_LABELS = {"job", "instance", "le"}
# Metrics Prometheus itself makes for every target.
SYNTHETIC_METRICS = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# The keys the daemon puts into inspectd_model_info (issue 6: model, backend, precision, …).
MODEL_INFO_KEYS = ("model", "backend", "precision")


# --- PromQL, just enough to find metric and label names -------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHERS = re.compile(r"\{([^}]*)\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENT = re.compile(r"(?<![\w$.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*([A-Za-z_:][\w:]*)\s*(?:\{[^}]*\})?\s*,\s*(\w+)\s*\)\s*$")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) that a PromQL expression refers to. Grafana's variables ($line,
    $__rate_interval) only occur inside strings and ranges here, which are dropped before looking."""
    lv = _LABEL_VALUES.match(expr)
    if lv:  # Grafana's templating function, not PromQL
        return {lv.group(1)}, {lv.group(2)}
    text = _STRING.sub('""', expr)
    labels: set[str] = set()
    for group in _GROUPING.findall(text):
        labels |= {x.strip() for x in group.split(",") if x.strip()}
    for matchers in _MATCHERS.findall(text):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    text = _RANGE.sub(" ", _MATCHERS.sub(" ", _GROUPING.sub(" ", text)))
    metrics = {name for name, call in _IDENT.findall(text) if not call and name not in _KEYWORDS}
    return metrics, labels


@pytest.mark.parametrize(
    ("expr", "metrics", "labels"),
    [
        (
            'histogram_quantile(0.99, sum by (line, le) (rate(inspectd_latency_seconds_bucket{line=~"$line"}[$__rate_interval])))',
            {"inspectd_latency_seconds_bucket"},
            {"line", "le"},
        ),
        (
            "(time() - inspectd_last_verdict_timestamp_seconds) > 60 and inspectd_ready == 1",
            {"inspectd_last_verdict_timestamp_seconds", "inspectd_ready"},
            set(),
        ),
        ('sum without (reason) (x:y:z{verdict!="PASS", a=~"b"})', {"x:y:z"}, {"reason", "verdict", "a"}),
        ("label_values(inspectd_ready, line)", {"inspectd_ready"}, {"line"}),
    ],
)
def test_promql_names_finds_metrics_and_labels(expr: str, metrics: set[str], labels: set[str]) -> None:
    # The checks below are only as good as this parser: it must neither miss a name nor invent one.
    assert promql_names(expr) == (metrics, labels)


# --- what the daemon exports ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported() -> tuple[set[str], set[str], set[str]]:
    """(sample names, family names, label names) of a daemon's registry: daemon/metrics.py is the source."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, "line-1")
    metrics.set_model_info(dict.fromkeys(MODEL_INFO_KEYS, "x"))  # set once the model is loaded
    samples: set[str] = set()
    families: set[str] = set()
    labels: set[str] = set()
    for family in registry.collect():
        families.add(family.name)
        for sample in family.samples:
            samples.add(sample.name)
            labels |= set(sample.labels)
    return samples, families, labels


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES_YML.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _recorded() -> set[str]:
    return {r["record"] for r in _rules() if "record" in r}


def _check_names(where: str, queries: list[str], exported: tuple[set[str], set[str], set[str]]) -> set[str]:
    samples, _, labels = exported
    known_metrics = samples | _recorded() | SYNTHETIC_METRICS
    known_labels = labels | SCRAPE_LABELS
    used: set[str] = set()
    problems = []
    for q in queries:
        metrics, used_labels = promql_names(q)
        if not metrics:
            problems.append(f"no metric found in {q!r}")
        problems += [f"unknown metric {m} in {q!r}" for m in sorted(metrics - known_metrics)]
        problems += [f"unknown label {lb} in {q!r}" for lb in sorted(used_labels - known_labels)]
        used |= metrics
    assert not problems, f"{where}:\n" + "\n".join(problems)
    return used


def _family(name: str, families: set[str]) -> str | None:
    """The exported family a sample name belongs to (inspectd_latency_seconds_bucket → …_seconds)."""
    for suffix in ("_bucket", "_count", "_sum", "_total", "_info", "_created", ""):
        if name.endswith(suffix) and name.removesuffix(suffix) in families:
            return name.removesuffix(suffix)
    return None


# --- the tests ------------------------------------------------------------------------------------------


def test_dashboard_refers_only_to_exported_metrics_and_labels(
    exported: tuple[set[str], set[str], set[str]],
) -> None:
    queries = dashboard_queries(load_dashboard())
    assert len(queries) >= 20  # the parser saw the panels at all
    _check_names("dashboard", queries, exported)


def test_rules_refer_only_to_exported_metrics_and_labels(
    exported: tuple[set[str], set[str], set[str]],
) -> None:
    _check_names("rules.yml", [r["expr"] for r in _rules()], exported)


def test_every_exported_inspectd_metric_is_shown_or_alerted_on(
    exported: tuple[set[str], set[str], set[str]],
) -> None:
    # A metric added to the daemon but to neither the dashboard nor an alert is one nobody will look at.
    _, families, _ = exported
    used = {m for q in dashboard_queries(load_dashboard()) for m in promql_names(q)[0]}
    used |= {m for r in _rules() for m in promql_names(r["expr"])[0]}
    shown = {_family(m, families) for m in used} - {None}
    missing = {f for f in families if f.startswith("inspectd_")} - shown
    assert not missing, f"exported but on no dashboard panel and in no rule: {sorted(missing)}"


def test_dashboard_covers_what_operators_asked_for() -> None:
    # issue 6: throughput, PASS/REJECT, NG rate, reasons, latency p50/p95/p99, stages, batch size, queue
    # depth, readiness, model info. Checked by the queries, not the titles, which may be reworded.
    text = "\n".join(dashboard_queries(load_dashboard()))
    for needle in (
        "inspectd_frames_received_total",
        "sum by (line, verdict) (rate(inspectd_verdicts_total",
        "line:inspectd_verdicts_reject:ratio_rate1m",
        "line:inspectd_verdicts_reject:ratio_rate15m",
        "sum by (line, reason)",
        "histogram_quantile(0.5, sum by (line, le) (rate(inspectd_latency_seconds_bucket",
        "histogram_quantile(0.95, sum by (line, le) (rate(inspectd_latency_seconds_bucket",
        "histogram_quantile(0.99, sum by (line, le) (rate(inspectd_latency_seconds_bucket",
        "sum by (line, stage, le) (rate(inspectd_stage_seconds_bucket",
        "inspectd_batch_size",
        "inspectd_queue_depth",
        "inspectd_ready",
        "inspectd_model_info",
    ):
        assert needle in text, needle


def test_dashboard_is_well_formed_for_provisioning() -> None:
    dash = load_dashboard()
    panels = list(dashboard_panels(dash))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    # Panels must not overlap on the 24-column grid (Grafana would shuffle them).
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
    # Every query goes to the datasource chosen by the $datasource variable, which defaults to the
    # provisioned one.
    ds_var = next(v for v in dash["templating"]["list"] if v["name"] == "datasource")
    provisioned = yaml.safe_load(DATASOURCES.read_text(encoding="utf-8"))["datasources"][0]
    assert ds_var["current"]["value"] == provisioned["uid"]
    for p in panels:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
    assert dash["uid"] == "inspectd"


def test_legends_name_labels_that_the_query_keeps() -> None:
    # "{{reason}}" on a query aggregated `by (line)` renders empty: the label is gone after the sum.
    for panel in dashboard_panels(load_dashboard()):
        for target in panel.get("targets", []):
            legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            groupings = re.findall(r"\bby\s*\(([^)]*)\)", target["expr"])
            if not groupings:
                continue  # no aggregation: every label of the series is kept
            outer = {x.strip() for x in groupings[0].split(",")}  # the outermost `by` comes first
            assert legend_labels <= outer, f"{panel['title']!r}: legend {legend_labels} vs by ({outer})"


def test_ng_rate_recording_rules_are_ratios_of_the_verdict_counter() -> None:
    rules = {r["record"]: r["expr"] for r in _rules() if "record" in r}
    for window in ("1m", "15m"):
        expr = " ".join(rules[f"line:inspectd_verdicts_reject:ratio_rate{window}"].split())
        assert expr == (
            f'sum by (line) (rate(inspectd_verdicts_total{{verdict="REJECT"}}[{window}]))'
            f" / sum by (line) (rate(inspectd_verdicts_total[{window}]))"
        )


def test_required_alerts_exist() -> None:
    alerts = {r["alert"]: r for r in _rules() if "alert" in r}
    assert {
        "InspectdNgRateHigh",
        "InspectdLatencyP99High",
        "InspectdNoVerdicts",
        "InspectdDeadlineMissesRising",
        "InspectdNotReady",
    } <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_promtool_check_config_and_rules() -> None:
    promtool = require_tool("promtool")
    for args in (["check", "config", str(PROMETHEUS_YML)], ["check", "rules", str(RULES_YML)]):
        out = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
    # check config also checks the rule files it names, so rules.yml must be the one it loads
    assert yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))["rule_files"] == ["rules.yml"]


def test_promtool_test_rules() -> None:
    # Each alert fires on a bad line and stays silent on a healthy one (deploy/prometheus/rules_test.yml).
    promtool = require_tool("promtool")
    out = subprocess.run(
        [promtool, "test", "rules", RULES_TEST_YML.name],
        cwd=RULES_TEST_YML.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    tested = set(re.findall(r"alertname:\s*(\w+)", RULES_TEST_YML.read_text(encoding="utf-8")))
    assert tested == {r["alert"] for r in _rules() if "alert" in r}, "every alert needs a promtool test"


def test_scrape_target_is_the_daemons_default_metrics_port() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "inspectd")
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    defaults = MetricsSettings()
    assert f"{defaults.host}:{defaults.port}" in targets
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_compose_mounts_exist_and_agree_with_provisioning() -> None:
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    mounts: dict[str, str] = {}
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):  # bind mount; the rest are named volumes
                assert (COMPOSE.parent / source).exists(), f"{source} does not exist"
                mounts[target] = source
    # Prometheus reads the config and rules that the tests above check.
    prom = compose["services"]["prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    assert mounts["/etc/prometheus"] == "./prometheus"
    # Grafana: the provider's path is where the dashboards are mounted; the datasource URL is where
    # Prometheus listens.
    provider = yaml.safe_load(DASHBOARD_PROVIDERS.read_text(encoding="utf-8"))["providers"][0]
    assert mounts[provider["options"]["path"]] == "./grafana/dashboards"
    listen = next(a for a in prom["command"] if a.startswith("--web.listen-address="))
    datasource = yaml.safe_load(DATASOURCES.read_text(encoding="utf-8"))["datasources"][0]
    assert datasource["url"] == "http://" + listen.split("=", 1)[1]
    for service in compose["services"].values():
        assert ":" in service["image"] and not service["image"].endswith(":latest"), "pin image tags"


def test_missing_tool_skips_here_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    # CI installs every tool (.ci/run); a skip there would hide an unchecked deployment file.
    missing = "inspectd-no-such-tool"
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_tool(missing)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        require_tool(missing)
