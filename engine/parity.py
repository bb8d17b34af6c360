"""Accuracy between backends, compared by a tool: the same preprocessed images through each backend, max
|Δlogit|, max |Δscore| and verdict flips against the reference (ONNX Runtime FP32 on CPU).

Used by ``inspectd check-backends``, by the parity gate of ``inspectd build-engine`` (an FP16 engine with
flips is not activated) and by ``inspectd quantize`` (an INT8 model with flips is not written).
A verdict is what the daemon decides from the score: PASS, REJECT, or grey zone (REJECT for re-inspection).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.backend import Backend, BackendError, BackendOptions, backend_options, create_backend, sigmoid
from engine.dataset import CLASS_NAMES, IMAGE_SUFFIXES, image_files, label_from_folders
from engine.package import Decision, ModelPackage, PackageError
from engine.preprocess import DecodeError, Preprocessor, load_gray

VERDICT_NAMES = ("PASS", "REJECT", "GREY")


def verdicts(logits: np.ndarray, decision: Decision) -> np.ndarray:
    """0 PASS, 1 REJECT, 2 grey zone: :meth:`Decision.classify`, the daemon's own rule, on each logit."""
    return decision.classify_all(sigmoid(np.asarray(logits, dtype=np.float32)).ravel())


@dataclass(frozen=True, slots=True)
class Tolerance:
    """What a candidate may differ from the reference by: verdict flips (default none) and, optionally, the
    largest |Δscore| (NG probability)."""

    max_flips: int = 0
    max_score_delta: float | None = None

    def __post_init__(self) -> None:
        if self.max_flips < 0:
            raise ValueError(f"max_flips must be ≥ 0, got {self.max_flips}")
        if self.max_score_delta is not None and not self.max_score_delta >= 0:
            raise ValueError(f"max_score_delta must be ≥ 0, got {self.max_score_delta}")


@dataclass(frozen=True, slots=True)
class Comparison:
    n: int
    max_abs_logit: float
    max_abs_score: float
    flips: int
    flip_indices: tuple[int, ...] = ()

    @property
    def agreement(self) -> float:
        return 1.0 - self.flips / self.n if self.n else math.nan

    def passes(self, tol: Tolerance) -> bool:
        if not math.isfinite(self.max_abs_logit):  # NaN/inf from a broken engine never passes
            return False
        if self.flips > tol.max_flips:
            return False
        return tol.max_score_delta is None or self.max_abs_score <= tol.max_score_delta

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "max_abs_logit_delta": self.max_abs_logit,
            "max_abs_score_delta": self.max_abs_score,
            "flips": self.flips,
            "verdict_agreement": self.agreement,
            "flip_indices": list(self.flip_indices[:20]),
        }


def compare(reference: np.ndarray, candidate: np.ndarray, decision: Decision) -> Comparison:
    ref = np.asarray(reference, dtype=np.float32)
    got = np.asarray(candidate, dtype=np.float32)
    if ref.shape != got.shape:
        raise ValueError(f"reference {ref.shape} and candidate {got.shape} logits differ in shape")
    if ref.size == 0:
        raise ValueError("nothing to compare: no images")
    flips = np.flatnonzero(verdicts(ref, decision) != verdicts(got, decision))
    with np.errstate(invalid="ignore"):
        d_logit = np.abs(ref.astype(np.float64) - got.astype(np.float64))
        d_score = np.abs(sigmoid(ref).astype(np.float64) - sigmoid(got).astype(np.float64))
    bad = ~np.isfinite(got)
    return Comparison(
        n=int(ref.size),
        max_abs_logit=math.inf if bad.any() else float(d_logit.max()),
        max_abs_score=math.inf if bad.any() else float(d_score.max()),
        flips=int(flips.size),
        flip_indices=tuple(int(i) for i in flips),
    )


# ── images ────────────────────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class LabelledImage:
    path: Path
    label: int | None  # 0 OK, 1 NG, None unknown (from the folder name)


def list_images(data_dir: Path) -> list[LabelledImage]:
    """Every image under ``data_dir`` (sorted), labelled by the first folder below it (good/ok → 0,
    not-good/ng/… → 1; else unknown)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: not a directory")
    out = []
    for p in image_files(root):
        name = label_from_folders(p.relative_to(root).parts[:-1])
        out.append(LabelledImage(p, None if name is None else CLASS_NAMES.index(name)))
    if not out:
        raise FileNotFoundError(f"--data {root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return out


def stratified_sample(
    images: Sequence[LabelledImage], n: int | None, seed: int = 0, *, exclude: Iterable[Path] = ()
) -> list[LabelledImage]:
    """A fixed (seeded) sample of ``n`` images keeping the class proportions; None → all. Sorted by path
    so a report's indices are stable."""
    skip = set(exclude)
    pool = [im for im in images if im.path not in skip]
    if n is None or n >= len(pool):
        return sorted(pool, key=lambda im: str(im.path))
    rng = np.random.default_rng(seed)
    groups: dict[int | None, list[LabelledImage]] = {}
    for im in pool:
        groups.setdefault(im.label, []).append(im)
    chosen: list[LabelledImage] = []
    keys = sorted(groups, key=lambda k: -1 if k is None else k)
    quotas = {k: max(1, round(n * len(groups[k]) / len(pool))) for k in keys}
    while sum(quotas.values()) > n:  # rounding up every class can overshoot by a few
        k = max(quotas, key=lambda key: quotas[key])
        quotas[k] -= 1
    for k in keys:
        members = groups[k]
        idx = rng.permutation(len(members))[: quotas[k]]
        chosen += [members[i] for i in idx]
    return sorted(chosen, key=lambda im: str(im.path))


