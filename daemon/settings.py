"""Configuration: one root ``Settings`` with a nested section per concern, read once at start.

Sources, highest priority first: explicit overrides (CLI flags) → ``INSPECTD_*`` environment variables (nested
with ``__``, e.g. ``INSPECTD_BATCHING__MAX_BATCH=16``) → the TOML file → defaults. Every section forbids
unknown keys, so a typo is an error that names the key instead of a silently ignored setting. Validators only
validate: they never read files, bind sockets or touch the network (``check-config`` does those checks
explicitly, outside the model).
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from engine.backend import BackendError, BackendOptions, OptionsError, backend_options, resolve_kind

DEFAULT_CONFIG = Path("/etc/inspectd/inspectd.toml")
MiB = 1024 * 1024

# tcp://host:port (port may be * or 0 = ephemeral), ipc://path, inproc://name. Checked textually only.
_ENDPOINT = re.compile(r"^(tcp://(\*|[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\]):(\*|\d{1,5})|ipc://.+|inproc://.+)$")
_LINE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the file/key and why."""


class Backpressure(enum.StrEnum):
    """What a source does when the intake queue is full. Explicit configuration, never a queue-size accident."""

    BLOCK = "block"  # wait for room (folder: the file simply waits on disk; it has no deadline pressure)
    REJECT_NEWEST = "reject_newest"  # the arriving frame gets REJECT overload
    REJECT_OLDEST = "reject_oldest"  # the oldest queued frame gets REJECT overload, the new one is queued


def _check_endpoint(value: str) -> str:
    if not _ENDPOINT.match(value):
        raise ValueError(f"{value!r} is not a ZeroMQ endpoint (tcp://HOST:PORT, ipc://PATH)")
    return value


