"""The folder source's verdict journal: which files already have a published verdict, across restarts.

One JSON line per published verdict, appended after publication (on the after-publish thread):
``{"v": 2, "name", "generation", "size", "mtime_ns", "ino", "ctime_ns", "sha256", "edges", "boot_id", "seq",
"verdict", "reason"}``. ``generation`` counts the parts inspected under that name (the verdict's ``frame_id``
is the name for the first, ``name/2``, ``name/3`` … after). ``sha256`` is the hash of the whole file as it was
inspected (``null`` when it could not be read), ``edges`` the hash of its size and first and last
:data:`EDGE_BYTES`.

**Which file is "the same" at a restart** (:func:`same_file`): a different size is a new part. Otherwise, when
inode, mtime and ctime are all unchanged, the edge hash decides (4 KiB read from each end, not the file):
a rewrite in place changes ctime, unless it fell within the same tick of a coarse clock (FAT, SMB, some NFS
servers: 1–2 s) as the inspected version, and then the edges catch it unless both images agree in their first
and last 4 KiB (for a PNG only by a checksum collision: its last bytes hold the zlib checksum of every pixel
and the last chunk's CRC; for an uncompressed BMP/TIFF when its top and bottom rows are pixel-identical).
When anything of the stat changed (a copy, a restore, ``touch``, a rename over it) the whole file is hashed
and compared. An unchanged file is never re-inspected, whatever its timestamps say.

**Older journals** (version 1: ``name, size, mtime_ns`` only) are migrated at start: a record whose size and
mtime still match is taken as recorded, exactly as before (no re-inspection), and rewritten with the hashes of
the file as it is now. Version-1 readers ignore the new keys (a rollback keeps working).

Semantics (docs/reliability.md): **at-least-once**. A verdict is published first and journaled second, so a
crash between the two re-inspects that file on restart (a second verdict, under a new ``boot_id``, with the
same ``frame_id``); a crash can never leave a file without a verdict *and* recorded. A torn last line
(``kill -9`` mid-write) is skipped: that file is re-inspected. Each record is one ``write`` on an
``O_APPEND`` descriptor, which survives the process being killed; it is not fsynced, so a power cut may forget
the last records (again: re-inspection, never a lost part). At start the journal is compacted to the files
still in the folder (one line each, the latest), so it stays as small as the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from daemon.logs import get_logger

log = get_logger(__name__)

EDGE_BYTES = 4096
VERSION = 2
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """What a file was when it was read. ``ino``/``ctime_ns``/hashes are None in version-1 records."""

    size: int
    mtime_ns: int
    ino: int | None = None
    ctime_ns: int | None = None
    sha256: str | None = None  # of the whole file; None when it was not read (unreadable, too large, …)
    edges: str | None = None  # of its size + first and last EDGE_BYTES

    @classmethod
    def of(cls, st: os.stat_result, data: bytes | None = None) -> FileIdentity:
        if data is None:
            return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
        return cls(
            st.st_size,
            st.st_mtime_ns,
            st.st_ino,
            st.st_ctime_ns,
            hashlib.sha256(data).hexdigest(),
            edge_digest(len(data), data[:EDGE_BYTES], data[-EDGE_BYTES:]),
        )

    def stat_matches(self, st: os.stat_result) -> bool:
        """Size, mtime and (when recorded) inode and ctime all as recorded."""
        return (
            (self.size, self.mtime_ns) == (st.st_size, st.st_mtime_ns)
            and self.ino in (None, st.st_ino)
            and self.ctime_ns in (None, st.st_ctime_ns)
        )

    def same_content(self, other: FileIdentity) -> bool:
        """Within a run, both read in full: the hashes decide; otherwise (one was not readable) the stat."""
        if self.sha256 is not None and other.sha256 is not None:
            return self.size == other.size and self.sha256 == other.sha256
        return (self.size, self.mtime_ns, self.ino, self.ctime_ns) == (
            other.size,
            other.mtime_ns,
            other.ino,
            other.ctime_ns,
        )


def edge_digest(size: int, head: bytes, tail: bytes) -> str:
    h = hashlib.sha256(size.to_bytes(8, "little"))
    h.update(head)
    h.update(tail)
    return h.hexdigest()


def _file_edges(fd: int, size: int) -> str:
    head = os.pread(fd, EDGE_BYTES, 0)
    tail = os.pread(fd, EDGE_BYTES, max(0, size - EDGE_BYTES))
    return edge_digest(size, head, tail)


def _file_sha256(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, _HASH_CHUNK, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def same_file(path: Path, recorded: FileIdentity, max_bytes: int) -> FileIdentity | None:
    """The file's identity now when it is still the recorded (inspected) one, else None (a new part).

    Reads at most ``2 × EDGE_BYTES`` when the stat is unchanged, the whole file (up to ``max_bytes``) when it is
    not. Any error reading it counts as changed (the folder source then inspects it: at-least-once)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        try:  # a symlink, FIFO, … is recorded by its stat alone (it was never read)
            st = os.lstat(path)
        except OSError:
            return None
        return FileIdentity.of(st) if recorded.sha256 is None and recorded.stat_matches(st) else None
    try:
        st = os.fstat(fd)
        if st.st_size != recorded.size:
            return None
        if not stat.S_ISREG(st.st_mode) or recorded.sha256 is None:
            if recorded.ino is None:  # version 1: size and mtime decided, as they did then; now migrated
                if st.st_mtime_ns != recorded.mtime_ns:
                    return None
                readable = stat.S_ISREG(st.st_mode) and st.st_size <= max_bytes
                return _identity(fd, st, full=True) if readable else FileIdentity.of(st)
            return FileIdentity.of(st) if recorded.stat_matches(st) else None
        if recorded.stat_matches(st):
            edges = _file_edges(fd, st.st_size)
            if recorded.edges is not None and edges != recorded.edges:
                return None
            return replace(recorded, edges=edges)
        if st.st_size > max_bytes:
            return None
        now = _identity(fd, st, full=True)
        return now if now.sha256 == recorded.sha256 else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _identity(fd: int, st: os.stat_result, *, full: bool) -> FileIdentity:
    return FileIdentity(
        st.st_size,
        st.st_mtime_ns,
        st.st_ino,
        st.st_ctime_ns,
        _file_sha256(fd) if full else None,
        _file_edges(fd, st.st_size),
    )


