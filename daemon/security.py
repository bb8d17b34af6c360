"""ZeroMQ CURVE on the camera (PULL) and verdict (PUB) sockets: encryption plus client authentication.

With ``security.*`` configured, both sockets are CURVE servers holding the daemon's secret key, and a ZAP
handler (pyzmq's :class:`~zmq.auth.thread.ThreadAuthenticator`) admits only clients whose public key is in
the directory configured for that socket: cameras may push frames, line controllers may subscribe, and a
camera key cannot read verdicts (two ZAP domains). With ``security.control_clients`` the control socket
(``inspectd model …``) is a CURVE server too, in a third domain: only operator keys may change the model. ``ZAP_ENFORCE_DOMAIN`` makes libzmq refuse every client
when the handler is gone, so a dead authenticator fails closed instead of open.

Key files are the zmq.auth certificate format (``NAME.key`` public, ``NAME.key_secret`` secret), written by
``inspectd keys generate``. Allowed keys are read at start: adding a client means a restart.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from daemon.logs import get_logger
from daemon.settings import SecuritySettings
from daemon.settings import is_loopback as is_loopback  # re-exported: where it was first defined

log = get_logger(__name__)

# One ZAP domain per socket, so each socket admits its own set of client keys.
DOMAINS = {"camera": "inspectd-camera", "publisher": "inspectd-verdicts", "control": "inspectd-control"}
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SecurityError(RuntimeError):
    """CURVE cannot be set up as configured; the message names the file and what is wrong."""


def load_secret_key(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a ``.key_secret`` certificate; refuses a public-only file."""
    if not path.is_file():
        raise SecurityError(f"security.server_secret_key: {path} does not exist")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SecurityError(f"security.server_secret_key: {path} is not a CURVE certificate: {exc}") from None
    if not secret:
        raise SecurityError(f"security.server_secret_key: {path} holds no secret key (use NAME.key_secret)")
    mode = path.stat().st_mode
    if mode & stat.S_IROTH:
        log.warning("secret key file is world-readable; chmod 600 it", path=str(path))
    return public, secret


def allowed_keys(directory: Path, setting: str) -> int:
    if not directory.is_dir():
        raise SecurityError(f"{setting}: {directory} is not a directory")
    n = len(list(directory.glob("*.key")))
    if n == 0:
        log.warning("no client public keys allowed: nobody can connect", setting=setting, path=str(directory))
    return n


class CurveServer:
    """The daemon's CURVE identity and its ZAP handler. ``apply`` a socket before it binds."""

    def __init__(self, settings: SecuritySettings, ctx: zmq.Context[Any]) -> None:
        if not settings.curve:
            raise ValueError("CurveServer needs security.server_secret_key")
        assert settings.server_secret_key and settings.camera_clients and settings.subscriber_clients
        self.settings = settings
        self._ctx = ctx
        self.public_key, self._secret_key = load_secret_key(Path(settings.server_secret_key))
        self._dirs = {
            "camera": (Path(settings.camera_clients), "security.camera_clients"),
            "publisher": (Path(settings.subscriber_clients), "security.subscriber_clients"),
        }
        if settings.control_clients is not None:  # operators allowed on the control socket
            self._dirs["control"] = (Path(settings.control_clients), "security.control_clients")
        self.allowed = {name: allowed_keys(d, setting) for name, (d, setting) in self._dirs.items()}
        self._auth: ThreadAuthenticator | None = None

    def start(self) -> None:
        # stdlib logger: pyzmq formats its messages %-style; our handler renders them like every other line
        auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("inspectd.zap"))
        auth.start()
        for name, (directory, _) in self._dirs.items():
            auth.configure_curve(domain=DOMAINS[name], location=str(directory))
        self._auth = auth

    def covers(self, name: str) -> bool:
        """Whether socket ``name`` has a list of allowed client keys (the control socket only when configured)."""
        return name in self._dirs

    def apply(self, sock: zmq.Socket[Any], name: str) -> None:
        """Make ``sock`` a CURVE server in ``name``'s ZAP domain. Must run before bind."""
        sock.curve_secretkey = self._secret_key
        sock.curve_publickey = self.public_key
        sock.curve_server = True
        sock.zap_domain = DOMAINS[name].encode()
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP handler → refuse, never accept unchecked

    @property
    def alive(self) -> bool:
        return self._auth is not None and self._auth.is_alive()

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def describe(self) -> dict[str, Any]:
        return {"curve": True, "server_public_key": self.public_key.decode(), "allowed_keys": self.allowed}


def configure_client(sock: zmq.Socket[Any], *, server_public_key: Path, client_secret_key: Path) -> None:
    """For cameras and subscribers: authenticate to a CURVE daemon. Call before connect."""
    server_public, _ = zmq.auth.load_certificate(server_public_key)
    public, secret = zmq.auth.load_certificate(client_secret_key)
    if not secret:
        raise SecurityError(f"{client_secret_key} holds no secret key (use NAME.key_secret)")
    sock.curve_serverkey = server_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def generate_keys(directory: Path, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public, 0644) and ``NAME.key_secret`` (0600) into ``directory``.

    The pair is created in a private (0700) temporary directory and moved into place, so the secret key is
    never readable by others, not even for a moment.
    """
    if not _KEY_NAME.match(name):
        raise SecurityError(f"key name {name!r}: use letters, digits, '_', '.', '-'")
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if not force and (public.exists() or secret.exists()):
        raise SecurityError(f"{public} or {secret} exists already (use --force to replace the pair)")
    tmp = Path(tempfile.mkdtemp(prefix=".keys-", dir=directory))
    try:
        tmp_public, tmp_secret = (Path(p) for p in zmq.auth.create_certificates(tmp, name))
        os.chmod(tmp_secret, 0o600)
        os.chmod(tmp_public, 0o644)
        os.replace(tmp_secret, secret)
        os.replace(tmp_public, public)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return public, secret
