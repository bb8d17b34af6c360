"""The folder source: image files written into a directory (not recursive) become frames, each exactly once.

A file is read only once it is complete, which the source learns in one of two ways:
- a *close-after-write* (inotify ``IN_CLOSE_WRITE``) or a *rename into the folder* (the ``name.tmp`` →
  ``name.png`` convention; names matching ``ignore_patterns`` are never read) with no write after it;
- otherwise (polling observers, network filesystems) size and mtime unchanged for ``stable_ms``.
After reading, the byte count is checked against the file's size again; a file that changed while being read is
put back, never inspected half-written. Writers that open the same file several times to append must use the
rename convention.

``frame_id`` is the file name. Files that are not regular files (symlinks are not followed, FIFOs, devices),
too large, or unreadable still become frames — REJECT ``decode_error`` — because they stand for parts that
were not inspected; they are never retried in a loop. So are files the input policy refuses on their header
(``daemon.image_policy``: not PNG/BMP/TIFF/JPEG, a format not in ``decode.formats``, sizes out of bounds), each
with a log line. With ``move_after_verdict`` each file is moved to ``done/`` (PASS) or ``rejected/`` (REJECT)
once its verdict is published, so the folder only ever holds files without a published verdict (what a restart
with ``process_existing`` re-inspects); with a ``journal`` the files stay and the journal remembers them
(``daemon/sources/journal.py``). Either way restarts are at-least-once: see docs/reliability.md.

**A new part under an old name.** Each inspected name is remembered with the identity of the file that was
inspected (``daemon/sources/journal.py``: size, times, inode, sha256 of the bytes read). A later event for that
name (a rename over it, a rewrite in place, a writer that stalled and then finished) makes the source read it
again once it is complete: the same bytes are no new part (``touch``, ``chmod``, the same image written again:
no verdict); different bytes are, with ``frame_id`` = ``<name>/<generation>`` (``f.png/2``, ``f.png/3``, …; a
file name cannot contain ``/``, so it never collides with another file's id). With a journal the generation
continues across restarts. A name is forgotten when its file is deleted or moved away (found gone when the
source learns of it), so the memory stays as large as the folder, not as the shift; a new file under a
forgotten name is generation 1 again (``frame_id`` = the name).
"""

from __future__ import annotations

import fnmatch
import os
import stat
import threading
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from daemon.clock import SYSTEM_CLOCK, Clock
from daemon.image_policy import InputPolicy, InputRejected
from daemon.logs import get_logger
from daemon.settings import FolderSettings
from daemon.sources import Intake
from daemon.sources.journal import FileIdentity, VerdictJournal
from daemon.types import Frame, Outcome, Verdict

log = get_logger(__name__)

DONE, REJECTED = "done", "rejected"
_IDENTITIES_KEPT = 4096  # identities of files awaiting their verdict (journal, move); oldest dropped
_VANISHED = "file vanished before it could be read"


class _Inspected:
    """What was inspected under a name: the file's identity (None when it could not even be opened) and the
    generation (1 for the first part under the name, 2 for the next, …)."""

    __slots__ = ("generation", "identity")

    def __init__(self, identity: FileIdentity | None, generation: int) -> None:
        self.identity = identity
        self.generation = generation


class _Pending:
    __slots__ = ("closed", "mtime_ns", "order", "size", "t_change")

    def __init__(self, order: int, closed: bool, t_change: float) -> None:
        self.order = order  # arrival order of the first event: files are inspected in that order
        self.closed = closed
        self.size = -1
        self.mtime_ns = -1
        self.t_change = t_change


class _Events(FileSystemEventHandler):
    def __init__(self, source: FolderSource) -> None:
        self._src = source

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        kind = event.event_type
        if kind in ("created", "modified"):
            self._src.note(_str(event.src_path), closed=False)
        elif kind == "closed":  # IN_CLOSE_WRITE; our own reads cause "closed_no_write", ignored
            self._src.note(_str(event.src_path), closed=True)
        elif kind == "moved":
            self._src.forget(_str(event.src_path))
            self._src.note(_str(event.dest_path), closed=True)
        elif kind == "deleted":
            self._src.forget(_str(event.src_path))


