"""Shared fixtures. Tests never need ../shared or the network; real-data tests skip without the folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REALDATA = Path(os.environ.get("INSPECTD_REALDATA", REPO.parent / "shared" / "data" / "screws-300"))


@pytest.fixture(scope="session")
def realdata() -> Path:
    if not (REALDATA / "good").is_dir():
        pytest.skip(f"real screws not present at {REALDATA} (set INSPECTD_REALDATA)")
    return REALDATA