def is_loopback(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// endpoints bound to a loopback address or ``localhost``."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name: reachable from elsewhere


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CameraSettings(_Section):
    enabled: bool = True
    name: str = "camera"  # source id in verdict records and metrics labels
    endpoint: str = "tcp://127.0.0.1:5555"  # the daemon binds a PULL socket here
    backpressure: Backpressure = Backpressure.REJECT_NEWEST
    max_message_bytes: int = Field(default=64 * MiB, ge=1024)  # per message part; larger → peer dropped
    rcvhwm: int = Field(default=100, ge=1)  # messages ZeroMQ may hold (per connection) before a send blocks
    # What ZeroMQ may hold queued for one camera connection, in bytes: rcvhwm × max_message_bytes must fit
    # (the high-water mark counts messages, not bytes). Size the unit's MemoryMax= with it (systemd/).
    max_buffered_bytes: int = Field(default=100 * 64 * MiB, ge=1024)

    _endpoint = field_validator("endpoint")(_check_endpoint)

    @model_validator(mode="after")
    def _buffered_bytes(self) -> CameraSettings:
        queued = self.rcvhwm * self.max_message_bytes
        if queued > self.max_buffered_bytes:
            raise ValueError(
                f"sources.camera.rcvhwm × sources.camera.max_message_bytes = {self.rcvhwm} × "
                f"{self.max_message_bytes} = {queued} bytes, above sources.camera.max_buffered_bytes "
                f"({self.max_buffered_bytes}): lower rcvhwm, or max_message_bytes to the largest frame the "
                "camera sends, or raise max_buffered_bytes (and the unit's MemoryMax=)"
            )
        return self


class FolderSettings(_Section):
    enabled: bool = False
    name: str = "folder"
    path: Path | None = None  # the watched directory (not recursive)
    process_existing: bool = True  # inspect files already there at start
    stable_ms: float = Field(default=500.0, gt=0)  # no close event: size+mtime unchanged this long = complete
    poll_ms: float = Field(default=20.0, gt=0)  # how often pending files are re-checked
    use_polling: bool = False  # stat-polling observer for filesystems without inotify (NFS, SMB)
    ignore_patterns: list[str] = Field(default_factory=lambda: [".*", "*.tmp", "*.part", "*.partial", "*~"])
    move_after_verdict: bool = False  # move to done/ (PASS) or rejected/ (REJECT) once published
    # Append-only record of published verdicts (name, size, mtime): a restart skips files recorded there and
    # re-inspects only the rest (at-least-once; see docs/reliability.md). None = no journal.
    journal: Path | None = None
    max_file_bytes: int = Field(default=64 * MiB, ge=1)
    backpressure: Backpressure = Backpressure.BLOCK

    @model_validator(mode="after")
    def _path_when_enabled(self) -> FolderSettings:
        if self.enabled and self.path is None:
            raise ValueError("sources.folder.path is required when sources.folder.enabled is true")
        return self


class SourcesSettings(_Section):
    camera: CameraSettings = CameraSettings()
    folder: FolderSettings = FolderSettings()


# A value in ``model.options`` as TOML and the environment give it; its type is the backend's to check.
OptionValue = str | int | float | bool | list[str | int]


class ModelSettings(_Section):
    path: Path | None = None  # the model package directory (model.onnx + model.json)
    backend: Literal["auto", "onnxruntime", "tensorrt", "torch"] = "onnxruntime"
    intra_op_threads: int = Field(default=1, ge=0)  # ONNX Runtime threads; 0 = its choice (all cores)
    # The chosen backend's own options, as configured (printed back by check-config); checked here against
    # its options type (engine.backends.*), so an unknown or mistyped key fails the configuration by name.
    options: dict[str, OptionValue] = Field(default_factory=dict)
    warmup: bool = True  # run every batch size once before READY
    verify_sha256: bool = True  # refuse a package whose model.onnx does not match model.json
    watch_s: float = Field(default=5.0, ge=0)  # how often to check the package on disk for changes; 0 = off
    # What a change of the package on disk leads to: "log" (a warning and a metric only), "load" (load it as
    # the candidate: verified, warmed up, never promoted by itself), "shadow" (load it and shadow-score it).
    watch_action: Literal["log", "load", "shadow"] = "log"

    @field_validator("options")
    @classmethod
    def _options_of_the_backend(
        cls, v: dict[str, OptionValue], info: ValidationInfo
    ) -> dict[str, OptionValue]:
        if "backend" not in info.data or "intra_op_threads" not in info.data:
            return v  # refused already; its own error says why
        try:
            _backend_options(info.data["backend"], info.data["intra_op_threads"], v)
        except OptionsError as exc:
            raise PydanticCustomError(
                "backend_options", "{message}", {"message": str(exc), "problems": exc.problems}
            ) from None
        except BackendError:
            pass  # the backend's module cannot be imported here: creating it at start-up says so
        return v

    def backend_options(self) -> BackendOptions:
        """``options`` as the typed options of the backend that ``backend`` resolves to (ONNX Runtime's
        ``intra_op_threads`` defaults to ``model.intra_op_threads``)."""
        return _backend_options(self.backend, self.intra_op_threads, self.options)


def _backend_options(backend: str, intra_op_threads: int, options: Mapping[str, object]) -> BackendOptions:
    kind = resolve_kind(backend)
    raw = dict(options)
    if kind == "onnxruntime":
        raw.setdefault("intra_op_threads", intra_op_threads)
    return backend_options(kind, raw)


AUTO_CPU_WORKERS = (
    4  # most ONNX Runtime sessions "auto" makes on a CPU: each holds its own copy of the weights
)


@dataclass(frozen=True, slots=True)
class ThreadLayout:
    """What ``batching``'s "auto" values resolve to on this machine, for the backend that was made."""

    inference_workers: int
    buffers: int
    preprocess_threads: int
    cores: int

    def describe(self) -> dict[str, int]:
        return {
            "inference_workers": self.inference_workers,
            "buffers": self.buffers,
            "preprocess_threads": self.preprocess_threads,
            "cores": self.cores,
        }


class BatchingSettings(_Section):
    max_batch: int = Field(default=8, ge=1, le=256)
    # While an inference worker is free, a batch waits at most this long after its first frame for company
    # (it is preprocessed meanwhile); while every worker is busy it fills up (daemon/batcher.py).
    max_wait_ms: float = Field(default=2.0, ge=0)
    queue_size: int = Field(default=64, ge=1)  # intake queue: where backpressure applies
    preprocess_threads: int = Field(default=2, ge=0)  # 0 = preprocess on the batcher thread
    # OpenCV's own threads inside each call (cv2.setNumThreads, process-wide). 1: each preprocessing thread runs
    # its OpenCV calls itself, the preprocessing pool being the parallelism. 0: OpenCV's default, a pool of one
    # thread per core whose workers keep spinning after each call and take the cores inference is using (on 2
    # cores a lone frame's inference p90 15.9 → 24.4 ms in isolation: docs/benchmarks.md run 13).
    opencv_threads: int = Field(default=1, ge=0, le=256)
    # A CPU wake-up latency request (PM QoS, /dev/cpu_dma_latency) held while the daemon runs, so idle CPUs wake
    # at once for a lone frame (daemon/cpu_latency.py; on the 2-core VM a lone frame's inference p50 17.0 →
    # 13.3 ms). "auto": 0 µs when the process may open the device, else logged and run without; N: hold N µs,
    # refuse to start if it cannot; "off": none. Costs power: idle CPUs poll instead of sleeping.
    cpu_latency_us: Annotated[int, Field(ge=0, le=2_000_000_000)] | Literal["auto", "off"] = "auto"
    # Preallocated batch buffers: one filling, one closed and waiting, one per worker in inference.
    # "auto" = inference_workers + 2; at least inference_workers + 1.
    buffers: Annotated[int, Field(ge=2)] | Literal["auto"] = "auto"
    # Inference threads, each with its own backend instance, running batches side by side. "auto": on a CPU
    # backend one single-threaded session (model.intra_op_threads = 1) per core, at most AUTO_CPU_WORKERS (N
    # sessions use N cores without intra-op barriers: docs/benchmarks.md); on a GPU backend one.
    inference_workers: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = "auto"
    # A frame that arrives while every inference worker is idle runs alone, on one single-threaded session,
    # while the other cores wait. "auto": an extra ONNX Runtime session with one thread per inference worker
    # runs such a frame instead, kept only if its batch of one measured at start-up is at least 10 % faster
    # than a worker's (daemon/lone_frame.py); N: that session with N threads, kept whatever it measures;
    # 0: none. A CPU ONNX Runtime backend with single-threaded workers only ("auto" is off otherwise).
    lone_frame_threads: Annotated[int, Field(ge=0, le=256)] | Literal["auto"] = "auto"
    # At start-up the batch size is capped to the largest one (of 1, 2, 4, … max_batch) whose warm-up inference
    # takes at most this share of deadlines.max_latency_ms: a frame may wait for the batch in flight and then
    # run in its own, so two of them must fit. 0 = always max_batch. Needs model.warmup.
    max_infer_share: float = Field(default=0.4, ge=0, le=1)
    # Where the crop, CLAHE, resize and normalise of a batch run: "cpu" (OpenCV in the preprocessing pool, the
    # reference) or "cuda" / "cuda:N" (engine.preprocess_torch, one batched call per batch on the inference
    # thread; the pool then only decodes and finds the pose). Needs torch with CUDA, checked at start.
    preprocess_device: str = Field(default="cpu", pattern=r"^(cpu|cuda(:\d+)?)$")

    @model_validator(mode="after")
    def _buffers_for_workers(self) -> BatchingSettings:
        if (
            isinstance(self.buffers, int)
            and isinstance(self.inference_workers, int)
            and self.buffers < self.inference_workers + 1
        ):
            raise ValueError(
                f"batching.buffers ({self.buffers}) must be ≥ batching.inference_workers + 1 "
                f"({self.inference_workers + 1}): one batch fills while every worker runs one"
            )
        return self

    def layout(
        self,
        *,
        on_cpu: bool,
        intra_op_threads: int = 1,
        cores: int | None = None,
    ) -> ThreadLayout:
        """The thread layout for a backend that computes on the CPU (``on_cpu``) or not, on ``cores`` cores
        (default: the ones this process may run on). An explicit value is kept; "auto" workers never need
        more buffers than explicit ``buffers`` allow."""
        n = cores if cores is not None else len(os.sched_getaffinity(0))
        per_session = intra_op_threads if intra_op_threads > 0 else n  # 0: ONNX Runtime's choice, all
        if isinstance(self.inference_workers, int):
            workers = self.inference_workers
        elif on_cpu:
            workers = max(1, min(n // per_session, AUTO_CPU_WORKERS))
        else:
            workers = 1
        if isinstance(self.buffers, int):
            workers = min(workers, self.buffers - 1)
            buffers = self.buffers
        else:
            buffers = workers + 2
        return ThreadLayout(workers, buffers, self.preprocess_threads, n)


class DeadlineSettings(_Section):
    max_latency_ms: float = Field(default=250.0, gt=0)  # deadline = arrival + this; then REJECT deadline
    engine_failures_not_ready: int = Field(default=3, ge=1)  # consecutive failed batches → not ready
    stall_s: float = Field(
        default=5.0, gt=0
    )  # work waiting and no batch finished this long → not progressing
    shutdown_timeout_s: float = Field(default=10.0, gt=0)  # drain budget; then REJECT shutdown


ImageFormat = Literal["png", "bmp", "tiff", "jpeg"]
_FORMATS: tuple[ImageFormat, ...] = ("png", "bmp", "tiff", "jpeg")


class DecodeSettings(_Section):
    """The input policy (daemon/image_policy.py): judged on the header, before any pixel is allocated."""

    max_pixels: int = Field(default=64 * MiB, ge=64)  # refuses decompression bombs before allocating
    min_side: int = Field(default=16, ge=1)  # a 1×1 "image" carries no part: REJECT, never upscale it
    max_side: int = Field(default=32768, ge=1)
    # Encoded formats accepted, recognised from the bytes; e.g. drop "jpeg" to refuse lossy images.
    formats: list[ImageFormat] = Field(default_factory=lambda: list(_FORMATS), min_length=1)

    @model_validator(mode="after")
    def _sides(self) -> DecodeSettings:
        if self.min_side > self.max_side:
            raise ValueError(f"decode.min_side {self.min_side} > decode.max_side {self.max_side}")
        return self


class PublisherSettings(_Section):
    endpoint: str = "tcp://127.0.0.1:5556"  # the daemon binds a PUB socket here
    heartbeat_ms: float = Field(default=1000.0, gt=0)
    sndhwm: int = Field(default=100_000, ge=1)  # per subscriber; beyond it ZeroMQ drops (seq shows the gap)
    linger_ms: int = Field(default=2000, ge=0)  # at close: time to flush queued verdicts
    # At start, no frame is read until this long after the bind: subscribers of the previous run re-subscribe
    # first (ZeroMQ reconnects every 100 ms by default), instead of missing the new boot's first verdicts.
    # Set it above the subscribers' ZMQ_RECONNECT_IVL.
    join_grace_ms: float = Field(default=500.0, ge=0)

    _endpoint = field_validator("endpoint")(_check_endpoint)


class AuditSettings(_Section):
    enabled: bool = False
    path: Path | None = None
    max_bytes: int = Field(default=1024 * MiB, ge=MiB)  # oldest entries deleted first beyond this
    pass_sample_rate: float = Field(default=0.0, ge=0.0, le=1.0)  # fraction of PASS images kept too
    queue_size: int = Field(
        default=256, ge=1
    )  # beyond it an entry is skipped (logged), never blocking verdicts

    @model_validator(mode="after")
    def _path_when_enabled(self) -> AuditSettings:
        if self.enabled and self.path is None:
            raise ValueError("audit.path is required when audit.enabled is true")
        return self


class SecuritySettings(_Section):
    """ZeroMQ CURVE (encryption + client authentication) on the camera and verdict sockets.

    All three set: both sockets are CURVE servers and only clients whose public key file (``*.key``, as written
    by ``inspectd keys generate``) is in the matching directory may connect. None set: plain TCP (then keep
    the endpoints on loopback or a closed network). Files are read at start, not here.
    """

    server_secret_key: Path | None = None  # the daemon's secret certificate (``NAME.key_secret``)
    camera_clients: Path | None = None  # directory of camera public keys allowed to push frames
    subscriber_clients: Path | None = None  # directory of line-controller public keys allowed to subscribe
    # Directory of operator public keys allowed on the control socket (``inspectd model …``); makes it a CURVE
    # server too. Needs the three above. Unset: the control socket must be loopback or ipc:// (not CURVE).
    control_clients: Path | None = None

    @property
    def curve(self) -> bool:
        return self.server_secret_key is not None

    @model_validator(mode="after")
    def _all_or_nothing(self) -> SecuritySettings:
        given = {
            k: getattr(self, k) is not None
            for k in ("server_secret_key", "camera_clients", "subscriber_clients")
        }
        if any(given.values()) and not all(given.values()):
            missing = [f"security.{k}" for k, v in given.items() if not v]
            raise ValueError(f"CURVE needs all three security keys; missing {', '.join(missing)}")
        if self.control_clients is not None and not self.curve:
            raise ValueError(
                "security.control_clients needs CURVE: set security.server_secret_key (and the rest)"
            )
        return self


class ControlSettings(_Section):
    """The local control socket (ZeroMQ REP, JSON requests): ``inspectd model load|status|shadow|promote|
    rollback|drop``. Loopback or ipc:// only, unless ``security.control_clients`` makes it a CURVE server."""

    enabled: bool = True
    # tcp://127.0.0.1:* = ephemeral (tests, bench: the ready line says where). A station should prefer an ipc://
    # path in the unit's RuntimeDirectory (/run/inspectd): then the file's permissions say who may control.
    endpoint: str = "tcp://127.0.0.1:5557"
    max_request_bytes: int = Field(default=64 * 1024, ge=1024)  # larger → the client is dropped by ZeroMQ

    _endpoint = field_validator("endpoint")(_check_endpoint)


class ShadowSettings(_Section):
    """Shadow scoring of a candidate model beside production (daemon/shadow.py)."""

    # A shadowed frame whose candidate score differs from production's by more than this (same verdict) is a
    # "score" disagreement; a PASS↔REJECT flip is one whatever the scores.
    score_tolerance: float = Field(default=0.1, gt=0, le=1)
    # Batches waiting for the candidate; when full, the newest batch is not shadowed (the sampled share shows it).
    queue_batches: int = Field(default=4, ge=1, le=1024)
    # Production first: while production is at the machine's limit — its inference workers busy this share of
    # the last half second or more, or yield_backlog frames waiting in the intake queue — no batch is shadowed and
    # no queued one started. yield_busy = 1 and yield_backlog = 0: never yield (only a full queue skips).
    yield_busy: float = Field(default=0.75, gt=0, le=1)
    yield_backlog: int = Field(default=8, ge=0)
    nice: int = Field(default=10, ge=0, le=19)  # the shadow thread's CPU priority below production's (Linux)
    audit: bool = (
        True  # keep disagreeing frames, with both verdicts, in the audit archive (when audit.enabled)
    )


class MetricsSettings(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=9108, ge=0, le=65535)  # 0 = ephemeral (tests)
    ng_window: int = Field(default=500, ge=1)
    # The drift statistics (daemon/drift.py) look at the last drift_window scored parts; the score drift is
    # reported once drift_min_parts of them passed (fewer: NaN, sampling noise would dominate).
    drift_window: int = Field(default=500, ge=1, le=100_000)
    drift_min_parts: int = Field(default=100, ge=1)

    @model_validator(mode="after")
    def _drift_parts_fit_the_window(self) -> MetricsSettings:
        if self.drift_min_parts > self.drift_window:
            raise ValueError(
                f"metrics.drift_min_parts ({self.drift_min_parts}) must not exceed metrics.drift_window "
                f"({self.drift_window})"
            )
        return self


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "console"] = "auto"  # auto: console on a terminal, JSON otherwise
    batch_lines: bool = True  # one canonical line per inference batch

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v


# The TOML file of the current load_settings() call; a ContextVar so concurrent loads (tests) don't mix.
_TOML_FILE: ContextVar[Path | None] = ContextVar("_TOML_FILE", default=None)


class TomlSettings(BaseSettings):
    """Settings read from keyword overrides, then the environment, then the TOML file of the current
    :func:`load_toml_settings` call (in that precedence). The daemon's and the PLC bridge's settings both are."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=_TOML_FILE.get())


class LineSettings(TomlSettings):
    """Settings of a process that serves one line: the daemon, the PLC bridge."""

    line: str = "line-1"  # line id: verdict topic, metrics label

    @field_validator("line")
    @classmethod
    def _line_id(cls, v: str) -> str:
        if not _LINE_ID.match(v):
            raise ValueError(f"line id {v!r} must be 1-64 characters of letters, digits, '_', '.', '-'")
        return v


class Settings(LineSettings):
    model_config = SettingsConfigDict(
        env_prefix="INSPECTD_", env_nested_delimiter="__", extra="forbid", frozen=True, validate_default=True
    )

    sources: SourcesSettings = SourcesSettings()
    model: ModelSettings = ModelSettings()
    batching: BatchingSettings = BatchingSettings()
    deadlines: DeadlineSettings = DeadlineSettings()
    decode: DecodeSettings = DecodeSettings()
    publisher: PublisherSettings = PublisherSettings()
    audit: AuditSettings = AuditSettings()
    security: SecuritySettings = SecuritySettings()
    control: ControlSettings = ControlSettings()
    shadow: ShadowSettings = ShadowSettings()
    metrics: MetricsSettings = MetricsSettings()
    logging: LoggingSettings = LoggingSettings()

    @model_validator(mode="after")
    def _distinct_endpoints(self) -> Settings:
        bound = [("publisher.endpoint", self.publisher.endpoint)]
        if self.sources.camera.enabled:
            bound.append(("sources.camera.endpoint", self.sources.camera.endpoint))
        if self.control.enabled:
            bound.append(("control.endpoint", self.control.endpoint))
        for i, (key, endpoint) in enumerate(bound):
            for other, endpoint2 in bound[i + 1 :]:
                if endpoint == endpoint2 and not endpoint.endswith(":*"):
                    raise ValueError(f"{other} and {key} are both {endpoint}")
        return self

    @model_validator(mode="after")
    def _control_not_exposed(self) -> Settings:
        # The control socket changes the model that decides every part: never reachable from the network
        # without CURVE and a list of allowed operator keys.
        c = self.control
        if c.enabled and self.security.control_clients is None and not is_loopback(c.endpoint):
            raise ValueError(
                f"control.endpoint {c.endpoint} is reachable from the network without CURVE: use ipc:// or a "
                "loopback address, or set security.control_clients (with the other security keys)"
            )
        return self


def deep_update(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, section by section (nested mappings merged, other values replaced);
    neither argument is changed. The one merge of configuration layers: CLI overrides, tests, the bench."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


def settings_assignments(items: Iterable[str]) -> dict[str, Any]:
    """``["batching.buffers=4", 'logging.format="json"']`` → nested overrides for :func:`deep_update`; each
    value is read as TOML (a bare word that is not TOML is taken as a string). A malformed item is a
    :class:`ConfigError` naming it."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"{item!r}: expected SECTION.KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        node: dict[str, Any] = {parts[-1]: value}
        for part in reversed(parts[:-1]):
            node = {part: node}
        out = deep_update(out, node)
    return out


def resolve_config_path(path: Path | None) -> Path | None:
    """An explicit path must exist; without one, the system default is used when present."""
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load_settings(config: Path | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Build the effective settings; raises :class:`ConfigError` with every problem listed by key."""
    return load_toml_settings(Settings, resolve_config_path(config), overrides)


S = TypeVar("S", bound=TomlSettings)


def load_toml_settings(cls: type[S], path: Path | None, overrides: Mapping[str, Any] | None = None) -> S:
    """``cls`` from ``path`` (None: no file), the environment and ``overrides``; :class:`ConfigError` with
    every problem listed by key (a TOML syntax error names the file)."""
    if path is not None:
        try:  # parse once here so a syntax error names the file, not a pydantic internals stack
            tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
    token = _TOML_FILE.set(path)
    try:
        return cls(**deep_update({}, overrides or {}))
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, path)) from None
    finally:
        _TOML_FILE.reset(token)


def format_errors(exc: ValidationError, path: Path | None) -> str:
    where = f" ({path} + INSPECTD_* environment)" if path else " (INSPECTD_* environment)"
    lines = [f"invalid configuration{where}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        if err["type"] == "backend_options":  # model.options: one line per option, named model.options.KEY
            for option, msg in err.get("ctx", {}).get("problems", ()):
                lines.append(f"  {key}.{option}: {msg}" if option is not None else f"  {key}: {msg}")
            continue
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def to_toml(settings: BaseModel) -> str:
    """The effective configuration (``Settings``, or another settings model: the PLC bridge's) as a TOML file
    that ``--config`` accepts (None values are commented)."""
    data = settings.model_dump(mode="json")
    lines: list[str] = []
    top = {k: v for k, v in data.items() if not isinstance(v, dict)}
    lines.extend(_toml_items(top))
    for name, table in _tables(data, ()):
        lines.append("")
        lines.append(f"[{'.'.join(name)}]")
        lines.extend(_toml_items(table))
    return "\n".join(lines) + "\n"


def _tables(
    data: dict[str, Any], prefix: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    for key, value in data.items():
        if isinstance(value, dict):
            name = (*prefix, key)
            scalars = {
                k: v for k, v in value.items() if not isinstance(v, dict) or not v or _is_option_map(k)
            }
            if scalars or not value:
                yield name, scalars
            yield from _tables({k: v for k, v in value.items() if k not in scalars}, name)


def _is_option_map(key: str) -> bool:
    return key == "options"  # model.options is a free map, written inline


def _toml_items(table: dict[str, Any]) -> Iterator[str]:
    for key, value in table.items():
        if value is None:
            yield f"# {key} = (not set)"
        else:
            yield f"{key} = {_toml_value(value)}"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
