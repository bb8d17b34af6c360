"""docs/plc.md is what a PLC programmer builds from: its tables must say what plc/ serves."""

from __future__ import annotations

import re

from plc import modbus_map as mm
from plc.handshake import Fault
from plc.opcua import VARIABLES
from tests.conftest import REPO

DOC = (REPO / "docs" / "plc.md").read_text(encoding="utf-8")


def test_every_header_register_is_documented_at_its_address() -> None:
    rows = {
        name: (int(addr), int(ref), int(n))
        for addr, ref, n, name in re.findall(r"^\| (\d+) \| (4\d{4}) \| (\d) \| `([A-Z_]+)` \|", DOC, re.M)
    }
    two = {"ACK", "DROPPED", "LATEST_SEQ"}
    for name in ("ACK", "STATUS", "FAULTS", "PENDING", "CAPACITY", "HEARTBEATS", "GAPS", "BOOT_NO", "SLOTS",
                 "DROPPED", "LATEST_SEQ", "VERSION", "SLOT_WORDS"):  # fmt: skip
        address = getattr(mm, name)
        assert rows.get(name) == (address, 40001 + address, 2 if name in two else 1), name
    assert len(rows) == 13 and mm.HEADER_SIZE == 16


def test_status_bits_slot_layout_and_fault_causes_are_documented() -> None:
    bits = dict(re.findall(r"^\| (\d) \| 16#[0-9A-F]{4} \| `([A-Z_]+)` \|", DOC, re.M))
    for bit, name in bits.items():
        assert getattr(mm, f"STATUS_{name}") == 1 << int(bit), name
    assert len(bits) == 6
    offsets = dict(re.findall(r"^\| \+(\d) \| \d \| `([A-Z_]+)` \|", DOC, re.M))
    assert {name: int(off) for off, name in offsets.items()} == {
        "SEQ": mm.SLOT_SEQ,
        "FLAGS": mm.SLOT_FLAGS,
        "REASON": mm.SLOT_REASON,
        "SCORE": mm.SLOT_SCORE,
        "FRAME_HASH": mm.SLOT_FRAME_HASH,
        "BOOT_NO": mm.SLOT_BOOT_NO,
    }
    flags = {"VALID": mm.FLAG_VALID, "PASS": mm.FLAG_PASS, "LOST_BEFORE": mm.FLAG_LOST_BEFORE}
    flags["NEW_BOOT"] = mm.FLAG_NEW_BOOT
    for name, mask in flags.items():
        assert f"bit {mask.bit_length() - 1} `{name}`" in DOC, name
    causes = dict(re.findall(r"^\| (\d) \| `([A-Z_]+)` \|", DOC, re.M))
    assert {name: int(v) for v, name in causes.items()} == {f.name: int(f) for f in Fault}


def test_every_opcua_variable_is_documented_with_its_type() -> None:
    for v in VARIABLES:
        if v.folder == "Latest":
            assert f"`Latest.{v.name}`" in DOC or f"`.{v.name}`" in DOC, v.name
            continue
        kind = f"`{v.enum}` (enum)" if v.enum else v.vtype.name
        row = re.search(rf"^\| `{v.folder}\.{v.name}` \| ([^|]+) \|", DOC, re.M)
        assert row and row.group(1).strip().startswith(kind), (v.folder, v.name, row and row.group(1))
