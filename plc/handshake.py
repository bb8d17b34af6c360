"""The result handshake between the bridge and a PLC, without any I/O: what both protocols serve.

Two parts:

- :class:`DaemonLink` follows the daemon's verdict stream (every message, in arrival order): liveness (any
  message within ``heartbeat_timeout_s``), readiness (the last heartbeat's ``ready``), the boot (each new
  ``boot_id`` gets the next ``boot_no``, 1 for the first one seen) and gaps, by the project's one rule,
  :class:`daemon.sequence.SequenceTracker`. Each verdict becomes a :class:`Result`.
- :class:`ResultChannel` is one PLC's side of the handshake (one per protocol, so an OPC UA client and a Modbus
  master each consume every verdict): a bounded buffer of the results it has not acknowledged, oldest first.
  The oldest is *presented* (OPC UA ``Result``, Modbus slot 0); ``toggle`` flips each time a result is
  presented that was not presented before. The PLC acknowledges by writing the ``seq`` it consumed: that
  result and every one before it leave the buffer (an ``ack`` that matches no buffered result changes
  nothing). A result that finds the buffer full is dropped: the channel is in ``overflow`` until the PLC has
  acknowledged the first result accepted after the loss, which carries ``lost_before`` (its ``seq`` jumps,
  too) — the PLC has then seen where verdicts are missing.

:func:`faults` is the fail-safe: any cause set means the bridge cannot vouch for the verdicts it serves, and the
PLC diverts every part until all are clear.
"""

from __future__ import annotations

import enum
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from daemon.reasons import reason_code
from daemon.sequence import SequenceTracker

__all__ = ["DaemonLink", "Fault", "Result", "ResultChannel", "faults", "frame_hash"]

SEQ_MASK = 0xFFFF_FFFF  # a PLC's UDINT: seq is served and acknowledged modulo 2**32


class Fault(enum.IntFlag):
    """Why the bridge cannot vouch for verdicts (a bit field on both protocols). Any bit: divert everything."""

    STARTING = 1  # nothing received from the daemon since the bridge started
    DAEMON_SILENT = 2  # no message (verdict or heartbeat) within heartbeat_timeout_ms
    DAEMON_NOT_READY = 4  # the daemon's last heartbeat said ready: false (starting, stopping, engine down)
    OVERFLOW = 8  # this channel dropped verdicts; clears when the PLC acknowledged past the loss


def frame_hash(frame_id: str) -> int:
    """CRC-32 (IEEE 802.3, as zlib and most PLC libraries compute it) of the frame id's UTF-8 bytes."""
    return zlib.crc32(frame_id.encode("utf-8")) & SEQ_MASK


@dataclass(frozen=True, slots=True)
class Result:
    """One verdict as a PLC sees it."""

    seq: int
    boot_id: str
    boot_no: int  # 1 = the first daemon boot this bridge saw; +1 at every restart
    frame_id: str
    passed: bool  # verdict == "PASS"; anything else (REJECT, a value this bridge does not know) is False
    reason: str
    score: float | None
    latency_ms: float
    t_published: float  # the daemon's wall clock at publication
    t_received: float  # the bridge's monotonic clock at receipt
    new_boot: bool = False  # the first verdict of its boot that this bridge passes on
    lost_before: bool = False  # verdicts were lost right before this one (a gap, or an overflow drop)

    @property
    def reason_code(self) -> int:
        return reason_code(self.reason)

    @property
    def frame_hash(self) -> int:
        return frame_hash(self.frame_id)

    @property
    def seq32(self) -> int:
        return self.seq & SEQ_MASK


