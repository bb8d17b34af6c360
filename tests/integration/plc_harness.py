"""The PLC bridge's tests: the real bridge as a child process, and two PLCs as real clients (asyncua, pymodbus).

:class:`BridgeProcess` runs ``inspectd plc-bridge --config FILE`` the way :class:`~tools.daemon_process.
DaemonProcess` runs ``serve`` (the same log reader, ``ready`` line, SIGTERM/kill), on ephemeral Modbus and
metrics ports (read back from the ``ready`` line) and a free OPC UA port (an OPC UA server advertises its URL,
so it is chosen before the start). The PLCs do what a PLC program does: read, act on what is new, write the
acknowledgement, keep polling.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from asyncua import Client, ua
from pymodbus.client import AsyncModbusTcpClient

from daemon.settings import deep_update
from plc import modbus_map as mm
from plc.opcua import EVENT_FIELDS
from plc.settings import PlcSettings
from tests.integration.reliability_harness import free_port
from tools.daemon_process import DaemonProcess

POLL_S = 0.002  # the PLCs' scan cycle


class BridgeProcess(DaemonProcess):
    verb = "plc-bridge"

    @property
    def modbus_port(self) -> int:
        return int(self.ready["modbus"]["port"])

    @property
    def opcua_endpoint(self) -> str:
        return str(self.ready["opcua"]["endpoint"])

    @property
    def namespace_index(self) -> int:
        return int(self.ready["opcua"]["namespace_index"])

    @property
    def metrics_url(self) -> str:
        return str(self.ready["metrics"])

    def scrape(self) -> dict[str, float]:
        """``/metrics`` over HTTP: sample name with labels → value."""
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


def bridge_settings(subscriber_endpoint: str, line: str, **overrides: Any) -> PlcSettings:
    base: dict[str, Any] = {
        "line": line,
        # 20 daemon heartbeats: a loaded machine's pause is no daemon loss (the kill test sets its own)
        "subscriber": {"endpoint": subscriber_endpoint, "heartbeat_timeout_ms": 2000},
        "handshake": {"buffer_size": 64},
        "opcua": {"endpoint": f"opc.tcp://127.0.0.1:{free_port()}/inspectd"},
        "modbus": {"host": "127.0.0.1", "port": 0, "slots": 8},
        "metrics": {"port": 0},
        "logging": {"format": "json"},
    }
    return PlcSettings(**deep_update(base, overrides))


@dataclass
class Consumed:
    """What a PLC took from the bridge, in order."""

    seq: int
    boot_no: int
    passed: bool
    reason_code: int
    frame_id: str | None  # OPC UA gives the id itself
    frame_hash: int
    flags: int = 0  # Modbus slot flags (or the OPC UA booleans, encoded the same way)
    t_seen: float = 0.0  # time.time() when the PLC first saw it


@dataclass
class ModbusImage:
    registers: list[int]

    def u32(self, address: int) -> int:
        return self.registers[address] << 16 | self.registers[address + 1]

    @property
    def status(self) -> int:
        return self.registers[mm.STATUS]

    @property
    def faults(self) -> int:
        return self.registers[mm.FAULTS]

    @property
    def pending(self) -> int:
        return self.registers[mm.PENDING]

    def slot(self, i: int) -> Consumed | None:
        a = mm.slot_address(i)
        flags = self.registers[a + mm.SLOT_FLAGS]
        if not flags & mm.FLAG_VALID:
            return None
        return Consumed(
            seq=self.u32(a + mm.SLOT_SEQ),
            boot_no=self.registers[a + mm.SLOT_BOOT_NO],
            passed=bool(flags & mm.FLAG_PASS),
            reason_code=self.registers[a + mm.SLOT_REASON],
            frame_id=None,
            frame_hash=self.u32(a + mm.SLOT_FRAME_HASH),
            flags=flags,
        )


@dataclass
class ModbusPlc:
    """A Modbus master: reads the whole map in one request, takes every new slot in order, acknowledges the last."""

    port: int
    slots: int
    consumed: list[Consumed] = field(default_factory=list)
    faults_seen: list[int] = field(default_factory=list)  # FAULTS at every read
    client: AsyncModbusTcpClient | None = None

    async def __aenter__(self) -> ModbusPlc:
        self.client = AsyncModbusTcpClient("127.0.0.1", port=self.port, timeout=5)
        assert await self.client.connect(), "Modbus connect failed"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.client is not None
        self.client.close()

    async def read(self) -> ModbusImage:
        assert self.client is not None
        rr = await self.client.read_holding_registers(0, count=mm.block_size(self.slots), device_id=1)
        assert not rr.isError(), rr
        image = ModbusImage(list(rr.registers))
        self.faults_seen.append(image.faults)
        return image

    async def ack(self, seq: int) -> None:
        assert self.client is not None
        wr = await self.client.write_registers(mm.ACK, [seq >> 16 & 0xFFFF, seq & 0xFFFF], device_id=1)
        assert not wr.isError(), wr

    def _new(self, c: Consumed) -> bool:
        # Slots shown again (our Ack not yet taken, or a partial Ack) are not new: (boot, seq) names a verdict.
        return (c.boot_no, c.seq) not in {(x.boot_no, x.seq) for x in self.consumed[-4 * self.slots :]}

    async def step(self, *, acknowledge: bool = True) -> ModbusImage:
        """One scan: read, take what is new, acknowledge the newest slot taken."""
        image = await self.read()
        now = time.time()
        last = None
        for i in range(min(image.pending, self.slots)):
            c = image.slot(i)
            assert c is not None, f"slot {i} empty with {image.pending} pending"
            if self._new(c):
                c.t_seen = now
                self.consumed.append(c)
            last = c
        if acknowledge and last is not None:
            await self.ack(last.seq)
        return image

    async def consume(self, n: int, timeout: float) -> list[Consumed]:
        end = time.monotonic() + timeout
        while len(self.consumed) < n:
            assert time.monotonic() < end, f"Modbus PLC: {len(self.consumed)} of {n} verdicts in {timeout} s"
            await self.step()
            await asyncio.sleep(POLL_S)
        return self.consumed


RESULT_FIELDS = (
    "Valid",
    "Seq",
    "BootNo",
    "Pass",
    "ReasonCode",
    "FrameId",
    "FrameIdHash",
    "NewBoot",
    "LostBefore",
)


class OpcUaPlc:
    """An OPC UA client as a PLC uses it: one Read of the Result variables per scan, Ack written per verdict."""

    def __init__(self, endpoint: str, ns: int, line: str, client: Client | None = None) -> None:
        self.client = client or Client(endpoint, timeout=10)
        self.ns, self.line = ns, line
        self.consumed: list[Consumed] = []
        self.faults_seen: list[int] = []
        self.events: list[dict[str, Any]] = []
        self.enum: Any = None  # what a test read of the ReasonCode enumeration

    def node(self, path: str) -> Any:
        return self.client.get_node(f"ns={self.ns};s={self.line}.{path}")

    async def __aenter__(self) -> OpcUaPlc:
        await self.client.connect()
        self._result = [self.node(f"Result.{n}") for n in RESULT_FIELDS]
        self._ack = self.node("Handshake.Ack")
        self._fault = self.node("Status.FaultCauses")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.disconnect()

    async def read(self, *paths: str) -> list[Any]:
        return list(await self.client.read_values([self.node(p) for p in paths]))

    async def step(self, *, acknowledge: bool = True) -> Consumed | None:
        values = await self.client.read_values([*self._result, self._fault])
        r = dict(zip(RESULT_FIELDS, values[:-1], strict=True))
        self.faults_seen.append(values[-1])
        if not r["Valid"]:
            return None
        c = Consumed(
            seq=r["Seq"],
            boot_no=r["BootNo"],
            passed=r["Pass"],
            reason_code=r["ReasonCode"],
            frame_id=r["FrameId"],
            frame_hash=r["FrameIdHash"],
            flags=mm.FLAG_VALID
            | (mm.FLAG_PASS if r["Pass"] else 0)
            | (mm.FLAG_NEW_BOOT if r["NewBoot"] else 0)
            | (mm.FLAG_LOST_BEFORE if r["LostBefore"] else 0),
            t_seen=time.time(),
        )
        if self.consumed and (self.consumed[-1].boot_no, self.consumed[-1].seq) == (c.boot_no, c.seq):
            return None  # still presented: the bridge has not yet taken our Ack (a PLC waits a scan)
        self.consumed.append(c)
        if acknowledge:
            await self._ack.write_value(ua.Variant(c.seq, ua.VariantType.UInt32))
        return c

    async def consume(self, n: int, timeout: float) -> list[Consumed]:
        end = time.monotonic() + timeout
        while len(self.consumed) < n:
            assert time.monotonic() < end, f"OPC UA PLC: {len(self.consumed)} of {n} verdicts in {timeout} s"
            await self.step()
            await asyncio.sleep(POLL_S)
        return self.consumed

    async def subscribe_events(self) -> None:
        """Every VerdictEvent of the line object, into ``events``."""
        plc = self

        class Handler:
            def event_notification(self, event: Any) -> None:
                plc.events.append({name: getattr(event, name) for name, _ in EVENT_FIELDS})

        line_obj = self.client.get_node(f"ns={self.ns};s={self.line}")
        etype = await self.client.nodes.root.get_child(
            ["0:Types", "0:EventTypes", "0:BaseEventType", f"{self.ns}:VerdictEventType"]
        )
        sub = await self.client.create_subscription(20, Handler())
        await sub.subscribe_events(line_obj, etype, queuesize=1000)


async def wait_for(predicate: Any, timeout: float, what: str, poll_s: float = 0.01) -> Any:
    """``predicate()`` (awaited when it is a coroutine function) until it is truthy, and that value;
    AssertionError naming ``what`` after ``timeout`` s."""
    end = time.monotonic() + timeout
    while True:
        got = predicate()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        assert time.monotonic() < end, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(poll_s)


def daemon_truth(collector_verdicts: list[dict[str, Any]]) -> list[tuple[int, str, bool]]:
    return [(v["seq"], v["frame_id"], v["verdict"] == "PASS") for v in collector_verdicts]


__all__ = [
    "BridgeProcess",
    "Consumed",
    "ModbusPlc",
    "OpcUaPlc",
    "bridge_settings",
    "daemon_truth",
    "wait_for",
]