def preprocess_images(package: ModelPackage, images: Sequence[LabelledImage]) -> np.ndarray:
    """The daemon's preprocessing (the package's own parameters) → float32 (N, 1, H, W)."""
    pre = Preprocessor(package.meta.preprocess)
    out = np.empty((len(images), 1, *package.meta.preprocess.input_size), dtype=np.float32)
    for i, im in enumerate(images):
        try:
            pre(load_gray(str(im.path)), out[i])
        except DecodeError as exc:
            raise DecodeError(f"{im.path}: {exc}") from None
    return out


def run_backend(backend: Backend, batch: np.ndarray) -> np.ndarray:
    """All of ``batch`` through an entered backend, in chunks of its max batch."""
    parts = [backend.infer(batch[i : i + backend.max_batch]) for i in range(0, len(batch), backend.max_batch)]
    return np.concatenate(parts).astype(np.float32)


# ── check-backends ────────────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class Candidate:
    label: str
    kind: str
    options: BackendOptions | None = None  # made by engine.backend.backend_options; None = the defaults

    @classmethod
    def of(cls, label: str, kind: str, **options: object) -> Candidate:
        """A candidate whose options are checked now (an unknown key raises OptionsError here)."""
        return cls(label, kind, backend_options(kind, options) if options else None)


@dataclass(frozen=True, slots=True)
class Row:
    label: str
    precision: str
    status: str  # "ok", "FAIL" (outside tolerance), or "skipped: why"
    comparison: Comparison | None = None
    seconds: float = 0.0


def available_candidates(package: ModelPackage) -> list[Candidate]:
    """Every backend configuration worth comparing; whether it can run here is found out by trying."""
    out = [Candidate("onnxruntime cpu", "onnxruntime")]
    rec = package.meta.variant("int8")
    if rec is not None:
        out.append(Candidate.of("onnxruntime cpu int8", "onnxruntime", model_file=rec["file"]))
    out.append(Candidate.of("onnxruntime cuda", "onnxruntime", device="cuda"))
    out.append(Candidate.of("torch cpu", "torch", device="cpu"))
    out.append(Candidate.of("torch cuda fp16", "torch", device="cuda"))
    out.append(Candidate.of("tensorrt fp16", "tensorrt", precision="fp16"))
    return out


def check_backends(
    package: ModelPackage,
    batch: np.ndarray,
    candidates: Sequence[Candidate],
    *,
    max_batch: int,
    tolerance: Tolerance,
) -> list[Row]:
    """Reference = the first candidate (ONNX Runtime CPU FP32); every other one compared against it."""
    import time

    rows: list[Row] = []
    reference: np.ndarray | None = None
    for cand in candidates:
        t0 = time.perf_counter()
        try:
            backend = create_backend(cand.kind, package, max_batch=max_batch, options=cand.options)
            with backend:
                logits = run_backend(backend, batch)
                precision = backend.precision
        except (BackendError, PackageError, ImportError, ValueError) as exc:
            if reference is None:
                raise BackendError(f"the reference backend {cand.label!r} failed: {exc}") from exc
            rows.append(Row(cand.label, "-", f"skipped: {_first_line(exc)}"))
            continue
        dt = time.perf_counter() - t0
        if reference is None:
            reference = logits
        cmp = compare(reference, logits, package.meta.decision)
        rows.append(Row(cand.label, precision, "ok" if cmp.passes(tolerance) else "FAIL", cmp, dt))
    return rows


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:100] if text else type(exc).__name__


def format_table(rows: Sequence[Row]) -> str:
    head = f"{'backend':<22} {'precision':<9} {'max|Δlogit|':>12} {'max|Δscore|':>12} {'flips':>7}  status"
    lines = [head, "─" * len(head)]
    for r in rows:
        c = r.comparison
        if c is None:
            lines.append(f"{r.label:<22} {r.precision:<9} {'':>12} {'':>12} {'':>7}  {r.status}")
        else:
            flips = f"{c.flips}/{c.n}"
            lines.append(
                f"{r.label:<22} {r.precision:<9} {c.max_abs_logit:>12.3g} {c.max_abs_score:>12.3g} {flips:>7}  {r.status}"
            )
    return "\n".join(lines)
