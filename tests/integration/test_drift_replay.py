"""Drift that can be seen: a brightness shift of the camera's light, replayed through the production pipeline
(``inspectd replay``), moves the daemon's drift statistic past its alert threshold while the NG rate stays far
below its own; the same parts without the shift stay below both. Thresholds are read from the shipped rules.

The package is the tiny ONNX model with a real reference: the NG logits of 80 good synthetic screws, scored
offline, and a threshold at their 95th percentile (a line that rejects ~5 % of its good parts). CLAHE evens out most of a
brightness change, but not all: +20 gray levels lower this model's scores by about two standard deviations, so
the parts look *better* — the direction in which the NG rate even falls and a defect may slip through, the one
only a drift statistic can show.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml

from daemon.app import App, StartupError
from engine.backend import create_backend
from engine.drift import ScoreReference, logit
from engine.package import Decision, ModelPackage, load_package, write_meta
from engine.preprocess import Preprocessor, load_gray
from inspectd.cli import main
from tests.deploy_support import RULES_YML
from tests.helpers import tiny_package
from tests.integration.daemon_harness import daemon_settings
from tools.synth import write_dataset

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SHIFT = 20  # gray levels: a lamp brighter, an exposure longer


def _alert_threshold(alert: str) -> float:
    """The number the shipped rule compares with: ``… > X``."""
    rules = yaml.safe_load(RULES_YML.read_text(encoding="utf-8"))
    (rule,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == alert]
    (value,) = set(re.findall(r">\s*([0-9.]+)", rule["expr"]))
    return float(value)


def _offline_logits(package: ModelPackage, files: list[Path]) -> np.ndarray:
    pre = Preprocessor(package.meta.preprocess)
    with create_backend("onnxruntime", package, max_batch=1, intra_op_threads=1) as backend:
        return np.array([float(backend.infer(pre(load_gray(str(f)))[None])[0]) for f in files])


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    root = tmp_path_factory.mktemp("drift")
    d = root / "model"
    tiny_package(d, input_size=(64, 64), seed=3)
    pkg = load_package(d)
    calibration = root / "calibration"
    write_dataset(calibration, n_ok=80, n_ng=0, seed=41)
    ok = _offline_logits(pkg, sorted((calibration / "OK").glob("*.png")))
    reference = ScoreReference.from_logits(ok, "80 good synthetic screws")
    # At the reference's 95th percentile: a line that rejects about 5 % of its good parts (false rejects),
    # under the NG-rate alert, so the NG rate has room to move either way.
    threshold = 1.0 / (1.0 + math.exp(-float(np.quantile(ok, 0.95))))
    write_meta(d, dataclasses.replace(pkg.meta, decision=Decision(threshold=threshold),
                                      score_reference=reference.to_dict()))  # fmt: skip
    return load_package(d)


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """New parts from the line (100 good, 5 defective), as photographed, and with the light SHIFT brighter."""
    root = tmp_path_factory.mktemp("line")
    plain, shifted = root / "plain", root / "shifted"
    write_dataset(plain, n_ok=100, n_ng=5, seed=42)
    shutil.copytree(plain, shifted)
    for png in shifted.rglob("*.png"):
        img = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)
        assert int(img.max()) + SHIFT <= 255  # a shift, not a clipping: nothing saturates
        cv2.imwrite(str(png), cv2.add(img, SHIFT), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    return plain, shifted


def _replay(
    data: Path, package: ModelPackage, out: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> dict[str, Any]:
    code = main(["replay", str(data), "--model", str(package.directory), "--out", str(out), "--config", str(config),
                 "--max-latency-ms", "5000", "--no-progress", "--max-heatmaps", "0"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    report: dict[str, Any] = json.loads((out / "replay.json").read_text(encoding="utf-8"))
    report["headline"] = capsys.readouterr().out
    return report


def _ng_rate(report: dict[str, Any]) -> float:
    inspected = [r for r in report["images"] if r["reason"] in ("model", "grey_zone", "out_of_tolerance")]
    assert len(inspected) == len(report["images"])  # nothing was rejected uninspected
    return sum(r["verdict"] == "REJECT" for r in inspected) / len(inspected)


def test_a_brightness_shift_raises_the_drift_statistic_and_not_the_ng_rate(
    package: ModelPackage, parts: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    psi_alert, ng_alert = _alert_threshold("InspectdScoreDrift"), _alert_threshold("InspectdNgRateHigh")
    assert (psi_alert, ng_alert) == (0.25, 0.10)  # what the docs and the dashboard say
    config = tmp_path / "inspectd.toml"
    settings = daemon_settings(package.directory, metrics={"drift_window": 500, "drift_min_parts": 50})
    config.write_text(f"[metrics]\ndrift_window = {settings.metrics.drift_window}\n"
                      f"drift_min_parts = {settings.metrics.drift_min_parts}\n", encoding="utf-8")  # fmt: skip
    plain, shifted = parts
    before = _replay(plain, package, tmp_path / "plain", config, capsys)
    after = _replay(shifted, package, tmp_path / "shifted", config, capsys)
    d0, d1 = before["drift"], after["drift"]
    ref = ScoreReference.from_dict(package.meta.score_reference or {})

    # The same kind of parts in the same light: calm, and the NG rate of a line that passes most good parts.
    assert d0["reference_parts"] == 76 and len(ref.logits) == 80 and d0["passed_parts"] >= 50
    assert d0["psi"] < psi_alert, d0
    assert _ng_rate(before) < ng_alert
    # The light changed: the drift statistic is far past its alert, the NG rate not near its own (it even fell:
    # the parts look better than the calibration's good ones, the median rank says so).
    assert d1["psi"] > psi_alert, d1
    assert _ng_rate(after) < _ng_rate(before) < ng_alert
    assert d1["median_rank"] < 0.25 < d0["median_rank"], (d0, d1)
    # And the image statistics say why: the crops are SHIFT gray levels brighter, their contrast the same.
    assert d1["crop_brightness"] - d0["crop_brightness"] == pytest.approx(SHIFT, abs=0.5)
    assert d1["crop_contrast"] == pytest.approx(d0["crop_contrast"], abs=0.5)
    # The replay's headline reports it too.
    assert f"drift: PSI {d1['psi']:.3f}" in after["headline"]
    print(f"PSI {d0['psi']:.3f} → {d1['psi']:.3f}; NG rate {_ng_rate(before):.3f} → {_ng_rate(after):.3f}")


def test_reference_against_the_operating_point(package: ModelPackage, tmp_path: Path) -> None:
    # The reference is compared below the package's PASS bound: a threshold that passes too few of the
    # reference's parts leaves the daemon without a drift statistic (said, not crashed); a malformed reference
    # is a package the daemon refuses, like any field it cannot read.
    ref = ScoreReference.from_dict(package.meta.score_reference or {})
    strict = tmp_path / "strict"
    shutil.copytree(package.directory, strict)
    below = 1.0 / (1.0 + math.exp(-ref.logits[10]))  # 10 of 80 parts pass
    write_meta(strict, dataclasses.replace(package.meta, decision=Decision(threshold=below)))
    app = App(daemon_settings(strict))
    app.init_package()
    monitor = app._drift_monitor(load_package(strict).meta)
    assert monitor.bins is None and "only 10 of the 80 reference parts pass" in monitor.no_reference
    assert logit(below) == pytest.approx(ref.logits[10])

    broken = tmp_path / "broken"
    shutil.copytree(package.directory, broken)
    meta = json.loads((broken / "model.json").read_text(encoding="utf-8"))
    meta["score_reference"]["logits"] = list(reversed(meta["score_reference"]["logits"]))
    (broken / "model.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(StartupError, match="score_reference logits must be sorted"):
        App(daemon_settings(broken)).start()
