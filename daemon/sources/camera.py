"""The ZeroMQ camera feed: the daemon binds a PULL socket; each message is (JSON header, pixels/bytes).

Messages are received without copying (``copy=False``): a raw frame becomes a numpy view on ZeroMQ's buffer
and stays that way until preprocessing writes its batch row. ``MAXMSGSIZE`` makes libzmq drop a peer that
sends an oversized part before any of it is buffered here. Memory in bytes: ZeroMQ queues at most ``rcvhwm``
messages per camera connection (``rcvhwm`` × ``max_message_bytes`` ≤ ``max_buffered_bytes``, checked when the
configuration is loaded); a message of more than 2 parts is read part by part and each extra part released at
once, then refused (kind ``multipart``, a REJECT when its header names the part). An encoded payload must be
the format its header names and pass the input policy (``daemon.image_policy``: format allow-list, min/max
size) on its header before it is admitted for decoding; a raw frame's shape is held to the same size limits.
The receive loop drains everything available before it polls again, and never blocks on the pipeline under
the ``reject_*`` policies, so an overload turns into prompt REJECT ``overload`` verdicts instead of frames
ageing invisibly inside ZeroMQ. No message can end the loop: an exception nothing should raise is a counted
message error (``unattributed``, or a REJECT when the part can be named), logged with its traceback.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import zmq

from daemon.clock import SYSTEM_CLOCK, Clock
from daemon.image_policy import InputPolicy, InputRejected
from daemon.logs import get_logger
from daemon.peers import PeerMonitor, bind_server
from daemon.settings import CameraSettings
from daemon.sources import Intake
from daemon.types import Frame
from daemon.wire import MESSAGE_PARTS, MessageError, parse_message

log = get_logger(__name__)

_POLL_MS = 100  # how often the loop notices stop() while the line is idle
_DRAIN_MAX = 256  # messages taken per wake-up before polling (and checking stop) again


class CameraSource:
    def __init__(
        self,
        settings: CameraSettings,
        ctx: zmq.Context[Any],
        *,
        max_pixels: int,
        clock: Clock = SYSTEM_CLOCK,
        policy: InputPolicy | None = None,
        secure: Callable[[zmq.Socket[Any], str], None] | None = None,
        monitor: PeerMonitor | None = None,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self._ctx = ctx
        self._max_pixels = max_pixels
        self._clock = clock
        self._policy = policy or InputPolicy(max_pixels=max_pixels)
        self._secure = secure  # CURVE server setup (daemon.security), applied before bind
        self._monitor = monitor
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: zmq.Socket[Any] | None = None
        self.endpoint = settings.endpoint
        self.seq = 0

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.name,
            "kind": "camera",
            "endpoint": self.endpoint,
            "policy": self.settings.backpressure.value,
        }

    def start(self, intake: Intake) -> None:
        sock = self._ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, self.settings.rcvhwm)
        sock.setsockopt(zmq.MAXMSGSIZE, self.settings.max_message_bytes)
        sock.setsockopt(zmq.LINGER, 0)  # unreceived frames were never accepted: nothing to flush
        self.endpoint = bind_server(
            sock, self.settings.endpoint, "camera", secure=self._secure, monitor=self._monitor
        )
        self._sock = sock  # owned by the receive thread from here on
        self._thread = threading.Thread(
            target=self._run, args=(intake,), name=f"source-{self.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            if self._thread.is_alive():
                log.error("camera source did not stop in time", source=self.name)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self, intake: Intake) -> None:
        sock = self._sock
        assert sock is not None
        try:
            while not self._stop.is_set():
                if not sock.poll(_POLL_MS):
                    continue
                for _ in range(_DRAIN_MAX):
                    if self._stop.is_set():
                        break
                    try:
                        message = self._receive(sock)
                        if message is None:
                            break
                        self._handle(*message, intake)
                    except zmq.ContextTerminated:
                        raise
                    except Exception as exc:  # a bug, not the sender's: one message lost, not the source
                        self._unexpected(intake, exc)
        except Exception:
            log.exception("camera source failed", source=self.name)
            raise
        finally:
            sock.close(linger=0)

    def _unexpected(self, intake: Intake, exc: Exception) -> None:
        """An exception no message should cause: counted as a message error, logged with it; the loop goes on."""
        with contextlib.suppress(Exception):  # not even a failing log call may end the receive loop
            intake.message_error("unattributed")
            log.error(
                "camera message could not be handled; counted, the source goes on",
                source=self.name,
                error=f"{type(exc).__name__}: {exc}",
                exc_info=exc,
            )

    def _receive(self, sock: zmq.Socket[Any]) -> tuple[list[Any], int, float, float] | None:
        """One whole message, part by part: (the parts kept, how many it had, arrival, wall clock at arrival).

        A message of more than 2 parts keeps only its first (the header, to name the part in the REJECT): every
        further part is received and released at once, so this thread holds at most 2 parts of any message.
        (libzmq itself delivers a message only once all of its parts have arrived: it buffers a whole message,
        ``sources.camera.max_message_bytes`` per part.) None when nothing is waiting."""
        try:
            first = sock.recv(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        t_arrival = self._clock.monotonic()
        t_received = self._clock.wall()
        kept: list[Any] = [first]
        n_parts = 1
        while sock.getsockopt(zmq.RCVMORE):
            part = sock.recv(flags=zmq.NOBLOCK, copy=False)  # atomic delivery: the rest is already here
            n_parts += 1
            if n_parts <= MESSAGE_PARTS:
                kept.append(part)
            elif len(kept) > 1:
                del kept[1:]  # too many parts: refused, the payload is not needed any more
            del part
        return kept, n_parts, t_arrival, t_received

    def _handle(
        self, parts: list[Any], n_parts: int, t_arrival: float, t_received: float, intake: Intake
    ) -> None:
        frame = self._frame(parts, n_parts, t_arrival, t_received, intake)
        if frame is not None:
            intake.submit(frame, self.settings.backpressure)

    def _frame(
        self, parts: list[Any], n_parts: int, t_arrival: float, t_received: float, intake: Intake
    ) -> Frame | None:
        """The frame to admit (with ``error`` set when it is malformed: REJECT), or None for a message that names
        no part (counted and logged here)."""
        frame_id: str | None = None
        try:
            try:
                header, image, data = parse_message(parts, max_pixels=self._max_pixels, n_parts=n_parts)
            except MessageError as exc:
                if exc.frame_id is None:
                    intake.message_error(exc.kind if exc.kind in ("multipart", "header") else "unattributed")
                    log.warning(
                        "malformed camera message dropped (no frame_id)", kind=exc.kind, error=str(exc)
                    )
                    return None
                log.warning("malformed camera message", frame_id=exc.frame_id, kind=exc.kind, error=str(exc))
                self.seq += 1
                return Frame(self.name, self.seq, exc.frame_id, t_arrival, t_received, error=str(exc))
            frame_id = header.frame_id
            error: str | None = None
            try:
                if image is not None:
                    self._policy.check_size(image.shape[0], image.shape[1], "raw frame")
                elif data is not None:
                    self._policy.check_encoded(data, declared=header.encoding)
            except InputRejected as exc:
                error = str(exc)
                image = data = None  # refused before decoding: nothing of it is kept
                log.warning("camera frame refused by the input policy", frame_id=frame_id, error=error)
        except Exception as exc:  # a bug in the checks: the part still gets its REJECT when it can be named
            if frame_id is None:
                raise  # counted by the receive loop
            log.error(
                "camera message could not be checked; rejected",
                frame_id=frame_id,
                error=f"{type(exc).__name__}: {exc}",
                exc_info=exc,
            )
            self.seq += 1
            error = f"internal error while checking the message ({type(exc).__name__}); not inspected"
            return Frame(self.name, self.seq, frame_id, t_arrival, t_received, error=error)
        self.seq += 1
        return Frame(
            source=self.name,
            seq=self.seq,
            frame_id=header.frame_id,
            t_arrival=t_arrival,
            t_received=t_received,
            t_capture=header.t_capture,
            data=data,
            image=image,
            label=header.label,
            error=error,
        )
