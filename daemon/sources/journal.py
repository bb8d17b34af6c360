"""The folder source's verdict journal: which files already have a published verdict, across restarts.

One JSON line per published verdict, appended after publication (on the after-publish thread):
``{"name", "size", "mtime_ns", "boot_id", "seq", "verdict", "reason"}``. A file counts as recorded while its
name, size and modification time (ns) are unchanged; rewrite it and it is a new part.

Semantics (docs/reliability.md): **at-least-once**. A verdict is published first and journaled second, so a
crash between the two re-inspects that file on restart (a second verdict, under a new ``boot_id``); a crash can
never leave a file without a verdict *and* recorded. A torn last line (``kill -9`` mid-write) is skipped: that
file is re-inspected. Each record is one ``write`` on an ``O_APPEND`` descriptor, which survives the process
being killed; it is not fsynced, so a power cut may forget the last records (again: re-inspection, never a
lost part). At start the journal is compacted to the files still in the folder, so it stays as small as the
folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from daemon.logs import get_logger

log = get_logger(__name__)

Identity = tuple[int, int]  # (size, mtime_ns)


class VerdictJournal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def open(self, directory: Path) -> dict[str, Identity]:
        """Read the records, keep those whose file is still there unchanged, rewrite, open for appending."""
        recorded: dict[str, Identity] = {}
        lines: dict[str, str] = {}
        skipped = 0
        try:
            with open(self.path, encoding="utf-8", errors="surrogateescape") as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                        name, ident = str(rec["name"]), (int(rec["size"]), int(rec["mtime_ns"]))
                    except (ValueError, KeyError, TypeError):
                        skipped += 1  # a torn last line after a crash: that file is simply re-inspected
                        continue
                    recorded[name], lines[name] = ident, line if line.endswith("\n") else line + "\n"
        except FileNotFoundError:
            pass
        kept: dict[str, Identity] = {}
        for name, ident in recorded.items():
            try:
                st = os.lstat(directory / name)
            except OSError:
                continue
            if (st.st_size, st.st_mtime_ns) == ident:
                kept[name] = ident
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as fh:
            fh.writelines(lines[name] for name in kept)
        os.replace(tmp, self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))
        log.info(
            "verdict journal opened",
            path=str(self.path),
            recorded=len(kept),
            dropped=len(recorded) - len(kept),
            unreadable_lines=skipped,
        )
        return kept

    def record(self, name: str, ident: Identity, message: dict[str, Any]) -> None:
        if self._fd is None:
            return
        rec = {
            "name": name,
            "size": ident[0],
            "mtime_ns": ident[1],
            "boot_id": message.get("boot_id"),
            "seq": message.get("seq"),
            "verdict": message.get("verdict"),
            "reason": message.get("reason"),
        }
        line = json.dumps(rec, separators=(",", ":")) + "\n"  # ensure_ascii: any file name is one ASCII line
        os.write(self._fd, line.encode("ascii"))  # one write on O_APPEND: whole or (torn by a crash) skipped

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
