"""Frame sources. A source turns something outside (a socket, a folder) into :class:`~daemon.types.Frame`s and
hands each to the pipeline through the :class:`Intake` it is given at start. Sources never decode or decide.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from daemon.settings import Backpressure
from daemon.types import Frame, Verdict


class Intake(Protocol):
    """What a source may call (implemented by :class:`daemon.pipeline.Pipeline`)."""

    def submit(self, frame: Frame, policy: Backpressure) -> None: ...

    def wait_for_room(self, timeout: float) -> bool: ...

    def message_error(self, kind: str) -> None:
        """Count a malformed message that cannot be attributed to a part (so it gets no verdict)."""


@runtime_checkable
class Source(Protocol):
    name: str

    def start(self, intake: Intake) -> None:
        """Begin producing frames (bind sockets, start watching). Errors here fail the daemon's start-up."""

    def stop(self) -> None:
        """Stop producing; returns once no further ``submit`` call can happen."""

    def describe(self) -> dict[str, Any]:
        """Where the source listens/watches, for the start-up log line."""


@runtime_checkable
class VerdictListener(Protocol):
    """Optionally implemented by sources (the folder source moves files) and in-process consumers (replay)."""

    def on_verdict(self, verdict: Verdict, frame: Frame, message: dict[str, Any]) -> None: ...
