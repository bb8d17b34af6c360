"""The stable numeric code of every verdict ``reason``: one table for the wire docs, OPC UA and Modbus.

The verdict wire format carries the reason as a name (``"reason": "deadline"``, ``daemon.types.Reason``);
a PLC wants a number. This is the one place the numbers are given (docs/daemon.md and docs/plc.md print the
same table, ``tests/unit/test_reason_codes.py`` checks them against it and against ``Reason``): the PLC
bridge's OPC UA ``ReasonCode`` enumeration and its Modbus register map use it as it stands.

Codes are never reused or renumbered: a new reason gets the next free number. ``0`` is "no verdict" (an empty
Modbus slot) and ``255`` a reason this table does not know (a newer daemon than the bridge); a PLC treats
every code other than ``1`` (``model``) as "not inspected by the model", and every REJECT as a REJECT.
Standard library only, like ``daemon.sequence``: a PLC gateway can import it with nothing else of inspectd.
"""

from __future__ import annotations

__all__ = ["NONE", "REASON_CODES", "REASON_NAMES", "UNKNOWN", "reason_code"]

NONE = 0  # no verdict here (an empty result slot)
UNKNOWN = 255  # a reason name not in this table: sent by a newer daemon

# name (as on the wire) → code. Append only.
REASON_CODES: dict[str, int] = {
    "model": 1,  # the model (and the gauges) decided: PASS or REJECT
    "grey_zone": 2,  # score between the grey-zone bounds: REJECT, a person re-inspects
    "out_of_tolerance": 3,  # a gauge measurement outside its band: REJECT
    "decode_error": 4,  # unreadable or malformed image or message: REJECT
    "no_part": 5,  # no part in the image: REJECT
    "pose_error": 6,  # the part could not be normalised: REJECT
    "deadline": 7,  # not decided by arrival + max_latency_ms: REJECT
    "overload": 8,  # refused by the backpressure policy: REJECT
    "engine_error": 9,  # the backend failed for this batch: REJECT
    "shutdown": 10,  # in flight when the daemon stopped: REJECT
}

# code → name, with the two codes that name no reason.
REASON_NAMES: dict[int, str] = {NONE: "none", **{c: n for n, c in REASON_CODES.items()}, UNKNOWN: "unknown"}


def reason_code(name: str) -> int:
    """The code of a reason name; :data:`UNKNOWN` for a name this table does not know."""
    return REASON_CODES.get(name, UNKNOWN)