def _str(p: str | bytes) -> str:
    return os.fsdecode(p)


class FolderSource:
    def __init__(
        self, settings: FolderSettings, *, clock: Clock = SYSTEM_CLOCK, policy: InputPolicy | None = None
    ) -> None:
        if settings.path is None:
            raise ValueError("folder source needs a path")
        self.settings = settings
        self.name = settings.name
        self.directory = Path(settings.path)
        self._clock = clock
        self._policy = policy or InputPolicy()
        self._journal = (
            VerdictJournal(Path(settings.journal), max_bytes=settings.max_file_bytes)
            if settings.journal is not None
            else None
        )
        # The journal file may live in the watched folder: it is never a part.
        self._own_names = (
            {Path(settings.journal).name}
            if settings.journal is not None
            and Path(settings.journal).parent.resolve() == self.directory.resolve()
            else set()
        )
        # frame seq → (name, identity, generation) until its verdict: for the journal and the move
        self._identity: dict[int, tuple[str, FileIdentity | None, int]] = {}
        self._stable_s = settings.stable_ms / 1000.0
        self._poll_s = settings.poll_ms / 1000.0
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._seen: dict[str, _Inspected] = {}
        self._order = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._observer: BaseObserver | None = None
        self._thread: threading.Thread | None = None
        self.seq = 0

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.name,
            "kind": "folder",
            "path": str(self.directory),
            "policy": self.settings.backpressure.value,
            "move_after_verdict": self.settings.move_after_verdict,
        }

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self, intake: Intake) -> None:
        if not self.directory.is_dir():
            raise FileNotFoundError(f"watched folder {self.directory} does not exist")
        if self.settings.move_after_verdict:
            (self.directory / DONE).mkdir(exist_ok=True)
            (self.directory / REJECTED).mkdir(exist_ok=True)
        recorded = self._journal.open(self.directory) if self._journal is not None else {}
        # Inspected before the restart: a changed file under one of these names is the next generation.
        with self._lock:
            for name, done in recorded.items():
                self._seen[name] = _Inspected(done.current or done.identity, done.generation)
        observer = PollingObserver(timeout=self._poll_s) if self.settings.use_polling else Observer()
        observer.schedule(_Events(self), str(self.directory), recursive=False)
        observer.start()  # watch first, then list: a file written in between is noted twice, not missed
        self._observer = observer
        if self.settings.process_existing:
            entries = []
            with os.scandir(self.directory) as it:
                for entry in it:
                    if entry.is_file(follow_symlinks=False) or entry.is_symlink():
                        st = entry.stat(follow_symlinks=False)
                        known = recorded.get(entry.name)
                        if known is not None and known.current is not None and known.current.stat_matches(st):
                            continue  # published before the restart (journal) and unchanged: not again
                        entries.append((st.st_mtime_ns, entry.path))
            wall_ns = self._clock.wall() * 1e9
            for mtime_ns, path in sorted(entries):
                self.note(path, closed=False, age_s=max(0.0, (wall_ns - mtime_ns) / 1e9))
        self._thread = threading.Thread(
            target=self._pump, args=(intake,), name=f"source-{self.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5.0)
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            if self._thread.is_alive():
                log.error("folder source did not stop in time", source=self.name)

    def close(self) -> None:
        """After the last verdict went through :meth:`on_verdict` (the App calls it once after-publish drained)."""
        if self._journal is not None:
            self._journal.close()

    @property
    def remembered(self) -> int:
        """Names held as already inspected (bounded by the folder's contents, not by the shift)."""
        return len(self._seen)

    @property
    def waiting(self) -> int:
        """Files noticed but not read yet (still being written, or waiting their turn). 0 right after
        :meth:`start` means the files already in the folder were all recorded or already read (tests)."""
        with self._lock:
            return len(self._pending)

    @property
    def alive(self) -> bool:
        """The pump thread runs, and so does the observer that notices new files: without it the folder would
        look healthy while no new part is ever read."""
        if self._thread is None or not self._thread.is_alive():
            return False
        return self._observer is None or self._observer.is_alive() or self._stop.is_set()

    # -- events (observer thread) ------------------------------------------------------------------------
    def note(self, path: str, *, closed: bool, age_s: float = 0.0) -> None:
        """Something happened to the file (created, written, closed, renamed into the folder). A name already
        inspected is looked at again too: :meth:`_emit` decides whether it holds a new part."""
        p = Path(path)
        if p.parent != self.directory or self._ignored(p.name) or p.name in self._own_names:
            return
        now = self._clock.monotonic()
        with self._lock:
            entry = self._pending.get(p.name)
            if entry is None:
                self._order += 1
                # A file already there at start is as old as its mtime says: an old one need not wait.
                entry = _Pending(self._order, closed, now - min(age_s, self._stable_s))
                self._pending[p.name] = entry
            else:
                entry.closed = closed  # a write after a close means the writer is back: wait again
        self._wake.set()

    def forget(self, path: str) -> None:
        """The file is gone (deleted, moved away): the name is free, a new file of that name is generation 1.
        Unless a file of that name is there again already: a polling observer reports a rename over a file as
        its deletion followed by the move, and that file is the next generation (see :meth:`note`)."""
        name = Path(path).name
        if os.path.lexists(self.directory / name):
            return
        with self._lock:
            self._pending.pop(name, None)
            self._seen.pop(name, None)

    def _ignored(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pat) for pat in self.settings.ignore_patterns)

    # -- the pump (source thread) ------------------------------------------------------------------------
    def _pump(self, intake: Intake) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    waiting = bool(self._pending)
                self._wake.wait(self._poll_s if waiting else 0.5)
                self._wake.clear()
                for name in self._ready():
                    while not intake.wait_for_room(0.2):  # block policy: the file waits on disk
                        if self._stop.is_set():
                            return
                    if self._stop.is_set():
                        return
                    self._emit(name, intake)
        except Exception:
            log.exception("folder source failed", source=self.name)
            raise

    def _ready(self) -> list[str]:
        now = self._clock.monotonic()
        with self._lock:
            candidates = sorted(self._pending.items(), key=lambda kv: kv[1].order)
        ready = []
        for name, entry in candidates:
            try:
                st = os.lstat(self.directory / name)
            except FileNotFoundError:
                self.forget(name)  # gone before it was complete (or renamed away): not a part here
                continue
            except OSError:
                ready.append(name)  # unreadable metadata: _emit turns it into a decode_error verdict
                continue
            if not stat.S_ISREG(st.st_mode):
                ready.append(name)  # symlink / FIFO / device: rejected by _emit without being followed
                continue
            if (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns):
                first_look = entry.size < 0
                entry.size, entry.mtime_ns = st.st_size, st.st_mtime_ns
                if not first_look:
                    entry.t_change = now  # it changed since the last look: the stability clock restarts
            if entry.closed or now - entry.t_change >= self._stable_s:
                ready.append(name)
        return ready

    def _emit(self, name: str, intake: Intake) -> None:
        path = self.directory / name
        data, error, ident = self._read(path)
        if data is None and error is None:
            with self._lock:  # changed while being read: not complete after all; wait for it again
                entry = self._pending.get(name)
                if entry is not None:
                    entry.closed = False
                    entry.t_change = self._clock.monotonic()
            return
        with self._lock:
            prev = self._seen.get(name)
            if prev is not None and (
                error == _VANISHED
                or (ident is not None and prev.identity is not None and prev.identity.same_content(ident))
            ):
                # No new part: an event about the file already inspected (touch, chmod, the same bytes written
                # again), or a file gone again before it could be read (no part to name).
                self._pending.pop(name, None)
                if ident is not None:
                    prev.identity = ident
                return
            generation = 1 if prev is None else prev.generation + 1
        frame_id = name if generation == 1 else f"{name}/{generation}"
        if data is not None:
            try:
                self._policy.check_encoded(data)
            except InputRejected as exc:
                data, error = None, str(exc)
        if error is not None:
            log.warning("file rejected without decoding", frame_id=frame_id, path=str(path), error=error)
        with self._lock:
            self._pending.pop(name, None)
            self._seen[name] = _Inspected(ident, generation)
            self.seq += 1
            self._identity[self.seq] = (name, ident, generation)
            if len(self._identity) > _IDENTITIES_KEPT:  # verdicts skipped by a full after-publish queue
                del self._identity[next(iter(self._identity))]
        frame = Frame(
            source=self.name,
            seq=self.seq,
            frame_id=frame_id,
            t_arrival=self._clock.monotonic(),
            t_received=self._clock.wall(),
            data=data,
            path=str(path),
            error=error,
        )
        intake.submit(frame, self.settings.backpressure)

    def _read(self, path: Path) -> tuple[bytes | None, str | None, FileIdentity | None]:
        """(bytes, None, identity with the hashes of the bytes) when complete; (None, reason, identity or None)
        for a file that will never be an image; (None, None, None) when it changed while being read."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None, _VANISHED, None
        except OSError as exc:
            if os.path.islink(path):
                return None, "symbolic link not followed", None
            return None, f"cannot open: {exc.strerror}", None
        try:
            st = os.fstat(fd)
            ident = FileIdentity.of(st)
            if not stat.S_ISREG(st.st_mode):
                return None, "not a regular file", ident
            if st.st_size > self.settings.max_file_bytes:
                return (
                    None,
                    f"file is {st.st_size} bytes, above the limit of {self.settings.max_file_bytes}",
                    ident,
                )
            chunks = []
            remaining = st.st_size + 1  # one byte more than announced reveals a file still growing
            while remaining > 0:
                chunk = os.read(fd, min(remaining, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
            data = b"".join(chunks)
            if len(data) != st.st_size or os.fstat(fd).st_size != st.st_size:
                return None, None, None
            return data, None, FileIdentity.of(st, data)
        except OSError as exc:
            return None, f"read failed: {exc.strerror}", None
        finally:
            os.close(fd)

    # -- after the verdict (after-publish thread) ---------------------------------------------------------
    def on_verdict(self, verdict: Verdict, frame: Frame, message: dict[str, Any]) -> None:
        if frame.source != self.name or frame.path is None:
            return
        with self._lock:
            entry = self._identity.pop(frame.seq, None)
        if self._journal is not None and entry is not None and entry[1] is not None:
            try:
                self._journal.record(entry[0], entry[1], entry[2], message)
            except OSError as exc:  # a full disk must not stop verdicts: the file is re-inspected later
                log.warning("could not journal a verdict", frame_id=frame.frame_id, error=str(exc))
        if not self.settings.move_after_verdict:
            return
        sub = DONE if verdict.outcome is Outcome.PASS else REJECTED
        src = Path(frame.path)
        ident = entry[1] if entry is not None else None
        if ident is not None and ident.ino is not None:
            try:
                replaced = not ident.stat_matches(os.lstat(src))
            except OSError:
                replaced = False  # gone: os.replace below says so
            if replaced:  # a new part under the name since it was read: it waits for its own verdict
                log.warning("inspected file was replaced before its move; left in place", path=str(src))
                return
        try:
            os.replace(src, self.directory / sub / src.name)
        except OSError as exc:
            log.warning("could not move inspected file", path=str(src), to=sub, error=str(exc))
            return
        with self._lock:  # the name is free again: a new file with it is a new part
            self._seen.pop(src.name, None)
