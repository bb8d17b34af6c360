"""Alerts reach a person: the real daemon stops, the real Prometheus fires InspectdTargetDown, the real
Alertmanager routes it and delivers it to a webhook served by this test; and its inhibition rules hold back a
line's other alerts while that line's daemon is down.

Debian's ``prometheus`` and ``prometheus-alertmanager`` run on free loopback ports with the shipped files, changed
only where a test must: the receivers' (commented-out) integrations become webhooks to this test, one URL per
receiver; the grouping waits and the target-down alert's ``for:`` shrink from minutes to about a second (their
timing is promtool's business: deploy/prometheus/rules_test.yml); scrape and evaluation run every second.
Routing tree, matchers, inhibition rules, alert expression, labels and annotations are the shipped ones.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy_support import ALERTMANAGER_YML, PROMETHEUS_YML, RULES_YML, ready_server, require_tool
from tests.helpers import tiny_package, wait_until
from tests.integration.daemon_harness import daemon_settings
from tests.integration.test_observability_prometheus import free_port, prometheus_server, station_config
from tools.daemon_process import DaemonProcess

pytestmark = pytest.mark.integration

STATION = yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))["global"]["external_labels"]["station"]


class Webhook:
    """An HTTP server taking Alertmanager's webhook POSTs: ``/hook/<receiver>``, one JSON message each."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []  # (path, body)
        self._cv = threading.Condition()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with hook._cv:
                    hook.messages.append((self.path, body))
                    hook._cv.notify_all()
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def alerts(self) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
        """Every alert delivered so far: (receiver path, message, alert)."""
        with self._cv:
            return [(path, msg, alert) for path, msg in self.messages for alert in msg["alerts"]]

    def wait_for(
        self, alertname: str, timeout: float, **labels: str
    ) -> tuple[str, dict[str, Any], dict[str, Any]]:
        def found() -> tuple[str, dict[str, Any], dict[str, Any]] | None:
            for path, msg, alert in self.alerts():
                lb = alert["labels"]
                if lb.get("alertname") == alertname and all(lb.get(k) == v for k, v in labels.items()):
                    return path, msg, alert
            return None

        return wait_until(found, timeout, lambda: f"{alertname} {labels} at the webhook; got {self.alerts()}")


def alertmanager_config(hook_base: str) -> dict[str, Any]:
    """The shipped alertmanager.yml, every receiver delivering to ``hook_base/<its name>``, waits of ~1 s."""
    config: dict[str, Any] = yaml.safe_load(ALERTMANAGER_YML.read_text(encoding="utf-8"))
    for receiver in config["receivers"]:
        assert set(receiver) == {"name"}, "shipped receivers have their integrations commented out"
        receiver["webhook_configs"] = [{"url": f"{hook_base}/{receiver['name']}", "send_resolved": True}]

    def fast(route: dict[str, Any]) -> None:
        for key in ("group_wait", "group_interval"):
            if key in route:
                route[key] = "1s"
        for child in route.get("routes", []):
            fast(child)

    fast(config["route"])
    return config


