"""The benchmark's images: one fixed set used by every measurement of a run (stages, daemon, naive loop).

``synth`` renders seeded synthetic screws (1024², the line camera's format; numpy + OpenCV only), so a run
needs nothing outside the repository and is repeatable. A directory takes its images in sorted order. Each
image exists in the three forms the measurements need: the gray array (raw camera frames), PNG bytes (PNG
camera frames and the decode stage) and a file on disk (the naive loop reads files, as a notebook does).
Synthetic PNGs go to a temporary directory, never into the repository.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from engine.dataset import image_files, label_from_folders
from engine.preprocess import load_gray
from tools.camera_sim import SimFrame, encode_frames, synth_pool

# What inspectd camera sends (tools.camera_sim.encode_frames): fast zlib level; decode speed barely depends on it.
_PNG_LEVEL = [cv2.IMWRITE_PNG_COMPRESSION, 1]


@dataclass(frozen=True, slots=True)
class BenchImages:
    source: str  # "synth" or the directory
    frames: list[SimFrame]  # gray uint8 + label
    png: list[bytes]  # the same images PNG-encoded, as a PNG camera sends them
    paths: list[Path]  # files with these pixels (the naive loop reads them)
    tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def grays(self) -> list[np.ndarray]:
        return [f.image for f in self.frames]

    def describe(self) -> dict[str, object]:
        shapes = sorted({f"{f.image.shape[1]}x{f.image.shape[0]}" for f in self.frames})
        return {
            "source": self.source,
            "n": len(self.frames),
            "size": shapes,
            "ng": sum(f.label == "NG" for f in self.frames),
            "png_kb_mean": round(sum(len(b) for b in self.png) / len(self.png) / 1024, 1),
        }

    def close(self) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()


def load_images(source: str, count: int, *, seed: int = 0, size: int = 1024) -> BenchImages:
    if source == "synth":
        frames = synth_pool(count, size=size, seed=seed)
        png = [_as_bytes(p) for _, p in encode_frames(frames, "png")]
        tmp = tempfile.TemporaryDirectory(prefix="inspectd-bench-")
        paths = []
        for f, data in zip(frames, png, strict=True):
            path = Path(tmp.name) / f"{f.name}.png"
            path.write_bytes(data)
            paths.append(path)
        return BenchImages("synth", frames, png, paths, tmp)
    return _from_directory(Path(source), count)


def _from_directory(directory: Path, count: int) -> BenchImages:
    if not directory.is_dir():
        raise FileNotFoundError(f"--images {directory}: not a directory (or 'synth')")
    all_paths = image_files(directory)
    if not all_paths:
        raise FileNotFoundError(f"--images {directory}: no images")
    paths = _spread(all_paths, count)
    # The daemon's own decoder (16-bit and colour handled as on the wire).
    frames = [SimFrame(p.stem, load_gray(str(p)), _label(p, directory)) for p in paths]
    png = [_encode(f.image) for f in frames]
    return BenchImages(str(directory), frames, png, paths)


def _spread(paths: list[Path], count: int) -> list[Path]:
    """``count`` paths evenly over the sorted list, so OK and NG folders are both represented."""
    if count >= len(paths):
        return paths
    idx = np.linspace(0, len(paths) - 1, count).round().astype(int)
    return [paths[i] for i in sorted(set(idx.tolist()))]


def _label(path: Path, root: Path) -> str | None:
    return label_from_folders(path.relative_to(root).parts[:-1])


def _encode(gray: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", gray, _PNG_LEVEL)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def _as_bytes(payload: np.ndarray | bytes) -> bytes:
    return payload if isinstance(payload, bytes) else payload.tobytes()
