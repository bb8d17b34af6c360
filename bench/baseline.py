"""The naive loop a notebook would write (the original assignment's main.py): one image at a time, from disk,
cv2 read → CLAHE → resize → torch eager forward. Same images, same machine, same run as the daemon.

Deliberately not tuned: a new CLAHE object per image, OpenCV's default resize, torch with its default thread
count (all cores), batch 1. That is the baseline the daemon's speed-up is quoted against.

A package without torch state (the patch memory: its network exists only as ``model.onnx``) gets the same loop
on its own model (:func:`naive_loop_onnx`): cv2 read → the package's preprocessing (pose crop, CLAHE, resize)
with a new preprocessor per image → an ONNX Runtime session with its default options, batch 1. Without it the
loop would run some other network and the speed-up would compare two different models.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def naive_loop(
    paths: Sequence[Path],
    input_size: tuple[int, int],
    *,
    seconds: float = 10.0,
    weights: Path | None = None,
    clip_limit: float = 2.0,
    tile_grid: tuple[int, int] = (8, 8),
    mean: float = 0.5,
    std: float = 0.25,
    threads: int | None = None,
) -> dict[str, Any]:
    """``threads``: torch intra-op threads; None = torch's default (what the notebook gets)."""
    import torch

    default_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _loop(paths, input_size, seconds, weights, clip_limit, tile_grid, mean, std)
    finally:
        torch.set_num_threads(default_threads)


def _loop(
    paths: Sequence[Path],
    input_size: tuple[int, int],
    seconds: float,
    weights: Path | None,
    clip_limit: float,
    tile_grid: tuple[int, int],
    mean: float,
    std: float,
) -> dict[str, Any]:
    import cv2
    import torch

    from engine.model import build_model, load_state

    # The package's own network when it has its torch state (same network, same numbers); a ResNet18 with
    # random weights otherwise.
    has_state = weights is not None and weights.is_file()
    model = load_state(weights.read_bytes(), source=str(weights)) if has_state else build_model(None).eval()
    h, w = input_size

    def one(path: Path) -> float:
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise FileNotFoundError(f"cannot read {path}")
        img = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=tile_grid).apply(img)
        img = cv2.resize(img, (w, h))
        x = torch.from_numpy(img).float().div(255.0).sub(mean).div(std)[None, None]
        with torch.no_grad():
            return float(torch.sigmoid(model(x)).item())

    n, wall, core = _timed(one, paths, seconds)
    return {
        "img_s": round(n / wall, 2),
        "ms_per_img": round(1000 * wall / n, 2),
        "core_ms_per_img": round(1000 * core / n, 2),
        "images": n,
        "torch_threads": torch.get_num_threads(),
        "weights": "package model.pt" if has_state else "random",
    }


def naive_loop_onnx(
    paths: Sequence[Path], package_dir: Path, *, seconds: float = 10.0, threads: int | None = None
) -> dict[str, Any]:
    """The notebook's loop on the package's own ``model.onnx``: ``threads`` ONNX Runtime intra-op threads (None:
    its default, every core). No gauges are measured (the daemon measures them for every frame), so the loop
    does a little less than the daemon: the speed-up is, if anything, understated."""
    import cv2
    import onnxruntime as ort

    from engine.package import load_package
    from engine.preprocess import Preprocessor

    pkg = load_package(package_dir)
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(pkg.onnx_path), opts, providers=["CPUExecutionProvider"])
    meta = pkg.meta

    def one(path: Path) -> float:
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise FileNotFoundError(f"cannot read {path}")
        x = Preprocessor(meta.preprocess)(img)[None]  # a new preprocessor (and CLAHE) per image
        (logit,) = sess.run([meta.output_name], {meta.input_name: x})
        return float(1.0 / (1.0 + np.exp(-float(logit[0]))))

    n, wall, core = _timed(one, paths, seconds)
    return {
        "img_s": round(n / wall, 2),
        "ms_per_img": round(1000 * wall / n, 2),
        "core_ms_per_img": round(1000 * core / n, 2),
        "images": n,
        "ort_threads": threads or "default",
        "weights": "package model.onnx (ONNX Runtime)",
    }


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
