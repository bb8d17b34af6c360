"""Training: ResNet18 (1 channel, 1 NG logit) on the cached, augmented training split, or the patch memory
(engine.patch_model, ``arch = "patch_memory"``) fitted on the training split's OK images.

Choices that are not the recipe's, and why (docs/training.md has the measurements):
- Checkpoint choice, early stopping and the LR schedule follow validation AUROC (or a class-balanced loss),
  never the plain validation loss: with a balanced sampler and a 5:1 validation split, a model that calls
  everything OK scores as well on plain loss as a useful one. The operating threshold is set afterwards by
  calibration (training.calibrate), not fixed at 0.5.
- Class balance by a weighted sampler (each epoch draws as many images as the split holds, NG as often as
  OK, each draw a new augmentation) or by ``pos_weight``; never by duplicating images into val/test.
- Deterministic for a seed: augmentation and sampling draw from generators seeded by (seed, epoch, rank), so a
  resumed run sees exactly the batches an uninterrupted one would have.
- ``torchrun`` works unchanged: with WORLD_SIZE > 1 the model is wrapped in DistributedDataParallel, every
  rank draws the same epoch order and takes its own stride of it; rank 0 validates, decides and writes, and
  broadcasts its decisions so the ranks never disagree about stopping.

:func:`train` is a list of steps, each a function of the ones before: :func:`start_run` (ranks, run directory,
threads, seed) → :func:`load_data` → :func:`split_data` → :func:`preprocess` → :func:`fit_patch_memory` or
:func:`fit_cnn` (each writes best.pt, last.pt and metrics.jsonl) → :func:`fit_gauges` (with the pose crop: bands
from the training split's OK parts) → :func:`calibrate_best` (one threshold for model and gauges together) →
:func:`write_run` (run.json, gauges.json). What flows between them: :class:`RunSetup`, :class:`Prepared`,
:class:`Fitted` and :class:`Gauging`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from engine.dataset import DataError, Dataset, discover, subset
from engine.drift import ScoreReference
from engine.gauges import GaugeSet, outside_any, values
from engine.model import build_model, model_from_state
from engine.pose import Measurements
from engine.preprocess import Preprocessor
from engine.split import Split, make_kfold, make_split
from training.augment import augment
from training.calibrate import Calibration, calibrate, margin_text
from training.config import TrainConfig
from training.gauge_fit import DEFAULT_BANDS, MIN_OK, fit_gauge_set
from training.images import Images, load_images, normalised
from training.metrics import auroc

CONFIG, SPLIT, METRICS, LAST, BEST, RUN, GAUGES = (
    "config.json",
    "split.json",
    "metrics.jsonl",
    "last.pt",
    "best.pt",
    "run.json",
    "gauges.json",
)


@dataclass(frozen=True, slots=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Dist(
        rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0"))
    )


def _device(d: Dist) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def _broadcast(d: Dist, obj: Any) -> Any:
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def auto_threads() -> int:
    """This process's share of the cores, minus what other processes keep busy.

    OpenMP threads that outnumber the free cores spin at barriers while their siblings are descheduled: on a
    shared 2-core machine at load 9, two threads trained 3–7× slower than one. The 1-minute load average
    stands in for "busy" (it includes this process only before it starts working).
    """
    cores = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except OSError:  # not available on every platform
        busy = 0
    return max(1, min(cores, (os.cpu_count() or 1) - busy))


def resolve_split(
    ds: Dataset, cfg: TrainConfig, run_dir: Path, split_file: Path | None, data_hash: str
) -> Split:
    """Reuse the run's split.json (resume, or a re-run into the same directory), else ``split_file``, else make
    one. A split made for other data is refused rather than silently mixing test images into training."""
    existing = run_dir / SPLIT
    if existing.is_file() or split_file is not None:
        split = Split.load(existing if existing.is_file() else split_file)  # type: ignore[arg-type]
        if split.data_hash and split.data_hash != data_hash:
            raise DataError(
                f"split {existing if existing.is_file() else split_file} was made for other data "
                f"(hash {split.data_hash[:12]}…, this data {data_hash[:12]}…); use a new --out directory"
            )
        subset(ds, split.part("all"))  # every listed image must still be there
        return split
    if cfg.folds:
        return make_kfold(
            ds.samples,
            folds=cfg.folds,
            fold=cfg.fold,
            val_fraction=cfg.split[1],
            seed=cfg.seed,
            data_hash=data_hash,
        )
    return make_split(ds.samples, fractions=cfg.split, seed=cfg.seed, data_hash=data_hash)


def epoch_order(labels: np.ndarray, cfg: TrainConfig, epoch: int) -> np.ndarray:
    """The training indices of one epoch, identical on every rank."""
    rng = np.random.default_rng([cfg.seed, epoch, 7919])
    n = len(labels)
    if cfg.balance == "sampler":
        counts = np.bincount(labels, minlength=2).astype(np.float64)
        w = 1.0 / counts[labels]
        return rng.choice(n, size=n, replace=True, p=w / w.sum())
    return rng.permutation(n)


def batches(
    images: Images, pre: Preprocessor, cfg: TrainConfig, epoch: int, d: Dist
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Augmented, normalised training batches for this rank (float32 (B, 1, H, W), float32 labels (B,))."""
    labels = images.labels
    order = epoch_order(labels, cfg, epoch)
    per_rank = len(order) // d.world
    mine = order[d.rank :: d.world][:per_rank]
    rng = np.random.default_rng([cfg.seed, epoch, d.rank, 104729])
    h, w = images.pixels.shape[1:]
    for start in range(0, len(mine), cfg.batch_size):
        idx = mine[start : start + cfg.batch_size]
        if len(idx) < 2:  # BatchNorm cannot train on one sample
            break
        x = np.empty((len(idx), 1, h, w), dtype=np.float32)
        donors = rng.integers(0, len(images.pixels), len(idx)) if cfg.augment.background_swap else None
        for j, i in enumerate(idx):
            donor = images.pixels[donors[j]] if donors is not None else None
            pre.normalise_into(augment(images.pixels[i], cfg.augment, rng, donor), x[j, 0])
        yield x, labels[idx].astype(np.float32)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, device: torch.device, batch_size: int = 32) -> np.ndarray:
    """NG logits (float32 (N,)) of a normalised batch, in eval mode."""
    was_training = model.training
    model.eval()
    out = [
        model(torch.from_numpy(x[i : i + batch_size]).to(device))[:, 0].float().cpu().numpy()
        for i in range(0, len(x), batch_size)
    ]
    model.train(was_training)
    return np.concatenate(out) if out else np.empty(0, np.float32)


