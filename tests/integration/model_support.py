"""Shared by the model-update tests (issue 15): candidate packages good and bad, operating points chosen away
from every score (so batch-size rounding in ONNX Runtime cannot move a verdict), a camera that streams at a
line rate on its own thread, ``inspectd model …`` run in-process, and a /metrics scrape."""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from engine.package import Decision, ModelPackage, load_package, write_meta
from inspectd.cli import main
from tests.helpers import tiny_package
from tests.integration.daemon_harness import CameraPusher

MARGIN = 1e-4  # no score within this of an operating point or of the shadow tolerance


def gap_midpoint(values: Sequence[float], quantile: float) -> float:
    """A cut between two sorted ``values`` near ``quantile``: the midpoint of the widest of the nearby gaps."""
    s = np.sort(np.asarray(values, np.float64))
    k = int(quantile * (len(s) - 1))
    width, i = max((s[j + 1] - s[j], j) for j in range(max(0, k - 3), min(len(s) - 1, k + 4)))
    assert width > 2 * MARGIN, f"no gap near the {quantile} quantile of {s}"
    return float((s[i] + s[i + 1]) / 2)


def with_threshold(directory: Path, threshold: float) -> ModelPackage:
    pkg = load_package(directory)
    write_meta(directory, dataclasses.replace(pkg.meta, decision=Decision(threshold=threshold)))
    return load_package(directory)


def bad_sha_package(directory: Path, **kw: Any) -> Path:
    """A package whose model.onnx was changed after model.json vouched for it."""
    tiny_package(directory, **kw)
    with (directory / "model.onnx").open("ab") as fh:
        fh.write(b"\0")
    return directory


def not_onnx_package(directory: Path, **kw: Any) -> Path:
    """A consistent package (the sha256 matches) whose model file ONNX Runtime cannot load."""
    tiny_package(directory, **kw)
    (directory / "model.onnx").write_bytes(b"this is not an ONNX model")
    write_meta(directory, load_package(directory, verify=False).meta)
    return directory


def failing_package(directory: Path, input_size: tuple[int, int] = (32, 32)) -> Path:
    """A valid ONNX model that loads and then raises on every run: its output is reshaped to 7 values whatever
    the batch (a model exported with a fixed shape by mistake)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from engine.package import ModelMeta
    from engine.preprocess import PreprocessParams

    directory.mkdir(parents=True, exist_ok=True)
    h, w = input_size
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["f"]),
            helper.make_node("ReduceMean", ["f", "axes"], ["m"], keepdims=0),
            helper.make_node("Reshape", ["m", "shape"], ["logit"]),
        ],
        "failing",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, h, w])],
        [helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["N"])],
        initializer=[
            numpy_helper.from_array(np.array([1], np.int64), "axes"),
            numpy_helper.from_array(np.array([7], np.int64), "shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(directory / "model.onnx"))
    write_meta(
        directory, ModelMeta(name="failing", preprocess=PreprocessParams(input_size=input_size), opset=18)
    )
    return directory


def model_cli(*args: str, endpoint: str) -> int:
    """``inspectd model ARGS --endpoint ENDPOINT`` in this process (its output goes to capsys)."""
    return main(["model", *args, "--endpoint", endpoint])


class Streamer:
    """A line camera on its own thread: ``images`` in turn at ``fps``, frame ids f00000, f00001, … (the image
    of frame i is ``images[i % len(images)]``), until the block ends."""

    def __init__(self, endpoint: str, images: Sequence[np.ndarray], fps: float) -> None:
        self.endpoint = endpoint
        self.images = list(images)
        self.fps = fps
        self.sent: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-camera", daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> Streamer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            with CameraPusher(self.endpoint) as cam:
                t0 = time.monotonic()
                for i in itertools.count():
                    delay = t0 + i / self.fps - time.monotonic()
                    if self._stop.wait(max(0.0, delay)):
                        return
                    fid = f"f{i:05d}"
                    cam.send(fid, self.images[i % len(self.images)])
                    self.sent.append(fid)
        except BaseException as exc:  # surfaced on the test's thread at the end of the block
            self.error = exc


def image_of(frame_id: str, n_images: int) -> int:
    return int(frame_id[1:]) % n_images


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the daemon's /metrics, by (name, labels), over a real HTTP request."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]
