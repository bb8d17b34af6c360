"""Where the daemon's time goes in one phase: py-spy attached to it, every thread sampled, summarised.

``inspectd bench --profile DIR`` attaches two samplers to the daemon for a phase (saturation, and the lowest
line rate): one records every thread that is not idle, one only the thread holding the GIL. Their raw stacks
(``DIR/PHASE.txt``, ``DIR/PHASE-gil.txt``; collapsed "frame;frame;… count" lines, any flame-graph tool reads
them) are summarised into the result: how busy each thread was, the share of the GIL held, and the top
functions by samples where they were the innermost frame (self) and anywhere on the stack (inclusive, this
project's code only). py-spy (``pip install py-spy``) reads the process from outside, without pausing it
(``--nonblocking``); attaching needs ptrace rights over the daemon (root, or the same user with
``kernel.yama.ptrace_scope`` 0).
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

RATE_HZ = 100
TOP = 12
_PROJECT = re.compile(r"\((daemon|engine|bench|inspectd)/")
_LINE = re.compile(r":\d+\)$")


def py_spy() -> str:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        raise FileNotFoundError("--profile needs py-spy (pip install py-spy)")
    return exe


class PhaseProfile:
    """Context manager: the samplers run for ``seconds`` (or until the block ends) against ``pid``."""

    def __init__(self, directory: Path, name: str, pid: int, seconds: float) -> None:
        self.directory = directory
        self.name = name
        self.pid = pid
        self.seconds = max(1, round(seconds))
        self.summary: dict[str, Any] = {}
        self._procs: list[tuple[Path, subprocess.Popen[bytes]]] = []

    def __enter__(self) -> PhaseProfile:
        self.directory.mkdir(parents=True, exist_ok=True)
        exe = py_spy()
        for suffix, extra in (("", []), ("-gil", ["--gil"])):
            out = self.directory / f"{self.name}{suffix}.txt"
            cmd = [
                exe,
                "record",
                "--pid",
                str(self.pid),
                "--threads",
                "--nonblocking",
                "--rate",
                str(RATE_HZ),
            ]
            cmd += [*extra, "--format", "raw", "--duration", str(self.seconds), "--output", str(out)]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self._procs.append((out, proc))
        return self

    def __exit__(self, *exc: object) -> None:
        for _, proc in self._procs:
            try:
                proc.wait(timeout=self.seconds + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
        (busy, _), (gil, _) = self._procs
        if busy.exists():
            self.summary = summarise(busy.read_text(), self.seconds * RATE_HZ)
            self.summary["raw"] = str(busy)
        if gil.exists() and self.summary:
            samples = sum(n for _, n in _stacks(gil.read_text()))
            self.summary["gil_held_share"] = round(samples / (self.seconds * RATE_HZ), 3)
            self.summary["gil_top_self"] = _top(_self_counts(gil.read_text()), samples)


def _stacks(text: str) -> list[tuple[list[str], int]]:
    out = []
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if stack and count.isdigit():
            out.append((stack.split(";"), int(count)))
    return out


def _thread(frame: str) -> str:
    """``thread (1234): inference-1`` → ``inference``; ``preprocess_0`` → ``preprocess`` (a pool, together)."""
    name = frame.split(": ", 1)[-1]
    return re.sub(r"(_|-)\d+$", "", name)


def _self_counts(text: str) -> collections.Counter[str]:
    c: collections.Counter[str] = collections.Counter()
    for frames, n in _stacks(text):
        if len(frames) > 1:
            c[_LINE.sub(")", frames[-1])] += n
    return c


def _top(counts: collections.Counter[str], total: int) -> list[dict[str, Any]]:
    return (
        [{"function": k, "share": round(v / total, 3)} for k, v in counts.most_common(TOP)] if total else []
    )


def summarise(text: str, possible: int) -> dict[str, Any]:
    """``possible``: samples one always-busy thread would give (seconds × rate)."""
    threads: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for frames, n in _stacks(text):
        total += n
        threads[_thread(frames[0])] += n
        for f in {_LINE.sub(")", f) for f in frames[1:]}:
            if _PROJECT.search(f):
                inclusive[f] += n
    return {
        "samples": total,
        "threads_busy": {t: round(n / possible, 3) for t, n in threads.most_common()},
        "top_self": _top(_self_counts(text), total),
        "top_inclusive": _top(inclusive, total),
    }
