"""bench.stages.parallel_limit: the machine limit measured with every core busy (real ONNX Runtime, the daemon's
real per-frame function). Structure and failure handling only: speed is never asserted in tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.images import _encode as encode_png
from bench.stages import parallel_limit
from engine.package import load_package
from tests.helpers import tiny_package


@pytest.fixture()
def package(tmp_path: Path):  # type: ignore[no-untyped-def]
    tiny_package(tmp_path / "pkg", input_size=(32, 32))
    return load_package(tmp_path / "pkg")


def _images(n: int = 3) -> tuple[list[np.ndarray], list[bytes]]:
    rng = np.random.default_rng(0)
    grays = [rng.integers(0, 256, (96, 96), dtype=np.uint8) for _ in range(n)]
    return grays, [encode_png(g) for g in grays]


def test_every_thread_runs_whole_batches_of_the_daemons_work(package) -> None:  # type: ignore[no-untyped-def]
    grays, png = _images()
    out = parallel_limit(package, grays, png, 2, threads=2, seconds=0.3)
    assert set(out) == {"raw", "png"}
    for m in out.values():
        assert m["threads"] == 2 and m["batch"] == 2
        assert m["seconds"] >= 0.3 and m["img_s"] > 0 and m["core_ms_per_img"] > 0
        # Whole batches only, and the rate is the frames over the measured wall time.
        assert m["frames"] > 0 and m["frames"] % 2 == 0
        assert m["img_s"] == pytest.approx(m["frames"] / m["seconds"], rel=0.02)


@pytest.mark.parametrize("fail_after", [0, 6])  # in the warm-up (before the start barrier), and mid-run
def test_a_failing_thread_is_reported_and_does_not_hang(package, monkeypatch, fail_after) -> None:  # type: ignore[no-untyped-def]
    from engine.backends.onnxruntime import OnnxRuntimeBackend

    real = OnnxRuntimeBackend._infer
    calls = [0]

    def breaking(self, x):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] > fail_after:
            raise RuntimeError("session lost")
        return real(self, x)

    monkeypatch.setattr(OnnxRuntimeBackend, "_infer", breaking)
    grays, png = _images()
    with pytest.raises(RuntimeError, match=r"parallel limit \(raw\) failed: .*session lost"):
        parallel_limit(package, grays, png, 2, threads=2, seconds=0.5)


def test_a_frame_the_daemon_would_reject_fails_the_measurement(package) -> None:  # type: ignore[no-untyped-def]
    grays, png = _images()
    png[1] = b"\x89PNG\r\n\x1a\n" + b"\0" * 40  # a truncated PNG: the per-frame function rejects it
    with pytest.raises(RuntimeError, match="rejected bench image"):
        parallel_limit(package, grays, png, 2, threads=1, seconds=0.2)
