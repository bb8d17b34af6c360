from __future__ import annotations

import io
import json
import logging

from daemon.logs import configure_logging, get_logger


def test_json_lines_carry_line_and_boot_id_and_stdlib_is_routed() -> None:
    buf = io.StringIO()
    configure_logging(level="INFO", fmt="auto", line="L1", boot_id="b00t", stream=buf)  # not a tty → JSON
    try:
        get_logger("daemon.test").info("batch", n=3, first="f1")
        logging.getLogger("some.library").warning("plain %s", "stdlib")
        get_logger("daemon.test").debug("hidden")
        try:
            raise ValueError("boom")
        except ValueError:
            get_logger("daemon.test").exception("failed", frame_id="f9")
    finally:
        configure_logging(stream=io.StringIO())
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert [x["event"] for x in lines] == ["batch", "plain stdlib", "failed"]
    for x in lines:
        assert x["line"] == "L1" and x["boot_id"] == "b00t" and "timestamp" in x and "level" in x
    assert lines[0]["n"] == 3 and lines[1]["level"] == "warning"
    assert lines[2]["frame_id"] == "f9" and "ValueError" in json.dumps(lines[2]["exception"])


def test_console_format_is_not_json() -> None:
    buf = io.StringIO()
    configure_logging(fmt="console", stream=buf)
    try:
        get_logger("x").info("hello", k=1)
    finally:
        configure_logging(stream=io.StringIO())
    text = buf.getvalue()
    assert "hello" in text and not text.lstrip().startswith("{")
