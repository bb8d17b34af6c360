"""Split reuse across runs and the k-fold summary: the guards that keep test images out of training."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("torch")

from engine.dataset import DataError, discover
from engine.split import Split, make_split
from training.config import PRESETS, TrainConfig
from training.kfold import summarise
from training.train import SPLIT, resolve_split, resume_config


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for i in range(20):
        (root / "OK").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "OK" / f"ok{i:02d}.png"), np.full((8, 8), 200 - i, np.uint8))
    for i in range(6):
        (root / "NG").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "NG" / f"dent{i:02d}.png"), np.full((8, 8), 50 + i, np.uint8))
    return root


def test_a_run_directory_reuses_its_split_even_with_another_seed(data: Path, tmp_path: Path) -> None:
    ds = discover(data)
    h = ds.content_hash()
    run = tmp_path / "run"
    run.mkdir()
    first = resolve_split(ds, TrainConfig(seed=0), run, None, h)
    first.save(run / SPLIT)
    assert resolve_split(ds, TrainConfig(seed=99), run, None, h) == first  # not re-split


def test_a_split_made_for_other_data_is_refused(data: Path, tmp_path: Path) -> None:
    ds = discover(data)
    other = make_split(ds.samples, seed=0, data_hash="0" * 64)
    f = other.save(tmp_path / "other.json")
    with pytest.raises(DataError, match="made for other data"):
        resolve_split(ds, TrainConfig(), tmp_path / "new", f, ds.content_hash())


def test_resume_refuses_to_change_anything_but_epochs_budget_and_threads(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TrainConfig(epochs=5).to_dict()))
    assert resume_config(tmp_path, epochs=9, lr=None).epochs == 9
    with pytest.raises(ValueError, match=r"\['lr'\] cannot change"):
        resume_config(tmp_path, lr=0.1)


def _fold(run: Path, images: list[dict]) -> Path:  # type: ignore[type-arg]
    (run / "eval-test").mkdir(parents=True)
    y = np.array([im["label"] for im in images])
    from training.metrics import auroc

    z = np.array([im["logit"] for im in images])
    (run / "eval-test" / "metrics.json").write_text(json.dumps({"images": images, "auroc": auroc(z, y)}))
    return run


def test_kfold_summary_pools_each_folds_own_verdicts(tmp_path: Path) -> None:
    def im(path: str, label: int, logit: float, reject: bool, group: str = "dent") -> dict:  # type: ignore[type-arg]
        return {
            "path": path,
            "label": label,
            "group": "OK" if label == 0 else group,
            "logit": logit,
            "reject": reject,
        }

    a = _fold(tmp_path / "a", [im("1", 0, -1, False), im("2", 1, 2, True), im("3", 0, 3, True)])
    b = _fold(tmp_path / "b", [im("4", 0, 0, False), im("5", 1, 1, False, "bent"), im("6", 1, 4, True)])
    s = summarise([a, b])
    assert s["n"] == 6 and s["auroc_per_fold"] == [0.5, 1.0] and s["auroc_mean"] == 0.75
    assert s["recall"] == pytest.approx(2 / 3) and s["false_reject_rate"] == pytest.approx(1 / 3)
    assert s["per_type_recall"] == {"bent": 0.0, "dent": 1.0}
    with pytest.raises(ValueError, match="overlap"):
        summarise([a, a])


def test_split_file_lists_relative_paths(data: Path, tmp_path: Path) -> None:
    ds = discover(data)
    split = make_split(ds.samples, seed=1, data_hash=ds.content_hash())
    saved = json.loads(split.save(tmp_path / "s.json").read_text())
    assert all(not p.startswith("/") for p in saved["train"] + saved["val"] + saved["test"])
    assert Split.load(tmp_path / "s.json") == split


def test_the_false_reject_budget_is_the_default_presets_and_a_flag() -> None:
    import argparse

    from training.commands.train import add_arguments, build_config

    assert PRESETS["default"].frr_budget == 0.04 and TrainConfig().frr_budget is None
    # A run saved before budgets existed is re-read without one (its threshold was the recall threshold).
    saved = {k: v for k, v in PRESETS["default"].to_dict().items() if k != "frr_budget"}
    assert TrainConfig.from_saved(saved).frr_budget is None
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--data", "d", "--out", "o", "--frr-budget", "0.02"])
    assert build_config(args).frr_budget == 0.02
    with pytest.raises(ValueError, match=r"\['frr_budget'\]"):
        build_config(parser.parse_args(["--data", "d", "--out", "o", "--frr-budget", "1.5"]))
