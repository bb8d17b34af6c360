"""The subscriber's side of ``seq``: which verdicts a line controller has seen, and which it never will.

The daemon numbers its verdicts ``seq`` = 1, 2, 3, … per ``boot_id`` (one per process start) and repeats the
last number in every heartbeat (``seq_last``). A subscriber that follows both knows, for every part, whether its
verdict arrived:

- a verdict whose ``seq`` is more than one above the last one accounted for means the numbers between were
  published and lost on the way (a slow subscriber beyond ``publisher.sndhwm``, a network cut): a **gap**;
- a heartbeat whose ``seq_last`` is above the last one accounted for is a gap too, so a verdict lost right
  before a quiet period is noticed at the next heartbeat instead of at the next part;
- a new ``boot_id`` is a **restart**: ``seq`` begins again at 1, so a new boot first seen above 1 means its
  first verdicts were missed (a gap from 1);
- the first message of all has nothing before it to compare with: a subscriber that joins mid-stream starts
  from there (no gap);
- a verdict at or below what was already accounted for is a repeat or out of order (ZeroMQ's PUB/SUB neither
  repeats nor reorders, so this is only ever a bug somewhere): counted and noted, never a gap.

Every subscriber of the verdict stream uses this one rule: ``inspectd watch``, the replay's and the benchmark's
own subscribers, the tests, and ``examples/plc_subscriber.py``. Standard library only, so a PLC gateway can
import it (``from daemon.sequence import SequenceTracker``) with nothing else of inspectd.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["SequenceTracker"]


class SequenceTracker:
    """Feed it every message of one line (verdicts and heartbeats, in arrival order); it keeps the account.

    ``feed`` returns the notes a human should read about that message (gaps, restarts, repeats), in the order
    they happened; the running totals are attributes.
    """

    def __init__(self) -> None:
        self.boot_id: str | None = None  # the boot being followed
        self.seq_last: int | None = None  # highest seq accounted for (seen or missed); None: nothing seen yet
        self.seen = 0  # verdict messages received, all boots
        self.gaps: list[tuple[int, int]] = []  # (first missing seq, last missing seq), in order, all boots
        self.missed = 0  # verdicts inside those gaps
        self.restarts = 0  # boot_id changes after the first boot seen
        self.out_of_order = 0  # verdicts at or below seq_last: repeated or late

    def feed(self, msg: Mapping[str, Any]) -> list[str]:
        """Account for one decoded message; messages of another ``type`` are ignored (new kinds may come)."""
        kind = msg.get("type")
        if kind not in ("verdict", "heartbeat"):
            return []
        notes: list[str] = []
        boot_id = str(msg["boot_id"])
        if boot_id != self.boot_id:
            if self.boot_id is not None:
                self.restarts += 1
                notes.append(f"daemon restarted: boot_id {self.boot_id} -> {boot_id}")
                self.seq_last = 0  # a new boot starts at seq 1: anything before what we see was missed
            self.boot_id = boot_id
        is_verdict = kind == "verdict"
        seq = int(msg["seq"] if is_verdict else msg["seq_last"])
        must_have_seen = seq - 1 if is_verdict else seq  # every verdict up to this one was published
        if self.seq_last is not None and must_have_seen > self.seq_last:
            first = self.seq_last + 1
            self.gaps.append((first, must_have_seen))
            self.missed += must_have_seen - self.seq_last
            notes.append(f"GAP: missed seq {first}..{must_have_seen}")
        if is_verdict:
            self.seen += 1
            if self.seq_last is not None and seq <= self.seq_last:
                self.out_of_order += 1
                notes.append(f"seq {seq} repeated or out of order (after {self.seq_last})")
        self.seq_last = max(seq, self.seq_last or 0)
        return notes
