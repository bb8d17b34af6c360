"""The Modbus TCP server (pymodbus 3.16's ``SimDevice`` datastore): the register map of ``plc.modbus_map``.

The device's ``action`` hook (pymodbus: "update registers … return a member of ExcCodes") runs on the bridge's
event loop before every request is answered: a read gets the block rendered from the handshake's state at that
moment (one request = one consistent picture; slot 0 never moves between two reads unless the PLC itself
acknowledged), a write is accepted only as the acknowledgement (both ACK registers, function code 16) and is
acknowledged on the channel before the response goes out. Any other write is refused (exception 2, illegal
data address). The server answers every unit id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from plc.handshake import DaemonLink, ResultChannel
from plc.modbus_map import STATUS, ack_value, block_size, render
from plc.settings import ModbusSettings

__all__ = ["ModbusFrontend"]

WRITE_MULTIPLE_REGISTERS = 16


class ModbusFrontend:
    """The Modbus TCP server of one line, serving one :class:`ResultChannel`. Lives on the bridge's event loop."""

    protocol = "modbus"

    def __init__(
        self,
        settings: ModbusSettings,
        link: DaemonLink,
        channel: ResultChannel,
        *,
        on_ack: Callable[[int], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.link, self.channel = link, channel
        self._on_ack = on_ack
        self._clock = clock
        self._server: ModbusTcpServer | None = None
        self._clients = 0
        self.refused_writes = 0

    async def start(self) -> None:
        logging.getLogger("pymodbus").setLevel(logging.WARNING)
        size = block_size(self.settings.slots)
        device = SimDevice(
            id=0,  # every unit id
            simdata=[SimData(0, count=size, values=0, datatype=DataType.REGISTERS)],
            action=self._action,
        )
        self._server = ModbusTcpServer(
            device, address=(self.settings.host, self.settings.port), trace_connect=self._connected
        )
        await self._server.serve_forever(background=True)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.transport is not None
        sockets = getattr(self._server.transport, "sockets", None) or ()
        return int(sockets[0].getsockname()[1]) if sockets else self.settings.port

    @property
    def running(self) -> bool:
        return self._server is not None and not self._server.serving.done()

    def clients(self) -> int:
        return self._clients

    def _connected(self, connected: bool) -> None:
        self._clients = max(0, self._clients + (1 if connected else -1))

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        values: Sequence[int] | Sequence[bool] | None,
    ) -> ExcCodes | None:
        if values is None:  # a read: the block as of now (the ACK registers keep what the PLC wrote)
            image = render(self.link, self.channel, self.settings.slots, self._clock())
            registers[STATUS - start_address : STATUS - start_address + len(image)] = image
            return None
        seq = (
            ack_value(address, [int(v) for v in values])
            if function_code == WRITE_MULTIPLE_REGISTERS
            else None
        )
        if seq is None:
            self.refused_writes += 1
            return ExcCodes.ILLEGAL_ADDRESS
        self._on_ack(seq)  # then pymodbus stores the write: the ACK registers read back what was written
        return None
