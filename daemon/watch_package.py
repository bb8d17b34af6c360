"""Notice the model package being replaced on disk while the daemon serves the one it loaded at start.

The daemon keeps serving what it loaded (and verified): a deployment that copies a new package over the old
one must not change verdicts half-way through a shift, and a half-copied file must not crash anything. What
it does is say so: a warning log line naming both models, ``inspectd_model_package_changed`` = 1 while the
package on disk differs from the one served, and ``inspectd_model_package_changes_total``. Restart the daemon
to serve the new package (hot reload is later work).

A cheap ``stat`` of ``model.onnx`` and ``model.json`` (following a ``current -> v7`` symlink) every
``model.watch_s``; only when that changes are the files hashed, on this thread, never on the verdict path.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from daemon.logs import get_logger
from engine.package import META_NAME, ONNX_NAME, ModelPackage, sha256_file

log = get_logger(__name__)

_Stat = tuple[int, int, int, int] | None  # (device, inode, size, mtime_ns) or None when missing


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
        self, package: ModelPackage, registry: CollectorRegistry, line: str, *, interval_s: float
    ) -> None:
        self.package = package
        self.interval_s = interval_s
        self.line = line
        self._onnx, self._meta = package.directory / ONNX_NAME, package.directory / META_NAME
        # What is being served: the ONNX digest model.json vouched for at load (verified unless
        # model.verify_sha256 is off), and model.json's own bytes as they are now, just after the load.
        self._served_onnx = package.meta.onnx_sha256 or _sha_or_none(self._onnx)
        self._served_meta = _sha_or_none(self._meta)
        self._fingerprint = self._stats()
        self.changed = False
        self.changed_gauge = Gauge(
            "inspectd_model_package_changed",
            "1 while the model package on disk differs from the one being served (restart to load it).",
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
                log.exception("model package check failed", path=str(self.package.directory))

    def check(self) -> bool:
        """One look at the package on disk; True when it differs from the one being served."""
        fingerprint = self._stats()
        if fingerprint == self._fingerprint:
            return self.changed
        self._fingerprint = fingerprint
        onnx_sha, meta_sha = _sha_or_none(self._onnx), _sha_or_none(self._meta)
        changed = onnx_sha != self._served_onnx or meta_sha != self._served_meta
        if changed:
            self.changes.labels(self.line).inc()
            log.warning(
                "model package changed on disk; still serving the model loaded at start (restart to load it)",
                path=str(self.package.directory),
                serving=self.package.meta.model_id,
                on_disk=self._describe_on_disk(onnx_sha),
            )
        elif self.changed:
            log.info("model package on disk is the served one again", path=str(self.package.directory))
        self.changed = changed
        self.changed_gauge.labels(self.line).set(1 if changed else 0)
        return changed

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
