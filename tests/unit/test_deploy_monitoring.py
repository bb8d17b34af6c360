"""deploy/: Prometheus config and rules, Alertmanager config, Grafana provisioning and dashboard, the compose file.

Two kinds of checks. The tools' own (promtool check config/rules, promtool test rules, amtool check-config and
amtool config routes test) catch syntax, alert logic and routing. Ours catch what the tools cannot: a dashboard
or rule that names a metric or label the daemon does not export (it would show "no data" forever), and files
that disagree with each other (ports, paths, uids, line ids, alert names, the daemon's reasons).
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from daemon.drift import DriftMonitor
from daemon.gc_pauses import GcPauses
from daemon.metrics import Metrics
from daemon.settings import MetricsSettings, Settings
from daemon.types import Outcome, Reason, Verdict
from engine.gauges import Band
from engine.package import Decision
from tests.deploy_support import (
    ALERTMANAGER_YML,
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
REPO = DEPLOY.parent

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
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2", "group_left", "group_right"}


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
        (
            "sum by (line, thread) (rate(a[1m])) / on (line) group_left sum by (line) (rate(b[1m]))",
            {"a", "b"},
            {"line", "thread"},
        ),
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
    # As App.init_metrics builds them for a package with a decision and gauges (the bands' series exist then)
    drift = DriftMonitor("line-1", bands=(Band("length_px", 880.0, 940.0),))
    metrics = Metrics(registry, "line-1", decision=Decision(threshold=0.5), drift=drift)
    metrics.set_model_info(dict.fromkeys(MODEL_INFO_KEYS, "x"))  # set once the model is loaded
    GcPauses(registry, "line-1")  # App.init_metrics registers the collector's pauses beside them
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
        # issue 20: reasons kept apart, per-model verdicts, score distribution against the threshold, drift
        "line:inspectd_inspected_reject:ratio_rate15m",
        "line:inspectd_station_faults:ratio_rate15m",
        "line_class:inspectd_verdicts_reject:rate1m",
        "group_left (model) inspectd_model_info",
        "inspectd_score_bucket",
        "inspectd_decision_threshold",
        "line:inspectd_grey_zone:ratio_rate15m",
        "inspectd_score_drift_psi",
        "inspectd_score_drift_median_rank",
        "inspectd_score_reference_parts",
        "inspectd_crop_brightness",
        "inspectd_crop_contrast",
        "line:inspectd_pose_failures:ratio_rate15m",
        'inspectd_part_measurement{line=~"$line", measurement="length_px"}',
        'inspectd_gauge_band{line=~"$line", measurement="length_px"}',
        # issue 15: model updates on a running line
        'inspectd_model_info{line=~"$line", role="production"}',
        "inspectd_shadow_disagreements_total",
        "line:inspectd_shadow_flips:ratio_rate10m",
        "inspectd_shadow_sampled_ratio",
        "inspectd_model_switches_total",
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
        "InspectdStationFaults",
        "InspectdScoreDrift",
        "InspectdGreyZoneRateHigh",
        "InspectdLatencyP99High",
        "InspectdNoVerdicts",
        "InspectdDeadlineMissesRising",
        "InspectdNotReady",
        "InspectdTargetDown",
        "InspectdShadowDisagreementHigh",
    } <= set(alerts)
    for name, rule in alerts.items():
        # Alertmanager routes by these two (deploy/alertmanager/alertmanager.yml)
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["labels"]["area"] in ("station", "quality"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert "$labels.line" in rule["annotations"]["summary"], f"{name}: say which line"


def test_inspection_outcomes_in_the_rules_are_the_daemons() -> None:
    # The rules split reasons into inspection outcomes and station faults with one regex; it must be exactly
    # the reasons the daemon counts as inspected (Verdict.inspected), or a new reason lands on the wrong side.
    def inspected(reason: Reason) -> bool:
        return Verdict("f", "s", Outcome.REJECT, reason, None, 0.5, "m", None, 0.0).inspected

    outcomes = {r.value for r in Reason if inspected(r)}
    assert outcomes == {"model", "grey_zone", "out_of_tolerance"}
    regexes = set(re.findall(r'reason[=!]~"([^"]+)"', RULES_YML.read_text(encoding="utf-8")))
    assert regexes == {"|".join(sorted(outcomes, key=list(Reason).index)), "no_part|pose_error"}, regexes
    text = {r["record"]: " ".join(r["expr"].split()) for r in _rules() if "record" in r}
    assert 'reason!~"model|grey_zone|out_of_tolerance"' in text["line:inspectd_station_faults:ratio_rate15m"]
    assert (
        'reason=~"model|grey_zone|out_of_tolerance"' in text["line:inspectd_inspected_reject:ratio_rate15m"]
    )


def test_shadow_flip_kinds_in_the_rules_are_the_daemons() -> None:
    # The alert counts verdict flips; the kinds it names must be exactly the daemon's kinds other than "score".
    from daemon.models import DISAGREEMENT_KINDS

    rule = {r["record"]: r["expr"] for r in _rules() if "record" in r}[
        "line:inspectd_shadow_flips:ratio_rate10m"
    ]
    (kinds,) = re.findall(r'kind=~"([^"]+)"', rule)
    assert set(kinds.split("|")) == set(DISAGREEMENT_KINDS) - {"score"}
    # Every production verdict → candidate verdict change has a kind (PASS and REJECT, both ways).
    assert {"pass_reject", "reject_pass"} <= set(DISAGREEMENT_KINDS)


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
    doc = yaml.safe_load(RULES_TEST_YML.read_text(encoding="utf-8"))
    exprs = {t["expr"] for group in doc["tests"] for t in group.get("promql_expr_test", [])}
    assert _recorded() <= exprs, f"recording rules without a promtool test: {sorted(_recorded() - exprs)}"


def test_scrape_target_is_the_daemons_default_metrics_port() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "inspectd")
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    defaults = MetricsSettings()
    assert f"{defaults.host}:{defaults.port}" in targets
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_every_target_names_its_line() -> None:
    # InspectdTargetDown has only the target's labels (the daemon is down): its `line` must come from here, so
    # Alertmanager can route it by line and inhibit that line's other alerts. honor_labels keeps the daemon's
    # own `line` on its series (without it Prometheus would rename it to exported_line).
    job = next(
        j
        for j in yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))["scrape_configs"]
        if j["job_name"] == "inspectd"
    )
    assert job["honor_labels"] is True
    for sc in job["static_configs"]:
        assert sc.get("labels", {}).get("line"), sc
    # The shipped target is the default daemon: its line is the default line id, as in the example config.
    (default,) = [
        sc
        for sc in job["static_configs"]
        if f"{MetricsSettings().host}:{MetricsSettings().port}" in sc["targets"]
    ]
    example = tomllib.loads((REPO / "systemd" / "inspectd.toml").read_text(encoding="utf-8"))
    assert default["labels"]["line"] == Settings().line == example["line"]


# --- Alertmanager -----------------------------------------------------------------------------------------


def _alertmanager() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(ALERTMANAGER_YML.read_text(encoding="utf-8"))
    return doc


def _amtool(*args: str) -> subprocess.CompletedProcess[str]:
    amtool = require_tool("amtool")
    return subprocess.run([amtool, *args], capture_output=True, text=True, timeout=60)


def test_amtool_check_config() -> None:
    out = _amtool("check-config", str(ALERTMANAGER_YML))
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def _route(labels: dict[str, str]) -> str:
    out = _amtool(
        "config",
        "routes",
        "test",
        f"--config.file={ALERTMANAGER_YML}",
        *(f"{k}={v}" for k, v in labels.items()),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip()


def test_every_alert_reaches_the_receiver_for_its_severity_area_and_line() -> None:
    # By severity: critical pages the on-call; by area: quality warnings go to quality engineering, station
    # warnings to maintenance; by line: line-1 has an on-call of its own, other lines share one.
    alerts = [r for r in _rules() if "alert" in r]
    for rule in alerts:
        labels = {"alertname": rule["alert"], "station": "station-01", **rule["labels"]}
        for line in ("line-1", "line-7"):
            if labels["severity"] == "critical":
                expected = "oncall-line-1" if line == "line-1" else "oncall"
            else:
                expected = "quality" if labels["area"] == "quality" else "station"
            assert _route({**labels, "line": line}) == expected, (rule["alert"], line)
    # Every receiver is one some alert reaches: none is configured in vain.
    receivers = {r["name"] for r in _alertmanager()["receivers"]}
    assert receivers == {"oncall", "oncall-line-1", "quality", "station"}


def test_inhibition_names_real_alerts_and_labels() -> None:
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    for rule in _alertmanager()["inhibit_rules"]:
        matchers = rule["source_matchers"] + rule["target_matchers"]
        named = set(re.findall(r'alertname!?="(\w+)"', " ".join(matchers)))
        assert named <= alerts, named - alerts
        # Per line, per station: Prometheus adds `station` (external_labels) to every alert it sends.
        assert rule["equal"] == ["station", "line"]
    external = yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))["global"]["external_labels"]
    assert "station" in external


def test_commented_receiver_examples_are_valid_once_uncommented(tmp_path: Path) -> None:
    # The webhook and e-mail receivers ship commented out (there is no address to ship); a site uncomments
    # them. They must then be a valid configuration, not a trap found on the day of the first alert.
    lines = ALERTMANAGER_YML.read_text(encoding="utf-8").splitlines()
    key = re.compile(r"^(\s*)# ( *(?:- )?[a-z_]+:(?: |$).*)$")
    uncommented = [m.group(1) + m.group(2) if (m := key.match(line)) else line for line in lines]
    assert sum(a != b for a, b in zip(lines, uncommented, strict=True)) >= 15  # the examples, not prose
    config = tmp_path / "alertmanager.yml"
    config.write_text("\n".join(uncommented) + "\n", encoding="utf-8")
    out = _amtool("check-config", str(config))
    assert out.returncode == 0, out.stdout + out.stderr
    receivers = {r["name"]: r for r in yaml.safe_load(config.read_text(encoding="utf-8"))["receivers"]}
    assert receivers["oncall"]["webhook_configs"][0]["url"].startswith("http")
    assert receivers["quality"]["email_configs"][0]["to"]
    assert yaml.safe_load(config.read_text(encoding="utf-8"))["global"]["smtp_smarthost"]


def test_prometheus_sends_alerts_to_the_station_alertmanager() -> None:
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    am = compose["services"]["alertmanager"]
    listen = next(a for a in am["command"] if a.startswith("--web.listen-address="))
    config = yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))
    targets = [
        t for a in config["alerting"]["alertmanagers"] for sc in a["static_configs"] for t in sc["targets"]
    ]
    assert targets == [listen.split("=", 1)[1]]
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in am["command"]
    assert "./alertmanager:/etc/alertmanager:ro" in am["volumes"]
    assert "--cluster.listen-address=" in am["command"]  # no gossip port opened on the host network


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
