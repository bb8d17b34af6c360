"""The result handshake (plc/handshake.py) and the Modbus register map (plc/modbus_map.py), without sockets.

The integration tests (tests/integration/test_plc_bridge.py) run the same rules through the real daemon, the
bridge and real clients; these pin the rules themselves, message by message, with a clock the test owns.
"""

from __future__ import annotations

import zlib
from typing import Any

import pytest

from daemon.reasons import REASON_CODES, UNKNOWN
from plc import modbus_map as mm
from plc.handshake import DaemonLink, Fault, Result, ResultChannel, faults


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def verdict(seq: int, boot: str = "b1", **kw: Any) -> dict[str, Any]:
    msg = {
        "type": "verdict",
        "line": "l",
        "boot_id": boot,
        "seq": seq,
        "frame_id": f"f{seq}",
        "verdict": "PASS",
        "reason": "model",
        "score": 0.1,
        "t_published": 1.0,
        "latency_ms": 2.0,
    }
    return {**msg, **kw}


def heartbeat(seq_last: int, boot: str = "b1", ready: bool = True) -> dict[str, Any]:
    return {
        "type": "heartbeat",
        "line": "l",
        "boot_id": boot,
        "seq_last": seq_last,
        "t_published": 1.0,
        "ready": ready,
    }


def results(link: DaemonLink, *msgs: dict[str, Any]) -> list[Result]:
    out = []
    for m in msgs:
        r, _ = link.feed(m)
        if r is not None:
            out.append(r)
    return out


def test_link_faults_until_a_ready_heartbeat_and_again_after_the_timeout() -> None:
    clock = Clock()
    link = DaemonLink(heartbeat_timeout_s=3.0, clock=clock)
    assert link.faults() == Fault.STARTING | Fault.DAEMON_NOT_READY  # nothing heard: the bridge cannot vouch
    link.feed(heartbeat(0, ready=False))
    assert link.faults() == Fault.DAEMON_NOT_READY
    link.feed(heartbeat(0))
    assert link.faults() == Fault(0) and link.alive()
    clock.t += 3.0
    assert link.faults() == Fault(0)  # exactly the timeout: still alive
    clock.t += 0.01
    assert link.faults() == Fault.DAEMON_SILENT and not link.alive()
    link.feed(verdict(1))  # any message is a sign of life
    assert link.faults() == Fault(0)
    link.feed(heartbeat(1, ready=False))  # a stopping daemon's last heartbeat
    assert link.faults() == Fault.DAEMON_NOT_READY
    link.feed({"type": "something-new", "boot_id": "b1"})  # unknown kinds are no sign of life
    clock.t += 5
    assert Fault.DAEMON_SILENT in link.faults()


def test_link_numbers_boots_flags_the_first_verdict_of_each_and_the_one_after_a_gap() -> None:
    link = DaemonLink(3.0, clock=Clock())
    r = results(
        link,
        heartbeat(4),
        verdict(5),
        verdict(6),
        verdict(9),  # 7, 8 lost on the way
        heartbeat(11),  # 10, 11 lost just before a quiet period: noticed here, flagged on the next verdict
        verdict(12),
        verdict(1, boot="b2"),  # restart
        verdict(2, boot="b2"),
    )
    assert [(x.boot_no, x.seq, x.new_boot, x.lost_before) for x in r] == [
        (1, 5, True, False),
        (1, 6, False, False),
        (1, 9, False, True),
        (1, 12, False, True),
        (2, 1, True, False),
        (2, 2, False, False),
    ]
    assert link.sequence.gaps == [(7, 8), (10, 11)] and link.sequence.restarts == 1 and link.boot_no == 2


def test_result_fields_and_fail_safe_readings() -> None:
    link = DaemonLink(3.0, clock=Clock())
    (a, b, c) = results(
        link,
        verdict(1, verdict="REJECT", reason="deadline", score=None),
        verdict(2, verdict="MAYBE", reason="a_reason_from_the_future"),
        verdict(2**32 + 7, frame_id="ß/ä"),
    )
    assert not a.passed and a.reason_code == REASON_CODES["deadline"] and a.score is None
    assert not b.passed and b.reason_code == UNKNOWN  # never a PASS for a value the bridge does not know
    assert c.seq32 == 7 and c.frame_hash == zlib.crc32("ß/ä".encode())


def r(seq: int, boot_no: int = 1) -> Result:
    return Result(seq, "b", boot_no, f"f{seq}", True, "model", 0.5, 1.0, 1.0, 0.0)


def test_channel_presents_the_oldest_and_acknowledges_it_and_everything_before_it() -> None:
    ch = ResultChannel("t", capacity=8)
    assert ch.presented is None and not ch.toggle
    ch.offer(r(1))
    assert ch.presented == r(1) and ch.toggle  # presented: the toggle flips
    ch.offer(r(2))
    ch.offer(r(3))
    assert ch.toggle  # appended behind the presented one: no flip
    assert ch.acknowledge(1) == [r(1)] and ch.presented == r(2) and not ch.toggle  # the next is presented
    assert ch.acknowledge(3) == [r(2), r(3)] and ch.presented is None  # cumulative
    assert not ch.toggle  # nothing newly presented
    assert ch.acknowledge(3) == [] and ch.unmatched_acks == 1  # repeated: changes nothing
    ch.offer(r(4))
    assert ch.acknowledge(99) == [] and ch.presented == r(4)  # matches nothing: never skips ahead
    assert ch.acknowledged == 3 and ch.last_ack == 99


