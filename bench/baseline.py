"""The naive loop a notebook would write (the original assignment's main.py): one image at a time, from disk,
cv2 read → CLAHE → resize → torch eager forward. Same images, same machine, same run as the daemon.

Deliberately not tuned: a new CLAHE object per image, OpenCV's default resize, torch with its default thread
count (all cores), batch 1. That is the baseline the daemon's speed-up is quoted against.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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

    one(paths[0])  # the first forward allocates; a notebook pays it once too, but it is not throughput
    n = 0
    c0 = time.process_time()
    t0 = time.perf_counter()
    for path in itertools.cycle(paths):
        one(path)
        n += 1
        if time.perf_counter() - t0 >= seconds:
            break
    wall = time.perf_counter() - t0
    return {
        "img_s": round(n / wall, 2),
        "ms_per_img": round(1000 * wall / n, 2),
        "core_ms_per_img": round(1000 * (time.process_time() - c0) / n, 2),
        "images": n,
        "torch_threads": torch.get_num_threads(),
        "weights": "package model.pt" if has_state else "random",
    }
