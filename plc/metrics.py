"""The bridge's own Prometheus metrics (``inspectd_plc_*``), on a registry passed in; served on its own
``/metrics`` by the daemon's :class:`daemon.metrics.MetricsServer`.

Labels: ``line``, and ``protocol`` (``opcua`` | ``modbus``) for what is per PLC channel; every label value is
created at start, so a series exists (at 0) before its first event.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from plc.handshake import Fault

__all__ = ["BridgeMetrics"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
ACK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FAULT_CAUSES = {f: (f.name or str(int(f))).lower() for f in Fault}


class BridgeMetrics:
    def __init__(self, registry: CollectorRegistry, line: str, protocols: Sequence[str]) -> None:
        per_line, per_channel = ["line"], ["line", "protocol"]
        self.line = line
        self.verdicts = Counter(
            "inspectd_plc_verdicts", "Verdicts received from the daemon", per_line, registry=registry
        )
        self.heartbeats = Counter(
            "inspectd_plc_heartbeats", "Daemon heartbeats received", per_line, registry=registry
        )
        self.gaps = Counter(
            "inspectd_plc_gaps", "Gaps in seq on the daemon's stream", per_line, registry=registry
        )
        self.missed = Counter(
            "inspectd_plc_missed_verdicts", "Verdicts inside those gaps", per_line, registry=registry
        )
        self.restarts = Counter(
            "inspectd_plc_daemon_restarts",
            "Daemon restarts seen (a new boot_id)",
            per_line,
            registry=registry,
        )
        self.daemon_up = Gauge(
            "inspectd_plc_daemon_up",
            "1 while a message from the daemon arrived within the heartbeat timeout",
            per_line,
            registry=registry,
        )
        self.daemon_ready = Gauge(
            "inspectd_plc_daemon_ready", "The daemon's last heartbeat said ready", per_line, registry=registry
        )
        self.update_latency = Histogram(
            "inspectd_plc_update_latency_seconds",
            "Daemon publication (t_published) to the verdict served by the bridge (wall clock, one host)",
            per_channel,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.fault = Gauge(
            "inspectd_plc_fault", "1 while the PLC must divert every part", per_channel, registry=registry
        )
        self.fault_cause = Gauge(
            "inspectd_plc_fault_cause",
            "1 while this fault cause holds",
            [*per_channel, "cause"],
            registry=registry,
        )
        self.faults = Counter(
            "inspectd_plc_faults",
            "Times a fault cause was raised",
            [*per_channel, "cause"],
            registry=registry,
        )
        self.depth = Gauge(
            "inspectd_plc_buffer_depth",
            "Verdicts buffered, waiting for the PLC's acknowledgement",
            per_channel,
            registry=registry,
        )
        self.capacity = Gauge(
            "inspectd_plc_buffer_capacity", "handshake.buffer_size", per_channel, registry=registry
        )
        self.ack_lag = Gauge(
            "inspectd_plc_ack_lag_seconds",
            "How long the presented verdict has waited for its acknowledgement (0: none waits)",
            per_channel,
            registry=registry,
        )
        self.dropped = Counter(
            "inspectd_plc_dropped",
            "Verdicts dropped because the buffer was full",
            per_channel,
            registry=registry,
        )
        self.acks = Counter(
            "inspectd_plc_acks",
            "Acknowledgements written by the PLC (matched a buffered verdict, or not)",
            [*per_channel, "result"],
            registry=registry,
        )
        self.acknowledged = Counter(
            "inspectd_plc_acknowledged", "Verdicts acknowledged by the PLC", per_channel, registry=registry
        )
        self.ack_seconds = Histogram(
            "inspectd_plc_ack_seconds",
            "A verdict's arrival at the bridge to its acknowledgement by the PLC",
            per_channel,
            buckets=ACK_BUCKETS,
            registry=registry,
        )
        self.clients = Gauge("inspectd_plc_clients", "Connected clients", per_channel, registry=registry)
        for metric in (self.verdicts, self.heartbeats, self.gaps, self.missed, self.restarts):
            metric.labels(line)
        self.daemon_up.labels(line)
        self.daemon_ready.labels(line)
        for p in protocols:
            for m in (self.fault, self.depth, self.capacity, self.ack_lag, self.dropped, self.clients):
                m.labels(line, p)
            for c in (self.acknowledged, self.update_latency, self.ack_seconds):
                c.labels(line, p)
            for cause in FAULT_CAUSES.values():
                self.fault_cause.labels(line, p, cause)
                self.faults.labels(line, p, cause)
            for result in ("matched", "unmatched"):
                self.acks.labels(line, p, result)
