"""structlog, configured once per process: JSON lines off a terminal, a console renderer on one.

Every line carries the line id and the boot id. They are added by a processor rather than bound in
contextvars, because contextvars do not follow into the pipeline's threads. The stdlib root logger is routed
through the same renderer, so library messages (watchdog, asyncio, …) land in the same stream and format.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

Processor = Any  # structlog's processor type is a loose callable protocol


def _static_fields(fields: dict[str, str]) -> Processor:
    def add(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for k, v in fields.items():
            event.setdefault(k, v)
        return event

    return add


def configure_logging(
    *,
    level: str = "INFO",
    fmt: str = "auto",
    line: str | None = None,
    boot_id: str | None = None,
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and stdlib logging for this process. Safe to call again (tests, reconfiguration)."""
    stream = stream if stream is not None else sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not _isatty(stream))
    static = {k: v for k, v in (("line", line), ("boot_id", boot_id)) if v is not None}
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _static_fields(static),
    ]
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=_isatty(stream))
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    tail: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if use_json:
        tail.append(structlog.processors.dict_tracebacks)  # a traceback as JSON, not a multi-line string
    formatter = structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=[*tail, renderer])
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.set_name("inspectd")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "inspectd"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # watchdog logs every inotify event at DEBUG; keep it quiet unless something goes wrong.
    logging.getLogger("watchdog").setLevel(max(logging.INFO, root.level))


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def get_logger(name: str) -> Any:
    """A structlog logger; ``log.info("event", key=value)``."""
    return structlog.stdlib.get_logger(name)
