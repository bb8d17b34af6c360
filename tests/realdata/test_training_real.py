"""Brief training on the real screws (skipped without ../shared): the package loads and the report renders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from engine.gauges import GaugeSet
from engine.package import ModelPackage, load_package
from inspectd.cli import main

pytestmark = [pytest.mark.realdata, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def default_run(realdata: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelPackage]:
    """``inspectd train`` and ``inspectd export`` with their defaults on screws-300 (80/10/10 split): the run and
    the package a user who follows the README ships. Trained once for this module's tests (~1–2 min)."""
    root = tmp_path_factory.mktemp("default")
    run, model = root / "run", root / "model"
    assert main(["train", "--data", str(realdata), "--out", str(run), "--no-progress"]) == 0
    assert (
        main(["evaluate", str(run), "--data", str(realdata)]) == 0
    )  # before export: the test metrics travel
    assert main(["export", str(run), "--out", str(model)]) == 0
    return run, load_package(model)


def test_the_default_model_on_real_screws_ranks_ng_above_ok_on_its_held_back_test(
    default_run: tuple[Path, ModelPackage],
) -> None:
    """The default preset (three patch memories on the 320×1000 pose crop) as shipped, on the 80/10/10 split:
    fitting takes about a minute here, and the 30 test images were never used to choose any setting."""
    run, pkg = default_run
    metrics = json.loads((run / "eval-test" / "metrics.json").read_text())
    assert metrics["n"] == 30 and metrics["failed"] == {}
    assert (
        metrics["auroc"] >= 0.9
    )  # measured 0.984 (docs/training.md §9); the ResNet18 presets scored 0.75–0.86
    assert pkg.meta.training["config"]["arch"] == "patch_memory" and pkg.meta.preprocess.pose is not None
    assert pkg.meta.created_by["parity"]["verdicts_equal"] is True


def test_the_default_package_is_the_whole_inspection_and_catches_every_test_ng(
    default_run: tuple[Path, ModelPackage], realdata: Path, tmp_path: Path
) -> None:
    """The package holds the length, straightness and crest-dip bands learnt from the training OK parts, its threshold
    was calibrated with them (45 NG / 225 OK: 0 escapes bound the escape rate below 6.4 %), and through ONNX
    Runtime, gauges applied, every NG of the untouched test split is rejected."""
    _, pkg = default_run
    assert pkg.meta.gauges is not None
    gauges = GaugeSet.from_dict(pkg.meta.gauges)
    assert [b.name for b in gauges.bands] == ["length_px", "straightness_px", "crest_dip_px"]
    assert gauges.pose == pkg.meta.preprocess.pose and gauges.n_ok == 200
    # … and their margins in the score, on the same measurements (the threshold was calibrated with them)
    assert gauges.margins is not None and [m.name for m in gauges.margins.margins] == [
        b.name for b in gauges.bands
    ]
    cal = pkg.meta.calibration
    assert cal["gauges"] is True and cal["recall"] == 1.0 and (cal["n_ng"], cal["n_ok"]) == (45, 225)
    assert cal["escapes"] == 0 and cal["escape_rate_upper"] == pytest.approx(0.0644, abs=1e-4)
    out = tmp_path / "ev"
    assert main(["evaluate", str(pkg.directory), "--data", str(realdata), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    print(
        f"\ncalibration: FRR {cal['false_reject_rate']:.3f} (model alone {cal['model_false_reject_rate']:.3f}), "
        f"gauges reject {cal['ng_rejected_by_gauges']} NG / {cal['ok_rejected_by_gauges']} OK, escape rate "
        f"≤ {cal['escape_rate_upper']:.4f}; test: recall {metrics['recall']:.3f}, FRR "
        f"{metrics['false_reject_rate']:.3f}, by source {metrics['by_source']['ng']}, OK {metrics['by_source']['ok']}"
    )
    assert metrics["evaluated"]["backend"] == "onnxruntime" and metrics["gauges"] is True
    assert metrics["n_ng"] == 5 and metrics["recall"] == 1.0 and metrics["escapes"] == 0


def test_brief_cnn_training_on_real_screws_gives_a_package_and_a_report(
    realdata: Path, tmp_path: Path
) -> None:
    run, model = tmp_path / "run", tmp_path / "model"
    args = [
        "--data",
        str(realdata),
        "--out",
        str(run),
        "--preset",
        "cnn",
        "--epochs",
        "1",
        "--input-size",
        "64x192",
        "--no-progress",
    ]
    assert main(["train", *args]) == 0  # ResNet18 on pose-normalised crops
    assert main(["evaluate", str(run), "--data", str(realdata)]) == 0
    assert main(["export", str(run), "--out", str(model)]) == 0
    pkg = load_package(model)
    assert pkg.meta.preprocess.pose is not None and pkg.meta.preprocess.input_size == (64, 192)
    assert (
        pkg.meta.created_by["parity"]["n_images"] == 30 and pkg.meta.created_by["parity"]["source"] == "given"
    )
    assert main(["evaluate", str(model), "--data", str(realdata), "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n"] == 30 and metrics["n_ng"] == 5 and set(metrics["per_type"]) >= {"OK", "thread_side"}
    assert metrics["failed"] == {}  # pose normalisation succeeds on every real test image
    html = (tmp_path / "ev" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5