@dataclass(frozen=True, slots=True)
class Recorded:
    """A journal record of a file still in the folder. ``current``: its identity now when it is still the
    inspected file (not to be inspected again), None when it was replaced (a new part, ``generation`` + 1)."""

    identity: FileIdentity
    generation: int
    current: FileIdentity | None


class VerdictJournal:
    def __init__(self, path: Path, *, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._fd: int | None = None

    def open(self, directory: Path) -> dict[str, Recorded]:
        """Read the records, judge each file still there (:func:`same_file`), rewrite, open for appending."""
        records: dict[str, dict[str, Any]] = {}
        skipped = 0
        try:
            with open(self.path, encoding="utf-8", errors="surrogateescape") as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                        _identity_of(rec)
                        records[str(rec["name"])] = rec
                    except (ValueError, KeyError, TypeError, AttributeError):
                        skipped += 1  # a torn last line after a crash: that file is simply re-inspected
        except FileNotFoundError:
            pass
        out: dict[str, Recorded] = {}
        lines: list[str] = []
        replaced = migrated = 0
        for name, rec in records.items():
            ident, generation = _identity_of(rec), _generation(rec)
            if not _plain_name(name) or not os.path.lexists(directory / name):
                continue  # gone: the record goes with it (compaction)
            current = same_file(directory / name, ident, self.max_bytes)
            if current is None:
                replaced += 1  # kept, so that the next part under this name gets the next generation
            elif current != ident:
                migrated += ident.ino is None
                rec = rec | _identity_fields(current) | {"v": VERSION, "generation": generation}
            out[name] = Recorded(ident, generation, current)
            lines.append(json.dumps(rec, separators=(",", ":")) + "\n")
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", encoding="ascii") as fh:
            fh.writelines(lines)
        os.replace(tmp, self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))
        log.info(
            "verdict journal opened",
            path=str(self.path),
            recorded=len(out) - replaced,
            replaced=replaced,
            migrated=migrated,
            dropped=len(records) - len(out),
            unreadable_lines=skipped,
        )
        return out

    def record(self, name: str, ident: FileIdentity, generation: int, message: dict[str, Any]) -> None:
        if self._fd is None:
            return
        rec = {
            "v": VERSION,
            "name": name,
            "generation": generation,
            **_identity_fields(ident),
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


def _identity_fields(ident: FileIdentity) -> dict[str, Any]:
    return {
        "size": ident.size,
        "mtime_ns": ident.mtime_ns,
        "ino": ident.ino,
        "ctime_ns": ident.ctime_ns,
        "sha256": ident.sha256,
        "edges": ident.edges,
    }


def _identity_of(rec: dict[str, Any]) -> FileIdentity:
    def opt_int(key: str) -> int | None:
        value = rec.get(key)
        return None if value is None else int(value)

    def opt_str(key: str) -> str | None:
        value = rec.get(key)
        return None if value is None else str(value)

    return FileIdentity(
        int(rec["size"]),
        int(rec["mtime_ns"]),
        opt_int("ino"),
        opt_int("ctime_ns"),
        opt_str("sha256"),
        opt_str("edges"),
    )


def _plain_name(name: str) -> bool:
    """A name of a file directly in the folder (a hand-edited journal must not point elsewhere)."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def _generation(rec: dict[str, Any]) -> int:
    try:
        return max(1, int(rec.get("generation", 1)))
    except (TypeError, ValueError):
        return 1
