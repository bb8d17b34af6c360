"""``batching.preprocess_device`` (GPU preprocessing, opt-in): the pool stops after the pose, the batch is
cropped, equalised, resized and normalised in one device call before inference, and every frame still gets its
one verdict. Run here with engine.preprocess_torch on the CPU (the code path is the device's); without CUDA,
asking for "cuda" is refused at start, naming the setting."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from daemon import pipeline as pipeline_mod  # noqa: E402
from daemon.settings import Backpressure, ConfigError, Settings  # noqa: E402
from daemon.types import Frame, Reason  # noqa: E402
from engine.backend import Backend  # noqa: E402
from engine.package import ModelPackage, load_package  # noqa: E402
from engine.preprocess import Preprocessor, device_preprocessor  # noqa: E402
from engine.preprocess_torch import MAX_LEVELS, MAX_SHARE  # noqa: E402
from tests.helpers import pipeline_for, settled_items, tiny_package  # noqa: E402
from tests.model_support import patch_params, rendered_screws  # noqa: E402


class Recording(Backend):
    """Keeps every batch it is given; logit = the batch row's mean (so verdicts depend on the pixels)."""

    name = "recording"
    seen: list[np.ndarray] = []  # noqa: RUF012

    def _open(self) -> None:
        pass

    def _close(self) -> None:
        pass

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        type(self).seen.append(batch.copy())
        return batch.reshape(batch.shape[0], -1).mean(1).astype(np.float32)


@pytest.fixture
def package(tmp_path: Path) -> ModelPackage:
    """A package whose preprocessing is the default kind's: the pose crop (its network is not run here)."""
    import json

    tiny_package(tmp_path / "pkg", input_size=(80, 250))
    meta = json.loads((tmp_path / "pkg" / "model.json").read_text())
    meta["preprocess"] = patch_params().to_dict()
    (tmp_path / "pkg" / "model.json").write_text(json.dumps(meta))
    return load_package(tmp_path / "pkg")


def _settings(device: str) -> Settings:
    return Settings(
        # One inference worker: the recording backend sees the batches in the order the frames came.
        batching={
            "max_batch": 4,
            "max_wait_ms": 5.0,
            "preprocess_threads": 2,
            "preprocess_device": device,
            "inference_workers": 1,
        },
        deadlines={"max_latency_ms": 60_000},
        model={"warmup": False},
    )


@pytest.mark.timeout(120)
def test_the_batch_is_preprocessed_on_the_device_and_every_frame_gets_its_verdict(
    package: ModelPackage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "cuda" as configured; the device stage made on the CPU (what this machine has): the same code path.
    monkeypatch.setattr(
        pipeline_mod, "device_preprocessor", lambda params, device: device_preprocessor(params, "cpu")
    )
    screws = rendered_screws(6, seed=21)
    frames = [
        Frame("camera", i, f"f{i}", time.monotonic(), time.time(), image=img)
        for i, img in enumerate(screws.frames)
    ]
    frames.append(
        Frame(
            "camera", 99, "blank", time.monotonic(), time.time(), image=np.full((1024, 1024), 200, np.uint8)
        )
    )
    Recording.seen = []
    p = pipeline_for(_settings("cuda"), package, Recording(package, max_batch=4))
    assert p.device_stage is not None
    p.start()
    try:
        for f in frames:
            p.submit(f, Backpressure.BLOCK)
        items = settled_items(p, len(frames), timeout=60.0)
    finally:
        p.drain(10.0)
    by_id = {i.verdict.frame_id: i for i in items}
    assert sorted(by_id) == sorted(f.frame_id for f in frames)
    assert by_id["blank"].verdict.reason is Reason.NO_PART  # the pose, still in the pool, still rejects
    rows = np.concatenate(Recording.seen)  # in the order the frames came: f0, f1, …
    ref = Preprocessor(package.meta.preprocess).batch(screws.frames)
    levels = np.abs(np.rint((rows - ref) * 255.0 * package.meta.preprocess.std))
    assert levels.max() <= MAX_LEVELS and np.count_nonzero(levels) <= MAX_SHARE * levels.size
    for item in items:
        if item.verdict.reason is Reason.MODEL:
            assert item.job.image is not None and item.job.image.brightness > 0  # drift statistics measured
            assert item.job.staged is None  # the frame is not kept once its row is written
            assert item.verdict.timings_ms["preprocess"] > 0


def test_a_failing_device_stage_rejects_its_frames_with_engine_error(
    package: ModelPackage, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Broken:
        def warmup(self) -> None:
            pass

        def __call__(self, frames: Any, poses: Any) -> Any:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(pipeline_mod, "device_preprocessor", lambda params, device: Broken())
    screws = rendered_screws(3, seed=22)
    p = pipeline_for(_settings("cuda"), package, Recording(package, max_batch=4))
    p.start()
    try:
        for i, img in enumerate(screws.frames):
            p.submit(
                Frame("camera", i, f"f{i}", time.monotonic(), time.time(), image=img), Backpressure.BLOCK
            )
        items = settled_items(p, 3, timeout=60.0)
    finally:
        p.drain(10.0)
    assert len(items) == 3 and all(i.verdict.reason is Reason.ENGINE_ERROR for i in items)
    assert "device preprocessing failed" in items[0].verdict.detail["error"]


def test_cuda_preprocessing_without_cuda_is_refused_at_start_naming_the_setting(
    package: ModelPackage,
) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    with pytest.raises(ConfigError, match=r"batching.preprocess_device = 'cuda': .*CUDA is not available"):
        pipeline_for(_settings("cuda"), package, Recording(package, max_batch=4))
    with pytest.raises(ValueError, match="preprocess_device"):
        _settings("gpu")  # only cpu, cuda and cuda:N
    assert _settings("cpu").batching.preprocess_device == "cpu"
    assert pipeline_for(_settings("cpu"), package, Recording(package, max_batch=4)).device_stage is None
