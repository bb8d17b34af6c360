"""TensorRT engine builder and its cache: ONNX → serialized plan, keyed so a plan is only ever loaded where
it was built for.

A plan is tied to the exact TensorRT version, the GPU (compute capability), the precision and the batch
profile it was built with; loading one anywhere else at best fails and at worst trips TensorRT's version-tag
assertion. So every plan in ``package.engine_cache_dir`` has a JSON sidecar holding its :class:`EngineKey`,
and :meth:`EngineCache.lookup` compares the whole key *before* a single byte of the plan reaches
``deserialize_cuda_engine``.

Integrity, as on the CPU path (``load_package`` hashes ``model.onnx``): the sidecar records the plan's sha256
when it is built; :meth:`EngineCache.read_plan` reads the plan once, hashes those very bytes and hands back
only those bytes, so a swapped or corrupted plan is refused, never deserialized. A build reads ``model.onnx``
once, checks its sha256 against the key (the package's ``onnx_sha256``) and parses those verified bytes, not
the path. The sidecar also says whether the plan passed ``inspectd build-engine``'s parity gate;
:func:`check_gate` refuses an ungated plan unless the configuration accepts one (``allow_ungated``).

Polygraphy's split: this module builds (loaders build); :mod:`engine.backends.tensorrt` runs. ``tensorrt``
is imported lazily, only inside the functions that need it, and only TensorRT ≥ 10 is supported.

FP16 takes one of two routes, chosen in one place (:func:`precision_route`) by what the installed TensorRT
offers, not by its version number:

- **weakly typed** (TensorRT 10: ``BuilderFlag.FP16``): the model's ONNX as it is; the builder may pick FP16
  kernels anywhere, except in the layers the model marks FP32 (its ``fp32`` ONNX scopes, engine.onnx_fp16),
  which are pinned to FP32 with ``OBEY_PRECISION_CONSTRAINTS``;
- **strongly typed** (TensorRT 11 removed ``BuilderFlag.FP16``; strong typing is its only FP16 route): an FP16
  copy of the ONNX (engine.onnx_fp16: FP32 inputs and outputs, the model's FP32 scopes kept FP32), made from
  the verified bytes, parsed into a strongly typed network.

Either way TF32 is turned off when the model has FP32 scopes: TF32 keeps 10 mantissa bits, no better than FP16
for the sums those scopes protect.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from engine.backend import BackendError

log = logging.getLogger(__name__)

Precision = Literal["fp16", "fp32"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
MIN_TENSORRT_MAJOR = 10
DEFAULT_WORKSPACE_MB = 1024
_SAFE = re.compile(r"[^A-Za-z0-9.]+")


class EngineBuildError(BackendError):
    """TensorRT could not parse the ONNX file or build a plan from it."""


class EngineKeyMismatch(BackendError):
    """No plan in the cache was built for this station/model/precision/profile (and rebuilding is off)."""


class PlanIntegrityError(BackendError):
    """A plan whose bytes do not hash to the sha256 its sidecar recorded when it was built (swapped, corrupted,
    or written by something other than inspectd's builder). Refused, never deserialized, never rebuilt over."""


class UngatedPlanError(BackendError):
    """A plan that has not passed ``inspectd build-engine``'s parity gate, and the configuration does not accept
    one (``allow_ungated``)."""


GateStatus = Literal["passed", "ungated-accepted"]


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def read_verified_onnx(path: Path, expected_sha256: str) -> bytes:
    """The bytes of ``path``, read once, if they hash to ``expected_sha256`` (the package's ``onnx_sha256``,
    which is also the engine key's): a build parses exactly these bytes, so the file cannot change between the
    check and the parse, and a plan is never keyed under a model it was not built from."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise EngineBuildError(f"cannot read {path}: {exc}") from None
    actual = sha256_bytes(data)
    if actual != expected_sha256:
        raise EngineBuildError(
            f"{path} sha256 {actual[:16]}… does not match the package's onnx_sha256 {expected_sha256[:16]}… "
            "(the file changed after the package was loaded, or model.json does not describe it); "
            "refusing to build a TensorRT plan from it"
        )
    return data


def import_tensorrt() -> Any:
    """``import tensorrt``, refusing versions before 10 (named I/O tensors, ``execute_async_v3``)."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendError(f"TensorRT is not importable here: {exc}") from None
    major = int(str(trt.__version__).split(".")[0])
    if major < MIN_TENSORRT_MAJOR:
        raise BackendError(f"TensorRT {trt.__version__} is too old; inspectd needs TensorRT ≥ 10")
    return trt


@functools.lru_cache(maxsize=1)
def trt_logger() -> Any:
    """One logger for the process: TensorRT warns (and may misbehave) when builder and runtime use different
    loggers."""
    trt = import_tensorrt()
    return trt.Logger(trt.Logger.WARNING)


@dataclass(frozen=True, slots=True)
class BatchProfile:
    """The optimization profile over the batch dimension: every batch size in ``min..max`` is valid, and
    TensorRT tunes its kernels for ``opt`` (the batch size the line typically produces)."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"batch profile must satisfy 1 ≤ min ≤ opt ≤ max, got {self}")

    @classmethod
    def for_max(cls, max_batch: int, opt: int | None = None) -> BatchProfile:
        """1..max_batch, opt defaulting to 8 (or max_batch when smaller)."""
        return cls(1, min(max_batch, opt if opt is not None else 8), max_batch)

    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(range(self.min, self.max + 1))

    def shapes(self, chw: tuple[int, int, int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) full input shapes, as ``IOptimizationProfile.set_shape`` takes them."""
        return ((self.min, *chw), (self.opt, *chw), (self.max, *chw))


@dataclass(frozen=True, slots=True)
class EngineKey:
    """Everything a plan depends on. Two plans with equal keys are interchangeable; unequal keys never are."""

    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"
    precision: str
    profile: BatchProfile
    input_shape: tuple[int, int, int]  # (C, H, W); the batch dimension is the profile's

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineKey:
        p = d["profile"]
        return cls(
            onnx_sha256=str(d["onnx_sha256"]),
            tensorrt_version=str(d["tensorrt_version"]),
            gpu_name=str(d["gpu_name"]),
            compute_capability=str(d["compute_capability"]),
            precision=str(d["precision"]),
            profile=BatchProfile(int(p["min"]), int(p["opt"]), int(p["max"])),
            input_shape=(int(d["input_shape"][0]), int(d["input_shape"][1]), int(d["input_shape"][2])),
        )

    def digest(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def stem(self) -> str:
        """File name stem: readable for a person listing the folder, unique through the digest."""
        p = self.profile
        return f"trt{_SAFE.sub('_', self.tensorrt_version)}-{self.precision}-b{p.min}-{p.opt}-{p.max}-{self.digest()}"

    def describe(self) -> str:
        p = self.profile
        return (
            f"onnx {self.onnx_sha256[:12]}, TensorRT {self.tensorrt_version}, {self.gpu_name} "
            f"(sm {self.compute_capability}), {self.precision}, batch {p.min}/{p.opt}/{p.max}, "
            f"input {'×'.join(map(str, self.input_shape))}"
        )

    def differences(self, other: EngineKey) -> list[str]:
        """Human-readable ``field: theirs → ours`` for every field that differs."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k}: {theirs[k]} → {mine[k]}" for k in mine if mine[k] != theirs[k]]


@dataclass(frozen=True, slots=True)
class CachedEngine:
    key: EngineKey
    plan: Path
    record: dict[str, Any]  # the sidecar: key, build and parity information


class EngineCache:
    """Plans and their JSON sidecars in one folder (``package.engine_cache_dir``), plus the timing cache.

    Written atomically (temporary file + rename) so a daemon starting during a build sees either no plan
    or a complete one. A plan whose sidecar is missing, unreadable or holds another key is never loaded.
    """

    SIDECAR_SUFFIX = ".json"
    PLAN_SUFFIX = ".plan"
    CANDIDATE = ".candidate"

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def plan_path(self, key: EngineKey, *, candidate: bool = False) -> Path:
        tag = self.CANDIDATE if candidate else ""
        return self.directory / f"{key.stem()}{tag}{self.PLAN_SUFFIX}"

    @staticmethod
    def sidecar_path(plan: Path) -> Path:
        return plan.with_suffix(EngineCache.SIDECAR_SUFFIX)

    def read_record(self, plan: Path) -> dict[str, Any] | None:
        try:
            record = json.loads(self.sidecar_path(plan).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and isinstance(record.get("key"), dict) else None

    def verify(self, plan: Path, key: EngineKey) -> dict[str, Any]:
        """The sidecar record of ``plan`` if it holds exactly ``key``; else :class:`EngineKeyMismatch`."""
        record = self.read_record(plan)
        if record is None:
            raise EngineKeyMismatch(f"engine plan {plan} has no readable key sidecar; refusing to load it")
        try:
            theirs = EngineKey.from_dict(record["key"])
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineKeyMismatch(f"engine plan {plan} has a malformed key sidecar ({exc})") from None
        if theirs != key:
            raise EngineKeyMismatch(
                f"engine plan {plan} was built for [{theirs.describe()}], this station needs "
                f"[{key.describe()}] (differs in {'; '.join(key.differences(theirs))})"
            )
        if not plan.is_file():
            raise EngineKeyMismatch(f"engine plan {plan} is missing (only its sidecar exists)")
        return record

    def lookup(self, key: EngineKey) -> CachedEngine | None:
        plan = self.plan_path(key)
        if not plan.is_file():
            return None
        try:
            record = self.verify(plan, key)
        except EngineKeyMismatch as exc:
            log.warning("ignoring cached engine: %s", exc)
            return None
        return CachedEngine(key=key, plan=plan, record=record)

    def entries(self) -> list[EngineKey]:
        """Keys of every activated plan in the folder (candidates excluded)."""
        keys = []
        for sidecar in sorted(self.directory.glob(f"*{self.SIDECAR_SUFFIX}")):
            if self.CANDIDATE in sidecar.name or sidecar.name.startswith("."):
                continue
            record = self.read_record(sidecar.with_suffix(self.PLAN_SUFFIX))
            if record is None:
                continue
            with contextlib.suppress(KeyError, TypeError, ValueError):
                keys.append(EngineKey.from_dict(record["key"]))
        return keys

    def store(self, key: EngineKey, plan: bytes, record: dict[str, Any], *, candidate: bool = False) -> Path:
        """Write plan then sidecar (a sidecar never points at a half-written plan). The sidecar records the
        sha256 and size of exactly these plan bytes (``plan_sha256``, ``plan_bytes``), whatever ``record``
        says."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.plan_path(key, candidate=candidate)
        _atomic_write(path, plan)
        reserved = {"key", "plan_sha256", "plan_bytes"}
        full = {
            "key": key.to_dict(),
            "plan_sha256": sha256_bytes(plan),
            "plan_bytes": len(plan),
            **{k: v for k, v in record.items() if k not in reserved},
        }
        _atomic_write(self.sidecar_path(path), (json.dumps(full, indent=2) + "\n").encode())
        return path

    def read_plan(self, plan: Path, record: dict[str, Any]) -> bytes:
        """The bytes of ``plan``, read once, if they hash to the ``plan_sha256`` its sidecar ``record`` holds;
        else :class:`PlanIntegrityError`. Deserialize exactly the bytes returned, never the file again."""
        expected = record.get("plan_sha256")
        if not isinstance(expected, str) or len(expected) != 64:
            raise PlanIntegrityError(
                f"engine plan {plan}: its sidecar records no plan_sha256 (written by an inspectd without plan "
                "hashing, or edited), so its bytes cannot be checked; refusing to load it. Rebuild it on this "
                "station: inspectd build-engine PACKAGE --force --data VALIDATION_DIR"
            )
        try:
            data = plan.read_bytes()
        except OSError as exc:
            raise PlanIntegrityError(f"engine plan {plan} cannot be read: {exc}") from None
        actual = sha256_bytes(data)
        if actual != expected:
            raise PlanIntegrityError(
                f"engine plan {plan} has sha256 {actual[:16]}… ({len(data)} bytes), but its sidecar recorded "
                f"{expected[:16]}… ({record.get('plan_bytes')} bytes) when it was built: the plan was replaced "
                "or corrupted. Refusing to deserialize it (and not rebuilding over it: find out what changed "
                "it). Then delete it, or replace it with: inspectd build-engine PACKAGE --force "
                "--data VALIDATION_DIR"
            )
        return data

    def activate(self, key: EngineKey, record_update: dict[str, Any]) -> Path:
        """Promote the candidate plan (which passed the parity gate) to the key's plan."""
        cand = self.plan_path(key, candidate=True)
        record = self.verify(cand, key)
        self.read_plan(cand, record)  # a candidate that changed since it was built is never promoted
        record.update(
            {k: v for k, v in record_update.items() if k not in {"key", "plan_sha256", "plan_bytes"}}
        )
        final = self.plan_path(key)
        os.replace(cand, final)
        _atomic_write(self.sidecar_path(final), (json.dumps(record, indent=2) + "\n").encode())
        self.sidecar_path(cand).unlink(missing_ok=True)
        return final

    def discard_candidate(self, key: EngineKey) -> None:
        cand = self.plan_path(key, candidate=True)
        cand.unlink(missing_ok=True)
        self.sidecar_path(cand).unlink(missing_ok=True)

    def timing_cache_path(self, key: EngineKey) -> Path:
        """One timing cache per TensorRT version and GPU: TensorRT rejects a cache from another version or
        device, so sharing one file across them would only throw the tuning away."""
        gpu = _SAFE.sub("_", key.gpu_name).strip("_")
        return (
            self.directory
            / f"timing-trt{_SAFE.sub('_', key.tensorrt_version)}-{gpu}-sm{key.compute_capability}.cache"
        )

    @contextlib.contextmanager
    def build_lock(self) -> Iterator[None]:
        """Several daemons on one station may start together; one builds, the others then find its plan."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / ".build.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def mismatch_message(cache: EngineCache, key: EngineKey, package_dir: Path) -> str:
    """Names the wanted key and every key the cache does hold, with the fields that differ."""
    found = cache.entries()
    lines = [f"no TensorRT engine in {cache.directory} for this station: need [{key.describe()}]"]
    if not found:
        lines.append("the engine cache is empty")
    for other in found:
        lines.append(f"found [{other.describe()}] — differs in {'; '.join(key.differences(other))}")
    lines.append(
        f"build one with 'inspectd build-engine {package_dir}' on this station, or allow the backend to "
        "rebuild (rebuild=True)"
    )
    return "\n  ".join(lines)


def build_plan(
    onnx_path: Path,
    key: EngineKey,
    *,
    input_name: str,
    timing_cache: Path | None,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
) -> bytes:
    """Read ``onnx_path`` once, check its sha256 against ``key.onnx_sha256`` and build a serialized plan for
    ``key`` (precision + batch profile) from those verified bytes (``OnnxParser.parse``, not the path).

    The timing cache is read before and written after the build, so a rebuild (new model, same layers)
    skips most kernel timing.
    """
    trt = import_tensorrt()
    onnx_bytes = read_verified_onnx(onnx_path, key.onnx_sha256)
    route = precision_route(key.precision)
    if route.strongly_typed:
        onnx_bytes = _fp16_onnx(onnx_bytes, onnx_path)
    logger = trt_logger()
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, route))
    parser = trt.OnnxParser(network, logger)
    # No path argument: the package has no external weights (load_package refuses them), so the parser needs
    # nothing from the file system — it sees only the bytes that were hashed (or their FP16 copy).
    if not parser.parse(onnx_bytes):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path}: {'; '.join(errors) or 'no details'}")
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    if set(inputs) != {input_name}:
        raise EngineBuildError(f"{onnx_path} has inputs {sorted(inputs)}; expected exactly [{input_name!r}]")
    declared = tuple(inputs[input_name].shape)
    if len(declared) != 4 or tuple(d for d in declared[1:]) != key.input_shape:
        raise EngineBuildError(
            f"{onnx_path} input {input_name!r} has shape {declared}; expected (N, {', '.join(map(str, key.input_shape))})"
        )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    _apply_precision(trt, network, config, route)
    profile = builder.create_optimization_profile()
    mn, opt, mx = key.profile.shapes(key.input_shape)
    profile.set_shape(input_name, mn, opt, mx)
    if config.add_optimization_profile(profile) < 0:
        raise EngineBuildError(f"TensorRT rejected the optimization profile {key.profile}")

    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    # ignore_mismatch=False: a cache from another device/version is dropped, never blended in (the file
    # name already separates them, see EngineCache.timing_cache_path).
    config.set_timing_cache(cache, ignore_mismatch=False)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"TensorRT failed to build {onnx_path} for [{key.describe()}]; see its log above"
        )
    log.info("built TensorRT plan for [%s] in %.1f s", key.describe(), time.perf_counter() - t0)
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


@dataclass(frozen=True, slots=True)
class PrecisionRoute:
    """How the installed TensorRT builds a precision (see the module docstring)."""

    name: str  # recorded in the plan's sidecar (``precision_route``)
    strongly_typed: bool  # parse the FP16-cast ONNX into a strongly typed network
    builder_fp16: bool  # weakly typed: BuilderFlag.FP16, the model's FP32 scopes pinned


def precision_route(precision: str) -> PrecisionRoute:
    """The one place that decides how ``precision`` is built here, from what this TensorRT offers."""
    if precision == "fp32":
        return PrecisionRoute("fp32", strongly_typed=False, builder_fp16=False)
    trt = import_tensorrt()
    if getattr(trt.BuilderFlag, "FP16", None) is not None:
        return PrecisionRoute(
            "fp16 weakly typed (BuilderFlag.FP16; the model's fp32 scopes pinned to FP32)",
            strongly_typed=False,
            builder_fp16=True,
        )
    return PrecisionRoute(
        "fp16 strongly typed (FP16-cast ONNX, engine.onnx_fp16; the model's fp32 scopes kept FP32)",
        strongly_typed=True,
        builder_fp16=False,
    )


def _fp16_onnx(onnx_bytes: bytes, onnx_path: Path) -> bytes:
    from engine.onnx_fp16 import Fp16Error, to_fp16

    try:
        fp16 = to_fp16(onnx_bytes)
    except ImportError as exc:
        raise EngineBuildError(
            f"an FP16 plan on this TensorRT needs the onnx package (the gpu extra) to cast {onnx_path}: {exc}"
        ) from None
    except Fp16Error as exc:
        raise EngineBuildError(
            f"cannot make the FP16 graph of {onnx_path} for a strongly typed network: {exc}"
        ) from None
    log.info("FP16 graph of %s for a strongly typed network: %s", onnx_path, fp16.summary())
    return fp16.data


def _network_flags(trt: Any, route: PrecisionRoute) -> int:
    """Networks are explicit-batch in TensorRT ≥ 10 (EXPLICIT_BATCH is ignored in 10 and gone in 11), so the only
    flag is STRONGLY_TYPED, and only where it still exists (11 types every network strongly and deprecated it)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 1 << int(flag) if route.strongly_typed and flag is not None else 0


def _apply_precision(trt: Any, network: Any, config: Any, route: PrecisionRoute) -> None:
    from engine.onnx_fp16 import in_fp32_scope

    scoped = [network.get_layer(i) for i in range(network.num_layers)]
    scoped = [layer for layer in scoped if in_fp32_scope(str(layer.name))]
    if scoped and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if not route.builder_fp16:
        return
    config.set_flag(trt.BuilderFlag.FP16)
    pinned = 0
    floats = (trt.DataType.FLOAT, trt.DataType.HALF)
    for layer in scoped:
        outs = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype in floats]
        if not outs:
            continue
        layer.precision = trt.DataType.FLOAT
        for j in outs:
            layer.set_output_type(j, trt.DataType.FLOAT)
        pinned += 1
    if pinned:
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        log.info("%d layers of the model's fp32 scopes pinned to FP32", pinned)


def resolve_plan(
    cache: EngineCache,
    key: EngineKey,
    *,
    package_dir: Path,
    rebuild: bool,
    build: Callable[[], bytes],
    allow_ungated: bool = False,
) -> CachedEngine:
    """The cached plan for ``key``; else build it (when ``rebuild`` and ``allow_ungated``) or raise.

    A plan built here is not parity-gated (the daemon has no validation images); its sidecar says so, and
    ``inspectd build-engine`` is the gated way. Since the daemon serves an ungated plan only with
    ``allow_ungated``, ``rebuild`` without it refuses *before* spending minutes on a plan it would then refuse
    (:class:`UngatedPlanError`). Integrity and gate of whatever is returned are checked by the caller, on the
    bytes it deserializes (:meth:`EngineCache.read_plan`, :func:`check_gate`).
    """
    hit = cache.lookup(key)
    if hit is not None:
        return hit
    if not rebuild:
        raise EngineKeyMismatch(mismatch_message(cache, key, package_dir))
    if not allow_ungated:
        raise UngatedPlanError(
            f"no TensorRT engine in {cache.directory} for this station [{key.describe()}]. rebuild=true would "
            "build one now, but a plan the daemon builds at start has not passed the parity gate, and an "
            "ungated plan is served only with allow_ungated=true. Build a gated one on this station: "
            f"'inspectd build-engine {package_dir} --data VALIDATION_DIR' (or set model.options.allow_ungated "
            "= true to accept an ungated one, logged and shown as gate=ungated-accepted on inspectd_model_info)"
        )
    with cache.build_lock():
        hit = cache.lookup(key)  # another process may have built it while we waited
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        plan = build()
        record: dict[str, Any] = {
            "built_by": "backend rebuild",
            "build_seconds": round(time.perf_counter() - t0, 2),
            "precision_route": precision_route(key.precision).name,
            "parity": {"gated": False, "reason": "built by the backend at start (rebuild=true)"},
        }
        path = cache.store(key, plan, record)
    return CachedEngine(key=key, plan=path, record=cache.verify(path, key))


def passed_gate(record: dict[str, Any]) -> bool:
    """True when the sidecar ``record`` says its plan passed ``inspectd build-engine``'s parity gate: the
    gate's record must name this very plan (its ``plan_sha256``), so a gate result never carries over to
    other bytes."""
    parity = record.get("parity")
    return (
        isinstance(parity, dict)
        and parity.get("gated") is True
        and isinstance(record.get("plan_sha256"), str)
        and parity.get("plan_sha256") == record.get("plan_sha256")
    )


def check_gate(record: dict[str, Any], plan: Path, *, allow_ungated: bool, package_dir: Path) -> GateStatus:
    """``"passed"`` for a gated plan; for an ungated one :class:`UngatedPlanError`, or — when the configuration
    explicitly accepts it (``allow_ungated``) — ``"ungated-accepted"`` with a warning in the log."""
    if passed_gate(record):
        return "passed"
    parity = record.get("parity")
    why = (
        parity.get("reason")
        if isinstance(parity, dict) and parity.get("reason")
        else f"built by {record.get('built_by', 'an unknown builder')}, with no parity record for these bytes"
    )
    if not allow_ungated:
        raise UngatedPlanError(
            f"engine plan {plan} has not passed the parity gate of 'inspectd build-engine' ({why}); refusing "
            f"to judge parts with it. Gate it on this station: 'inspectd build-engine {package_dir} --data "
            "VALIDATION_DIR' (it replaces the ungated plan), or accept it explicitly with "
            "model.options.allow_ungated = true (logged, and shown as gate=ungated-accepted on "
            "inspectd_model_info)"
        )
    log.warning(
        "serving TensorRT plan %s that has NOT passed the parity gate (%s), because allow_ungated=true: "
        "its verdicts were never compared with ONNX Runtime's on real images",
        plan,
        why,
    )
    return "ungated-accepted"
