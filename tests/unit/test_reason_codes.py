"""One reason-code table (daemon/reasons.py), the same in the wire's docs. That OPC UA's ReasonCode enumeration and
the Modbus slots carry it is read back by real clients in tests/integration/test_plc_bridge.py."""

from __future__ import annotations

import re

from daemon.reasons import NONE, REASON_CODES, REASON_NAMES, UNKNOWN, reason_code
from daemon.types import Reason
from tests.conftest import REPO

# The published numbers. A PLC program compares against them: a change here breaks every line that uses them.
PUBLISHED = {
    "model": 1,
    "grey_zone": 2,
    "out_of_tolerance": 3,
    "decode_error": 4,
    "no_part": 5,
    "pose_error": 6,
    "deadline": 7,
    "overload": 8,
    "engine_error": 9,
    "shutdown": 10,
}


def test_every_reason_the_daemon_can_publish_has_its_stable_code() -> None:
    assert {r.value for r in Reason} == set(REASON_CODES), "a new Reason needs the next free code"
    for name, code in PUBLISHED.items():
        assert REASON_CODES[name] == code, f"{name} was published as {code}: never renumber"
    codes = [*REASON_CODES.values(), NONE, UNKNOWN]
    assert len(codes) == len(set(codes)) and all(0 <= c <= 0xFFFF for c in codes)
    assert REASON_NAMES[NONE] == "none" and REASON_NAMES[UNKNOWN] == "unknown"
    assert reason_code("a_reason_from_a_newer_daemon") == UNKNOWN


def _doc_table(text: str) -> dict[int, str]:
    return {int(c): n for c, n in re.findall(r"^\| (\d+) \| `([a-z_]+)` \|", text, re.M)}


def test_docs_print_the_table_as_the_code_has_it() -> None:
    daemon_md = (REPO / "docs" / "daemon.md").read_text(encoding="utf-8")
    assert _doc_table(daemon_md) == REASON_NAMES
    plc_md = (REPO / "docs" / "plc.md").read_text(encoding="utf-8")
    assert "daemon.md#reason-codes" in plc_md  # the register map and the address space point at it
