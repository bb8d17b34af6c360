"""The OPC UA server (asyncua): one object per line with the presented result, the handshake and the status,
the ``ReasonCode`` enumeration, and an event per verdict.

Node ids are strings under the bridge's namespace (``opcua.namespace``, resolved by URI: its index is 2 when
it is the only one): ``ns=2;s=<line>.Result.Seq``, ``ns=2;s=<line>.Handshake.Ack``, … — stable, so a PLC
project can name them. docs/plc.md has the address space as a table; :data:`VARIABLES` is its one source.

All values are written from the one event loop that also owns the handshake; one task (the updater) writes
what changed after each message, acknowledgement or tick, events first, then the Result, Handshake and Status
variables, without yielding in between in practice (asyncua's writes complete synchronously), so one Read of
the Result variables sees one verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from asyncua import ua
from asyncua.common.node import Node
from asyncua.crypto.permission_rules import UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.address_space import NodeData
from asyncua.server.server import Server
from asyncua.server.user_managers import CertificateUserManager, UserManager
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds

from daemon.logs import get_logger
from daemon.reasons import REASON_NAMES
from daemon.settings import ConfigError
from plc.handshake import DaemonLink, Result, ResultChannel, faults
from plc.settings import OpcUaSettings

__all__ = ["APPLICATION_URI", "VARIABLES", "OpcUaFrontend", "node_id"]

log = get_logger("inspectd.plc.opcua")
APPLICATION_URI = "urn:inspectd:plc-bridge"  # a server certificate's subjectAltName URI must be this
NO_SCORE = -1.0  # Score when the model gave none (decode errors, overload, …)
VERDICT_NAMES = {0: "REJECT", 1: "PASS"}
VT = ua.VariantType


@dataclass(frozen=True)
class Variable:
    folder: str  # Result | Handshake | Status | Latest
    name: str
    vtype: ua.VariantType
    enum: str | None = None  # "ReasonCode" | "Verdict": the variable's DataType is that enumeration
    writable: bool = False
    meaning: str = ""


# The address space under Objects/<line>/, in order (docs/plc.md prints the same table).
VARIABLES: tuple[Variable, ...] = (
    Variable("Result", "Valid", VT.Boolean, meaning="a verdict is presented and waits for its Ack"),
    Variable(
        "Result", "Toggle", VT.Boolean, meaning="flips whenever a verdict not presented before is presented"
    ),
    Variable("Result", "Seq", VT.UInt32, meaning="its seq (write it to Handshake.Ack once consumed)"),
    Variable(
        "Result", "Pass", VT.Boolean, meaning="true = PASS, false = REJECT (also when nothing is presented)"
    ),
    Variable("Result", "Verdict", VT.Int32, enum="Verdict", meaning="REJECT (0) or PASS (1)"),
    Variable(
        "Result", "ReasonCode", VT.Int32, enum="ReasonCode", meaning="reason code (docs/daemon.md); 0 = none"
    ),
    Variable(
        "Result", "Score", VT.Double, meaning=f"NG score in [0, 1]; {NO_SCORE} when the model gave none"
    ),
    Variable("Result", "FrameId", VT.String, meaning="the camera's frame id"),
    Variable("Result", "FrameIdHash", VT.UInt32, meaning="CRC-32 of the frame id (as in the Modbus slots)"),
    Variable("Result", "BootId", VT.String, meaning="boot_id of the daemon run that published it"),
    Variable(
        "Result", "BootNo", VT.UInt32, meaning="1 for the first daemon boot the bridge saw, +1 per restart"
    ),
    Variable("Result", "LatencyMs", VT.Double, meaning="frame arrival at the daemon → publication"),
    Variable("Result", "NewBoot", VT.Boolean, meaning="the first verdict of its daemon boot"),
    Variable(
        "Result", "LostBefore", VT.Boolean, meaning="verdicts were lost right before it: divert the gap"
    ),
    Variable("Handshake", "Ack", VT.UInt32, writable=True, meaning="the PLC writes the Seq it consumed"),
    Variable("Handshake", "Pending", VT.UInt32, meaning="verdicts buffered, not yet acknowledged"),
    Variable("Handshake", "Capacity", VT.UInt32, meaning="handshake.buffer_size"),
    Variable("Handshake", "Dropped", VT.UInt32, meaning="verdicts dropped because the buffer was full"),
    Variable("Handshake", "Overflow", VT.Boolean, meaning="dropped, and not yet acknowledged past the loss"),
    Variable("Status", "Fault", VT.Boolean, meaning="divert every part while true"),
    Variable(
        "Status",
        "FaultCauses",
        VT.UInt32,
        meaning="bit field: 1 starting, 2 daemon silent, 4 not ready, 8 overflow",
    ),
    Variable(
        "Status", "DaemonAlive", VT.Boolean, meaning="a message from the daemon within the heartbeat timeout"
    ),
    Variable("Status", "DaemonReady", VT.Boolean, meaning="the daemon's last heartbeat said ready"),
    Variable("Status", "HeartbeatCounter", VT.UInt32, meaning="daemon heartbeats received"),
    Variable("Status", "GapsDetected", VT.UInt32, meaning="gaps in seq on the daemon's stream"),
    Variable("Status", "MissedVerdicts", VT.UInt32, meaning="verdicts inside those gaps"),
    Variable("Status", "Restarts", VT.UInt32, meaning="daemon restarts (new boot_id) seen"),
    Variable("Status", "BootId", VT.String, meaning="the daemon's current boot_id"),
    Variable("Status", "BootNo", VT.UInt32, meaning="daemon boots seen"),
    Variable("Latest", "Seq", VT.UInt32, meaning="the newest verdict, acknowledged or not (for displays)"),
    Variable("Latest", "Pass", VT.Boolean),
    Variable("Latest", "Verdict", VT.Int32, enum="Verdict"),
    Variable("Latest", "ReasonCode", VT.Int32, enum="ReasonCode"),
    Variable("Latest", "Score", VT.Double),
    Variable("Latest", "FrameId", VT.String),
    Variable("Latest", "LatencyMs", VT.Double),
)

# Properties of VerdictEventType (a BaseEventType): one event per verdict, emitted by the line object.
EVENT_FIELDS: tuple[tuple[str, ua.VariantType], ...] = (
    ("Seq", VT.UInt32),
    ("BootId", VT.String),
    ("FrameId", VT.String),
    ("Pass", VT.Boolean),
    ("ReasonCode", VT.Int32),
    ("Score", VT.Double),
    ("LatencyMs", VT.Double),
)


def node_id(line: str, folder: str, name: str) -> str:
    """The string identifier of a variable (in the bridge's namespace)."""
    return f"{line}.{folder}.{name}"


def _result_values(r: Result | None) -> dict[str, Any]:
    if r is None:
        return {
            "Seq": 0, "Pass": False, "Verdict": 0, "ReasonCode": 0, "Score": NO_SCORE, "FrameId": "",
            "FrameIdHash": 0, "BootId": "", "BootNo": 0, "LatencyMs": 0.0, "NewBoot": False, "LostBefore": False,
        }  # fmt: skip
    return {
        "Seq": r.seq32,
        "Pass": r.passed,
        "Verdict": int(r.passed),
        "ReasonCode": r.reason_code,
        "Score": NO_SCORE if r.score is None else r.score,
        "FrameId": r.frame_id,
        "FrameIdHash": r.frame_hash,
        "BootId": r.boot_id,
        "BootNo": r.boot_no,
        "LatencyMs": r.latency_ms,
        "NewBoot": r.new_boot,
        "LostBefore": r.lost_before,
    }


class OpcUaFrontend:
    """The OPC UA server of one line, serving one :class:`ResultChannel`. Lives on the bridge's event loop."""

    protocol = "opcua"

    def __init__(
        self,
        settings: OpcUaSettings,
        line: str,
        link: DaemonLink,
        channel: ResultChannel,
        *,
        on_ack: Callable[[int], None],
        on_served: Callable[[Result], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``on_ack(seq)``: the PLC wrote ``Handshake.Ack``. ``on_served(result)``: a new verdict is in the
        address space (its event emitted, the Latest variables written)."""
        self.settings = settings
        self.line = line
        self._on_served = on_served
        self.link, self.channel = link, channel
        self._on_ack = on_ack
        self._clock = clock
        self.server: Server | None = None
        self.namespace_index = 0
        self._nodes: dict[tuple[str, str], ua.NodeId] = {}
        self._written: dict[ua.NodeId, Any] = {}
        self._events: deque[Result] = deque()
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._evgen: Any = None
        self._latest: Result | None = None  # the newest verdict (the Latest folder)
        self.events_emitted = 0

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        # asyncua logs every session and subscription at INFO
        logging.getLogger("asyncua").setLevel(logging.WARNING)
        s = self.settings
        user_manager = CertificateUserManager() if s.secured else None
        server = (
            Server(user_manager=cast(UserManager, user_manager)) if user_manager is not None else Server()
        )
        await server.init()
        server.set_endpoint(s.endpoint)
        server.set_server_name(f"inspectd PLC bridge ({self.line})")
        await server.set_application_uri(APPLICATION_URI)
        if s.secured:
            assert s.certificate and s.private_key and s.trusted_clients and user_manager is not None
            for key, path in (("opcua.certificate", s.certificate), ("opcua.private_key", s.private_key)):
                if not path.is_file():
                    raise ConfigError(f"{key}: {path} does not exist")
            try:
                await server.load_certificate(str(s.certificate))
                await server.load_private_key(str(s.private_key))
            except ValueError as exc:
                raise ConfigError(f"opcua.certificate / opcua.private_key cannot be loaded: {exc}") from None
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
            server.set_identity_tokens([ua.X509IdentityToken])  # anonymous refused
            for path in _certificate_files(s.trusted_clients):  # a session's identity: a trusted certificate
                try:
                    await user_manager.add_role(path, UserRole.User, name=path.name)
                except ValueError as exc:
                    raise ConfigError(f"opcua.trusted_clients: {path} is not a certificate: {exc}") from None
            store = TrustStore([s.trusted_clients], [])
            await store.load()
            options = (
                CertificateValidatorOptions.TIME_RANGE
                | CertificateValidatorOptions.TRUSTED
                | CertificateValidatorOptions.PEER_CLIENT
            )
            server.set_certificate_validator(CertificateValidator(options, store))
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
            server.set_identity_tokens([ua.AnonymousIdentityToken])
        self.namespace_index = idx = await server.register_namespace(s.namespace)
        enums = {
            "ReasonCode": await _enum(server, idx, "ReasonCode", REASON_NAMES),
            "Verdict": await _enum(server, idx, "Verdict", VERDICT_NAMES),
        }
        event_type = await server.create_custom_event_type(
            idx, "VerdictEventType", ObjectIds.BaseEventType, list(EVENT_FIELDS)
        )
        line_obj = await server.nodes.objects.add_object(_nid(idx, self.line), self.line)
        await line_obj.set_event_notifier([ua.EventNotifier.SubscribeToEvents])
        folders: dict[str, Node] = {}
        for v in VARIABLES:
            if v.folder not in folders:
                folders[v.folder] = await line_obj.add_object(_nid(idx, f"{self.line}.{v.folder}"), v.folder)
            nid = _nid(idx, node_id(self.line, v.folder, v.name))
            initial = _initial(v.vtype)
            datatype = enums[v.enum].nodeid if v.enum else None
            node = await folders[v.folder].add_variable(
                nid, v.name, ua.Variant(initial, v.vtype), datatype=datatype
            )
            if v.writable:
                await node.set_writable()
            self._nodes[(v.folder, v.name)] = nid
            self._written[nid] = initial
        ack = self._nodes[("Handshake", "Ack")]
        server.set_attribute_value_setter(ack, self._ack_written)
        self._evgen = await server.get_event_generator(event_type, line_obj.nodeid)
        await server.start()
        self.server = server
        self._task = asyncio.create_task(self._updater(), name="opcua-updater")
        self.refresh()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.server is not None:
            await self.server.stop()
            self.server = None

    @property
    def port(self) -> int:
        assert self.server is not None and self.server.bserver is not None
        return int(self.server.bserver.port)

    @property
    def endpoint(self) -> str:
        host = self.settings.endpoint.split("://", 1)[1].split("/", 1)
        path = "/" + host[1] if len(host) > 1 else ""
        return f"opc.tcp://{host[0].rsplit(':', 1)[0]}:{self.port}{path}"

    @property
    def running(self) -> bool:
        """The server is up and its updater alive (a dead updater would leave stale values: the bridge stops)."""
        return self.server is not None and self._task is not None and not self._task.done()

    def clients(self) -> int:
        """Connected OPC UA clients (TCP connections)."""
        if self.server is None or self.server.bserver is None:
            return 0
        return len(self.server.bserver.clients)

    # -- what the bridge tells it ----------------------------------------------------------------------------
    def verdict(self, result: Result) -> None:
        """A new verdict from the daemon: its event is emitted (every one, acknowledged or not), and it is the
        Latest."""
        self._events.append(result)
        self._latest = result
        self._dirty.set()

    def refresh(self) -> None:
        """The state changed (a message, an ack, a tick): the updater writes what differs."""
        self._dirty.set()

    def _ack_written(self, node: NodeData, attr: AttributeIds, value: ua.DataValue) -> None:
        # Runs inside asyncua's Write service (and for any write to the node): store it, then acknowledge.
        node.attributes[attr].value = value
        seq = value.Value.Value if value.Value is not None else None
        if isinstance(seq, int) and not isinstance(seq, bool):
            self._on_ack(seq)
        self._dirty.set()

    # -- the updater -----------------------------------------------------------------------------------------
    async def _updater(self) -> None:
        try:
            await self._update_forever()
        except Exception:
            log.exception("the OPC UA updater failed")  # the bridge sees it stopped (running) and exits 1
            raise

    async def _update_forever(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            emitted = []
            while self._events:
                emitted.append(self._events.popleft())
                await self._emit(emitted[-1])
            await self._write_state()
            if self._on_served is not None:
                for r in emitted:
                    self._on_served(r)

    async def _emit(self, r: Result) -> None:
        ev = self._evgen.event  # property types come from VerdictEventType (EVENT_FIELDS)
        ev.Seq = r.seq32
        ev.BootId = r.boot_id
        ev.FrameId = r.frame_id
        ev.Pass = r.passed
        ev.ReasonCode = r.reason_code
        ev.Score = NO_SCORE if r.score is None else r.score
        ev.LatencyMs = r.latency_ms
        ev.Severity = 100 if r.passed else 500
        verdict = "PASS" if r.passed else "REJECT"
        await self._evgen.trigger(message=f"seq {r.seq} {verdict} {r.reason} {r.frame_id}")
        self.events_emitted += 1

    def values(self) -> dict[tuple[str, str], Any]:
        """Every variable's value for the current state (what the updater writes)."""
        link, ch, now = self.link, self.channel, self._clock()
        fault = faults(link, ch, now)
        out: dict[tuple[str, str], Any] = {}
        head = ch.presented
        out[("Result", "Valid")] = head is not None
        out[("Result", "Toggle")] = ch.toggle
        for name, value in _result_values(head).items():
            out[("Result", name)] = value
        out[("Handshake", "Pending")] = len(ch.pending)
        out[("Handshake", "Capacity")] = ch.capacity
        out[("Handshake", "Dropped")] = ch.dropped & 0xFFFF_FFFF
        out[("Handshake", "Overflow")] = ch.overflow
        out[("Status", "Fault")] = bool(fault)
        out[("Status", "FaultCauses")] = int(fault)
        out[("Status", "DaemonAlive")] = link.alive(now)
        out[("Status", "DaemonReady")] = link.ready
        out[("Status", "HeartbeatCounter")] = link.heartbeats & 0xFFFF_FFFF
        out[("Status", "GapsDetected")] = len(link.sequence.gaps)
        out[("Status", "MissedVerdicts")] = link.sequence.missed & 0xFFFF_FFFF
        out[("Status", "Restarts")] = link.sequence.restarts
        out[("Status", "BootId")] = link.boot_id or ""
        out[("Status", "BootNo")] = link.boot_no
        latest = _result_values(self._latest)
        for name in ("Seq", "Pass", "Verdict", "ReasonCode", "Score", "FrameId", "LatencyMs"):
            out[("Latest", name)] = latest[name]
        return out

    async def _write_state(self) -> None:
        assert self.server is not None
        for key, value in self.values().items():
            nid = self._nodes[key]
            if self._written.get(nid) == value and type(self._written.get(nid)) is type(value):
                continue
            self._written[nid] = value
            vtype = _VTYPES[key]
            await self.server.write_attribute_value(nid, ua.DataValue(ua.Variant(value, vtype)))


_VTYPES: dict[tuple[str, str], ua.VariantType] = {(v.folder, v.name): v.vtype for v in VARIABLES}


def _nid(idx: int, identifier: str) -> ua.NodeId:
    return ua.NodeId.from_string(f"ns={idx};s={identifier}")


def _initial(vtype: ua.VariantType) -> Any:
    return {VT.Boolean: False, VT.String: "", VT.Double: 0.0}.get(vtype, 0)


def _certificate_files(directory: Path) -> list[Path]:
    """The client certificates (``*.der``, ``*.pem``, ``*.crt``, ``*.cer``) in ``opcua.trusted_clients``."""
    if not directory.is_dir():
        raise ConfigError(f"opcua.trusted_clients: {directory} is not a directory")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in (".der", ".pem", ".crt", ".cer"))
    if not files:
        raise ConfigError(f"opcua.trusted_clients: no certificate in {directory}: no client could connect")
    return files


async def _enum(server: Server, idx: int, name: str, values: dict[int, str]) -> Node:
    """An enumeration DataType with the given (not consecutive) values: EnumDefinition and EnumValues."""
    dtype = await server.nodes.enum_data_type.add_data_type(_nid(idx, f"{name}Enum"), name)
    fields = [
        ua.EnumField(Name=n, DisplayName=ua.LocalizedText(n), Value=v) for v, n in sorted(values.items())
    ]
    await dtype.write_data_type_definition(ua.EnumDefinition(Fields=fields))
    enum_values = [
        ua.EnumValueType(Value=v, DisplayName=ua.LocalizedText(n), Description=ua.LocalizedText(n))
        for v, n in sorted(values.items())
    ]
    prop = await dtype.add_property(
        0,
        "EnumValues",
        ua.Variant(enum_values, VT.ExtensionObject),
        datatype=ua.NodeId.from_string(f"i={ObjectIds.EnumValueType}"),
    )
    await prop.write_value_rank(ua.ValueRank.OneDimension)
    return dtype
