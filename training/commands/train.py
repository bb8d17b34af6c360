"""Train the screw model on a folder of labelled images into a run directory: by default the patch memory on the
pose crop (fitted in about 30 s) with the length/straightness gauges learnt from the same OK parts, or a ResNet18
(1 channel) with `--preset cnn` or `recipe`."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from training.config import TrainConfig


def _size(text: str) -> tuple[int, int]:
    """``256`` → (256, 256); ``144x448`` → (144, 448) as height × width."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be S or HxW, got {text!r}") from None
    if len(nums) == 1:
        return nums[0], nums[0]
    if len(nums) == 2:
        return nums[0], nums[1]
    raise argparse.ArgumentTypeError(f"size must be S or HxW, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="class folders (OK/NG, good/not-good…), MVTec AD layout, or a CSV",
    )
    parser.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, split, metrics)")
    parser.add_argument(
        "--preset",
        default="default",
        help="base configuration: default (patch memory on the pose crop), cnn (ResNet18 on the pose crop), recipe (the assignment's ResNet18 on the whole frame)",
    )
    parser.add_argument("--config", type=Path, help="JSON or TOML file of training options (over the preset)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--input-size", type=_size, help="S or HxW (height × width)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--weights", help="none | imagenet | PATH to a state dict")
    parser.add_argument(
        "--pose",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pose-normalised crop (axis horizontal, head left) before CLAHE",
    )
    parser.add_argument(
        "--rotate", type=float, help="augmentation rotation range ± degrees (180 = full circle)"
    )
    parser.add_argument("--folds", type=int, help="k-fold: number of folds (test = fold --fold)")
    parser.add_argument("--fold", type=int)
    parser.add_argument("--split-file", type=Path, help="reuse this split.json instead of making a split")
    parser.add_argument(
        "--target-recall",
        type=float,
        help="NG recall that model and gauges together keep on the calibration images (default 1.0)",
    )
    parser.add_argument(
        "--grey-zone-frr",
        type=float,
        help="re-inspection budget: add a grey zone whose upper edge scraps at most this share of the "
        "calibration OK parts automatically (the rest of the model's rejects go to a person)",
    )
    parser.add_argument(
        "--frr-budget",
        type=float,
        help="false-reject budget: when the recall target's threshold rejects fewer calibration OK parts than "
        "this share, lower it to the budget, a safety margin below the weakest calibration NG (the default "
        "preset: 0.05)",
    )
    parser.add_argument(
        "--gauges",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with the pose crop: learn length/straightness tolerance bands from the training OK parts and "
        "calibrate the threshold with them (default on; --no-gauges: the model alone)",
    )
    parser.add_argument(
        "--max-minutes", type=float, help="wall-clock budget; stops after the epoch that would exceed it"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (one line per epoch only)"
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective training configuration (preset, --config and flags) as JSON and exit",
    )


def build_config(args: argparse.Namespace) -> TrainConfig:
    from training.config import PRESETS, load_config_file

    if args.preset not in PRESETS:
        raise SystemExit(f"inspectd train: --preset must be one of {sorted(PRESETS)}, got {args.preset!r}")
    cfg = PRESETS[args.preset]
    if args.config:
        cfg = load_config_file(args.config, cfg)
    flags = {
        "epochs": args.epochs,
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "weights": args.weights,
        "pose": args.pose,
        "folds": args.folds,
        "fold": args.fold,
        "target_recall": args.target_recall,
        "grey_zone_frr": args.grey_zone_frr,
        "frr_budget": args.frr_budget,
        "gauges": args.gauges,
        "max_minutes": args.max_minutes,
        "threads": args.threads,
    }
    cfg = replace(cfg, **{k: v for k, v in flags.items() if v is not None})
    if args.rotate is not None:
        cfg = replace(cfg, augment=replace(cfg.augment, rotate_deg=args.rotate))
    return cfg


def run(args: argparse.Namespace) -> int:
    if args.print_config:
        import json

        try:
            print(json.dumps(build_config(args).to_dict(), sort_keys=True))
        except ValueError as exc:
            raise SystemExit(f"inspectd train: {exc}") from None
        return 0
    from engine.dataset import DataError
    from training.train import train

    try:
        if args.resume:
            from training.train import resume_config

            given = {
                k: getattr(args, k)
                for k in (
                    "epochs",
                    "max_minutes",
                    "threads",
                    "input_size",
                    "batch_size",
                    "lr",
                    "seed",
                    "weights",
                    "pose",
                    "folds",
                    "fold",
                    "rotate",
                    "target_recall",
                    "grey_zone_frr",
                    "frr_budget",
                    "gauges",
                    "config",
                )
            }
            cfg = resume_config(args.out, **given)
        else:
            cfg = build_config(args)
        train(
            args.data,
            args.out,
            cfg,
            resume=args.resume,
            split_file=args.split_file,
            progress=not args.no_progress,
        )
    except (DataError, ValueError, FileExistsError, FileNotFoundError) as exc:
        raise SystemExit(f"inspectd train: {exc}") from None
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 speaks
        print(
            f"run: {args.out}  (next: inspectd evaluate {args.out} --data {args.data}; "
            f"inspectd export {args.out} --out MODEL_DIR)"
        )
    return 0
