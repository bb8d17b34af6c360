"""Notice the model package being replaced on disk while the daemon serves, and (when asked) load it.

What production decides with never changes because a file changed: a deployment that copies a new package
over the old one must not change verdicts half-way through a shift, and a half-copied file must not crash
anything. What the watcher does, by ``model.watch_action``:

- ``log`` (the default): say so. A warning naming the model in production and the state on disk,
  ``inspectd_model_package_changed`` = 1 while the package on disk differs from production's, and
  ``inspectd_model_package_changes_total``.
- ``load`` / ``shadow``: that too, and once the package on disk is consistent (its ``model.onnx`` matches its
  ``model.json``) load it as the candidate, beside production (daemon/lifecycle.py: verified, checked and warmed
  up; with ``shadow`` it then shadow-scores production's frames). Promoting it stays an operator's decision
  (``inspectd model promote``). A package that is refused is not tried again until it changes again.

A cheap ``stat`` of ``model.onnx`` and ``model.json`` (following a ``current -> v7`` symlink) every
``model.watch_s``; only when that changes are the files hashed, on this thread, never on the verdict path.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from daemon.logs import get_logger
from daemon.models import LoadInProgress, ModelError
from engine.package import META_NAME, ONNX_NAME, sha256_file

log = get_logger(__name__)

_Stat = tuple[int, int, int, int] | None  # (device, inode, size, mtime_ns) or None when missing
Served = tuple[str, str, str]  # production's (ONNX sha256, model.json sha256, model id)


def _stat(path: Path) -> _Stat:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _sha_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


class PackageWatcher:
    def __init__(
        self,
        directory: Path,
        served: Callable[[], Served],
        registry: CollectorRegistry,
        line: str,
        *,
        interval_s: float,
        on_new: Callable[[Path], None] | None = None,
    ) -> None:
        """``served``: what production is now; ``on_new``: load a consistent new package in ``directory`` (a
        ModelError means refused; LoadInProgress: try again at the next look)."""
        self.directory = Path(directory)
        self.interval_s = interval_s
        self.line = line
        self._served = served
        self._on_new = on_new
        self._onnx, self._meta = self.directory / ONNX_NAME, self.directory / META_NAME
        onnx_sha, json_sha, _ = served()
        self._disk: tuple[str | None, str | None] = (onnx_sha, json_sha)  # as loaded at start
        self._offered: tuple[str | None, str | None] = self._disk  # the last state handed to on_new
        self._fingerprint: tuple[_Stat, _Stat] | None = self._stats()
        self.changed = False
        self.changed_gauge = Gauge(
            "inspectd_model_package_changed",
            "1 while the model package on disk differs from the one in production.",
            ["line"],
            registry=registry,
        )
        self.changes = Counter(
            "inspectd_model_package_changes",
            "Times the model package on disk was seen to change while serving.",
            ["line"],
            registry=registry,
        )
        self.changed_gauge.labels(line).set(0)
        self.changes.labels(line)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _stats(self) -> tuple[_Stat, _Stat]:
        return _stat(self._onnx), _stat(self._meta)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="package-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # never take the daemon down over a check that only informs
                log.exception("model package check failed", path=str(self.directory))

    def check(self) -> bool:
        """One look at the package on disk; True when it differs from production's."""
        fingerprint = self._stats()
        seen = fingerprint != self._fingerprint
        if seen:
            self._fingerprint = fingerprint
            self._disk = (_sha_or_none(self._onnx), _sha_or_none(self._meta))
        onnx_sha, json_sha, model_id = self._served()
        changed = self._disk != (onnx_sha, json_sha)
        if seen and changed:
            self.changes.labels(self.line).inc()
            on_disk = self._describe_on_disk(self._disk[0])
            log.warning(
                "model package changed on disk; production unchanged"
                + ("" if self._on_new else " (inspectd model load DIR, or model.watch_action = load)"),
                path=str(self.directory),
                serving=model_id,
                on_disk=on_disk,
            )
            if self._on_new is not None and on_disk["state"] == "consistent" and self._disk != self._offered:
                self._load()
        elif seen and self.changed:
            log.info("model package on disk is the served one again", path=str(self.directory))
        self.changed = changed
        self.changed_gauge.labels(self.line).set(1 if changed else 0)
        return changed

    def _load(self) -> None:
        assert self._on_new is not None
        try:
            self._on_new(self.directory)
        except LoadInProgress:
            self._fingerprint = None  # look again next time
            return
        except ModelError:
            pass  # refused (logged by the lifecycle): not tried again until the package changes
        self._offered = self._disk

    def _describe_on_disk(self, onnx_sha: str | None) -> dict[str, Any]:
        """What is there now, including whether it is even a consistent package (a copy may be half done)."""
        if onnx_sha is None:
            return {"state": f"{ONNX_NAME} missing"}
        try:
            declared = json.loads(self._meta.read_text(encoding="utf-8")).get("onnx_sha256")
        except (OSError, ValueError, AttributeError):
            return {"onnx_sha256": onnx_sha[:12], "state": f"{META_NAME} missing or unreadable"}
        state = (
            "consistent" if declared == onnx_sha else f"{ONNX_NAME} does not match {META_NAME} (incomplete?)"
        )
        return {"onnx_sha256": onnx_sha[:12], "state": state}
