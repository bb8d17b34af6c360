from __future__ import annotations

from tools.commands.watch import GapDetector


def v(seq: int, boot: str = "b1") -> dict[str, object]:
    return {"type": "verdict", "boot_id": boot, "seq": seq}


def hb(seq_last: int, boot: str = "b1") -> dict[str, object]:
    return {"type": "heartbeat", "boot_id": boot, "seq_last": seq_last}


def test_contiguous_stream_has_no_gaps() -> None:
    g = GapDetector()
    for m in [hb(0), v(1), v(2), hb(2), v(3)]:
        assert g.feed(m) == []
    assert g.gaps == [] and g.seq_last == 3


def test_joining_mid_stream_is_not_a_gap_but_a_hole_later_is() -> None:
    g = GapDetector()
    assert g.feed(v(41)) == []
    assert g.feed(v(44)) == ["GAP: missed seq 42..43"]
    assert g.feed(hb(46)) == ["GAP: missed seq 45..46"]  # lost right before a quiet period
    assert g.gaps == [(42, 43), (45, 46)]


def test_restart_resets_seq_and_detects_lost_first_verdicts() -> None:
    g = GapDetector()
    g.feed(v(1))
    g.feed(v(2))
    notes = g.feed(v(3, boot="b2"))
    assert notes[0].startswith("daemon restarted") and notes[1] == "GAP: missed seq 1..2"
    assert g.restarts == 1
    assert g.feed(hb(3, boot="b2")) == []