def test_channel_acknowledges_the_oldest_match_across_a_restart_never_more() -> None:
    ch = ResultChannel("t", capacity=8)
    for x in (r(5), r(6), r(1, boot_no=2), r(5, boot_no=2)):
        ch.offer(x)
    # seq 5 is buffered twice (two boots): the PLC that acknowledges 5 consumed the older one
    assert ch.acknowledge(5) == [r(5)]
    assert ch.acknowledge(5) == [r(6), r(1, boot_no=2), r(5, boot_no=2)]


def test_channel_overflow_drops_the_newest_and_holds_the_fault_until_the_plc_acknowledged_past_the_loss() -> (
    None
):
    link = DaemonLink(3.0, clock=Clock())
    link.feed(heartbeat(0))
    ch = ResultChannel("t", capacity=3)
    assert [ch.offer(r(i)) for i in range(1, 6)] == [True, True, True, False, False]
    assert ch.dropped == 2 and ch.overflow and faults(link, ch) == Fault.OVERFLOW
    assert [x.seq for x in ch.pending] == [1, 2, 3]
    ch.acknowledge(3)
    assert not ch.pending and ch.overflow  # caught up on what was kept: it has not seen the gap yet
    assert ch.offer(r(6)) and ch.presented is not None and ch.presented.lost_before
    assert ch.offer(r(7)) and not ch.pending[-1].lost_before
    ch.acknowledge(6)
    assert not ch.overflow and faults(link, ch) == Fault(0)


def test_channel_a_second_loss_before_the_first_was_seen_moves_the_marker() -> None:
    ch = ResultChannel("t", capacity=2)
    for i in (1, 2, 3):  # 3 dropped
        ch.offer(r(i))
    ch.acknowledge(1)
    ch.offer(r(4))  # accepted, lost_before
    ch.offer(r(5))  # dropped again: the loss now lies after 4
    assert ch.dropped == 2 and ch.dropping
    ch.acknowledge(4)
    assert ch.overflow  # 4 was after the first loss, not the second
    ch.offer(r(6))
    ch.acknowledge(6)
    assert not ch.overflow


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        ResultChannel("t", 0)


# -- the register map ---------------------------------------------------------------------------------------
def test_render_lays_out_header_and_slots_as_documented() -> None:
    clock = Clock()
    link = DaemonLink(3.0, clock=clock)
    ch = ResultChannel("modbus", capacity=4)
    for x in results(
        link,
        heartbeat(69999),
        verdict(70000, frame_id="cam-1", score=0.9876, verdict="REJECT"),
        verdict(70001, score=None, reason="overload", verdict="REJECT"),
    ):
        ch.offer(x)
    block = [0, 0, *mm.render(link, ch, slots=3, now=clock())]  # the ACK registers are the PLC's
    assert len(block) == mm.block_size(3) == 16 + 3 * 8

    def u32(a: int) -> int:
        return block[a] << 16 | block[a + 1]

    status = block[mm.STATUS]
    assert status & mm.STATUS_RESULT_VALID and status & mm.STATUS_RESULT_TOGGLE
    assert status & mm.STATUS_DAEMON_ALIVE and status & mm.STATUS_DAEMON_READY
    assert not status & (mm.STATUS_FAULT | mm.STATUS_OVERFLOW) and block[mm.FAULTS] == 0
    assert (block[mm.PENDING], block[mm.CAPACITY], block[mm.HEARTBEATS], block[mm.BOOT_NO]) == (2, 4, 1, 1)
    assert (block[mm.SLOTS], block[mm.VERSION], block[mm.SLOT_WORDS]) == (3, mm.MAP_VERSION, mm.SLOT_SIZE)
    assert u32(mm.LATEST_SEQ) == 70001 and u32(mm.DROPPED) == 0
    s0, s1, s2 = (mm.slot_address(i) for i in range(3))
    assert u32(s0 + mm.SLOT_SEQ) == 70000  # above 65535: two registers, high word first
    assert block[s0 + mm.SLOT_FLAGS] == mm.FLAG_VALID | mm.FLAG_NEW_BOOT  # REJECT: no PASS bit
    assert block[s0 + mm.SLOT_REASON] == REASON_CODES["model"] and block[s0 + mm.SLOT_SCORE] == 988
    assert u32(s0 + mm.SLOT_FRAME_HASH) == zlib.crc32(b"cam-1") and block[s0 + mm.SLOT_BOOT_NO] == 1
    assert (
        block[s1 + mm.SLOT_SCORE] == mm.SCORE_NONE and block[s1 + mm.SLOT_REASON] == REASON_CODES["overload"]
    )
    assert block[s2 : s2 + mm.SLOT_SIZE] == [0] * mm.SLOT_SIZE  # empty slot: reads as not valid, REJECT
    clock.t += 10  # silence: the fault shows in the status word and the causes
    block = [0, 0, *mm.render(link, ch, slots=3, now=clock())]
    assert block[mm.STATUS] & mm.STATUS_FAULT and block[mm.FAULTS] == Fault.DAEMON_SILENT
    assert not block[mm.STATUS] & mm.STATUS_DAEMON_ALIVE


def test_only_a_whole_ack_write_acknowledges() -> None:
    assert mm.ack_value(mm.ACK, [1, 2]) == 65538
    assert mm.ack_value(mm.ACK, [2]) is None  # half a seq could name another verdict
    assert mm.ack_value(mm.ACK + 1, [2]) is None
    assert mm.ack_value(mm.STATUS, [0, 0]) is None
