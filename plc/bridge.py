"""The bridge's wiring: the daemon's verdict stream in, an OPC UA and a Modbus TCP server out, one event loop.

The verdict stream is received by :class:`daemon.subscriber.VerdictSubscriber` on its own thread (as every
inspectd subscriber does); each message is handed to the event loop, which owns everything else: the
:class:`~plc.handshake.DaemonLink`, one :class:`~plc.handshake.ResultChannel` per protocol, both servers and
a tick that notices silence. Nothing is shared between threads but that hand-over.

``start()`` is a flat list — metrics HTTP server → OPC UA server → Modbus server → subscriber → ``READY=1`` —
and ``stop()`` undoes it in reverse. Until the daemon's first heartbeat says ready, and whenever it goes
silent, every channel is in fault (``STARTING`` / ``DAEMON_SILENT`` / ``DAEMON_NOT_READY``): the PLC diverts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

import zmq
import zmq.auth
from prometheus_client import CollectorRegistry

from daemon.logs import get_logger
from daemon.metrics import MetricsServer
from daemon.settings import ConfigError
from daemon.subscriber import VerdictSubscriber
from daemon.systemd_notify import SystemdNotifier
from plc.handshake import DaemonLink, Fault, Result, ResultChannel, faults
from plc.metrics import FAULT_CAUSES, BridgeMetrics
from plc.settings import PlcSettings

__all__ = ["PlcBridge"]

log = get_logger("inspectd.plc")
TICK_S = 0.05  # how often silence, ack lag and the gauges are looked at


class PlcBridge:
    """``await bridge.start()`` … ``await bridge.stop()``, or ``await bridge.run(stop_event)`` for both."""

    def __init__(
        self,
        settings: PlcSettings,
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        self.settings = settings
        self.line = settings.line
        self.registry = registry if registry is not None else CollectorRegistry()
        self._clock = clock
        self.notifier = notifier or SystemdNotifier()
        self.link = DaemonLink(settings.subscriber.heartbeat_timeout_ms / 1000, clock)
        size = settings.handshake.buffer_size
        self.channels: dict[str, ResultChannel] = {}
        if settings.opcua.enabled:
            self.channels["opcua"] = ResultChannel("opcua", size)
        if settings.modbus.enabled:
            self.channels["modbus"] = ResultChannel("modbus", size)
        self.metrics = BridgeMetrics(self.registry, self.line, list(self.channels))
        self.frontends: dict[str, Any] = {}
        self.http: MetricsServer | None = None
        self.subscriber: VerdictSubscriber | None = None
        self.ready = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._faults: dict[str, Fault] = {p: Fault(0) for p in self.channels}
        self._counted = {"heartbeats": 0, "gaps": 0, "missed": 0, "restarts": 0}
        self._t_watchdog = 0.0

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        self._loop = asyncio.get_running_loop()
        options = _curve_options(s)
        if s.metrics.enabled:
            self.http = MetricsServer(self.registry, s.metrics.host, s.metrics.port, ready=lambda: self.ready)
            self.http.start()
        if "opcua" in self.channels:
            from plc.opcua import OpcUaFrontend  # asyncua: only when the protocol is on

            opcua = OpcUaFrontend(
                s.opcua,
                self.line,
                self.link,
                self.channels["opcua"],
                on_ack=self._ack_opcua,
                on_served=self._served_opcua,
                clock=self._clock,
            )
            await opcua.start()
            self.frontends["opcua"] = opcua
        if "modbus" in self.channels:
            from plc.modbus import ModbusFrontend

            modbus = ModbusFrontend(
                s.modbus, self.link, self.channels["modbus"], on_ack=self._ack_modbus, clock=self._clock
            )
            await modbus.start()
            self.frontends["modbus"] = modbus
        for p, ch in self.channels.items():
            self.metrics.capacity.labels(self.line, p).set(ch.capacity)
        self.subscriber = VerdictSubscriber(
            s.subscriber.endpoint,
            self.line,
            self._from_subscriber,
            options={zmq.RCVHWM: s.subscriber.rcvhwm, **options},
            name="plc-verdict-sub",
        )
        self.subscriber.start()
        self._refresh()
        self.ready = True
        log.info("ready", **self.describe())
        self.notifier.ready(f"bridging line {self.line}")

    async def stop(self) -> None:
        self.ready = False
        self.notifier.stopping()
        log.info("stopping")
        if self.subscriber is not None:
            self.subscriber.stop()
            self.subscriber = None
        for fe in reversed(list(self.frontends.values())):
            await fe.stop()
        self.frontends.clear()
        if self.http is not None:
            self.http.stop()
            self.http = None
        log.info(
            "stopped",
            verdicts=self.link.verdicts,
            **{f"{p}_acknowledged": ch.acknowledged for p, ch in self.channels.items()},
            **{f"{p}_dropped": ch.dropped for p, ch in self.channels.items()},
        )

    async def run(self, stop: asyncio.Event) -> int:
        """Start, serve until ``stop`` is set (0) or the subscriber thread dies (1), stop (also after a failed
        start: what had started is stopped)."""
        try:
            await self.start()
            return await self.supervise(stop)
        finally:
            await self.stop()

    async def supervise(self, stop: asyncio.Event) -> int:
        """The tick: silence becomes a fault on time, gauges follow, systemd's watchdog is fed while healthy."""
        interval = self.notifier.watchdog_interval_s
        while not stop.is_set():
            if self.subscriber is None or not self.subscriber.running:
                log.error("the verdict subscriber thread died: stopping (systemd restarts the bridge)")
                return 1
            dead = [p for p, fe in self.frontends.items() if not fe.running]
            if (
                dead
            ):  # a server that no longer serves, or serves values no longer updated: the PLC must see it
                log.error("a protocol server died: stopping (systemd restarts the bridge)", protocols=dead)
                return 1
            self._refresh()
            now = self._clock()
            if interval is not None and now - self._t_watchdog >= interval / 3:
                self.notifier.watchdog()
                self._t_watchdog = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK_S)
        return 0

    def describe(self) -> dict[str, Any]:
        """Where it listens (the ``ready`` log line): tests and operators read the bound ports here."""
        out: dict[str, Any] = {
            "subscriber": self.settings.subscriber.endpoint,
            "buffer_size": self.settings.handshake.buffer_size,
            "heartbeat_timeout_ms": self.settings.subscriber.heartbeat_timeout_ms,
        }
        if "opcua" in self.frontends:
            fe = self.frontends["opcua"]
            out["opcua"] = {
                "endpoint": fe.endpoint,
                "namespace": self.settings.opcua.namespace,
                "namespace_index": fe.namespace_index,
                "secured": self.settings.opcua.secured,
            }
        if "modbus" in self.frontends:
            out["modbus"] = {
                "host": self.settings.modbus.host,
                "port": self.frontends["modbus"].port,
                "slots": self.settings.modbus.slots,
            }
        if self.http is not None:
            out["metrics"] = f"http://{self.http.host}:{self.http.port}/metrics"
        out["pid"] = os.getpid()
        return out

    # -- the verdict stream ----------------------------------------------------------------------------------
    def _from_subscriber(self, msg: dict[str, Any], t_arrival: float) -> None:
        """On the subscriber's thread: hand the message to the loop (a subscription to ``line-1`` also
        receives ``line-10``: only this line's messages count)."""
        if msg.get("line") != self.line or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._handle, msg, t_arrival)

    def _handle(self, msg: dict[str, Any], t_arrival: float) -> None:
        result, notes = self.link.feed(msg, t_arrival)
        for note in notes:
            if note.startswith("daemon restarted"):
                log.warning(
                    "daemon restarted", note=note, boot_id=self.link.boot_id, boot_no=self.link.boot_no
                )
            else:
                log.warning("daemon stream", note=note, boot_id=self.link.boot_id)
        self._count_stream()
        if result is not None:
            self.metrics.verdicts.labels(self.line).inc()
            for p, ch in self.channels.items():
                self._offer(p, ch, result)
        self._refresh()

    def _offer(self, protocol: str, channel: ResultChannel, result: Result) -> None:
        was_dropping = channel.dropping
        if not channel.offer(result):
            self.metrics.dropped.labels(self.line, protocol).inc()
            if not was_dropping:  # once per run of drops; the count is in the metric and the registers
                log.warning(
                    "buffer full: verdict dropped",
                    protocol=protocol,
                    seq=result.seq,
                    frame_id=result.frame_id,
                    capacity=channel.capacity,
                )
            return
        fe = self.frontends.get(protocol)
        if protocol == "opcua" and fe is not None:
            fe.verdict(result)  # written (and its event emitted) by the OPC UA updater: _served_opcua
        else:  # Modbus renders every request from the channel: the verdict is served from this moment
            self._served(protocol, result)

    def _served_opcua(self, result: Result) -> None:
        self._served("opcua", result)

    def _served(self, protocol: str, result: Result) -> None:
        latency = max(0.0, time.time() - result.t_published)
        self.metrics.update_latency.labels(self.line, protocol).observe(latency)

    def _count_stream(self) -> None:
        seq, m, line = self.link.sequence, self.metrics, self.line
        for name, now_value, counter in (
            ("heartbeats", self.link.heartbeats, m.heartbeats),
            ("gaps", len(seq.gaps), m.gaps),
            ("missed", seq.missed, m.missed),
            ("restarts", seq.restarts, m.restarts),
        ):
            if now_value > self._counted[name]:
                counter.labels(line).inc(now_value - self._counted[name])
                self._counted[name] = now_value

    # -- acknowledgements ------------------------------------------------------------------------------------
    def _ack_opcua(self, seq: int) -> None:
        self._ack("opcua", seq)

    def _ack_modbus(self, seq: int) -> None:
        self._ack("modbus", seq)

    def _ack(self, protocol: str, seq: int) -> None:
        channel = self.channels[protocol]
        done = channel.acknowledge(seq)
        self.metrics.acks.labels(self.line, protocol, "matched" if done else "unmatched").inc()
        if done:
            now = self._clock()
            self.metrics.acknowledged.labels(self.line, protocol).inc(len(done))
            for r in done:
                self.metrics.ack_seconds.labels(self.line, protocol).observe(max(0.0, now - r.t_received))
        else:
            log.debug("acknowledgement matches no buffered verdict", protocol=protocol, seq=seq)
        self._refresh()

    # -- state → gauges, logs, OPC UA ------------------------------------------------------------------------
    def _refresh(self) -> None:
        now, m, line = self._clock(), self.metrics, self.line
        m.daemon_up.labels(line).set(1 if self.link.alive(now) else 0)
        m.daemon_ready.labels(line).set(1 if self.link.ready else 0)
        for p, ch in self.channels.items():
            fault = faults(self.link, ch, now)
            before = self._faults[p]
            if fault != before:
                raised, cleared = fault & ~before, before & ~fault
                for cause in Fault:
                    if cause in raised:
                        m.faults.labels(line, p, FAULT_CAUSES[cause]).inc()
                    m.fault_cause.labels(line, p, FAULT_CAUSES[cause]).set(1 if cause in fault else 0)
                if raised:
                    log.warning(
                        "fault raised: the PLC diverts every part",
                        protocol=p,
                        raised=_names(raised),
                        causes=_names(fault),
                    )
                if cleared and not fault:
                    log.info("fault cleared", protocol=p, cleared=_names(cleared))
                elif cleared:
                    log.info("fault cause cleared", protocol=p, cleared=_names(cleared), causes=_names(fault))
                self._faults[p] = fault
            m.fault.labels(line, p).set(1 if fault else 0)
            m.depth.labels(line, p).set(len(ch.pending))
            m.ack_lag.labels(line, p).set(ch.oldest_age(now))
            fe = self.frontends.get(p)
            if fe is not None:
                m.clients.labels(line, p).set(fe.clients())
                if p == "opcua":
                    fe.refresh()


def _names(f: Fault) -> list[str]:
    return [FAULT_CAUSES[c] for c in Fault if c in f]


def _curve_options(s: PlcSettings) -> dict[int, bytes]:
    """CURVE client keys for the subscription (daemon with security.subscriber_clients), read at start."""
    sub = s.subscriber
    if sub.server_public_key is None or sub.client_secret_key is None:
        return {}
    try:
        server_public, _ = zmq.auth.load_certificate(sub.server_public_key)
        public, secret = zmq.auth.load_certificate(sub.client_secret_key)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"subscriber: CURVE key file cannot be read: {exc}") from None
    if not secret:
        raise ConfigError(f"subscriber.client_secret_key: {sub.client_secret_key} holds no secret key")
    return {zmq.CURVE_SERVERKEY: server_public, zmq.CURVE_PUBLICKEY: public, zmq.CURVE_SECRETKEY: secret}