def val_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Plain BCE, class-balanced BCE (mean of the per-class means) and AUROC."""
    z = torch.from_numpy(logits.astype(np.float32))
    y = torch.from_numpy(labels.astype(np.float32))
    per = nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none").numpy()
    pos = labels == 1
    return {
        "val_loss": float(per.mean()),
        "val_balanced_loss": float(0.5 * (per[pos].mean() + per[~pos].mean())),
        "val_auroc": auroc(logits, labels),
    }


def _score(m: dict[str, float], cfg: TrainConfig) -> tuple[float, float]:
    """Larger is better; AUROC ties (frequent on a small val split) are broken by the balanced loss."""
    if cfg.select == "auroc":
        return (m["val_auroc"], -m["val_balanced_loss"])
    return (-m["val_balanced_loss"], m["val_auroc"])


# ------------------------------------------------------------------------------------------------- the steps
@dataclass(frozen=True, slots=True)
class RunSetup:
    """Where and how this process trains: the run directory, the configuration, its rank, log and clock."""

    run: Path
    cfg: TrainConfig
    dist: Dist
    threads: int  # torch threads
    log: Callable[[str], None]  # silent on ranks > 0
    t_start: float  # time.monotonic() when train() began


@dataclass(frozen=True, slots=True)
class Prepared:
    """The data a fit learns from and calibration is measured on: the dataset, its split, and the training and
    validation images after the deterministic preprocessing (``x_val``: validation, normalised as served)."""

    ds: Dataset
    data_hash: str
    split: Split
    pre: Preprocessor
    tr: Images
    va: Images
    x_val: np.ndarray


@dataclass(frozen=True, slots=True)
class ExtraCalibration:
    """Training images the model never learnt from, scored as a new part would be: their NG logits, their rows
    in ``Prepared.tr`` (in the order of ``logits``: labels and gauge flags are looked up there) and a name for
    the calibration set they make with the validation split."""

    logits: np.ndarray
    rows: np.ndarray
    name: str


@dataclass(frozen=True, slots=True)
class Fitted:
    """What a fit hands to calibration once best.pt is written: the device to evaluate it on, how the fit ended
    (run.json's ``stopped``, ``epochs_run``, ``best_epoch``, ``seconds``) and ``calibration_extra``: images
    beyond the validation split to calibrate on (or None)."""

    device: torch.device
    stopped: str
    epochs_run: int
    best_epoch: int
    seconds: float
    calibration_extra: ExtraCalibration | None = None


@dataclass(frozen=True, slots=True)
class Gauging:
    """The run's gauges (None: not learnt, ``why_not`` says why) and which images they reject, for calibrating
    the model's threshold beside them: ``train_reject`` per training image (an OK part judged by bands learnt
    without it, k-fold; an NG part by the bands) and ``val_reject`` per validation image (by the bands)."""

    gauges: GaugeSet | None
    why_not: str = ""
    train_reject: np.ndarray | None = None
    val_reject: np.ndarray | None = None

    def summary(self) -> dict[str, Any]:
        """run.json's ``gauges``: what was learnt (the bands themselves are in gauges.json) or why not."""
        if self.gauges is None:
            return {"file": None, "why_not": self.why_not}
        g = self.gauges
        return {
            "file": GAUGES,
            "bands": {b.name: b.describe() for b in g.bands},
            "n_ok": g.n_ok,
            "false_reject_estimate": g.false_reject_estimate,
            "ng_caught": g.ng_caught,
        }


