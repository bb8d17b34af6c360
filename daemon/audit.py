"""The audit archive: REJECT images (and a sample of PASS) with the published verdict as a JSON sidecar.

Runs on the after-publish thread, never in the verdict path. Names are ``<UTC time>_<seq>_<safe frame id>``:
the frame id is reduced to ``[A-Za-z0-9._-]`` and cannot start with a dot, so no id can climb out of the
archive (``../``), hide a file, or collide across boots (the seq and time come first). The archive keeps
itself under ``max_bytes`` by deleting its oldest entries, tracked in memory after one scan at start.

Shadow scoring (daemon/shadow.py) keeps the frames on which a candidate disagreed with production here too,
from its own thread: ``<UTC time>_shadow_<n>_<safe frame id>``, the image and a sidecar with both verdicts.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from daemon.logs import get_logger
from daemon.settings import AuditSettings
from daemon.types import Frame, Outcome, Verdict

log = get_logger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"BM", "bmp"),
    (b"\xff\xd8\xff", "jpg"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
)


def safe_name(frame_id: str, max_chars: int = 80) -> str:
    """A file-name fragment derived from an untrusted frame id: no separators, no leading dots, bounded."""
    name = _UNSAFE.sub("_", frame_id).lstrip(".")[:max_chars]
    return name or "frame"


def sniff_extension(data: bytes | memoryview) -> str:
    head = bytes(data[:8])
    for magic, ext in _MAGIC:
        if head.startswith(magic):
            return ext
    return "bin"


class AuditArchive:
    def __init__(self, settings: AuditSettings, *, rng: random.Random | None = None) -> None:
        if settings.path is None:
            raise ValueError("audit archive needs a path")
        self.settings = settings
        self.directory = Path(settings.path)
        self._rng = rng or random.Random()
        # One entry = the files of one verdict (image + sidecar), deleted together, oldest first.
        self._entries: collections.deque[tuple[list[Path], int]] = collections.deque()
        self._total = 0
        self._lock = threading.Lock()  # the after-publish thread and the shadow thread both write
        self._shadow_n = 0

    def open(self) -> None:
        """Create the directory and index what an earlier run left (oldest first) so the cap covers it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        groups: dict[str, tuple[int, list[Path], int]] = {}
        with os.scandir(self.directory) as it:
            for e in it:
                if e.is_file(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    stem = Path(e.name).stem
                    t, paths, size = groups.get(stem, (0, [], 0))
                    groups[stem] = (max(t, st.st_mtime_ns), [*paths, Path(e.path)], size + st.st_size)
        for _, (_, paths, size) in sorted(groups.items(), key=lambda kv: (kv[1][0], kv[0])):
            self._entries.append((paths, size))
            self._total += size
        self._enforce_cap()

    @property
    def total_bytes(self) -> int:
        return self._total

    def wants(self, verdict: Verdict) -> bool:
        if verdict.outcome is Outcome.REJECT:
            return True
        rate = self.settings.pass_sample_rate
        return rate > 0 and self._rng.random() < rate

    def on_verdict(self, verdict: Verdict, frame: Frame, message: dict[str, Any]) -> None:
        if not self.wants(verdict):
            return
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(message.get("t_published", time.time())))
        base = f"{stamp}_{message.get('seq', 0):09d}_{safe_name(frame.frame_id)}"
        sidecar = dict(message, source=frame.source, label=frame.label, timings_ms=verdict.timings_ms)
        self._write(base, frame, sidecar)

    def keep_disagreement(self, frame: Frame, production: Verdict, candidate: Verdict, kind: str) -> None:
        """A frame on which a shadowing candidate disagreed with production: the image and both verdicts."""
        with self._lock:
            self._shadow_n += 1
            n = self._shadow_n
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        base = f"{stamp}_shadow_{n:09d}_{safe_name(frame.frame_id)}"
        sidecar = {
            "type": "shadow_disagreement",
            "kind": kind,
            "frame_id": frame.frame_id,
            "source": frame.source,
            "label": frame.label,
            "production": _verdict_record(production),
            "candidate": _verdict_record(candidate),
        }
        self._write(base, frame, sidecar)

    def _write(self, base: str, frame: Frame, sidecar: dict[str, Any]) -> None:
        image_bytes, ext = self._image_bytes(frame)
        files = [(self.directory / f"{base}.json", json.dumps(sidecar, indent=1, default=str).encode())]
        if image_bytes is not None:
            files.insert(0, (self.directory / f"{base}.{ext}", image_bytes))
        for path, data in files:
            _write_atomic(path, data)
        with self._lock:
            self._entries.append(([p for p, _ in files], sum(len(d) for _, d in files)))
            self._total += self._entries[-1][1]
            self._enforce_cap()

    def _image_bytes(self, frame: Frame) -> tuple[bytes | None, str]:
        if frame.data is not None:  # the bytes exactly as received: what the model was given
            return bytes(frame.data), sniff_extension(frame.data)
        if frame.image is not None:
            img = np.ascontiguousarray(frame.image)
            ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
            if ok:
                return buf.tobytes(), "png"
        return None, "bin"

    def _enforce_cap(self) -> None:
        while self._total > self.settings.max_bytes and self._entries:
            paths, size = self._entries.popleft()
            for path in paths:
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("audit archive: cannot delete old entry", path=str(path), error=str(exc))
            self._total -= size


def _verdict_record(v: Verdict) -> dict[str, Any]:
    return {
        "model": v.model,
        "verdict": v.outcome.value,
        "reason": v.reason.value,
        "score": v.score,
        "threshold": v.threshold,
        "detail": v.detail,
    }


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # a reader never sees half an image
    tmp.write_bytes(data)
    tmp.replace(path)
