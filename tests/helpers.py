"""Test helpers importable from any test module."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], timeout: float, what: str | Callable[[], str], *, poll_s: float = 0.05
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that: for a condition the code under
    test signals no other way (a counter, a file, a thread's state). After ``timeout`` seconds it raises
    AssertionError naming ``what`` (a callable is called then, for details only known at failure: a log tail).

    The first looks come fast and the pause grows to ``poll_s``: a condition that already holds costs nothing,
    a long wait costs little CPU on a loaded machine. The predicate gets one last look at the deadline.
    """
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        result = predicate()
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(
                f"timed out after {timeout:g} s waiting for {what() if callable(what) else what}"
            )
        time.sleep(min(pause, remaining))
        pause = min(2 * pause, poll_s)


def drawn_image(size: int = 1024, seed: int = 7) -> np.ndarray:
    """A fixed, library-independent test picture: gradient + dark bar + noise (not a screw)."""
    import cv2

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    img = (150 + 30 * x / size + 10 * np.sin(y / 37.0)).astype(np.float32)
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    c = size // 2
    cv2.line(img, (c - size // 3, c - size // 5), (c + size // 3, c + size // 5), 70, max(2, size // 12))
    cv2.circle(img, (c + size // 3, c + size // 5), size // 9, 60, -1)
    return img


def drawn_dataset(root: Path, *, n_ok: int, n_ng: int, size: int, seed_step: int) -> Path:
    """``good/`` and ``not-good/`` folders of :func:`drawn_image` pictures, each OK one a little brighter and each
    NG one a little darker than the last, so a tiny package's scores spread over a threshold (parity checks)."""
    import cv2

    for label, n in (("good", n_ok), ("not-good", n_ng)):
        (root / label).mkdir(parents=True)
        for i in range(n):
            img = drawn_image(size, seed=seed_step * i + len(label))
            img = cv2.add(img, 15 * i) if label == "good" else cv2.subtract(img, 12 * i)
            cv2.imwrite(str(root / label / f"{label}{i:03d}.png"), img)
    return root


def tiny_package(directory, input_size=(64, 64), seed=0, threshold=0.5, name="tiny"):  # type: ignore[no-untyped-def]
    """A small but real ONNX model package (conv → relu → GAP → linear → NG logit), built with onnx.helper.

    Fast to create and to run, so daemon and engine tests use a real ONNX Runtime session without torch.
    The logit depends on image content, so verdicts differ between images.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from engine.package import ModelMeta, write_meta
    from engine.preprocess import PreprocessParams

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, (4,)).astype(np.float32)
    w2 = rng.normal(0, 1.0, (4, 1)).astype(np.float32)
    b2 = np.array([0.0], np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"]),
        helper.make_node("Reshape", ["y", "shape"], ["logit"]),
    ]
    h, w = input_size
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, h, w])],
        [helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["N"])],
        initializer=[
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(b2, "b2"),
            numpy_helper.from_array(np.array([-1], np.int64), "shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(d / "model.onnx"))
    from engine.package import Decision

    meta = ModelMeta(
        name=name,
        preprocess=PreprocessParams(input_size=input_size),
        decision=Decision(threshold=threshold),
        opset=17,
        created_by={"tool": "tests.helpers.tiny_package"},
    )
    return write_meta(d, meta)


def pipeline_for(settings, package, backend, metrics=None):  # type: ignore[no-untyped-def]
    """A daemon Pipeline over ``backend`` with the package's preprocessing and decision; ``metrics`` (a
    ``daemon.metrics.MetricsSink``) or Prometheus metrics on a private registry (so tests may build several)."""
    from prometheus_client import CollectorRegistry

    from daemon.decision import Decider
    from daemon.metrics import Metrics
    from daemon.pipeline import Pipeline
    from engine.preprocess import Preprocessor

    meta = package.meta
    return Pipeline(
        settings,
        backend=backend,
        preprocessor=Preprocessor(meta.preprocess),
        decider=Decider(meta.decision, meta.model_id),
        metrics=metrics
        if metrics is not None
        else Metrics(CollectorRegistry(), "t", process_collector=False),
    )


def next_settled(q, timeout=10.0):  # type: ignore[no-untyped-def]
    """The next item of a publish queue that is a verdict (a ``Settled``, or None at the end of the stream),
    running the work queued between verdicts (``Ledger.after_published``) on the way, as the publisher would.
    ``queue.Empty`` after ``timeout`` seconds."""
    import time

    from daemon.ledger import Deferred

    end = time.monotonic() + timeout
    while True:
        item = q.get(timeout=max(0.01, end - time.monotonic()))
        if not isinstance(item, Deferred):
            return item
        item.run()


def settled_items(p, n, timeout=10.0):  # type: ignore[no-untyped-def]
    """Up to ``n`` settled items from a Pipeline's publish queue (fewer if ``timeout`` seconds pass first)."""
    import queue
    import time

    out = []
    end = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < end:
        try:
            item = next_settled(p.settled, max(0.01, end - time.monotonic()))
        except queue.Empty:
            break
        if item is not None:
            out.append(item)
    return out
