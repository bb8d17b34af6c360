"""``batching.opencv_threads``: the daemon sets OpenCV's own thread count before its preprocessing pool starts
(1 by default: the pool is the parallelism), or leaves OpenCV's setting alone (0)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest

from tests.helpers import tiny_package
from tests.integration.daemon_harness import daemon_settings, running_app

pytestmark = pytest.mark.integration


@pytest.fixture
def opencv_threads() -> Iterator[None]:
    before = cv2.getNumThreads()
    try:
        yield
    finally:
        cv2.setNumThreads(before)


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("opencv_threads")
def test_opencv_runs_single_threaded_inside_the_pool_unless_told_otherwise(tmp_path: Path) -> None:
    tiny_package(tmp_path / "pkg", input_size=(32, 32))
    cv2.setNumThreads(3)
    with running_app(daemon_settings(tmp_path / "pkg")) as app:
        assert cv2.getNumThreads() == 1
        assert app.pipeline is not None and app.pipeline.opencv_threads == 1
    cv2.setNumThreads(3)
    with running_app(daemon_settings(tmp_path / "pkg", batching={"opencv_threads": 0})) as app:
        assert cv2.getNumThreads() == 3  # 0: OpenCV's own setting, untouched
        assert app.pipeline is not None and app.pipeline.opencv_threads == 3
