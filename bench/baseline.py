"""The naive loop a notebook would write (the original assignment's main.py): one image at a time, from disk,
cv2 read → preprocess → forward, batch 1. Same images, same machine, same run as the daemon.

Deliberately not tuned: a new preprocessor (and so a new CLAHE object) per image, batch 1, the runtime's default
thread count (all cores). The preprocessing is the package's own (``engine.preprocess.Preprocessor``: the pose
crop when the package has one, CLAHE, resize, normalise), so the loop inspects what the daemon inspects. The
network is the package's: its torch state (``model.pt``) in torch eager when the package has one, as a notebook
would run it, else its ``model.onnx`` on an ONNX Runtime session with the default options. No gauges are
measured (the daemon measures them on every frame), so the loop does a little less than the daemon and the
speed-up is, if anything, understated. That is the baseline the daemon's speed-up is quoted against.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def naive_loop(
    paths: Sequence[Path], package_dir: Path, *, seconds: float = 10.0, threads: int | None = None
) -> dict[str, Any]:
    """The notebook's loop on the package in ``package_dir``. ``threads``: the runtime's intra-op threads (torch
    or ONNX Runtime); None = its default, what the notebook gets."""
    import cv2

    from engine.package import load_package
    from engine.preprocess import Preprocessor

    pkg = load_package(package_dir)
    params = pkg.meta.preprocess
    state = pkg.directory / "model.pt"
    forward, runtime, close = (_torch if state.is_file() else _onnx)(pkg, threads)

    def one(path: Path) -> float:
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise FileNotFoundError(f"cannot read {path}")
        x = Preprocessor(params)(img)[None]  # a new preprocessor (and CLAHE) per image
        return 1.0 / (1.0 + float(np.exp(-forward(x))))

    try:
        n, wall, core = _timed(one, paths, seconds)
    finally:
        close()
    return {
        "img_s": round(n / wall, 2),
        "ms_per_img": round(1000 * wall / n, 2),
        "core_ms_per_img": round(1000 * core / n, 2),
        "images": n,
        **runtime,
    }


Forward = Callable[[np.ndarray], float]


def _torch(pkg: Any, threads: int | None) -> tuple[Forward, dict[str, Any], Callable[[], None]]:
    import torch

    from engine.model import load_state

    state = pkg.directory / "model.pt"
    model = load_state(state.read_bytes(), source=str(state))
    default_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)

    def forward(x: np.ndarray) -> float:
        with torch.no_grad():
            return float(model(torch.from_numpy(x)).reshape(-1)[0])

    def close() -> None:
        torch.set_num_threads(default_threads)  # process-wide: the torch backend's timing runs after this

    info = {"runtime": "torch", "threads": torch.get_num_threads(), "weights": "package model.pt"}
    return forward, info, close


def _onnx(pkg: Any, threads: int | None) -> tuple[Forward, dict[str, Any], Callable[[], None]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(pkg.onnx_path), opts, providers=["CPUExecutionProvider"])
    meta = pkg.meta

    def forward(x: np.ndarray) -> float:
        (logit,) = sess.run([meta.output_name], {meta.input_name: x})
        return float(logit.reshape(-1)[0])

    info = {"runtime": "ONNX Runtime", "threads": threads or "default", "weights": "package model.onnx"}
    return forward, info, lambda: None


def _timed(one: Callable[[Path], float], paths: Sequence[Path], seconds: float) -> tuple[int, float, float]:
    """Run ``one`` over ``paths`` (cycling) for ``seconds`` after one untimed warm-up call: (images, wall s,
    CPU s)."""
    one(paths[0])  # the first run allocates; a notebook pays it once too, but it is not throughput
    n = 0
    c0 = time.process_time()
    t0 = time.perf_counter()
    for path in itertools.cycle(paths):
        one(path)
        n += 1
        if time.perf_counter() - t0 >= seconds:
            break
    return n, time.perf_counter() - t0, time.process_time() - c0
