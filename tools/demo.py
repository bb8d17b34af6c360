"""``inspectd demo``: the whole product in one command, on a machine with no GPU and no data.

synthetic screws (or real labelled images) → a small, short training run → the exported, verified package →
the daemon (in this process, metrics endpoint on) → a simulated camera at a steady rate → a live view → a
summary. Training and export run as ``inspectd train`` / ``inspectd export`` subprocesses, printed as the
commands a user would type: torch lives in those processes only, and the daemon part of the demo is exactly
``inspectd serve``'s App.

Everything is cached under the work directory: the synthetic images, the training run and the package are
keyed by what made them, so a second run goes straight to serving.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from daemon.app import App
from daemon.settings import Settings
from tools.camera_sim import CameraSim, SimFrame, synth_pool

Say = Callable[[str], None]
PRODUCTION_INPUT = (
    320,
    1000,
)  # the default preset's input size (training.config.PATCH; a test keeps them equal)


class DemoError(RuntimeError):
    """A demo step failed; the message says which and where its output is."""


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path
    data: Path | None = None  # labelled images to train on; None: synthetic screws
    seconds: float | None = None  # live view duration; None: until Ctrl-C
    fps: float = 5.0
    input_size: tuple[int, int] = PRODUCTION_INPUT
    preset: str = "default"  # training preset: default (patch memory, fitted in seconds) | cnn | recipe
    epochs: int = 30
    train_minutes: float = 3.0
    n_ok: int = 120
    n_ng: int = 40
    pool: int = 24  # distinct synthetic frames the camera cycles through
    seed: int = 0
    retrain: bool = False
    metrics_port: int = 9108


def default_workdir() -> Path:
    env = os.environ.get("INSPECTD_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "inspectd"
    return base / "demo"


def find_real_data() -> Path | None:
    """screws-300 where the project keeps it: $INSPECTD_REALDATA, else ../shared/data/screws-300."""
    candidates = [os.environ.get("INSPECTD_REALDATA"), Path.cwd().parent / "shared" / "data" / "screws-300"]
    for c in candidates:
        if c and (Path(c) / "good").is_dir():
            return Path(c)
    return None


# -- step 1: data ------------------------------------------------------------------------------------------
def synthetic_data(cfg: DemoConfig, say: Say) -> Path:
    from tools.synth import write_dataset  # numpy + OpenCV

    out = cfg.workdir / f"synth-{cfg.n_ok}ok-{cfg.n_ng}ng-s{cfg.seed}"
    done = out / ".complete"
    if done.is_file():
        say(f"synthetic screws: cached in {out}")
        return out
    shutil.rmtree(out, ignore_errors=True)  # an interrupted earlier run
    say(f"rendering {cfg.n_ok} OK + {cfg.n_ng} NG synthetic screws (1024², five defect types) into {out}")
    t0 = time.monotonic()
    write_dataset(out, cfg.n_ok, cfg.n_ng, seed=cfg.seed, size=1024)
    done.write_text("")
    say(f"  done in {time.monotonic() - t0:.0f} s")
    return out


# -- step 2: train and export (subprocesses) ---------------------------------------------------------------
def _data_identity(data: Path) -> dict[str, Any]:
    """Cheap identity of a data folder for the cache key (names and sizes; training hashes the content)."""
    files = sorted(p for p in data.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(data).as_posix()}\0{p.stat().st_size}\0".encode())
    return {"path": str(data.resolve()), "files": len(files), "listing": h.hexdigest()[:16]}


def train_args(cfg: DemoConfig, data: Path, run_dir: Path) -> list[str]:
    h, w = cfg.input_size
    args = [
        "train", "--data", str(data), "--out", str(run_dir), "--preset", cfg.preset, "--input-size", f"{h}x{w}",
        "--seed", str(cfg.seed), "--no-progress",
    ]  # fmt: skip
    if cfg.preset not in ("default", "patch"):  # a ResNet18 preset: gradient descent under a budget
        args += ["--epochs", str(cfg.epochs), "--max-minutes", str(cfg.train_minutes)]
    return args


def package_key(cfg: DemoConfig, data: Path) -> str:
    """What the cached package was made from: the data and the effective training configuration, as
    ``inspectd train --print-config`` resolves it (a preset changed by an upgrade trains again instead of serving
    the old model)."""
    cmd = [sys.executable, "-m", "inspectd.cli", *train_args(cfg, data, Path("RUN")), "--print-config"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise DemoError(f"'inspectd train --print-config' failed: {done.stderr.strip()[-500:]}")
    key_src = {"data": _data_identity(data), "config": json.loads(done.stdout)}
    return hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:12]


def model_package(cfg: DemoConfig, data: Path, say: Say) -> Path:
    """The package for (data, training options): reused when it exists, else trained and exported."""
    key = package_key(cfg, data)
    run_dir, pkg_dir = cfg.workdir / "runs" / key, cfg.workdir / "models" / key
    if (pkg_dir / "model.json").is_file() and not cfg.retrain:
        say(f"model package: cached in {pkg_dir} (--retrain to train again)")
        return pkg_dir
    shutil.rmtree(run_dir, ignore_errors=True)  # a half-finished run from an interrupted demo
    shutil.rmtree(pkg_dir, ignore_errors=True)
    h, w = cfg.input_size
    if (h, w) != PRODUCTION_INPUT:
        say(
            f"reduced input size {h}×{w} (production: {PRODUCTION_INPUT[0]}×{PRODUCTION_INPUT[1]}) "
            f"so training fits on a small CPU: expect a weaker model"
        )
    _inspectd(train_args(cfg, data, run_dir), say, cfg.workdir / "train.log")
    _inspectd(["export", str(run_dir), "--out", str(pkg_dir), "--name", f"demo-{key[:6]}"], say,
              cfg.workdir / "export.log")  # fmt: skip
    return pkg_dir


def _inspectd(argv: list[str], say: Say, log_path: Path) -> None:
    """Run ``inspectd ARGV`` in a subprocess, echoing the command and streaming its output, indented."""
    say("$ inspectd " + " ".join(argv))
    cmd = [sys.executable, "-m", "inspectd.cli", *argv]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
    }  # epoch lines as they happen, not when the pipe buffer fills
    with open(log_path, "w", encoding="utf-8") as log, subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
    ) as proc:  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            say("  │ " + line.rstrip())
        rc = proc.wait()
    if rc != 0:
        raise DemoError(f"'inspectd {argv[0]}' failed (exit {rc}); its output is in {log_path}")


# -- step 3: the daemon ------------------------------------------------------------------------------------
def _port_free(port: int) -> bool:
    with socket.socket() as s, contextlib.suppress(OSError):
        s.bind(("127.0.0.1", port))
        return True
    return False


def daemon_settings(cfg: DemoConfig, package: Path) -> Settings:
    """Stock settings, but everything on 127.0.0.1 ephemeral ports except metrics (its usual port when free),
    and 1 preprocessing + 1 ONNX Runtime thread: the camera and the view need the rest of 2 cores."""
    port = cfg.metrics_port if cfg.metrics_port and _port_free(cfg.metrics_port) else 0
    values: dict[str, Any] = {
        "line": "demo",
        "model": {"path": str(package), "intra_op_threads": 1},
        "sources": {"camera": {"endpoint": "tcp://127.0.0.1:*"}},
        "publisher": {"endpoint": "tcp://127.0.0.1:*"},
        "control": {"enabled": False},  # one model for the demo
        "metrics": {"host": "127.0.0.1", "port": port},
        "batching": {"preprocess_threads": 1},
        "logging": {"format": "json", "level": "WARNING"},
    }
    return Settings(**values)  # not load_settings(): a station's /etc/inspectd config must not apply here


# -- step 4: the camera ------------------------------------------------------------------------------------
def camera_frames(cfg: DemoConfig, data: Path | None, package: Path, say: Say) -> list[SimFrame]:
    """Synthetic parts the model never saw, or the held-out test split of the real data, with their labels."""
    if data is None:
        say(f"rendering {cfg.pool} new synthetic screws for the camera (not in the training set)")
        return synth_pool(cfg.pool, size=1024, seed=cfg.seed + 1000)
    from engine.package import load_package
    from engine.preprocess import load_gray
    from replay.selection import select  # ground truth for the labels

    sel = select(data, part="test", package=load_package(package))
    say(f"camera: the {len(sel.items)} held-out test images of {data}, cycled")
    return [SimFrame(Path(i.frame_id).stem, load_gray(str(i.path)), i.label) for i in sel.items]


class Camera:
    """The simulated camera on its own thread, in half-second chunks so that it can be stopped between them."""

    def __init__(self, endpoint: str, frames: list[SimFrame], fps: float) -> None:
        self.endpoint, self.frames, self.fps = endpoint, frames, fps
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-camera", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        sim = CameraSim(self.endpoint, fps=self.fps)  # created here: a ZeroMQ socket belongs to one thread
        chunk = max(1, round(self.fps / 2))
        t_next = time.monotonic()
        try:
            for k in itertools.count():
                if self._stop.wait(max(0.0, t_next - time.monotonic())):  # keeps the rate across chunks
                    return
                t_next += chunk / self.fps
                start = (k * chunk) % len(self.frames)
                frames = self.frames[start:] + self.frames[:start]
                self.sent += int(sim.run(frames, chunk, prefix=f"cam{k:05d}")["sent"])
        finally:
            sim.close()


def start_daemon(cfg: DemoConfig, package: Path, listener: Any) -> App:
    from daemon.logs import configure_logging

    settings = daemon_settings(cfg, package)
    log = open(cfg.workdir / "daemon.log", "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    configure_logging(level=settings.logging.level, fmt="json", line=settings.line, stream=log)
    app = App(settings, registry=CollectorRegistry(), listeners=[listener])
    app.start()
    return app
