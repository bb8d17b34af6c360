"""Shared helpers for daemon integration tests (and later issues): the real App in-process on ephemeral ports,
a real ZeroMQ SUB collector, a camera pusher, offline ONNX Runtime scores, and Backend test doubles.

Everything binds ``127.0.0.1`` with port ``*``/``0`` so tests run in parallel with anyone else's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from prometheus_client import CollectorRegistry

from daemon.app import App
from daemon.security import generate_keys
from daemon.settings import Settings, deep_update
from daemon.subscriber import VerdictSubscriber
from daemon.wire import camera_message
from engine.backend import Backend, BackendError, create_backend, sigmoid
from engine.package import Decision, ModelPackage, load_package, write_meta
from engine.preprocess import Preprocessor, decode, to_gray8
from tests.helpers import tiny_package

EPHEMERAL = "tcp://127.0.0.1:*"


# -- model and images -----------------------------------------------------------------------------------
def synth_images(n: int, size: int = 128, seed: int = 0, ng_every: int = 3) -> list[tuple[np.ndarray, str]]:
    """n synthetic screws (uint8 gray) with labels; every ``ng_every``-th is NG with a cycling defect."""
    from tools.synth import DEFECT_TYPES, render_screw

    out = []
    for i in range(n):
        ng = ng_every > 0 and i % ng_every == ng_every - 1
        defect = DEFECT_TYPES[(i // max(ng_every, 1)) % len(DEFECT_TYPES)] if ng else None
        img, _ = render_screw(seed * 100_003 + i, defect, size=size)
        out.append((img, "NG" if ng else "OK"))
    return out


def offline_scores(package: ModelPackage, images: Sequence[np.ndarray | bytes]) -> np.ndarray:
    """Reference NG probabilities: the same preprocessing and ONNX Runtime, one image at a time."""
    pre = Preprocessor(package.meta.preprocess)
    with create_backend("onnxruntime", package, max_batch=1, intra_op_threads=1) as backend:
        scores = []
        for img in images:
            gray = decode(img) if isinstance(img, bytes) else to_gray8(img)
            scores.append(float(sigmoid(backend.infer(pre(gray)[None]))[0]))
    return np.asarray(scores)


def calibrated_package(
    directory: Path, images: Sequence[np.ndarray], input_size: tuple[int, int] = (64, 64)
) -> ModelPackage:
    """The tiny ONNX package with its threshold at the median offline score, so verdicts are mixed."""
    tiny_package(directory, input_size=input_size, seed=3)
    pkg = load_package(directory)
    median = float(np.median(offline_scores(pkg, images)))
    write_meta(directory, dataclasses.replace(pkg.meta, decision=Decision(threshold=median)))
    return load_package(directory)


# -- settings and the app ---------------------------------------------------------------------------------
def daemon_settings(model_dir: Path | None, **overrides: Any) -> Settings:
    """Settings for a test daemon: ephemeral ports everywhere, fast heartbeats; nested dict overrides."""
    base: dict[str, Any] = {
        "line": "test-line",
        "model": {"path": str(model_dir) if model_dir else None, "intra_op_threads": 1},
        "sources": {"camera": {"endpoint": EPHEMERAL}},
        "publisher": {"endpoint": EPHEMERAL, "heartbeat_ms": 50, "linger_ms": 1000},
        "control": {"endpoint": EPHEMERAL},
        "metrics": {"port": 0},
        # One inference worker unless a test asks for the automatic layout: a test that injects a backend
        # scripts that one instance, and replicas of it would not follow the script.
        "batching": {"preprocess_threads": 1, "inference_workers": 1},
        # Generous by default: a shared, loaded CI machine must not turn a slow moment into deadline rejects.
        # Tests about deadlines set their own.
        "deadlines": {"max_latency_ms": 1000},
        "logging": {"format": "json", "batch_lines": False},
    }
    return Settings(**deep_update(base, overrides))


@contextlib.contextmanager
def running_app(settings: Settings, **kwargs: Any) -> Iterator[App]:
    """The real App started in-process; always stopped (drained) on exit."""
    kwargs.setdefault("registry", CollectorRegistry())
    app = App(settings, **kwargs)
    app.start()
    try:
        yield app
    finally:
        app.stop()


# -- the line controller's side -------------------------------------------------------------------------
class VerdictCollector:
    """A real subscriber (:class:`~daemon.subscriber.VerdictSubscriber`, on its own thread) collecting the
    verdicts and heartbeats of one line, every message's topic and ``line`` checked to be that line;
    ``sequence`` (a :class:`~daemon.sequence.SequenceTracker`, fed every message) holds the gaps and restarts
    it saw."""

    def __init__(self, endpoint: str | None, line: str, ctx: zmq.Context[Any] | None = None) -> None:
        if endpoint is None:
            raise ValueError("no publisher endpoint (is the app started?)")
        self.endpoint = endpoint
        self.line = line
        self.verdicts: list[dict[str, Any]] = []
        self.heartbeats: list[dict[str, Any]] = []
        self.arrivals: list[float] = []  # time.monotonic() at receipt of each verdict
        self._cv = threading.Condition()
        self._sub = VerdictSubscriber(
            endpoint, line, self._on_message, check_topic=True, name="test-collector", ctx=ctx
        )
        self.sequence = self._sub.sequence

    def __enter__(self) -> VerdictCollector:
        self.start()
        self.wait_heartbeat()  # the subscription is live: nothing sent from now on is lost (slow joiner)
        return self

    def start(self) -> None:
        """Connect and collect without waiting for the daemon (a line controller that is up before it)."""
        self._sub.start()

    def __exit__(self, *exc: object) -> None:
        self._sub.stop(5)

    def _on_message(self, msg: dict[str, Any], t_arrival: float) -> None:
        with self._cv:
            if msg["type"] == "verdict":
                self.verdicts.append(msg)
                self.arrivals.append(t_arrival)
            else:
                self.heartbeats.append(msg)
            self._cv.notify_all()

    def wait_heartbeat(self, timeout: float = 10.0, ready: bool | None = None) -> dict[str, Any]:
        n0 = len(self.heartbeats)
        end = time.monotonic() + timeout
        with self._cv:
            while True:
                for hb in self.heartbeats[n0:]:
                    if ready is None or hb["ready"] is ready:
                        return hb
                n0 = len(self.heartbeats)
                if not self._cv.wait(end - time.monotonic()) and time.monotonic() >= end:
                    raise TimeoutError(f"no heartbeat (ready={ready}) within {timeout} s")

    def wait_verdicts(self, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        end = time.monotonic() + timeout
        with self._cv:
            while len(self.verdicts) < n:
                if not self._cv.wait(max(0.0, end - time.monotonic())) and time.monotonic() >= end:
                    raise TimeoutError(f"{len(self.verdicts)} of {n} verdicts within {timeout} s")
            return list(self.verdicts)

    def by_frame_id(self) -> dict[str, dict[str, Any]]:
        with self._cv:
            return {v["frame_id"]: v for v in self.verdicts}


@contextlib.contextmanager
def serving(settings: Settings, **kwargs: Any) -> Iterator[tuple[App, VerdictCollector, CameraPusher]]:
    """A running app with a subscribed collector of its verdicts and a camera pushing to it."""
    with (
        running_app(settings, **kwargs) as app,
        VerdictCollector(app.publisher_endpoint, settings.line) as sub,
        CameraPusher(app.camera_endpoint) as cam,
    ):
        yield app, sub, cam


class CameraPusher:
    """The camera's side: a PUSH socket that connects to the daemon's PULL endpoint."""

    def __init__(self, endpoint: str | None, ctx: zmq.Context[Any] | None = None) -> None:
        if endpoint is None:
            raise ValueError("no camera endpoint (is the camera source enabled?)")
        self._sock = (ctx or zmq.Context.instance()).socket(zmq.PUSH)
        self._sock.setsockopt(zmq.LINGER, 2000)
        self._sock.setsockopt(zmq.SNDTIMEO, 5000)
        self._sock.connect(endpoint)

    def __enter__(self) -> CameraPusher:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()

    def send(
        self, frame_id: str, image: np.ndarray | bytes, *, encoding: str = "raw", label: str | None = None
    ) -> None:
        self._sock.send_multipart(
            camera_message(frame_id, image, encoding=encoding, label=label, t_capture=time.time()), copy=False
        )

    def send_parts(self, parts: Sequence[bytes]) -> None:
        self._sock.send_multipart(list(parts))

    def stream(self, items: Sequence[tuple[str, np.ndarray]], fps: float, **kw: Any) -> None:
        """Send at a steady rate on an absolute schedule (no drift)."""
        t0 = time.monotonic()
        for i, (fid, img) in enumerate(items):
            delay = t0 + i / fps - time.monotonic()
            if delay > 0:
                time.sleep(
                    delay
                )  # the behaviour: a camera triggers at its line rate, whatever the daemon does
            self.send(fid, img, **kw)


# -- Backend test doubles --------------------------------------------------------------------------------
class ScriptedBackend(Backend):
    """A Backend whose timing and failures a test controls. Logit = mean of the batch row (deterministic).

    ``delay_s`` sleeps inside every infer; ``fail_batches`` makes that many next calls raise BackendError;
    ``gate`` (an Event), when set up, blocks infer until the test releases it.
    """

    name = "scripted"

    def __init__(
        self, package: ModelPackage, *, max_batch: int = 8, delay_s: float = 0.0, **options: Any
    ) -> None:
        super().__init__(package, max_batch=max_batch, **options)
        self.delay_s = delay_s
        self.fail_batches = 0
        self.gate: threading.Event | None = None
        self.calls = 0
        self.entered = 0
        self.exited = 0
        self.batch_sizes: list[int] = []

    def _open(self) -> None:
        self.entered += 1

    def _close(self) -> None:
        self.exited += 1

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.batch_sizes.append(batch.shape[0])
        if self.gate is not None:
            self.gate.wait(30)
        if self.delay_s:
            time.sleep(self.delay_s)  # the behaviour under test: a backend this slow
        if self.fail_batches > 0:
            self.fail_batches -= 1
            raise BackendError("scripted failure")
        return batch.reshape(batch.shape[0], -1).mean(axis=1).astype(np.float32)


def curve_keys(root: Path) -> dict[str, Path]:
    """A station's CURVE keys as ``inspectd keys generate`` writes them: the server's pair; one camera, one
    subscriber and one operator key in their allow-list folders (``cameras``, ``subscribers``, ``operators``);
    and an ``intruder`` key that no folder allows."""
    out: dict[str, Path] = {}
    out["server_public"], out["server_secret"] = generate_keys(root / "server", "server")
    _, out["cam"] = generate_keys(root / "cameras", "cam1")
    _, out["plc"] = generate_keys(root / "subscribers", "plc1")
    _, out["operator"] = generate_keys(root / "operators", "op1")
    _, out["intruder"] = generate_keys(root / "elsewhere", "intruder")
    for name in ("cameras", "subscribers", "operators"):
        out[name] = root / name
    return out
