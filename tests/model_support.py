"""Small real packages of both model kinds, for the backend, precision and GPU-path tests (needs torch).

- :func:`patch_package`: the default kind at a small size: a two-member patch ensemble (the whole crop at half
  resolution, and a band at full resolution with the residual-norm feature), fitted on rendered screws
  (tools.synth) through the pose crop and the package's own preprocessing, exported as training exports it.
- :func:`resnet_package`: the ResNet18 (seeded random weights) exported the same way.

Both set the decision threshold between two neighbouring scores in the middle of the test screws' scores, so
half of them PASS and half REJECT and a comparison of verdicts has something to flip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from engine.package import Decision
from engine.pose import PoseParams
from engine.preprocess import Preprocessor, PreprocessParams

PATCH_INPUT = (80, 250)  # the 320×1000 pose crop at a quarter of its resolution: fast to fit and to run


@dataclass(frozen=True)
class Screws:
    """Rendered 1024² screws: raw frames, labels (1 = NG) and the package's network input for them."""

    frames: list[np.ndarray]
    labels: list[int]


def rendered_screws(n: int, seed: int) -> Screws:
    from tools.camera_sim import synth_pool

    pool = synth_pool(n, seed=seed)
    return Screws([f.image for f in pool], [int(f.label == "NG") for f in pool])


def write_images(screws: Screws, root: Path) -> Path:
    """``good/`` and ``not-good/`` folders of the frames as PNG (what ``--data`` takes)."""
    for i, (img, label) in enumerate(zip(screws.frames, screws.labels, strict=True)):
        folder = root / ("not-good" if label else "good")
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"screw{i:03d}.png"), img)
    return root


def midpoint_threshold(logits: np.ndarray) -> Decision:
    """A threshold (on the NG probability) halfway between the two middle logits."""
    s = np.sort(np.asarray(logits, dtype=np.float64))
    mid = 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])
    return Decision(threshold=float(1.0 / (1.0 + math.exp(-mid))))


def patch_params() -> PreprocessParams:
    return PreprocessParams(input_size=PATCH_INPUT, pose=PoseParams().to_dict())


def patch_package(directory: Path, *, seed: int = 3, screws: Screws | None = None) -> tuple[Path, Screws]:
    """The package, fitted on the first 24 good ``screws`` (default: 60 rendered ones), and the screws it was
    not fitted on (good and NG)."""
    import torch

    from training.export import export_package
    from training.patch_memory import PatchSettings, fit_members

    params = patch_params()
    pre = Preprocessor(params)
    screws = screws if screws is not None else rendered_screws(60, seed=seed)
    fit_on = [i for i, y in enumerate(screws.labels) if y == 0][:24]
    held = Screws(
        [f for i, f in enumerate(screws.frames) if i not in fit_on],
        [y for i, y in enumerate(screws.labels) if i not in fit_on],
    )
    pixels = np.stack([pre.geometric(screws.frames[i]) for i in fit_on])
    small = PatchSettings(patch=8, stride=4, dims=16, window=(1, 1))
    h, w = PATCH_INPUT
    members = [
        replace(small, view=(0, h, 0, w - w % 2, 2)),
        # the thread band, registered to a reference thread phase as the default preset's is
        replace(
            small, view=(12, h - 12, 110, w, 1), residual=True, sd_pool=3, window=(1, 0), align=(15, 115, 8)
        ),
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, _ = fit_members(_normalised(pixels, params), pixels, members, seed=0, log=lambda _: None)
        x = network_input(held, params)
        with torch.no_grad():
            logits = model(torch.from_numpy(x))[:, 0].numpy()
        export_package(
            model,
            directory,
            preprocess=params,
            decision=midpoint_threshold(logits),
            name="patch-small",
            verify_batch=x,
        )
    finally:
        torch.set_num_threads(threads)
    return directory, held


def resnet_package(directory: Path, *, input_size: tuple[int, int] = (64, 64), seed: int = 0) -> Path:
    import torch

    from engine.model import build_model
    from training.export import export_package

    torch.manual_seed(seed)
    model = build_model(None).eval()
    x = np.random.default_rng(seed).normal(0, 1, (16, 1, *input_size)).astype(np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(x))[:, 0].numpy()
    export_package(
        model,
        directory,
        preprocess=PreprocessParams(input_size=input_size),
        decision=midpoint_threshold(logits),
        name="r18",
        verify_batch=x,
    )
    return directory


def network_input(screws: Screws, params: PreprocessParams) -> np.ndarray:
    """The daemon's preprocessing of ``screws`` → float32 (N, 1, H, W)."""
    return Preprocessor(params).batch(screws.frames)


def _normalised(pixels: np.ndarray, params: PreprocessParams) -> np.ndarray:
    return ((pixels.astype(np.float32) / 255.0 - params.mean) / params.std)[:, None]


def folder_screws(root: Path, *, good: int, ng: int) -> Screws:
    """The first ``good`` and ``ng`` images (sorted) of ``root``'s good/ and not-good/ folders."""
    files = sorted((root / "good").glob("*.png"))[:good] + sorted((root / "not-good").glob("*.png"))[:ng]
    frames = [cv2.imread(str(f), cv2.IMREAD_GRAYSCALE) for f in files]
    return Screws(frames, [int(f.parent.name != "good") for f in files])