class DaemonLink:
    """What the bridge knows of the daemon, from its messages (fed in arrival order, one thread)."""

    def __init__(self, heartbeat_timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.sequence = SequenceTracker()
        self.t_last: float | None = None  # clock() at the last message
        self.ready = False  # the last heartbeat's ``ready``; False until one arrives
        self.heartbeats = 0
        self.verdicts = 0
        self.boot_no = 0
        self._clock = clock
        self._boot_first = False  # the next verdict is the first of its boot
        self._gap_pending = False  # a heartbeat showed a gap: the next verdict carries lost_before

    @property
    def boot_id(self) -> str | None:
        return self.sequence.boot_id

    def feed(self, msg: Mapping[str, Any], t_arrival: float | None = None) -> tuple[Result | None, list[str]]:
        """Account for one message; the verdict as a :class:`Result` (None for a heartbeat) and the notes."""
        kind = msg.get("type")
        if kind not in ("verdict", "heartbeat"):
            return None, []  # new kinds may come: ignored, never a sign of life
        now = self._clock() if t_arrival is None else t_arrival
        boot_before, gaps_before = self.sequence.boot_id, len(self.sequence.gaps)
        notes = self.sequence.feed(msg)
        self.t_last = now
        if self.sequence.boot_id != boot_before:
            self.boot_no += 1
            self._boot_first, self._gap_pending = True, False
        gap = len(self.sequence.gaps) > gaps_before
        if kind == "heartbeat":
            self.heartbeats += 1
            self.ready = msg.get("ready") is True
            self._gap_pending = self._gap_pending or gap
            return None, notes
        self.verdicts += 1
        score = msg.get("score")
        result = Result(
            seq=int(msg["seq"]),
            boot_id=str(msg["boot_id"]),
            boot_no=self.boot_no,
            frame_id=str(msg["frame_id"]),
            passed=msg.get("verdict") == "PASS",
            reason=str(msg.get("reason")),
            score=float(score) if isinstance(score, int | float) else None,
            latency_ms=float(msg.get("latency_ms") or 0.0),
            t_published=float(msg.get("t_published") or 0.0),
            t_received=now,
            new_boot=self._boot_first,
            lost_before=gap or self._gap_pending,
        )
        self._boot_first = self._gap_pending = False
        return result, notes

    def alive(self, now: float | None = None) -> bool:
        now = self._clock() if now is None else now
        return self.t_last is not None and now - self.t_last <= self.heartbeat_timeout_s

    def faults(self, now: float | None = None) -> Fault:
        """The causes on the daemon's side (the same for every channel)."""
        now = self._clock() if now is None else now
        if self.t_last is None:
            return Fault.STARTING | Fault.DAEMON_NOT_READY
        out = Fault(0)
        if not self.alive(now):
            out |= Fault.DAEMON_SILENT
        if not self.ready:
            out |= Fault.DAEMON_NOT_READY
        return out


class ResultChannel:
    """One PLC's buffer of unacknowledged results (one protocol). Not thread-safe: one event loop owns it."""

    def __init__(self, name: str, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be ≥ 1, got {capacity}")
        self.name = name
        self.capacity = capacity
        self.pending: deque[Result] = deque()
        self.toggle = False  # flips whenever a result not presented before is presented
        self.overflow = False
        self.dropped = 0  # results dropped because the buffer was full
        self.accepted = 0
        self.acknowledged = 0  # results removed by acknowledgements
        self.unmatched_acks = 0  # acknowledgements that matched no buffered result
        self.last_ack: int | None = None  # the last value acknowledged (matched or not)
        self._loss_pending = False  # a result was dropped: the next one accepted carries lost_before
        self._clears_overflow: Result | None = None  # acknowledging this one ends the overflow

    @property
    def dropping(self) -> bool:
        """The last verdict offered was dropped (and none has been accepted since)."""
        return self._loss_pending

    @property
    def presented(self) -> Result | None:
        return self.pending[0] if self.pending else None

    def offer(self, result: Result) -> bool:
        """Buffer ``result``; False (and overflow) when the buffer is full: it is dropped."""
        if len(self.pending) >= self.capacity:
            self.dropped += 1
            self.overflow = True
            self._loss_pending, self._clears_overflow = True, None
            return False
        if self._loss_pending:
            result = replace(result, lost_before=True)
            self._loss_pending, self._clears_overflow = False, result
        if not self.pending:
            self.toggle = not self.toggle
        self.pending.append(result)
        self.accepted += 1
        return True

    def acknowledge(self, seq: int) -> list[Result]:
        """The PLC consumed ``seq`` (modulo 2**32): the oldest buffered result with that number and every one
        before it leave the buffer; they are returned (none when nothing matched: the ack is counted only)."""
        seq &= SEQ_MASK
        self.last_ack = seq
        upto = next((i for i, r in enumerate(self.pending) if r.seq32 == seq), None)
        if upto is None:
            self.unmatched_acks += 1
            return []
        done = [self.pending.popleft() for _ in range(upto + 1)]
        self.acknowledged += len(done)
        if any(r is self._clears_overflow for r in done):
            self.overflow, self._clears_overflow = False, None
        if self.pending:
            self.toggle = not self.toggle  # the next one is presented
        return done

    def oldest_age(self, now: float) -> float:
        """Seconds the presented result has waited for its acknowledgement (0 when none waits)."""
        return now - self.pending[0].t_received if self.pending else 0.0


def faults(link: DaemonLink, channel: ResultChannel, now: float | None = None) -> Fault:
    """Every cause that tells this channel's PLC to divert everything."""
    out = link.faults(now)
    if channel.overflow:
        out |= Fault.OVERFLOW
    return out
