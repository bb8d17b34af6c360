"""The one place that wires the daemon together. ``start()`` is a flat list of steps; ``stop()`` undoes them
in reverse, draining as it goes, so that every frame admitted before the stop gets exactly one verdict.

Collaborators can be injected (a Backend instance, sources, a registry, a clock, a notifier, in-process
verdict listeners), so tests run the real wiring with a slow or failing backend, replay feeds a folder through
the same pipeline, and the benchmark measures exactly what production runs.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zmq
from prometheus_client import CollectorRegistry

from daemon.audit import AuditArchive
from daemon.clock import SYSTEM_CLOCK, Clock
from daemon.control import ControlServer, handle
from daemon.cpu_latency import CpuLatencyError, CpuLatencyRequest, hold_for_setting
from daemon.decision import Decider
from daemon.drift import DriftMonitor
from daemon.gc_pauses import GcPauses, freeze_startup, unfreeze
from daemon.image_policy import InputPolicy
from daemon.lifecycle import ModelLifecycle
from daemon.loading import CandidateLoader
from daemon.logs import get_logger
from daemon.metrics import Metrics, MetricsServer
from daemon.models import ModelError
from daemon.peers import PeerMonitor
from daemon.pipeline import Pipeline
from daemon.publisher import AfterPublish, VerdictPublisher
from daemon.security import CurveServer, SecurityError, is_loopback
from daemon.settings import ConfigError, Settings
from daemon.sinks import AfterPublishWorker
from daemon.sources import Source, VerdictListener
from daemon.sources.camera import CameraSource
from daemon.sources.folder import FolderSource
from daemon.systemd_notify import SystemdNotifier
from daemon.watch_package import PackageWatcher
from engine.backend import Backend, OptionsError, create_backend
from engine.drift import NoReference, load_reference
from engine.gauges import GaugeSet, load_gauges
from engine.package import ModelMeta, ModelPackage, load_package
from engine.preprocess import Preprocessor

log = get_logger(__name__)

_SUPERVISE_S = 0.25


class StartupError(RuntimeError):
    """The daemon cannot start (model, endpoints, folder); the message says what to fix."""


class App:
    def __init__(
        self,
        settings: Settings,
        *,
        backend: Backend | None = None,
        sources: Sequence[Source] | None = None,
        registry: CollectorRegistry | None = None,
        clock: Clock = SYSTEM_CLOCK,
        notifier: SystemdNotifier | None = None,
        listeners: Sequence[AfterPublish] = (),
        boot_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.boot_id = boot_id or uuid.uuid4().hex[:16]
        self.registry = registry if registry is not None else CollectorRegistry()
        self.notifier = notifier if notifier is not None else SystemdNotifier()
        self.stop_requested = threading.Event()
        self._t_publisher_bound = 0.0
        self.exit_code = 0
        self._backend = backend
        self._sources_in = sources
        self._listeners = list(listeners)
        self._stopping = False
        self._stopped = False
        self._ready_state = False
        self.package: ModelPackage | None = None
        self.metrics: Metrics | None = None
        self.metrics_server: MetricsServer | None = None
        self.ctx: zmq.Context[Any] | None = None
        self.pipeline: Pipeline | None = None
        self.publisher: VerdictPublisher | None = None
        self.after_publish: AfterPublishWorker | None = None
        self.audit: AuditArchive | None = None
        self.sources: list[Source] = []
        self.curve: CurveServer | None = None
        self.peers: PeerMonitor | None = None
        self.package_watcher: PackageWatcher | None = None
        self.models: ModelLifecycle | None = None
        self.control: ControlServer | None = None
        self._supervisor: threading.Thread | None = None
        self.gc_pauses: GcPauses | None = None
        self._gc_frozen: dict[str, Any] | None = None  # what freeze_startup did, until stop unfreezes
        self.cpu_latency: CpuLatencyRequest | None = None  # batching.cpu_latency_us's request, until stop
        self._cpu_latency_line: str | None = None

    # -- start: one flat list of steps --------------------------------------------------------------------
    def start(self) -> None:
        t0 = time.monotonic()
        try:
            self.init_package()
            self.init_zmq()
            self.init_security()
            self.init_peer_monitor()
            self.init_control()
            self.init_sources()
            self.init_metrics()
            self.start_metrics_server()
            self.init_pipeline()
            self.init_models()
            self.init_cpu_latency()
            self.freeze_startup_heap()  # before any stage thread runs: its collection pauses nobody
            self.start_after_publish()
            self.start_publisher()
            self.start_pipeline()
            self.start_sources()
            self.start_peer_monitor()
            self.start_supervisor()
            self.start_package_watcher()
            self.start_control()
            self.notify_ready(time.monotonic() - t0)
        except BaseException:
            self.stop()
            raise

    def init_package(self) -> None:
        if self._backend is not None:
            self.package = self._backend.package
            return
        path = self.settings.model.path
        if path is None:
            raise StartupError("no model package: set model.path in the config or pass --model DIR")
        self.package = load_package(path, verify=self.settings.model.verify_sha256)

    def init_security(self) -> None:
        """CURVE + ZAP before any socket binds, so no connection is ever accepted unauthenticated."""
        assert self.ctx is not None
        sec = self.settings.security
        if sec.curve:
            try:
                self.curve = CurveServer(sec, self.ctx)
            except SecurityError as exc:
                raise StartupError(str(exc)) from None
            self.curve.start()
            return
        exposed = [
            ep
            for ep, on in (
                (self.settings.sources.camera.endpoint, self.settings.sources.camera.enabled),
                (self.settings.publisher.endpoint, True),
            )
            if on and not is_loopback(ep)
        ]
        if exposed:
            log.warning(
                "endpoints reachable from the network without CURVE: anyone there can feed frames or read "
                "verdicts; configure security.* (inspectd keys generate)",
                endpoints=exposed,
            )

    def init_peer_monitor(self) -> None:
        names = ("camera", "publisher") if self.settings.sources.camera.enabled else ("publisher",)
        if self.settings.control.enabled:
            names = (*names, "control")
        self.peers = PeerMonitor(self.registry, self.settings.line, sockets=names)

    def init_control(self) -> None:
        """Bind the control socket now (a bad endpoint fails start-up); it answers once the daemon is ready."""
        if not self.settings.control.enabled:
            return
        assert self.ctx is not None
        curve = self.curve if self.curve is not None and self.curve.covers("control") else None
        try:
            self.control = ControlServer(
                self.settings.control,
                self.ctx,
                self._control_request,
                secure=curve.apply if curve is not None else None,
                monitor=self.peers,
            )
        except zmq.ZMQError as exc:
            raise StartupError(
                f"control.endpoint {self.settings.control.endpoint}: cannot bind: {exc}"
            ) from None

    def _control_request(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.models is None:
            raise ModelError("the daemon is still starting")
        return handle(self.models, request)

    def init_sources(self) -> None:
        if self._sources_in is not None:
            self.sources = list(self._sources_in)
        else:
            cfg = self.settings.sources
            policy = InputPolicy.from_settings(self.settings.decode)
            if cfg.folder.enabled:
                self.sources.append(FolderSource(cfg.folder, clock=self.clock, policy=policy))
            if cfg.camera.enabled:
                assert self.ctx is not None
                self.sources.append(
                    CameraSource(
                        cfg.camera,
                        self.ctx,
                        max_pixels=self.settings.decode.max_pixels,
                        clock=self.clock,
                        policy=policy,
                        secure=self.curve.apply if self.curve is not None else None,
                        monitor=self.peers,
                    )
                )
        if not self.sources:
            raise StartupError("no source enabled: enable sources.camera and/or sources.folder")

    def init_metrics(self) -> None:
        assert self.package is not None
        m, meta = self.settings.metrics, self.package.meta
        names = [s.name for s in self.sources]
        self.metrics = Metrics(
            self.registry,
            self.settings.line,
            sources=names,
            ng_window=m.ng_window,
            decision=meta.decision,
            drift=self._drift_monitor(meta),
        )
        self.gc_pauses = GcPauses(self.registry, self.settings.line)
        self.gc_pauses.install()

    def _drift_monitor(self, meta: ModelMeta) -> DriftMonitor:
        try:
            return self._drift_for(meta)
        except ValueError as exc:
            raise StartupError(f"model package {self.settings.model.path}: {exc}") from None

    def _drift_for(self, meta: ModelMeta) -> DriftMonitor:
        """The drift windows, compared with the package's score reference at its operating point. A package
        without one (exported before references existed) is served as before: drift reads "no reference".
        ValueError for a reference or gauges the daemon cannot use."""
        m = self.settings.metrics
        reference = load_reference(meta.score_reference)
        bins, why = None, "the package has no score_reference (exported before inspectd kept one)"
        if reference is not None:
            try:
                bins = reference.bins(meta.decision.bounds[0])
            except NoReference as exc:
                why = str(exc)
        if bins is None:
            log.warning("score drift not measured: no reference", reason=why)
        else:
            log.info(
                "score drift reference",
                parts=bins.n_reference,
                bins=len(bins.counts),
                source=reference and reference.source,
            )
        gauges = load_gauges(meta.gauges, meta.preprocess.pose)
        return DriftMonitor(
            self.settings.line,
            bins=bins,
            no_reference=why,
            bands=gauges.bands if gauges is not None else (),
            window=m.drift_window,
            min_parts=m.drift_min_parts,
        )

    def init_zmq(self) -> None:
        self.ctx = zmq.Context()

    def start_metrics_server(self) -> None:
        m = self.settings.metrics
        if m.enabled:
            self.metrics_server = MetricsServer(self.registry, m.host, m.port, ready=self.is_ready)
            self.metrics_server.start()

    def init_pipeline(self) -> None:
        assert self.package is not None and self.metrics is not None
        meta = self.package.meta
        backend = self._backend
        if backend is None:
            model = self.settings.model
            try:  # checked when the settings were loaded; settings made otherwise are checked here
                options = model.backend_options()
            except OptionsError as exc:
                where = f"model.options.{exc.key}" if exc.key else "model.options"
                raise ConfigError(f"{where}: {exc}") from None
            backend = create_backend(
                model.backend, self.package, max_batch=self.settings.batching.max_batch, options=options
            )
        if backend.max_batch < self.settings.batching.max_batch:
            raise StartupError(
                f"backend max_batch {backend.max_batch} < batching.max_batch {self.settings.batching.max_batch}"
            )
        self._backend = backend
        self.pipeline = Pipeline(
            self.settings,
            backend=backend,
            preprocessor=Preprocessor(meta.preprocess),
            decider=Decider(meta.decision, meta.model_id, gauges=self._gauges(meta)),
            metrics=self.metrics,
            clock=self.clock,
        )

    def init_models(self) -> None:
        """The model lifecycle: candidates are made like production's backend, for as many workers, warmed up at
        the batch sizes the pipeline forms, and held to the inference budget production was capped with."""
        assert self.pipeline is not None and self.metrics is not None
        p = self.pipeline
        p.models.production.drift = self.metrics.drift
        loader = CandidateLoader(
            template=lambda: p.models.production.backends[0],
            workers=len(p.workers),
            batch_sizes=lambda: tuple(sorted({1, p.max_batch})),
            budget_s=p.budget_s,
            verify=self.settings.model.verify_sha256,
            drift=self._drift_for,
            lone=lambda: p.models.production.lone,
        )
        self.models = ModelLifecycle(
            p.models, loader, p.shadow, self.metrics, switch_timeout_s=self.settings.deadlines.stall_s
        )
        self.models.publish()

    def _gauges(self, meta: ModelMeta) -> GaugeSet | None:
        try:
            return load_gauges(meta.gauges, meta.preprocess.pose)
        except ValueError as exc:
            raise StartupError(f"model package {self.settings.model.path}: gauges: {exc}") from None

    def start_after_publish(self) -> None:
        handlers: list[AfterPublish] = []
        if self.settings.audit.enabled:
            self.audit = AuditArchive(self.settings.audit)
            self.audit.open()
            handlers.append(self.audit.on_verdict)
            if self.pipeline is not None:  # shadow disagreements are kept there too, from the shadow thread
                self.pipeline.shadow.keep = self.audit.keep_disagreement
        handlers.extend(s.on_verdict for s in self.sources if isinstance(s, VerdictListener))
        handlers.extend(self._listeners)
        if self.pipeline is not None:
            self.pipeline.ledger.keep_frames = bool(handlers)  # else pixels go at settle (daemon.ledger)
        if handlers:
            self.after_publish = AfterPublishWorker(handlers, queue_size=self.settings.audit.queue_size)
            self.after_publish.start()

    def start_publisher(self) -> None:
        assert self.ctx is not None and self.pipeline is not None and self.metrics is not None
        self.publisher = VerdictPublisher(
            self.settings.publisher,
            self.ctx,
            self.pipeline.settled,
            line=self.settings.line,
            boot_id=self.boot_id,
            metrics=self.metrics,
            ready=self.is_ready,
            after_publish=self.after_publish.offer if self.after_publish is not None else None,
            clock=self.clock,
            secure=self.curve.apply if self.curve is not None else None,
            monitor=self.peers,
        )
        self.publisher.start()
        self._t_publisher_bound = time.monotonic()

    def start_pipeline(self) -> None:
        assert self.pipeline is not None and self.models is not None
        self.pipeline.start()
        # Entered and warmed up: what the backend loaded (e.g. a TensorRT plan's parity gate) is known now.
        self.models.publish()

    def start_sources(self) -> None:
        assert self.pipeline is not None
        # A verdict published before a subscriber has re-subscribed (after a restart) is lost to it: it sees the
        # new boot start above seq 1. Frames not yet read are owed nothing, so reading waits out the grace. On
        # an ephemeral port (replay, demo, bench, tests) no earlier subscriber can exist: nothing to wait for.
        pub = self.settings.publisher
        grace_s = pub.join_grace_ms / 1000.0 - (time.monotonic() - self._t_publisher_bound)
        if grace_s > 0 and not pub.endpoint.endswith(":*"):
            self.stop_requested.wait(grace_s)
        for source in self.sources:
            source.start(self.pipeline)

    def start_peer_monitor(self) -> None:
        assert self.peers is not None
        self.peers.start()  # after every monitored socket is set up (watch() happens before start)

    def start_package_watcher(self) -> None:
        interval, action = self.settings.model.watch_s, self.settings.model.watch_action
        if interval <= 0 or self.package is None or self.pipeline is None:
            return
        slots, lifecycle = self.pipeline.models, self.models

        def served() -> tuple[str, str, str]:
            prod = slots.production
            return prod.meta.onnx_sha256, prod.json_sha256, prod.model_id

        def load(directory: Path) -> None:
            assert lifecycle is not None
            lifecycle.load(directory, shadow=action == "shadow", origin="watcher")

        self.package_watcher = PackageWatcher(
            self.package.directory,
            served,
            self.registry,
            self.settings.line,
            interval_s=interval,
            on_new=load if action != "log" else None,
        )
        self.package_watcher.start()

    def start_control(self) -> None:
        if self.control is not None:
            self.control.start()

    def start_supervisor(self) -> None:
        self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        self._supervisor.start()

    def init_cpu_latency(self) -> None:
        """Hold ``batching.cpu_latency_us``'s wake-up latency request (daemon/cpu_latency.py) until stop."""
        setting = self.settings.batching.cpu_latency_us
        try:
            self.cpu_latency, self._cpu_latency_line = hold_for_setting(setting)
        except CpuLatencyError as exc:
            raise ConfigError(f"batching.cpu_latency_us = {setting!r}: {exc}") from None

    def freeze_startup_heap(self) -> None:
        """Everything start-up loaded goes to the collector's permanent generation (daemon.gc_pauses), so no
        full collection walks it again while frames are in flight. Done once every init step has run and before
        the first thread starts: the collection it runs first (tens to hundreds of ms in a large process) then
        delays no supervisor round, ping or frame."""
        self._gc_frozen = freeze_startup()

    def notify_ready(self, startup_s: float) -> None:
        self._update_ready()
        self.notifier.ready()
        log.info(
            "ready",
            boot_id=self.boot_id,
            pid=os.getpid(),
            startup_s=round(startup_s, 2),
            publisher=self.publisher_endpoint,
            metrics_port=self.metrics_port,
            max_batch=self.pipeline.max_batch if self.pipeline is not None else None,
            layout=self.pipeline.layout.describe() if self.pipeline is not None else None,
            opencv_threads=self.pipeline.opencv_threads if self.pipeline is not None else None,
            cpu_latency=self._cpu_latency_line,
            lone_frame=self.pipeline.lone_frame.describe() if self.pipeline is not None else None,
            gc=self._gc_frozen,
            sources=[s.describe() for s in self.sources],
            control=self.control_endpoint,
            security=self.curve.describe() if self.curve is not None else {"curve": False},
            **(self._backend.describe() if self._backend else {}),
        )

    # -- stop: the same steps in reverse ------------------------------------------------------------------
    def request_stop(self, exit_code: int = 0) -> None:
        """Safe from a signal handler: only records the request."""
        if exit_code:
            self.exit_code = exit_code
        self.stop_requested.set()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stopping = True
        self.stop_requested.set()
        t0 = time.monotonic()
        budget = self.settings.deadlines.shutdown_timeout_s
        self.notifier.stopping()
        self._update_ready()
        log.info("stopping", pending=self.pipeline.ledger.pending_count if self.pipeline else 0)
        if self._supervisor is not None:
            self._supervisor.join(timeout=2 * _SUPERVISE_S + 1)
        # No model change from here on.
        control_closed = self.control.stop() if self.control is not None else True
        if self.package_watcher is not None:
            self.package_watcher.stop()
        if self.models is not None:
            self.models.stop()
        for source in reversed(self.sources):
            try:
                source.stop()
            except Exception:
                log.exception("source stop failed", source=source.name)
        shutdown_rejects = 0
        if self.pipeline is not None:
            shutdown_rejects = self.pipeline.drain(max(0.5, budget - (time.monotonic() - t0)))
        clean = True
        if self.publisher is not None:
            linger = self.settings.publisher.linger_ms / 1000.0
            clean = self.publisher.join(max(0.5, budget - (time.monotonic() - t0)) + linger)
            if not clean:
                log.error("publisher did not finish in time")
        if self.after_publish is not None:
            self.after_publish.stop(max(0.5, budget - (time.monotonic() - t0)))
        for source in self.sources:
            if isinstance(source, FolderSource):
                source.close()  # its verdict journal: every verdict has been through on_verdict by now
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self.gc_pauses is not None:
            self.gc_pauses.remove()
        if self._gc_frozen is not None:
            unfreeze()
            self._gc_frozen = None
        if self.cpu_latency is not None:
            self.cpu_latency.release()  # every frame is settled: idle CPUs may sleep again
        monitor_closed = self.peers.stop() if self.peers is not None else True
        if self.curve is not None:
            self.curve.stop()
        if self.ctx is not None:
            sockets_closed = (
                clean
                and monitor_closed
                and control_closed
                and not any(getattr(s, "alive", False) for s in self.sources)
            )
            if sockets_closed:
                self.ctx.term()  # last: every socket is closed (with linger) by the thread that owned it
            else:
                self.ctx.destroy(linger=0)
        log.info(
            "stopped",
            admitted=self.pipeline.ledger.admitted if self.pipeline else 0,
            verdicts=self.publisher.seq_last if self.publisher else 0,
            shutdown_rejects=shutdown_rejects,
            seconds=round(time.monotonic() - t0, 3),
            exit_code=self.exit_code,
        )

    def run_until_stopped(self) -> int:
        """Block until a stop is requested (signal, fatal stage failure), then stop. Returns the exit code."""
        while not self.stop_requested.wait(0.5):
            pass
        self.stop()
        return self.exit_code

    # -- health --------------------------------------------------------------------------------------------
    def is_ready(self) -> bool:
        return self._ready_state

    def _compute_ready(self, dead: Sequence[str] | None = None) -> bool:
        p = self.pipeline
        return (
            not self._stopping
            and p is not None
            and p.healthy
            and p.progressing(self.settings.deadlines.stall_s)
            and not (self._dead_stages() if dead is None else dead)
        )

    def _update_ready(self, dead: Sequence[str] | None = None) -> None:
        ready = self._compute_ready(dead)
        if ready != self._ready_state:
            self._ready_state = ready
            if self.metrics is not None:
                self.metrics.set_ready(ready)
            log.info("readiness changed", ready=ready)

    def _supervise(self) -> None:
        assert self.pipeline is not None and self.metrics is not None
        stall_s = self.settings.deadlines.stall_s
        while not self.stop_requested.wait(_SUPERVISE_S):
            # Liveness first, once per round, and everything below decided from that one look: a stage found
            # dead gets no WATCHDOG=1 after it, not even in the round that finds it.
            dead = self._dead_stages()
            self._update_ready(dead)
            for name, depth in self.pipeline.queue_depths().items():
                self.metrics.set_queue_depth(name, depth)
            if dead:
                log.error("a stage died; stopping", stages=dead)
                self.request_stop(exit_code=1)
                return
            if self.pipeline.progressing(stall_s) and self.notifier.watchdog_interval_s is not None:
                self.notifier.watchdog()  # withheld while wedged: systemd's WatchdogSec then restarts us

    def _dead_stages(self) -> list[str]:
        """The stage threads that have ended: [] while every one runs (and before the pipeline exists)."""
        if self.pipeline is None:
            return []
        return [n for n, alive in self.stages_alive().items() if not alive]

    def stages_alive(self) -> dict[str, bool]:
        """Every thread a part's way through the daemon depends on: sources, pipeline, publisher, sinks."""
        p = self.pipeline
        assert p is not None
        alive = {
            "batcher": p.batcher.alive,
            **{w.name: w.alive for w in p.workers},  # "inference", "inference-1", …
            "deadline-watchdog": p.ledger.alive,
            "publisher": self.publisher is not None and self.publisher.alive,
        }
        for s in self.sources:
            alive[f"source-{s.name}"] = bool(getattr(s, "alive", True))
        if self.after_publish is not None:  # the audit archive, folder moves/journal, in-process listeners
            alive["after-publish"] = self.after_publish.alive
        if self.curve is not None:  # without it no camera can (re)connect: stop, let systemd restart us
            alive["zap-authenticator"] = self.curve.alive
        return alive

    # -- where things listen (ephemeral ports resolved) ----------------------------------------------------
    @property
    def publisher_endpoint(self) -> str | None:
        return self.publisher.endpoint if self.publisher else None

    @property
    def camera_endpoint(self) -> str | None:
        for s in self.sources:
            if isinstance(s, CameraSource):
                return s.endpoint
        return None

    @property
    def control_endpoint(self) -> str | None:
        return self.control.endpoint if self.control else None

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_server.port if self.metrics_server else None
