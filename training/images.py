"""Decode + the deterministic preprocessing (``Preprocessor.geometric``) of a list of samples, cached on disk,
and, with a pose crop, each part's gauge measurements (engine.pose) from the very pose the crop was cut with.

The cache key is the preprocessing parameters plus each file's path, size and mtime, so changed parameters or
a replaced image are recomputed and nothing stale is ever served. Measurements are cached beside the crop
(``KEY.json``); a crop cached before measurements were kept is measured once more and the result cached.
Images that cannot be decoded or whose pose cannot be found are reported with their reason, not dropped
silently; the caller decides (training excludes them with a warning, evaluation counts them as REJECT — what the
daemon would do).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.dataset import Dataset, Sample
from engine.pose import Measurements, Pose, PoseParams, estimate_pose
from engine.preprocess import DecodeError, Preprocessor, load_gray


def default_cache_dir() -> Path:
    env = os.environ.get("INSPECTD_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "inspectd"
    return base / "geometric"


@dataclass(frozen=True, slots=True)
class Images:
    samples: tuple[Sample, ...]  # the images that made it, in order
    pixels: np.ndarray  # uint8 (N, H, W): output of Preprocessor.geometric
    failed: dict[str, str]  # path → reason ("decode_error: …", "pose_error: …")
    # engine.pose measurements of each image in ``samples`` (None without a pose crop: nothing was measured)
    measurements: tuple[Measurements, ...] | None = None

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)


def _key(params_json: str, path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(
        f"{params_json}\0{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()
    ).hexdigest()


def load_images(
    ds: Dataset,
    samples: Sequence[Sample],
    pre: Preprocessor,
    *,
    cache_dir: Path | None = None,
    threads: int = 2,
) -> Images:
    """``geometric`` output (and, with a pose crop, measurements) of each sample; ``cache_dir=None`` uses
    :func:`default_cache_dir`."""
    params_json = json.dumps(pre.params.to_dict(), sort_keys=True)
    cache = (cache_dir or default_cache_dir()) / hashlib.sha256(params_json.encode()).hexdigest()[:16]
    cache.mkdir(parents=True, exist_ok=True)
    pose_params = PoseParams.from_dict(pre.params.pose) if pre.params.pose is not None else None

    def one(sample: Sample) -> tuple[np.ndarray, Measurements | None] | str:
        path = ds.abspath(sample)
        key = _key(params_json, path)
        npy, meas_json, err = cache / f"{key}.npy", cache / f"{key}.json", cache / f"{key}.err"
        crop: np.ndarray | None = np.load(npy) if npy.is_file() else None
        meas = _read_measurements(meas_json) if pose_params is not None else None
        if crop is not None and (pose_params is None or meas is not None):
            return crop, meas
        if err.is_file():
            return err.read_text(encoding="utf-8")
        try:
            gray = load_gray(str(path))
            # The pose the crop is cut with is the pose measured: estimated once, as the daemon does.
            pose: Pose | None = estimate_pose(gray, pose_params) if pose_params is not None else None
            if crop is None:
                crop = pre.geometric(gray, pose=pose)
        except (DecodeError, OSError) as exc:
            return f"decode_error: {exc}"  # not cached: the file may be fixed in place
        except ValueError as exc:  # engine.pose.PoseError / NoPartError are ValueErrors with a reason
            reason = str(getattr(exc, "reason", "pose_error"))
            msg = str(exc) if str(exc).startswith(reason) else f"{reason}: {exc}"
            err.write_text(msg, encoding="utf-8")
            return msg
        if pose is not None:
            _atomic_write(meas_json, json.dumps(pose.measurements.to_dict()).encode())
        if not npy.is_file():
            tmp = cache / f".{key}.{os.getpid()}.{id(crop)}.npy"
            np.save(tmp, crop)
            tmp.replace(npy)
        return crop, pose.measurements if pose is not None else None

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = list(pool.map(one, samples))
    kept = [(s, r) for s, r in zip(samples, results, strict=True) if not isinstance(r, str)]
    failed = {s.path: r for s, r in zip(samples, results, strict=True) if isinstance(r, str)}
    h, w = pre.params.input_size
    pixels = np.stack([r[0] for _, r in kept]) if kept else np.empty((0, h, w), np.uint8)
    measurements = None
    if pose_params is not None:
        measurements = tuple(m for _, (_, m) in kept if m is not None)
    return Images(tuple(s for s, _ in kept), pixels, failed, measurements)


def _read_measurements(path: Path) -> Measurements | None:
    """Cached measurements, or None when there are none (or the file is unreadable, or was written before a
    measurement existed: they are measured again)."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        if "crest_dip_px" not in d:
            return None
        return Measurements.from_dict(d)
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(data)}")
    tmp.write_bytes(data)
    tmp.replace(path)


def normalised(pre: Preprocessor, pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) → float32 (N, 1, H, W) exactly as the daemon normalises."""
    out = np.empty((len(pixels), 1, *pixels.shape[1:]), dtype=np.float32)
    for i, img in enumerate(pixels):
        pre.normalise_into(img, out[i, 0])
    return out