class Alertmanager:
    def __init__(self, base: str, log: Path) -> None:
        self.base = base
        self.log = log

    def post_alerts(self, alerts: list[dict[str, Any]]) -> None:
        req = urllib.request.Request(
            f"{self.base}/api/v2/alerts",
            data=json.dumps(alerts).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200

    def alerts(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.base}/api/v2/alerts", timeout=5) as resp:
            result: list[dict[str, Any]] = json.load(resp)
        return result

    def log_tail(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-3000:]


@contextlib.contextmanager
def alertmanager(tmp_path: Path, config: dict[str, Any]) -> Iterator[Alertmanager]:
    """The real Alertmanager on a free loopback port, one instance (no cluster); always stopped on exit."""
    binary = require_tool("alertmanager", "prometheus-alertmanager")
    config_file = tmp_path / "alertmanager.yml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    log = tmp_path / "alertmanager.log"
    argv = [
        binary,
        f"--config.file={config_file}",
        f"--storage.path={tmp_path / 'am-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
        "--log.level=warn",
    ]
    base = f"http://127.0.0.1:{port}"
    with ready_server("alertmanager", argv, base, log):
        yield Alertmanager(base, log)


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


def _alert(name: str, line: str, severity: str, area: str) -> dict[str, Any]:
    labels = {"alertname": name, "line": line, "station": STATION, "severity": severity, "area": area}
    return {"labels": labels, "annotations": {"summary": f"{name} on {line}"}}


@pytest.mark.timeout(60)
def test_a_line_whose_daemon_is_down_raises_one_alert_not_all_of_them(
    tmp_path: Path, webhook: Webhook
) -> None:
    # Line a's daemon is down while its NG-rate and drift windows still hold old data; line b is up with a high
    # NG rate. Only a's target-down alert and b's NG rate may reach anyone.
    with alertmanager(tmp_path, alertmanager_config(webhook.base)) as am:
        am.post_alerts(
            [
                _alert("InspectdTargetDown", "a", "critical", "station"),
                _alert("InspectdNgRateHigh", "a", "warning", "quality"),
                _alert("InspectdScoreDrift", "a", "warning", "quality"),
                _alert("InspectdNgRateHigh", "b", "warning", "quality"),
            ]
        )
        wait_until(lambda: len(am.alerts()) == 4, 10, lambda: f"4 alerts in Alertmanager: {am.alerts()}")

        def state() -> dict[tuple[str, str], dict[str, Any]]:
            return {(a["labels"]["alertname"], a["labels"]["line"]): a["status"] for a in am.alerts()}

        # Inhibition is evaluated when the API is asked; the inhibiting alert must be in the same station.
        wait_until(
            lambda: state()[("InspectdNgRateHigh", "a")]["state"] == "suppressed", 10, lambda: str(state())
        )
        status = state()
        for held in (("InspectdNgRateHigh", "a"), ("InspectdScoreDrift", "a")):
            assert status[held]["state"] == "suppressed" and status[held]["inhibitedBy"], (held, status)
        for free in (("InspectdTargetDown", "a"), ("InspectdNgRateHigh", "b")):
            assert status[free]["state"] == "active", (free, status)

        path, _, _ = webhook.wait_for("InspectdTargetDown", 15, line="a")
        assert path == "/hook/oncall"  # critical, and line a has no on-call route of its own
        path, _, _ = webhook.wait_for("InspectdNgRateHigh", 15, line="b")
        assert path == "/hook/quality"
        time.sleep(2.0)  # two more group intervals: nothing held back is sent after all
        delivered = {(a["labels"]["alertname"], a["labels"]["line"]) for _, _, a in webhook.alerts()}
        assert delivered == {("InspectdTargetDown", "a"), ("InspectdNgRateHigh", "b")}, delivered


@pytest.mark.timeout(120)
def test_a_stopped_daemon_reaches_the_on_call_through_prometheus_and_alertmanager(
    tmp_path: Path, webhook: Webhook
) -> None:
    tiny_package(tmp_path / "model", input_size=(32, 32))
    settings = daemon_settings(tmp_path / "model", line="line-1")  # a line with an on-call of its own
    # The shipped rules, with the target-down alert's `for: 1m` shortened to 1 s.
    rules = yaml.safe_load(RULES_YML.read_text(encoding="utf-8"))
    (down,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "InspectdTargetDown"]
    assert down["for"] == "1m"
    down["for"] = "1s"
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")

    am_dir, prom_dir = tmp_path / "am", tmp_path / "prom"
    am_dir.mkdir()
    prom_dir.mkdir()
    with (
        alertmanager(am_dir, alertmanager_config(webhook.base)) as am,
        DaemonProcess(settings, tmp_path / "daemon", name="daemon") as daemon,
    ):
        target = f"127.0.0.1:{daemon.ready['metrics_port']}"
        config = station_config(
            target, settings.line, rules=rules_file, alertmanager=am.base.removeprefix("http://")
        )
        with prometheus_server(prom_dir, config) as prom:
            prom.wait_for("the daemon scraped", lambda: prom.scalar(f'up{{instance="{target}"}}') == 1)
            assert not webhook.alerts()  # a running daemon raises nothing
            t_stop = time.monotonic()
            assert daemon.stop() == 0  # SIGTERM, as systemctl stop: drained, exit 0
            path, message, alert = webhook.wait_for("InspectdTargetDown", 60, line="line-1")
            took = time.monotonic() - t_stop
            assert prom.scalar(f'up{{instance="{target}"}}') == 0
    # Routed by severity and line: line-1's own on-call, one notification for the line.
    assert path == "/hook/oncall-line-1" and message["receiver"] == "oncall-line-1", (path, message)
    assert message["status"] == alert["status"] == "firing"
    assert alert["labels"] == {
        "alertname": "InspectdTargetDown",
        "severity": "critical",
        "area": "station",
        "job": "inspectd",
        "instance": target,
        "line": "line-1",
        "station": STATION,  # Prometheus' external label: the inhibition rules' `equal` needs it
    }
    assert alert["annotations"]["summary"] == f"Line line-1: inspectd on {target} cannot be scraped"
    assert message["groupLabels"] == {"alertname": "InspectdTargetDown", "station": STATION, "line": "line-1"}
    assert took < 60, took
    print(f"daemon stopped → notification at the webhook in {took:.1f} s")
