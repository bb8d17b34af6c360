"""Learn tolerance bands on the pose measurements from OK images and write them into a package's model.json:
calibrating a package's gauges again (``inspectd train`` already learns them from the training split's OK parts
for every pose-crop model, and ``inspectd export`` packages them), e.g. on more good parts or a new lot.

Every image is measured with engine.pose (the package's preprocess.pose parameters if it has them, else the
defaults). Bands come from the OK images; the table shows, for every gaugeable measurement, the OK false-reject
rate (k-fold: each OK part judged by bands learned without it) and how many NG parts of each defect type fall
outside (bands from all OK parts; NG parts are never used to learn). Only the chosen bands (--bands) are written.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from engine.gauge_plot import gauge_figure
from engine.gauges import DEFAULT_MARGIN_PX, DEFAULT_QUANTILES, MEASUREMENTS, GaugeSet, outside, values
from engine.pose import Measurements, PoseError, PoseParams, estimate_pose
from training.gauge_fit import (
    DEFAULT_BANDS,
    DEFAULT_K,
    DEFAULT_ONE_SIDED,
    MIN_OK,
    fit_gauge_set,
    kfold_flags,
    learn_bands,
)


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in MEASUREMENTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--bands: unknown {unknown}; choose from {','.join(MEASUREMENTS)}")
    return names


def _sides(text: str) -> dict[str, str]:
    """``straightness_px:high,length_px:low`` → {"straightness_px": "high", "length_px": "low"}; "" → {}."""
    out: dict[str, str] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, side = item.partition(":")
        if name not in MEASUREMENTS or side not in ("low", "high"):
            raise argparse.ArgumentTypeError(f"--one-sided: expected NAME:low or NAME:high, got {item!r}")
        out[name] = side
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="class folders (OK/NG, good/not-good…), MVTec AD layout, or a CSV",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="model package directory whose model.json to update"
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=DEFAULT_MARGIN_PX,
        help=f"px added outside the quantiles (default {DEFAULT_MARGIN_PX})",
    )
    parser.add_argument(
        "--quantiles",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        default=DEFAULT_QUANTILES,
        help=f"OK quantiles the band starts from (default {DEFAULT_QUANTILES[0]} {DEFAULT_QUANTILES[1]})",
    )
    parser.add_argument(
        "--bands",
        type=_names,
        default=DEFAULT_BANDS,
        help=f"comma-separated measurements to gauge (default {','.join(DEFAULT_BANDS)}; all: {','.join(MEASUREMENTS)})",
    )
    parser.add_argument(
        "--one-sided",
        type=_sides,
        default=dict(DEFAULT_ONE_SIDED),
        help="bands limited on one side only, NAME:low|high,… (default straightness_px:high; '' = none)",
    )
    parser.add_argument(
        "--k",
        type=int,
        default=DEFAULT_K,
        help=f"folds of the OK false-reject estimate (default {DEFAULT_K})",
    )
    parser.add_argument("--seed", type=int, default=0, help="fold assignment seed (default 0)")
    parser.add_argument("--figure", type=Path, help="also write the OK-vs-NG histograms with the bands (PNG)")
    parser.add_argument("--dry-run", action="store_true", help="measure and report, leave model.json alone")


@dataclass(frozen=True, slots=True)
class Measured:
    ok: list[Measurements]
    ng: dict[str, list[Measurements]]  # defect type → parts
    failures: list[tuple[str, str]]  # (relative path, reason)
    pose_ms: list[float]


def measure(data: Path, params: PoseParams) -> Measured:
    """Measure every image of the dataset; unreadable images and pose failures are collected, not raised."""
    from engine.dataset import discover
    from engine.preprocess import DecodeError, load_gray

    ds = discover(data, check_readable=False)  # every image is decoded below anyway
    ok: list[Measurements] = []
    ng: dict[str, list[Measurements]] = {}
    failures: list[tuple[str, str]] = []
    pose_ms: list[float] = []
    for s in ds.samples:
        try:
            gray = load_gray(str(ds.abspath(s)))
            t0 = time.perf_counter()
            m = estimate_pose(gray, params).measurements
            pose_ms.append((time.perf_counter() - t0) * 1e3)
        except (DecodeError, PoseError, OSError) as exc:
            failures.append((s.path, str(exc)))
            continue
        if s.label == 0:
            ok.append(m)
        else:
            ng.setdefault(s.group, []).append(m)
    return Measured(ok, dict(sorted(ng.items())), failures, pose_ms)


def _frac(n: int, total: int) -> str:
    return f"{n}/{total} ({100.0 * n / total:.1f} %)" if total else "–"


def report(
    measured: Measured,
    chosen: Sequence[str],
    q: tuple[float, float],
    margin: float,
    one_sided: Mapping[str, str],
    k: int,
    seed: int,
    pose: PoseParams,
) -> tuple[GaugeSet, list[str]]:
    """The gauge set for ``chosen`` and the report lines for every gaugeable measurement."""
    ok, ng = measured.ok, measured.ng
    # Chosen first, then the others for comparison (those every OK part has a finite value of: a band cannot be
    # learnt from a value that was not measured, e.g. the crest dip of a part with too few crests).
    every = tuple(
        dict.fromkeys(
            (*chosen, *(n for n in MEASUREMENTS if n in chosen or np.isfinite(values(ok, n)).all()))
        )
    )
    bands = {b.name: b for b in learn_bands(ok, names=every, q=q, margin_px=margin, one_sided=one_sided)}
    flags = kfold_flags(ok, k=k, seed=seed, names=every, q=q, margin_px=margin, one_sided=one_sided)
    caught = {n: {t: outside(parts, bands[n]) for t, parts in ng.items()} for n in every}
    head = f"  {'band':18s} {'low':>9s} {'high':>9s}  {'OK false-reject (' + str(k) + '-fold)':24s}"
    lines = [head + "".join(f"  {t[:17]:>17s}" for t in ng)]
    for n in every:
        b = bands[n]
        lo = "–" if b.low is None else f"{b.low:.2f}"
        hi = "–" if b.high is None else f"{b.high:.2f}"
        row = f"{'*' if n in chosen else ' '} {n:18s} {lo:>9s} {hi:>9s}  {_frac(int(flags[n].sum()), len(ok)):24s}"
        lines.append(row + "".join(f"  {_frac(int(c.sum()), len(c)):>17s}" for c in caught[n].values()))
    gauges, any_ok = fit_gauge_set(
        ok, ng, pose=pose.to_dict(), names=chosen, q=q, margin_px=margin, one_sided=one_sided, k=k, seed=seed
    )
    row = f"  {'any chosen band':18s} {'':9s} {'':9s}  {_frac(int(any_ok.sum()), len(ok)):24s}"
    lines.append(row + "".join(f"  {_frac(*gauges.ng_caught[t]):>17s}" for t in ng))
    lines.append("  (* = written to model.json; NG caught by bands learned from all OK parts)")
    return gauges, lines


def run(args: argparse.Namespace) -> int:
    from engine.dataset import DataError
    from engine.package import PackageError, load_package, sha256_file, write_meta

    def fail(msg: str) -> int:
        print(f"inspectd calibrate-gauges: {msg}", file=sys.stderr)
        return 2

    try:
        # verify: write_meta re-hashes model.onnx, so a swapped ONNX must be refused here, not blessed.
        pkg = load_package(args.out)
    except PackageError as exc:
        return fail(str(exc))
    pose_dict = pkg.meta.preprocess.pose
    params = PoseParams.from_dict(pose_dict) if pose_dict else PoseParams()
    q = (float(args.quantiles[0]), float(args.quantiles[1]))
    if not 0.0 <= q[0] < q[1] <= 1.0:
        return fail(f"--quantiles must satisfy 0 ≤ LO < HI ≤ 1, got {q[0]} {q[1]}")
    if args.margin < 0 or args.k < 2:
        return fail("--margin must be ≥ 0 and --k ≥ 2")
    try:
        measured = measure(args.data, params)
    except DataError as exc:
        return fail(str(exc))

    n_all = len(measured.ok) + sum(map(len, measured.ng.values())) + len(measured.failures)
    source = "the package" if pose_dict else "the defaults"
    print(f"measured {n_all} images from {args.data} with pose parameters from {source}")
    if measured.pose_ms:
        print(f"  estimate_pose median {np.median(measured.pose_ms):.2f} ms/image")
    print(f"  pose failures: {len(measured.failures)}/{n_all}")
    for path, reason in measured.failures:
        print(f"    {path}: {reason}")
    if len(measured.failures) == n_all:
        return fail("no image could be measured; check --data and the package's pose parameters")
    if len(measured.ok) < max(MIN_OK, 2 * args.k):
        return fail(
            f"only {len(measured.ok)} OK images could be measured; bands need at least "
            f"{max(MIN_OK, 2 * args.k)} (the 0.5 %/99.5 % quantiles of fewer parts are just their extremes)"
        )

    gauges, lines = report(measured, args.bands, q, args.margin, args.one_sided, args.k, args.seed, params)
    print(f"bands from {len(measured.ok)} OK parts (quantiles {q[0]}/{q[1]}, margin {args.margin} px):")
    print("\n".join(lines))
    if args.figure:
        args.figure.write_bytes(gauge_figure(measured.ok, measured.ng, gauges))
        print(f"figure: {args.figure}")
    if args.dry_run:
        print("dry run: model.json left unchanged")
        return 0
    if sha256_file(pkg.onnx_path) != pkg.meta.onnx_sha256:  # write_meta would re-hash and bless a new file
        return fail(f"{pkg.onnx_path} changed during calibration; model.json left unchanged, run again")
    # The package's threshold was calibrated on its model's logits plus these margins: they stay as they are
    # (re-learning them would move the score under a threshold that was not calibrated for it).
    kept = (pkg.meta.gauges or {}).get("margins")
    written = gauges.to_dict() | ({"margins": kept} if kept is not None else {})
    write_meta(args.out, replace(pkg.meta, gauges=written))
    print(f"wrote {len(gauges.bands)} band(s) into {args.out}/model.json")
    if kept is not None:
        print("  kept the package's gauge margins in the score (its threshold was calibrated with them)")
    return 0
