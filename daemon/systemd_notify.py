"""systemd's notify protocol in a few lines: datagrams to ``$NOTIFY_SOCKET`` (no dependency needed).

``READY=1`` once the backend is warm and the sources listen, ``WATCHDOG=1`` only while every stage thread runs
(sources, pipeline, publisher, after-publish sinks) and the pipeline makes progress, so a wedged daemon or one
with a dead stage is restarted by ``WatchdogSec`` even if its own stop stalls (the App's supervisor decides;
``daemon/app.py``), ``STOPPING=1`` when shutdown begins. Without
``NOTIFY_SOCKET`` (not under systemd, tests) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from daemon.logs import get_logger

log = get_logger(__name__)


class SystemdNotifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        # A leading '@' names a socket in the abstract namespace (a NUL byte on the wire).
        self.address: str | None = ("\0" + addr[1:] if addr.startswith("@") else addr) or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        wanted = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_interval_s: float | None = int(usec) / 1e6 if wanted else None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *states: str) -> bool:
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall("\n".join(states).encode())
            return True
        except OSError as exc:  # systemd gone or socket unreachable: never fatal for the daemon
            log.warning("systemd notify failed", states=list(states), error=str(exc))
            return False

    def ready(self, status: str = "inspecting") -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")
