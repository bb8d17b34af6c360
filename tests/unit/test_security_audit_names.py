"""The audit archive cannot be steered by a frame id: any id yields a plain file name inside the archive."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.audit import AuditArchive, safe_name
from daemon.settings import AuditSettings
from daemon.types import Frame, Outcome, Reason, Verdict

pytestmark = pytest.mark.timeout(120)

SAFE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,79}$")
hostile_ids = st.one_of(
    st.text(min_size=1, max_size=300),
    st.lists(
        st.sampled_from(["..", "/", "\\", ".", "\x00", "~", "a", "é", "\n", "%2e%2e", "CON"]),
        min_size=1,
        max_size=40,
    ).map("".join),
)


@settings(max_examples=500, deadline=None)
@given(hostile_ids)
def test_safe_name_is_always_one_plain_component(frame_id: str) -> None:
    name = safe_name(frame_id)
    assert SAFE.match(name), name
    root = Path("/archive")
    assert (root / f"20260101T000000_000000001_{name}.png").parent == root


@settings(max_examples=60, deadline=None)
@given(st.lists(hostile_ids, min_size=1, max_size=5))
def test_archived_files_stay_in_the_archive(frame_ids: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "archive"
        archive = AuditArchive(AuditSettings(enabled=True, path=root))
        archive.open()
        for seq, fid in enumerate(frame_ids, 1):
            frame = Frame("camera", seq, fid, 0.0, 0.0, data=b"\x89PNG\r\n\x1a\n....")
            verdict = Verdict(fid, "camera", Outcome.REJECT, Reason.DECODE_ERROR, None, 0.5, "m", None, 0.0)
            archive.on_verdict(verdict, frame, {"seq": seq, "t_published": 0.0, "frame_id": fid})
        files = list(Path(tmp).rglob("*"))
        assert all(p.parent == root for p in files if p != root)
        assert len([p for p in files if p.suffix == ".json"]) == len(frame_ids)
