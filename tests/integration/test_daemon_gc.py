"""The cyclic collector in the daemon (daemon.gc_pauses): start-up's objects are frozen once the daemon is up,
every collection is timed into ``inspectd_gc_pause_seconds`` (real HTTP scrape), and stopping undoes both."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from tests.helpers import tiny_package
from tests.integration.daemon_harness import daemon_settings, running_app
from tests.integration.model_support import sample, scrape

pytestmark = pytest.mark.integration


@pytest.mark.timeout(60)
def test_startup_objects_are_frozen_and_every_collection_is_timed(tmp_path: Path) -> None:
    tiny_package(tmp_path / "pkg", input_size=(64, 64))
    callbacks_before = list(gc.callbacks)
    assert gc.get_freeze_count() == 0
    with running_app(daemon_settings(tmp_path / "pkg")) as app:
        # What start-up left alive is in the permanent generation: a full collection no longer walks it.
        assert app.metrics_port is not None
        frozen = gc.get_freeze_count()
        assert frozen > 1000
        before = scrape(app.metrics_port)
        counts = {g: sample(before, "inspectd_gc_pause_seconds_count", line="test-line", generation=g)
                  for g in ("0", "1", "2")}  # fmt: skip
        gc.collect(0)
        gc.collect(2)
        after = scrape(app.metrics_port)
        for gen in ("0", "2"):
            n = sample(after, "inspectd_gc_pause_seconds_count", line="test-line", generation=gen)
            assert n >= counts[gen] + 1, gen
        total = sample(after, "inspectd_gc_pause_seconds_sum", line="test-line", generation="2")
        assert total > 0
        # A collection does not thaw them (a few are freed by reference counting meanwhile).
        assert gc.get_freeze_count() > frozen // 2
    # Stopped: the collector is as it was (an in-process restart, the next test).
    assert gc.get_freeze_count() == 0
    assert list(gc.callbacks) == callbacks_before
