from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import cv2
import numpy as np

from daemon.audit import AuditArchive, safe_name
from daemon.settings import AuditSettings
from daemon.types import Frame, Outcome, Reason, Verdict

MiB = 1024 * 1024


def verdict(outcome: Outcome, fid: str = "p") -> Verdict:
    reason = Reason.MODEL
    return Verdict(fid, "cam", outcome, reason, 0.7, 0.5, "m", None, 0.0)


def msg(seq: int) -> dict[str, object]:
    return {"seq": seq, "t_published": time.time(), "verdict": "REJECT"}


def test_safe_name_cannot_escape_or_hide() -> None:
    for fid in ["../../etc/passwd", "/abs/path", "..", ".hidden", "a\\b", "x\x00y", "ümlaut part 7", ""]:
        name = safe_name(fid)
        assert name and "/" not in name and "\\" not in name and not name.startswith(".")
        assert Path(name).name == name and name not in (".", "..")
    assert safe_name("cam-0001_a.png") == "cam-0001_a.png"


def test_rejects_archived_with_sidecar_passes_sampled(tmp_path: Path) -> None:
    arch = AuditArchive(AuditSettings(enabled=True, path=tmp_path / "a", pass_sample_rate=0.0))
    arch.open()
    img = np.full((8, 8), 7, np.uint8)
    arch.on_verdict(verdict(Outcome.PASS), Frame("cam", 1, "ok1", 0, 0, image=img), msg(1))
    assert list((tmp_path / "a").iterdir()) == []
    arch.on_verdict(verdict(Outcome.REJECT, "../evil"), Frame("cam", 2, "../evil", 0, 0, image=img), msg(2))
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(files) == 2 and all("_000000002__evil." in f for f in files)
    png = next(p for p in (tmp_path / "a").iterdir() if p.suffix == ".png")
    stored = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
    assert stored is not None and np.array_equal(stored, img)
    side = json.loads(next(p for p in (tmp_path / "a").iterdir() if p.suffix == ".json").read_text())
    assert side["seq"] == 2 and side["source"] == "cam"
    sampler = AuditArchive(
        AuditSettings(enabled=True, path=tmp_path / "b", pass_sample_rate=1.0), rng=random.Random(1)
    )
    sampler.open()
    sampler.on_verdict(
        verdict(Outcome.PASS), Frame("cam", 1, "ok1", 0, 0, data=b"\x89PNG\r\n\x1a\nxx"), msg(1)
    )
    assert sorted(p.suffix for p in (tmp_path / "b").iterdir()) == [".json", ".png"]


def test_size_cap_deletes_oldest_first_including_previous_runs(tmp_path: Path) -> None:
    d = tmp_path / "a"
    d.mkdir()
    old = d / "old.bin"
    old.write_bytes(b"x" * (MiB // 2))
    os.utime(old, (1, 1))
    arch = AuditArchive(AuditSettings(enabled=True, path=d, max_bytes=MiB))
    arch.open()
    blob = b"\x89PNG\r\n\x1a\n" + b"y" * (MiB // 3)
    for seq in range(1, 4):
        arch.on_verdict(
            verdict(Outcome.REJECT, f"p{seq}"), Frame("cam", seq, f"p{seq}", 0, 0, data=blob), msg(seq)
        )
        assert arch.total_bytes <= MiB
    assert not old.exists()
    names = sorted(p.name for p in d.iterdir())
    assert any("_p3." in n for n in names) and not any("_p1." in n for n in names)  # image + sidecar together
    assert sum(p.stat().st_size for p in d.iterdir()) == arch.total_bytes
