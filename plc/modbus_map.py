"""The Modbus register map, as pure functions: what a read returns, what an acknowledgement write means.

One block of 16-bit registers, served alike to function code 3 (holding registers) and 4 (input registers),
addresses 0-based as on the wire (``40001 + address`` in the 4xxxx notation). 32-bit values take two
registers, high word first. docs/plc.md has the map as a table; the constants here are its one source.
"""

from __future__ import annotations

from plc.handshake import DaemonLink, Result, ResultChannel, faults

__all__ = [
    "ACK",
    "HEADER_SIZE",
    "MAP_VERSION",
    "SLOT_SIZE",
    "ack_value",
    "block_size",
    "render",
    "slot_address",
]

MAP_VERSION = 1  # raised whenever a register below changes meaning (registers are only ever added)

# header
ACK = 0  # 2 registers, u32: the PLC writes the seq it consumed (one function-code-16 write of both)
STATUS = 2  # bit field, STATUS_* below
FAULTS = 3  # bit field: plc.handshake.Fault; any bit set = divert every part
PENDING = 4  # verdicts in the buffer, unacknowledged (slot 0 is the oldest)
CAPACITY = 5  # handshake.buffer_size
HEARTBEATS = 6  # daemon heartbeats received, modulo 2**16: it changes every publisher.heartbeat_ms
GAPS = 7  # gaps in seq seen on the daemon's stream, modulo 2**16
BOOT_NO = 8  # daemon boots seen: 1 for the first, +1 at every restart (modulo 2**16)
SLOTS = 9  # slots in this map (modbus.slots)
DROPPED = 10  # 2 registers, u32: verdicts dropped because the buffer was full
LATEST_SEQ = 12  # 2 registers, u32: the newest verdict's seq (acknowledged or not)
VERSION = 14  # MAP_VERSION
SLOT_WORDS = 15  # SLOT_SIZE
HEADER_SIZE = 16

STATUS_RESULT_VALID = 1 << 0  # slot 0 holds a verdict waiting for its acknowledgement
STATUS_RESULT_TOGGLE = 1 << 1  # flips whenever slot 0 presents a verdict it did not present before
STATUS_FAULT = 1 << 2  # FAULTS != 0: divert every part
STATUS_DAEMON_ALIVE = 1 << 3  # a message from the daemon within subscriber.heartbeat_timeout_ms
STATUS_DAEMON_READY = 1 << 4  # the daemon's last heartbeat said ready
STATUS_OVERFLOW = 1 << 5  # verdicts were dropped and the PLC has not yet acknowledged past the loss

# slot i at HEADER_SIZE + i × SLOT_SIZE: the i-th oldest unacknowledged verdict, zeros when none
SLOT_SEQ = 0  # 2 registers, u32
SLOT_FLAGS = 2  # bit field, FLAG_* below
SLOT_REASON = 3  # reason code (daemon.reasons)
SLOT_SCORE = 4  # NG score × 1000, rounded (0..1000); SCORE_NONE when the model gave none
SLOT_FRAME_HASH = 5  # 2 registers, u32: CRC-32 of the frame id (UTF-8)
SLOT_BOOT_NO = 7  # BOOT_NO of the daemon boot that published it
SLOT_SIZE = 8

FLAG_VALID = 1 << 0  # the slot holds a verdict
FLAG_PASS = 1 << 1  # 1 = PASS, 0 = REJECT (an empty slot reads REJECT)
FLAG_LOST_BEFORE = 1 << 2  # verdicts were lost right before this one: divert the parts in the seq gap
FLAG_NEW_BOOT = 1 << 3  # the first verdict of a daemon boot (seq starts again)
SCORE_NONE = 0xFFFF


def block_size(slots: int) -> int:
    return HEADER_SIZE + slots * SLOT_SIZE


def slot_address(i: int) -> int:
    return HEADER_SIZE + i * SLOT_SIZE


def _u32(value: int) -> list[int]:
    value &= 0xFFFF_FFFF
    return [value >> 16, value & 0xFFFF]


def _slot(r: Result | None) -> list[int]:
    if r is None:
        return [0] * SLOT_SIZE
    flags = FLAG_VALID
    flags |= FLAG_PASS if r.passed else 0
    flags |= FLAG_LOST_BEFORE if r.lost_before else 0
    flags |= FLAG_NEW_BOOT if r.new_boot else 0
    score = SCORE_NONE if r.score is None else max(0, min(1000, round(r.score * 1000)))
    return [*_u32(r.seq), flags, r.reason_code, score, *_u32(r.frame_hash), r.boot_no & 0xFFFF]


def render(link: DaemonLink, channel: ResultChannel, slots: int, now: float) -> list[int]:
    """The whole block but the ACK registers (addresses 2 … ``block_size(slots)`` - 1), from the current state."""
    fault = faults(link, channel, now)
    status = STATUS_RESULT_VALID if channel.pending else 0
    status |= STATUS_RESULT_TOGGLE if channel.toggle else 0
    status |= STATUS_FAULT if fault else 0
    status |= STATUS_DAEMON_ALIVE if link.alive(now) else 0
    status |= STATUS_DAEMON_READY if link.ready else 0
    status |= STATUS_OVERFLOW if channel.overflow else 0
    latest = link.sequence.seq_last or 0
    out = [
        status,
        int(fault),
        len(channel.pending),
        channel.capacity,
        link.heartbeats & 0xFFFF,
        len(link.sequence.gaps) & 0xFFFF,
        link.boot_no & 0xFFFF,
        slots,
        *_u32(channel.dropped),
        *_u32(latest),
        MAP_VERSION,
        SLOT_SIZE,
    ]
    pending = list(channel.pending)[:slots]
    for i in range(slots):
        out.extend(_slot(pending[i] if i < len(pending) else None))
    return out


def ack_value(address: int, values: list[int]) -> int | None:
    """The seq acknowledged by a write of ``values`` at ``address``; None when the write is not exactly the two
    ACK registers in one request (refused: a half-written seq could match another verdict)."""
    if address != ACK or len(values) != 2:
        return None
    return (values[0] & 0xFFFF) << 16 | (values[1] & 0xFFFF)