def train(
    data: str | Path,
    run_dir: str | Path,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    split_file: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train into ``run_dir`` (config.json, split.json, metrics.jsonl, last.pt, best.pt, run.json); returns
    the run summary that is also written to run.json. On ``resume`` pass the run's own config
    (:func:`resume_config`); only the epoch count, time budget and threads may differ."""
    setup = start_run(run_dir, cfg, resume=resume, log=log)
    ds, data_hash = load_data(data, setup)
    split = split_data(ds, data_hash, split_file, setup)
    prep = preprocess(ds, data_hash, split, setup)
    if cfg.arch == "patch_memory":
        fitted = fit_patch_memory(setup, prep)
    else:
        fitted = fit_cnn(setup, prep, resume=resume, progress=progress)
    summary: dict[str, Any] = {}
    if setup.dist.main and fitted is not None:
        gauging = fit_gauges(setup, prep)
        logits, cal = calibrate_best(setup, prep, fitted, gauging)
        summary = write_run(setup, prep, fitted, logits, cal, gauging)
        setup.log(_result_line(summary, cfg))
    if setup.dist.world > 1:
        dist.barrier()
    return summary


def start_run(run_dir: str | Path, cfg: TrainConfig, *, resume: bool, log: Callable[[str], None]) -> RunSetup:
    """Join the ranks (under torchrun), check that ``run_dir`` may be started (or resumed), create it, and set
    torch's threads and seed."""
    t_start = time.monotonic()
    d = init_distributed()
    if not d.main:
        log = _silent
    run = Path(run_dir)
    if run.exists() and (run / LAST).exists() and not resume:
        raise FileExistsError(
            f"{run} already holds a training run; pass --resume to continue it or use a new --out"
        )
    if resume and not (run / LAST).is_file():
        raise FileNotFoundError(f"--resume: {run / LAST} does not exist")
    if d.main:
        run.mkdir(parents=True, exist_ok=True)
    threads = cfg.threads or auto_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    return RunSetup(run, cfg, d, threads, log, t_start)


def load_data(data: str | Path, setup: RunSetup) -> tuple[Dataset, str]:
    """The labelled images in ``data`` (unreadable ones listed and excluded) and their content hash."""
    ds = discover(data)
    setup.log(f"{ds.describe()}; torch threads {setup.threads}")
    if ds.unreadable:
        setup.log(
            f"warning: {len(ds.unreadable)} unreadable image(s) excluded: {', '.join(ds.unreadable[:10])}"
        )
    return ds, ds.content_hash()


def split_data(ds: Dataset, data_hash: str, split_file: Path | None, setup: RunSetup) -> Split:
    """Rank 0's split (:func:`resolve_split`) on every rank; rank 0 writes it and the config into the run."""
    d = setup.dist
    split: Split = _broadcast(
        d, resolve_split(ds, setup.cfg, setup.run, split_file, data_hash) if d.main else None
    )
    if d.main:
        (setup.run / CONFIG).write_text(json.dumps(setup.cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
        split.save(setup.run / SPLIT)
    setup.log(f"split ({split.method}, seed {split.seed}): {split.describe(ds.samples)}")
    return split


def preprocess(ds: Dataset, data_hash: str, split: Split, setup: RunSetup) -> Prepared:
    """The training and validation images through the deterministic preprocessing (cached); images that fail
    it are listed and excluded, and each split must still hold both classes."""
    pre = Preprocessor(setup.cfg.preprocess())
    t0 = time.monotonic()
    tr = load_images(ds, subset(ds, split.train), pre)
    va = load_images(ds, subset(ds, split.val), pre)
    setup.log(f"preprocessed {len(tr.samples) + len(va.samples)} images in {time.monotonic() - t0:.1f} s")
    for name, imgs in (("train", tr), ("val", va)):
        for path, why in imgs.failed.items():
            setup.log(f"warning: {name} image {path} excluded: {why}")
    for name, imgs in (("train", tr), ("val", va)):
        if len(set(imgs.labels.tolist())) < 2:
            raise DataError(f"after excluding unusable images the {name} split lacks a class")
    return Prepared(ds, data_hash, split, pre, tr, va, normalised(pre, va.pixels))


def fit_patch_memory(setup: RunSetup, prep: Prepared) -> Fitted | None:
    """The patch memory (engine.patch_model) fitted on the training split's OK images; one "epoch".

    Calibration uses every image the fit did not see as a neighbour: the validation split, the training
    split's NG images (the fit ignores NG), and each training OK image scored leave-one-out (against the
    memory without its own patches). With few NG per split this sets the threshold on many more NG images.
    Nothing is shared between ranks: rank 0 fits (the others return None and wait at train()'s barrier).
    """
    from training.patch_memory import fit_members

    if not setup.dist.main:
        return None
    cfg, tr = setup.cfg, prep.tr
    ok = tr.labels == 0
    t0 = time.monotonic()
    model, loo = fit_members(
        normalised(prep.pre, tr.pixels[ok]),
        tr.pixels[ok],
        cfg.patch_members_settings(),
        seed=cfg.seed,
        log=setup.log,
    )
    fit_s = time.monotonic() - t0
    device = torch.device("cpu")
    row: dict[str, Any] = {"epoch": 1, "fit_s": round(fit_s, 1), "lr": None}
    row |= val_metrics(predict(model, prep.x_val, device), prep.va.labels)
    row |= {"best": True, "epoch_s": round(fit_s, 1), "elapsed_s": round(time.monotonic() - setup.t_start, 1)}
    ck = {"model": model.state_dict(), "arch": cfg.arch, "epoch": 1, "config": cfg.to_dict(), "val": row}
    _atomic_save(ck, setup.run / BEST)
    _atomic_save(ck | {"best": None, "best_epoch": 1, "bad_epochs": 0, "elapsed_s": fit_s}, setup.run / LAST)
    with open(setup.run / METRICS, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
    setup.log(f"fitted in {fit_s:.1f} s; val AUROC {row['val_auroc']:.3f}")
    ng = tr.labels == 1
    extra = ExtraCalibration(
        np.concatenate([predict(model, normalised(prep.pre, tr.pixels[ng]), device), loo]),
        np.concatenate([np.flatnonzero(ng), np.flatnonzero(ok)]),  # loo follows the OK images' order
        "val + train NG + train OK (leave-one-out)",
    )
    return Fitted(
        device,
        stopped="fitted",
        epochs_run=1,
        best_epoch=1,
        seconds=time.monotonic() - setup.t_start,
        calibration_extra=extra,
    )


@dataclass(frozen=True, slots=True)
class _Cnn:
    """The network and what trains it. ``net`` is ``model`` or, with several ranks, its DDP wrapper."""

    model: nn.Module
    net: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.ReduceLROnPlateau
    loss_fn: nn.Module
    device: torch.device


@dataclass(slots=True)
class _Progress:
    """The epoch loop's state between epochs (last.pt carries it across a resume)."""

    start_epoch: int = 1
    best: tuple[float, float] | None = None  # the best epoch's _score
    best_epoch: int = 0
    bad: int = 0  # epochs since the best one
    elapsed0: float = 0.0  # seconds spent before this process resumed the run


def fit_cnn(setup: RunSetup, prep: Prepared, *, resume: bool, progress: bool) -> Fitted:
    """The ResNet18 by gradient descent, one epoch at a time until the epochs, the patience or the time budget
    run out (or continued from last.pt on ``resume``); rank 0 validates, decides and writes best.pt/last.pt."""
    cfg, d = setup.cfg, setup.dist
    cnn = _build_cnn(setup, prep)
    p = _resume_progress(setup, cnn) if resume else _Progress()
    stopped = "epochs"
    epoch = p.start_epoch - 1
    durations: list[float] = []
    for epoch in range(p.start_epoch, cfg.epochs + 1):
        t_epoch = time.monotonic()
        row = _train_epoch(setup, prep, cnn, epoch, progress)
        elapsed = _end_epoch(setup, prep, cnn, p, row, t_epoch)
        durations.append(time.monotonic() - t_epoch)
        # rank 0's clock decides: ranks that disagreed would deadlock
        stop = _broadcast(d, _stop_reason(cfg, p, epoch, elapsed, durations))
        if stop:
            stopped = stop
            break
    return Fitted(
        cnn.device,
        stopped=stopped,
        epochs_run=epoch,
        best_epoch=p.best_epoch,
        seconds=p.elapsed0 + time.monotonic() - setup.t_start,
    )


def _build_cnn(setup: RunSetup, prep: Prepared) -> _Cnn:
    cfg, d = setup.cfg, setup.dist
    device = _device(d)
    model: nn.Module = build_model(None if cfg.weights == "none" else cfg.weights).to(device)
    net: nn.Module = model
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.local_rank] if device.type == "cuda" else None
        )
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="max", factor=cfg.lr_factor, patience=cfg.lr_patience, min_lr=cfg.min_lr
    )
    labels = prep.tr.labels
    n_ok, n_ng = int((labels == 0).sum()), int((labels == 1).sum())
    pos_weight = torch.tensor([n_ok / n_ng if cfg.balance == "pos_weight" else 1.0], device=device)
    return _Cnn(model, net, opt, sched, nn.BCEWithLogitsLoss(pos_weight=pos_weight), device)


def _resume_progress(setup: RunSetup, cnn: _Cnn) -> _Progress:
    """Model, optimiser and schedule from last.pt, and where its loop stood."""
    ck = torch.load(setup.run / LAST, map_location=cnn.device, weights_only=True)
    cnn.model.load_state_dict(ck["model"])
    cnn.opt.load_state_dict(ck["optimizer"])
    cnn.sched.load_state_dict(ck["scheduler"])
    best = tuple(ck["best"]) if ck["best"] is not None else None
    setup.log(f"resuming after epoch {ck['epoch']} (best epoch {ck['best_epoch']})")
    return _Progress(ck["epoch"] + 1, best, ck["best_epoch"], ck["bad_epochs"], ck["elapsed_s"])


def _train_epoch(setup: RunSetup, prep: Prepared, cnn: _Cnn, epoch: int, progress: bool) -> dict[str, Any]:
    """One pass over this rank's share of the epoch; the metrics row's epoch, train_loss (all ranks) and lr."""
    cfg, d = setup.cfg, setup.dist
    cnn.net.train()
    total, count = 0.0, 0
    n_batches = (len(prep.tr.samples) // d.world + cfg.batch_size - 1) // cfg.batch_size
    bar = _bar(n_batches, f"epoch {epoch}/{cfg.epochs}", progress and d.main)
    for x, y in batches(prep.tr, prep.pre, cfg, epoch, d):
        xb, yb = torch.from_numpy(x).to(cnn.device), torch.from_numpy(y).to(cnn.device)
        cnn.opt.zero_grad(set_to_none=True)
        loss = cnn.loss_fn(cnn.net(xb)[:, 0], yb)
        loss.backward()
        cnn.opt.step()
        total += loss.item() * len(y)
        count += len(y)
        bar.update(1)
        bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
    bar.close()
    if d.world > 1:  # log the loss over all ranks' batches, not rank 0's share
        tc = torch.tensor([total, float(count)], dtype=torch.float64, device=cnn.device)
        dist.all_reduce(tc)
        total, count = float(tc[0]), int(tc[1])
    return {"epoch": epoch, "train_loss": total / max(count, 1), "lr": cnn.opt.param_groups[0]["lr"]}


def _end_epoch(
    setup: RunSetup, prep: Prepared, cnn: _Cnn, p: _Progress, row: dict[str, Any], t_epoch: float
) -> float:
    """Validate (rank 0), step the schedule on rank 0's score, keep track of the best epoch; rank 0 writes
    best.pt (when it improved), last.pt and the metrics line. Returns the run's elapsed seconds."""
    cfg, d, epoch = setup.cfg, setup.dist, row["epoch"]
    row |= val_metrics(predict(cnn.model, prep.x_val, cnn.device), prep.va.labels) if d.main else {}
    score = _broadcast(d, _score(row, cfg) if d.main else None)
    cnn.sched.step(score[0])
    improved = p.best is None or score > p.best
    if improved:
        p.best, p.best_epoch, p.bad = score, epoch, 0
    else:
        p.bad += 1
    elapsed = p.elapsed0 + time.monotonic() - setup.t_start
    row |= {
        "best": improved,
        "epoch_s": round(time.monotonic() - t_epoch, 1),
        "elapsed_s": round(elapsed, 1),
    }
    if d.main:
        if improved:
            _atomic_save(
                {"model": cnn.model.state_dict(), "epoch": epoch, "config": cfg.to_dict(), "val": row},
                setup.run / BEST,
            )
        _atomic_save(
            {
                "model": cnn.model.state_dict(),
                "optimizer": cnn.opt.state_dict(),
                "scheduler": cnn.sched.state_dict(),
                "epoch": epoch,
                "config": cfg.to_dict(),
                "best": p.best,
                "best_epoch": p.best_epoch,
                "bad_epochs": p.bad,
                "elapsed_s": elapsed,
            },
            setup.run / LAST,
        )
        with open(setup.run / METRICS, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        setup.log(_line(row, cfg))
    return elapsed


def _stop_reason(
    cfg: TrainConfig, p: _Progress, epoch: int, elapsed: float, durations: list[float]
) -> str | None:
    """Why the loop stops after ``epoch`` (None: it goes on, up to ``cfg.epochs``)."""
    if p.bad >= cfg.patience:
        return f"early stop: no better val {cfg.select} for {cfg.patience} epochs"
    if epoch < cfg.epochs and elapsed + float(np.mean(durations)) > cfg.max_minutes * 60.0:
        return f"time budget: {cfg.max_minutes:g} min would be exceeded by another epoch"
    return None


def fit_gauges(setup: RunSetup, prep: Prepared) -> Gauging:
    """With the pose crop (and ``cfg.gauges``): tolerance bands (training.gauge_fit defaults) learnt from the
    training split's OK parts — the parts the model is fitted on — and which calibration images they reject.

    Too few OK parts for quantile bands (``MIN_OK``) leaves the run without gauges, said in the log and in
    run.json, rather than failing a small experiment.
    """
    cfg, tr, va = setup.cfg, prep.tr, prep.va
    if not cfg.gauged:
        return Gauging(None, "gauges off (--no-gauges)" if cfg.pose else "no pose crop (pose=False)")
    assert tr.measurements is not None and va.measurements is not None  # a pose crop measures every image
    ok_rows = np.flatnonzero(tr.labels == 0)
    ok = [tr.measurements[i] for i in ok_rows]
    if len(ok) < MIN_OK:
        why = f"only {len(ok)} OK training images (quantile bands need ≥ {MIN_OK})"
        setup.log(f"warning: no gauges: {why}")
        return Gauging(None, why)
    ng: dict[str, list[Measurements]] = {}
    for samples, measured in ((tr.samples, tr.measurements), (va.samples, va.measurements)):
        for s, m in zip(samples, measured, strict=True):
            if s.label == 1:
                ng.setdefault(s.group, []).append(m)
    # A band is learnt only on what every OK part has a value of: parts whose thread the crest dip cannot read
    # (too few crests in the pitch range, e.g. another part type or scale) leave that band out, said in the log.
    names = [n for n in DEFAULT_BANDS if np.isfinite(values(ok, n)).all()]
    dropped = [n for n in DEFAULT_BANDS if n not in names]
    if dropped:
        setup.log(f"warning: no {', '.join(dropped)} band: not measurable on every OK training part")
    gauges, ok_flags = fit_gauge_set(
        ok,
        dict(sorted(ng.items())),
        pose=cfg.preprocess().pose or {},
        names=names,
        seed=cfg.seed,
        margins=cfg.gauge_margins,
    )
    train_reject = outside_any(tr.measurements, gauges.bands)
    train_reject[ok_rows] = ok_flags  # the OK parts the bands were learnt from: judged without themselves
    bands = ", ".join(f"{b.name} {b.describe()}" for b in gauges.bands)
    caught = ", ".join(f"{t} {c}/{n}" for t, (c, n) in gauges.ng_caught.items())
    added = ""
    if gauges.margins is not None:
        mg = gauges.margins
        added = (
            f"; margins in the score beyond {mg.k:g} robust s.d., {mg.weight:g} logit per s.d. "
            + ", ".join(f"{m.name} {m.center:.2f} ± {m.scale:.2f}" for m in mg.margins)
        )
    setup.log(
        f"gauges from {len(ok)} OK training parts: {bands}; OK false-reject "
        f"{gauges.false_reject_estimate['any']:.3f} ({gauges.kfold}-fold); NG caught: {caught or 'none'}{added}"
    )
    return Gauging(gauges, "", train_reject, outside_any(va.measurements, gauges.bands))


def calibrate_best(
    setup: RunSetup, prep: Prepared, fitted: Fitted, gauging: Gauging | None = None
) -> tuple[np.ndarray, Calibration]:
    """The best checkpoint's validation logits, and the threshold calibrated on them (plus the fit's
    ``calibration_extra``), knowing which of those images the run's gauges reject."""
    best = torch.load(setup.run / BEST, map_location=fitted.device, weights_only=True)
    model = model_from_state(best["model"]).to(fitted.device)
    logits = predict(model, prep.x_val, fitted.device)
    extra = fitted.calibration_extra
    rows = extra.rows if extra is not None else np.empty(0, np.intp)
    cal_z = np.concatenate([logits, extra.logits]) if extra is not None else logits
    cal_y = np.concatenate([prep.va.labels, prep.tr.labels[rows]])
    gauge_reject = None
    raw_ok = cal_z[cal_y == 0]
    if gauging is not None and gauging.gauges is not None:
        assert gauging.val_reject is not None and gauging.train_reject is not None
        gauge_reject = np.concatenate([gauging.val_reject, gauging.train_reject[rows]])
        if gauging.gauges.margins is not None:
            # The threshold is calibrated on the score the daemon thresholds: the model's logit plus what the
            # part's measurements add (engine.gauges.Margins; 0 for a part within every margin).
            assert prep.va.measurements is not None and prep.tr.measurements is not None
            measured = [*prep.va.measurements, *(prep.tr.measurements[i] for i in rows)]
            cal_z = cal_z + gauging.gauges.margins.terms(measured)
    cfg = setup.cfg
    cal = calibrate(
        cal_z,
        cal_y,
        target_recall=cfg.target_recall,
        grey_zone_frr=cfg.grey_zone_frr,
        frr_budget=cfg.frr_budget,
        split=extra.name if extra is not None else "val",
        gauge_reject=gauge_reject,
    )
    # The drift reference is the model's own OK logits: the daemon's drift window holds the model's logits.
    return logits, replace(cal, ok_logits=tuple(np.sort(raw_ok).tolist()))


def write_run(
    setup: RunSetup,
    prep: Prepared,
    fitted: Fitted,
    logits: np.ndarray,
    cal: Calibration,
    gauging: Gauging,
) -> dict[str, Any]:
    """run.json: the data, the config, the best checkpoint on the validation split, the calibration, the gauges
    (gauges.json: the GaugeSet that export packages) and how the fit ended; returned as written."""
    ds = prep.ds
    if gauging.gauges is not None:
        text = json.dumps(gauging.gauges.to_dict(), indent=2) + "\n"
        (setup.run / GAUGES).write_text(text, encoding="utf-8")
    else:
        (setup.run / GAUGES).unlink(missing_ok=True)  # a re-run into the same directory: no stale bands
    summary = {
        "data": str(ds.root.resolve()),
        "layout": ds.layout,
        "data_hash": prep.data_hash,
        "counts": ds.counts(),
        "split_file": SPLIT,
        "excluded": sorted(set(ds.unreadable) | set(prep.va.failed)),
        "config": setup.cfg.to_dict(),
        "val": val_metrics(logits, prep.va.labels) | {"n": len(logits)},
        "calibration": cal.to_dict(),
        # the calibration's OK logits: export ships them as model.json's score_reference (drift monitoring)
        "score_reference": ScoreReference.from_logits(cal.ok_logits, cal.split).to_dict(),
        "gauges": gauging.summary(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "stopped": fitted.stopped,
        "epochs_run": fitted.epochs_run,
        "best_epoch": fitted.best_epoch,
        "seconds": fitted.seconds,
    }
    (setup.run / RUN).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _result_line(summary: dict[str, Any], cfg: TrainConfig) -> str:
    cal = summary["calibration"]
    gauges = ""
    if cal["gauges"]:
        gauges = (
            f" with the gauges (model alone {cal['model_recall']:.2f} / {cal['model_false_reject_rate']:.2f}; "
            f"gauges reject {cal['ng_rejected_by_gauges']} NG, {cal['ok_rejected_by_gauges']} OK)"
        )
    escape = (
        f"; escape rate ≤ {100 * cal['escape_rate_upper']:.1f} % ({100 * cal['escape_confidence']:.0f} % upper "
        f"bound: {cal['escapes']} of {cal['n_ng']} NG passed)"
    )
    at = (
        f"threshold {cal['threshold']:.4g} on {cal['n_ng']} NG / {cal['n_ok']} OK ({cal['split']}): "
        f"recall {cal['recall']:.2f}, false-reject rate {cal['false_reject_rate']:.2f}{gauges}{escape}"
        f"{margin_text(cal)}"
    )
    if cfg.arch == "patch_memory":
        return at
    return (
        f"stopped: {summary['stopped']}; best epoch {summary['best_epoch']}; "
        f"val AUROC {summary['val']['val_auroc']:.3f}; {at}"
    )


# ------------------------------------------------------------------------------------------------ run files
def resume_config(run_dir: str | Path, **changes: Any) -> TrainConfig:
    """The config a run was started with, with ``epochs``/``max_minutes``/``threads`` changed where given."""
    allowed = {"epochs", "max_minutes", "threads"}
    bad = sorted(k for k, v in changes.items() if v is not None and k not in allowed)
    if bad:
        raise ValueError(
            f"--resume continues the run as configured; {bad} cannot change (only {sorted(allowed)})"
        )
    cfg = TrainConfig.from_saved(json.loads((Path(run_dir) / CONFIG).read_text(encoding="utf-8")))
    return replace(cfg, **{k: v for k, v in changes.items() if v is not None})


def _line(row: dict[str, Any], cfg: TrainConfig) -> str:
    return (
        f"epoch {row['epoch']:>3}/{cfg.epochs}  loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}  "
        f"val_bal_loss {row['val_balanced_loss']:.4f}  val_auroc {row['val_auroc']:.3f}  lr {row['lr']:.1e}  "
        f"{row['epoch_s']:.0f}s{'  *' if row['best'] else ''}"
    )


def _silent(_: str) -> None:
    pass


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled or not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def load_run_model(run_dir: str | Path, device: str = "cpu") -> tuple[nn.Module, TrainConfig, dict[str, Any]]:
    """The best checkpoint of a run, its config and its run.json summary."""
    run = Path(run_dir)
    for name in (BEST, RUN, CONFIG):
        if not (run / name).is_file():
            raise FileNotFoundError(f"{run} is not a finished training run: {name} is missing")
    cfg = TrainConfig.from_saved(json.loads((run / CONFIG).read_text(encoding="utf-8")))
    ck = torch.load(run / BEST, map_location=device, weights_only=True)
    model = model_from_state(ck["model"])
    summary = json.loads((run / RUN).read_text(encoding="utf-8"))
    return model.eval(), cfg, summary


def load_run_gauges(run_dir: str | Path) -> GaugeSet | None:
    """The gauges a run learnt (gauges.json), or None when it learnt none."""
    p = Path(run_dir) / GAUGES
    if not p.is_file():
        return None
    try:
        return GaugeSet.from_dict(json.loads(p.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{p}: {exc}") from None


def history(run_dir: str | Path) -> list[dict[str, Any]]:
    p = Path(run_dir) / METRICS
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
