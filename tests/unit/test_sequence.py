"""``daemon.sequence.SequenceTracker``: the one rule by which every subscriber tells lost verdicts and restarts."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon.sequence import SequenceTracker

REPO = Path(__file__).resolve().parents[2]


def v(seq: int, boot: str = "b1") -> dict[str, Any]:
    return {"type": "verdict", "boot_id": boot, "seq": seq}


def hb(seq_last: int, boot: str = "b1") -> dict[str, Any]:
    return {"type": "heartbeat", "boot_id": boot, "seq_last": seq_last}


def feed_all(t: SequenceTracker, msgs: list[dict[str, Any]]) -> list[str]:
    return [note for m in msgs for note in t.feed(m)]


# -- in order ------------------------------------------------------------------------------------------------
def test_contiguous_stream_has_no_gaps() -> None:
    t = SequenceTracker()
    for m in [hb(0), v(1), v(2), hb(2), v(3)]:
        assert t.feed(m) == []
    assert (t.gaps, t.missed, t.restarts, t.out_of_order) == ([], 0, 0, 0)
    assert (t.boot_id, t.seq_last, t.seen) == ("b1", 3, 3)


def test_heartbeats_alone_are_no_gap_and_count_no_verdict() -> None:
    t = SequenceTracker()
    assert feed_all(t, [hb(0), hb(0), hb(0)]) == []
    assert (t.seq_last, t.seen, t.gaps) == (0, 0, [])


def test_the_daemons_own_messages_round_trip() -> None:
    import json

    from daemon.types import Outcome, Reason, Verdict
    from daemon.wire import encode, heartbeat_message, verdict_message

    def verdict(seq: int) -> dict[str, Any]:
        out = Verdict(f"f{seq}", "cam", Outcome.PASS, Reason.MODEL, 0.1, 0.5, "m@1", None, 0.0)
        msg = verdict_message(out, line="l", boot_id="3f9c", seq=seq, t_published=1.0, latency_ms=1.0)
        return dict(json.loads(encode(msg)))

    def beat(seq_last: int) -> dict[str, Any]:
        msg = heartbeat_message(line="l", boot_id="3f9c", seq_last=seq_last, t_published=1.0, ready=True)
        return dict(json.loads(encode(msg)))

    t = SequenceTracker()
    assert feed_all(t, [beat(0), verdict(1), verdict(2), beat(2)]) == []
    assert t.feed(beat(4)) == ["GAP: missed seq 3..4"]
    assert (t.boot_id, t.seen, t.gaps) == ("3f9c", 2, [(3, 4)])


def test_unknown_message_types_are_ignored() -> None:
    t = SequenceTracker()
    t.feed(v(1))
    assert t.feed({"type": "something-new", "boot_id": "other", "seq": 99}) == []
    assert (t.boot_id, t.seq_last, t.restarts) == ("b1", 1, 0)


# -- gaps ----------------------------------------------------------------------------------------------------
def test_a_gap_between_verdicts() -> None:
    t = SequenceTracker()
    assert feed_all(t, [v(1), v(2)]) == []
    assert t.feed(v(5)) == ["GAP: missed seq 3..4"]
    assert t.feed(v(6)) == []
    assert (t.gaps, t.missed, t.seen, t.seq_last) == ([(3, 4)], 2, 4, 6)


def test_a_single_lost_verdict() -> None:
    t = SequenceTracker()
    feed_all(t, [v(1)])
    assert t.feed(v(3)) == ["GAP: missed seq 2..2"]
    assert (t.gaps, t.missed) == ([(2, 2)], 1)


def test_a_gap_noticed_through_a_heartbeat_is_not_reported_again() -> None:
    t = SequenceTracker()
    feed_all(t, [v(1), v(2)])
    assert t.feed(hb(4)) == ["GAP: missed seq 3..4"]  # lost right before a quiet period
    assert t.feed(hb(4)) == []
    assert t.feed(v(5)) == []  # the next verdict is in order after what the heartbeat accounted for
    assert (t.gaps, t.missed, t.seen) == ([(3, 4)], 2, 3)


def test_joining_mid_stream_is_not_a_gap_but_a_hole_later_is() -> None:
    t = SequenceTracker()
    assert t.feed(v(41)) == []
    assert t.feed(v(44)) == ["GAP: missed seq 42..43"]
    assert t.feed(hb(46)) == ["GAP: missed seq 45..46"]  # lost right before a quiet period
    assert t.gaps == [(42, 43), (45, 46)] and t.missed == 4


def test_joining_mid_stream_on_a_heartbeat() -> None:
    t = SequenceTracker()
    assert t.feed(hb(100)) == []
    assert t.feed(v(101)) == []
    assert t.feed(v(103)) == ["GAP: missed seq 102..102"]


# -- restarts ------------------------------------------------------------------------------------------------
def test_restart_resets_seq_and_detects_lost_first_verdicts() -> None:
    t = SequenceTracker()
    t.feed(v(1))
    t.feed(v(2))
    notes = t.feed(v(3, boot="b2"))
    assert notes == ["daemon restarted: boot_id b1 -> b2", "GAP: missed seq 1..2"]
    assert t.restarts == 1 and t.boot_id == "b2" and t.gaps == [(1, 2)]
    assert t.feed(hb(3, boot="b2")) == []


def test_restart_seen_from_its_first_heartbeat_is_no_gap() -> None:
    t = SequenceTracker()
    feed_all(t, [v(7), v(8)])
    assert t.feed(hb(0, boot="b2")) == ["daemon restarted: boot_id b1 -> b2"]
    assert feed_all(t, [v(1, boot="b2"), v(2, boot="b2")]) == []
    assert (t.restarts, t.gaps, t.seen, t.seq_last) == (1, [], 4, 2)


def test_restart_whose_first_message_is_a_heartbeat_above_zero() -> None:
    t = SequenceTracker()
    t.feed(v(5))
    assert t.feed(hb(3, boot="b2")) == ["daemon restarted: boot_id b1 -> b2", "GAP: missed seq 1..3"]


def test_a_lower_seq_after_a_restart_is_in_order() -> None:
    t = SequenceTracker()
    feed_all(t, [v(1000), v(1001)])
    assert feed_all(t, [v(1, boot="b2"), v(2, boot="b2")]) == ["daemon restarted: boot_id b1 -> b2"]
    assert t.out_of_order == 0 and t.gaps == []


def test_every_restart_counts_and_gaps_accumulate_over_boots() -> None:
    t = SequenceTracker()
    feed_all(t, [v(1), v(3), v(1, "b2"), v(2, "b2"), v(2, "b3")])
    assert t.restarts == 2 and t.gaps == [(2, 2), (1, 1)] and t.missed == 2


# -- repeats and disorder --------------------------------------------------------------------------------------
def test_a_repeated_verdict_is_out_of_order_not_a_gap() -> None:
    t = SequenceTracker()
    feed_all(t, [v(1), v(2)])
    assert t.feed(v(2)) == ["seq 2 repeated or out of order (after 2)"]
    assert t.feed(v(3)) == []
    assert (t.out_of_order, t.gaps, t.seq_last, t.seen) == (1, [], 3, 4)


def test_a_late_verdict_does_not_move_the_account_back() -> None:
    t = SequenceTracker()
    feed_all(t, [v(1), v(2)])
    assert t.feed(v(4)) == ["GAP: missed seq 3..3"]
    assert t.feed(v(3)) == ["seq 3 repeated or out of order (after 4)"]
    assert t.feed(v(5)) == []  # continues after the highest seq, not after the late one
    assert (t.gaps, t.out_of_order, t.seq_last) == ([(3, 3)], 1, 5)


def test_an_older_heartbeat_is_no_note() -> None:
    t = SequenceTracker()
    feed_all(t, [v(1), v(2), v(3)])
    assert t.feed(hb(2)) == [] and t.seq_last == 3


@pytest.mark.parametrize("seed", range(5))
def test_random_losses_are_exactly_the_gaps(seed: int) -> None:
    import random

    rng = random.Random(seed)
    t = SequenceTracker()
    t.feed(hb(0))
    lost: set[int] = set()
    for seq in range(1, 300):
        if rng.random() < 0.1:
            lost.add(seq)
        else:
            t.feed(v(seq))
        if rng.random() < 0.05:
            t.feed(hb(seq))
    t.feed(hb(299))
    found = {s for a, b in t.gaps for s in range(a, b + 1)}
    assert found == lost and t.missed == len(lost) and t.seen == 299 - len(lost)


# -- the README's subscriber is the example, and runs --------------------------------------------------------
def test_readme_reproduces_the_example_subscriber_verbatim() -> None:
    example = (REPO / "examples" / "plc_subscriber.py").read_text(encoding="utf-8")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Verdicts on the wire") :]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None
    body = example[example.index("import json") :]
    assert block.group(1) == body
    assert len([ln for ln in body.splitlines() if ln.strip()]) <= 25  # "a PLC gateway in about 20 lines"
    tree = ast.parse(example)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported == {"json", "sys", "zmq", "daemon.sequence"}


def test_daemon_sequence_needs_only_the_standard_library() -> None:
    code = (
        "import sys\n"
        "import daemon.sequence\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'numpy', 'zmq', 'pydantic', 'structlog', 'prometheus_client', 'cv2', 'onnxruntime'})\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
    tree = ast.parse((REPO / "daemon" / "sequence.py").read_text(encoding="utf-8"))
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert modules <= {"__future__", "collections.abc", "typing"}
