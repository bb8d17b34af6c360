"""A settled frame keeps its pixels only while an after-publish handler needs them (daemon.ledger.keep_frames):
a daemon with no audit archive, folder journal or listener lets them go at settle; one with an audit archive
keeps them for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import tiny_package
from tests.integration.daemon_harness import daemon_settings, running_app

pytestmark = pytest.mark.integration


@pytest.mark.timeout(60)
def test_pixels_are_kept_after_settle_only_for_an_after_publish_handler(tmp_path: Path) -> None:
    tiny_package(tmp_path / "pkg", input_size=(32, 32))
    with running_app(daemon_settings(tmp_path / "pkg")) as app:
        assert app.pipeline is not None and app.after_publish is None
        assert app.pipeline.ledger.keep_frames is False
    audit = {"enabled": True, "path": str(tmp_path / "audit")}
    with running_app(daemon_settings(tmp_path / "pkg", audit=audit)) as app:
        assert app.pipeline is not None and app.after_publish is not None
        assert app.pipeline.ledger.keep_frames is True
