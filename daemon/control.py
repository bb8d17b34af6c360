"""The control socket: ``inspectd model …`` reaches a running daemon over ZeroMQ REQ/REP, one JSON object each way.

Requests, ``command`` plus its arguments (unknown keys are refused)::

    {"command": "status"}
    {"command": "load", "path": "/abs/package/dir", "shadow": false}   → {"ok": true, "load_id": 3}
    {"command": "shadow", "on": true}
    {"command": "promote"}    {"command": "rollback"}                   → {"ok": true, "first_seq": 1234, …}
    {"command": "drop", "role": "previous"}                            (or "candidate")

Replies are ``{"ok": true, …}`` or ``{"ok": false, "error": "…"}``. A load answers at once and runs on the daemon's
``model-loader`` thread (warming a model up takes seconds, a TensorRT build minutes); its outcome is
``status.load.last`` once ``status.load.in_progress`` is no longer it (:meth:`ControlClient.load` waits for it).

The daemon binds a REP socket on ``control.endpoint`` (loopback TCP, or ipc:// whose socket file it makes
readable and writable by its group only: the operators' group) and serves it on one thread. With
``security.control_clients`` it is a CURVE server whose ZAP handler admits only the operator keys in that
directory: an unknown client's handshake fails and it never gets an answer. ``control.max_request_bytes`` bounds
a request (libzmq drops a client that sends more).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from daemon.logs import get_logger
from daemon.models import ModelError
from daemon.peers import PeerMonitor, bind_server
from daemon.security import configure_client
from daemon.settings import ControlSettings
from daemon.threads import StageThread

if TYPE_CHECKING:
    from daemon.lifecycle import ModelLifecycle

log = get_logger(__name__)

POLL_MS = 100  # how often the control thread looks at its stop event
IPC_MODE = 0o660  # the ipc:// socket file: the daemon's user and group (operators) may connect
# command → the arguments it takes
COMMANDS: dict[str, tuple[str, ...]] = {
    "status": (),
    "load": ("path", "shadow"),
    "shadow": ("on",),
    "promote": (),
    "rollback": (),
    "drop": ("role",),
}

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlError(RuntimeError):
    """The daemon did not answer (not running, wrong endpoint, or a client key it does not know)."""


class ControlRefused(ControlError):
    """The daemon answered no; the message is its reason."""


# -- the daemon's side ---------------------------------------------------------------------------------------
def handle(lifecycle: ModelLifecycle, request: dict[str, Any]) -> dict[str, Any]:
    """One request → its reply (ModelError and malformed requests become ``ok: false``)."""
    command = request.get("command")
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; one of {', '.join(COMMANDS)}")
    unknown = sorted(set(request) - {"command", *COMMANDS[command]})
    if unknown:
        raise ValueError(f"{command}: unknown argument(s) {unknown}; it takes {list(COMMANDS[command])}")
    if command == "status":
        return {"status": lifecycle.status()}
    if command == "load":
        path, shadow = request.get("path"), request.get("shadow", False)
        if not isinstance(path, str) or not os.path.isabs(path):
            raise ValueError(f"load: path must be an absolute directory path, got {path!r}")
        if not isinstance(shadow, bool):
            raise ValueError(f"load: shadow must be true or false, got {shadow!r}")
        return {"load_id": lifecycle.start_load(Path(path), shadow=shadow)}
    if command == "shadow":
        on = request.get("on")
        if not isinstance(on, bool):
            raise ValueError(f"shadow: on must be true or false, got {on!r}")
        return lifecycle.set_shadow(on)
    if command == "promote":
        return lifecycle.promote()
    if command == "rollback":
        return lifecycle.rollback()
    role = request.get("role", "previous")
    if not isinstance(role, str):
        raise ValueError(f"drop: role must be previous or candidate, got {role!r}")
    return lifecycle.drop(role)


class ControlServer(StageThread):
    """The REP socket and its thread. Created (and bound) on the starting thread, then owned by its own."""

    def __init__(
        self,
        settings: ControlSettings,
        ctx: zmq.Context[Any],
        handler: Handler,
        *,
        secure: Callable[[zmq.Socket[Any], str], None] | None = None,
        monitor: PeerMonitor | None = None,
    ) -> None:
        self._handler = handler
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock = ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, settings.max_request_bytes)
        # CURVE server when configured (daemon.security): only operator keys get an answer.
        self.endpoint: str = bind_server(
            self._sock, settings.endpoint, "control", secure=secure, monitor=monitor
        )
        if self.endpoint.startswith("ipc://") and not self.endpoint.startswith("ipc://@"):
            os.chmod(self.endpoint[len("ipc://") :], IPC_MODE)

    def start(self) -> None:
        self._spawn(self._run, "control")

    def stop(self, timeout: float = 2.0) -> bool:
        self._stop.set()
        if self._thread is None:
            self._sock.close(linger=0)
            return True
        return self.join(timeout)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._sock.poll(POLL_MS):
                    continue
                parts = self._sock.recv_multipart()
                reply = self._answer(parts)
                self._sock.send(json.dumps(reply, default=str).encode())
        except Exception:
            log.exception("control socket failed; models can no longer be changed until a restart")
            raise
        finally:
            self._sock.close(linger=0)

    def _answer(self, parts: list[bytes]) -> dict[str, Any]:
        command = None
        try:
            if len(parts) != 1:
                raise ValueError(f"a request is one message part, got {len(parts)}")
            try:
                request = json.loads(parts[0].decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise ValueError(f"a request is a JSON object: {exc}") from None
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object with a 'command'")
            command = request.get("command")
            reply = {"ok": True, **self._handler(request)}
        except (ModelError, ValueError) as exc:
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("control request failed", command=command)
            reply = {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
        if command != "status":  # status is polled: not worth a line each
            log.info("control request", command=command, ok=reply["ok"], error=reply.get("error"))
        return reply


# -- the operator's side -----------------------------------------------------------------------------------
class ControlClient:
    """``inspectd model …``'s end: one REQ socket per request (a REQ socket that got no answer is stuck)."""

    def __init__(
        self,
        endpoint: str,
        *,
        timeout_s: float = 10.0,
        server_public_key: Path | None = None,
        client_secret_key: Path | None = None,
        ctx: zmq.Context[Any] | None = None,
    ) -> None:
        if (server_public_key is None) != (client_secret_key is None):
            raise ValueError("CURVE needs both the daemon's public key and this client's secret key")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._keys = (server_public_key, client_secret_key)
        self._ctx = ctx or zmq.Context.instance()

    def request(self, command: str, **args: Any) -> dict[str, Any]:
        """The reply to ``command``; ControlRefused when the daemon says no, ControlError when it is silent."""
        silent = ControlError(
            f"no answer from {self.endpoint} within {self.timeout_s:g} s: is inspectd running there "
            "(control.endpoint)? With CURVE, is this client's key in security.control_clients?"
        )
        timeout_ms = int(self.timeout_s * 1000)
        sock = self._ctx.socket(zmq.REQ)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDTIMEO, timeout_ms)  # no peer to send to (a refused handshake): don't hang
            server_key, client_key = self._keys
            if server_key is not None and client_key is not None:
                configure_client(sock, server_public_key=server_key, client_secret_key=client_key)
            sock.connect(self.endpoint)
            try:
                sock.send(json.dumps({"command": command, **args}).encode())
            except zmq.Again:
                raise silent from None
            if not sock.poll(timeout_ms):
                raise silent
            reply: dict[str, Any] = json.loads(sock.recv())
        finally:
            sock.close(linger=0)
        if not reply.get("ok"):
            raise ControlRefused(str(reply.get("error", "refused")))
        return reply

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.request("status")["status"]
        return status

    def load(
        self, path: Path, *, shadow: bool = False, wait_s: float = 600.0, poll_s: float = 0.2
    ) -> dict[str, Any]:
        """Load ``path`` as the candidate and wait for the outcome: the load's record when loaded,
        ControlRefused with the daemon's reason when refused, ControlError when it takes over ``wait_s``."""
        load_id = self.request("load", path=str(Path(path).resolve()), shadow=shadow)["load_id"]
        end = time.monotonic() + wait_s
        while True:
            load = self.status()["load"]
            last = load.get("last") or {}
            if last.get("id") == load_id:
                if last.get("result") != "loaded":
                    raise ControlRefused(str(last.get("error")))
                return dict(last)
            if time.monotonic() >= end:
                raise ControlError(f"load {load_id} of {path} not finished within {wait_s:g} s")
            time.sleep(poll_s)
