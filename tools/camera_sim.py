"""A simulated line camera: pushes frames to the daemon's PULL socket at a steady rate, labels in the header.

Synthetic screws are rendered ahead into a small pool (rendering a 1024² screw takes tens of ms, more than a
frame interval at high rates) and cycled with unique frame ids. A folder's images are read once and cycled.
"""

from __future__ import annotations

import csv
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import zmq

from daemon.wire import camera_message
from engine.dataset import image_files, label_from_folders
from engine.preprocess import load_gray


@dataclass(frozen=True, slots=True)
class SimFrame:
    name: str
    image: np.ndarray  # uint8 gray
    label: str | None


def synth_pool(n: int, *, size: int = 1024, seed: int = 0, ng_fraction: float = 0.3) -> list[SimFrame]:
    """n rendered screws; about ``ng_fraction`` of them NG, cycling through the defect types."""
    from tools.synth import DEFECT_TYPES, render_screw  # numpy + OpenCV only

    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        defect = DEFECT_TYPES[i % len(DEFECT_TYPES)] if rng.random() < ng_fraction else None
        img, _ = render_screw(seed * 1_000_003 + i, defect, size=size)
        frames.append(SimFrame(f"synth{i}", img, "NG" if defect else "OK"))
    return frames


def folder_pool(directory: Path, limit: int | None = None) -> list[SimFrame]:
    """Images under ``directory`` (recursive, sorted). Labels from ``labels.csv`` (``inspectd synth``), else
    from a parent folder named OK/NG/good/bad, else none."""
    labels: dict[str, str] = {}
    csv_path = directory / "labels.csv"
    if csv_path.is_file():
        with open(csv_path, newline="") as fh:
            labels = {row["file"]: row["label"] for row in csv.DictReader(fh)}
    paths = image_files(directory)
    if not paths:
        raise FileNotFoundError(f"no images under {directory}")
    frames = []
    for p in paths[:limit]:
        rel = p.relative_to(directory).as_posix()
        label = labels.get(rel) or label_from_folders(p.relative_to(directory).parts[:-1])
        frames.append(SimFrame(p.stem, load_gray(str(p)), label))
    return frames


def encode_frames(frames: list[SimFrame], encoding: str) -> list[tuple[SimFrame, np.ndarray | bytes]]:
    if encoding == "raw":
        return [(f, f.image) for f in frames]
    if encoding != "png":
        raise ValueError(f"encoding must be raw or png, got {encoding!r}")
    out: list[tuple[SimFrame, np.ndarray | bytes]] = []
    for f in frames:
        ok, buf = cv2.imencode(".png", f.image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:
            raise ValueError(f"cannot PNG-encode {f.name}")
        out.append((f, buf.tobytes()))
    return out


class CameraSim:
    def __init__(
        self, connect: str, *, fps: float, encoding: str = "raw", ctx: zmq.Context[Any] | None = None
    ) -> None:
        if fps <= 0:
            raise ValueError("fps must be > 0")
        self.fps = fps
        self.encoding = encoding
        self._sock = (ctx or zmq.Context.instance()).socket(zmq.PUSH)
        self._sock.setsockopt(zmq.LINGER, 5000)  # frames queued at exit still reach the daemon
        self._sock.connect(connect)

    def close(self) -> None:
        self._sock.close()

    def run(self, frames: list[SimFrame], count: int | None, prefix: str = "cam") -> dict[str, float]:
        """Send ``count`` frames (forever when None) on an absolute schedule; returns rate statistics."""
        payloads = encode_frames(frames, self.encoding)
        t0 = time.monotonic()
        period = 1.0 / self.fps
        sent = late = 0
        source: Iterator[tuple[SimFrame, np.ndarray | bytes]] = itertools.cycle(payloads)
        for i, (frame, payload) in enumerate(source):
            if count is not None and i >= count:
                break
            delay = t0 + i * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -period:
                late += 1  # the daemon (or this machine) cannot keep up; keep the schedule, don't burst
            msg = camera_message(
                f"{prefix}-{i + 1:07d}-{frame.name}",
                payload,
                encoding=self.encoding,
                label=frame.label,
                t_capture=time.time(),
            )
            self._sock.send_multipart(msg, copy=False)
            sent += 1
        elapsed = time.monotonic() - t0
        return {"sent": sent, "seconds": elapsed, "fps": sent / elapsed if elapsed > 0 else 0.0, "late": late}
