"""Gauging in the daemon: a part outside a tolerance band is REJECTed ``out_of_tolerance`` even when the model
would pass it; a part that cannot be measured is never passed; in-band parts keep the model's verdict."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from engine.gauges import Band, GaugeSet, learn_margins
from engine.package import Decision, ModelPackage, load_package, write_meta
from engine.pose import PoseParams, estimate_pose
from tests.helpers import tiny_package
from tests.integration.daemon_harness import daemon_settings, serving
from tools.synth import render_screw
from training.gauge_fit import learn_bands

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def parts() -> dict[str, list[np.ndarray]]:
    return {
        "ok": [render_screw(100 + i)[0] for i in range(16)],
        "short": [render_screw(200 + i, "manipulated_front")[0] for i in range(3)],
    }


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory, parts: dict[str, list[np.ndarray]]) -> ModelPackage:
    d: Path = tmp_path_factory.mktemp("pkg") / "gauged"
    tiny_package(d, input_size=(64, 64), seed=3)
    pkg = load_package(d)
    params = PoseParams()
    measured = [estimate_pose(img, params).measurements for img in parts["ok"]]
    gauges = GaugeSet(bands=learn_bands(measured), pose=params.to_dict(), n_ok=len(measured))
    # threshold 1.0: the model alone passes every part, so any REJECT below is the gauges' (or fail-safe's)
    meta = dataclasses.replace(pkg.meta, decision=Decision(threshold=1.0), gauges=gauges.to_dict())
    write_meta(d, meta)
    return load_package(d)


@pytest.mark.timeout(90)
def test_gauges_reject_out_of_tolerance_and_unmeasurable_parts(
    package: ModelPackage, parts: dict[str, list[np.ndarray]]
) -> None:
    frames = [(f"ok-{i}", img) for i, img in enumerate(parts["ok"])]
    frames += [(f"short-{i}", img) for i, img in enumerate(parts["short"])]
    frames.append(("empty-tray", np.full((1024, 1024), 190, np.uint8)))
    settings = daemon_settings(package.directory, batching={"max_batch": 4, "max_wait_ms": 2})
    with serving(settings) as (app, sub, cam):
        cam.stream(frames, fps=30)
        by_id = {v["frame_id"]: v for v in sub.wait_verdicts(len(frames), timeout=60)}
    # The drift window measured every part that was found (not the empty tray): the length quantiles sit in the
    # band, the 5th percentile among the 3 short screws below it (docs/operations.md, "Drift").
    snapshot = app.metrics.drift.snapshot() if app.metrics is not None else {}
    (band,) = [b for b in GaugeSet.from_dict(package.meta.gauges or {}).bands if b.name == "length_px"]
    length = snapshot["measurements"]["length_px"]
    assert band.low is not None and band.high is not None
    assert length["p05"] < band.low < length["p50"] < length["p95"] < band.high, (length, band)
    for i in range(len(parts["ok"])):
        v = by_id[f"ok-{i}"]
        assert (v["verdict"], v["reason"]) == ("PASS", "model"), v
    for i in range(len(parts["short"])):
        v = by_id[f"short-{i}"]
        assert (v["verdict"], v["reason"]) == ("REJECT", "out_of_tolerance"), v
        assert v["score"] is not None  # inference still ran: the record shows the model would have passed it
        assert v["detail"]["rejected_by"] == ["gauges"]
        (length,) = [g for g in v["detail"]["gauges"] if g["name"] == "length_px"]
        assert length["value"] < length["low"]
    empty = by_id["empty-tray"]
    assert (empty["verdict"], empty["reason"]) == ("REJECT", "no_part") and empty["score"] is None


def test_gauges_from_another_pose_setting_are_refused_at_start(tmp_path: Path) -> None:
    from daemon.app import App, StartupError

    d = tmp_path / "pkg"
    tiny_package(d, input_size=(64, 64))
    pkg = load_package(d)
    measured = [estimate_pose(render_screw(300 + i)[0]).measurements for i in range(4)]
    pose = PoseParams(work_scale=0.5).to_dict()  # measured differently from the model's pose crop below
    gauges = GaugeSet(bands=learn_bands(measured), pose=pose, n_ok=4)
    preprocess = dataclasses.replace(pkg.meta.preprocess, pose=PoseParams().to_dict())
    write_meta(d, dataclasses.replace(pkg.meta, preprocess=preprocess, gauges=gauges.to_dict()))
    with pytest.raises(StartupError, match="gauges"):
        App(daemon_settings(d)).start()


@pytest.mark.timeout(90)
def test_gauge_margins_raise_the_score_of_a_part_far_outside_the_good_parts(
    tmp_path: Path, parts: dict[str, list[np.ndarray]]
) -> None:
    """A package whose score adds the gauges' margins (no band that could reject a short screw): the daemon
    scores a short screw above the threshold by its length margin alone, says so in the verdict, and leaves the
    good parts' scores as the model's (within every margin)."""
    d = tmp_path / "margins"
    tiny_package(d, input_size=(64, 64), seed=3)
    pkg = load_package(d)
    params = PoseParams()
    measured = [estimate_pose(img, params).measurements for img in parts["ok"]]
    # The synthetic screws' lengths spread ± 8.6 px (robust s.d.); the short ones lie 11–17 s.d. below: 5 logits
    # per s.d. beyond 4 lifts them past any threshold.
    margins = learn_margins(measured, ("length_px",), weight=5.0)
    gauges = GaugeSet(bands=(Band("straightness_px", None, 1e6),), pose=params.to_dict(), margins=margins)
    # The tiny model's logits are within a few units: 0.999999 (logit 13.8) passes every part on the model alone.
    write_meta(
        d, dataclasses.replace(pkg.meta, decision=Decision(threshold=0.999999), gauges=gauges.to_dict())
    )
    frames = [(f"ok-{i}", img) for i, img in enumerate(parts["ok"])]
    frames += [(f"short-{i}", img) for i, img in enumerate(parts["short"])]
    settings = daemon_settings(d, batching={"max_batch": 4, "max_wait_ms": 2})
    with serving(settings) as (app, sub, cam):
        cam.stream(frames, fps=30)
        by_id = {v["frame_id"]: v for v in sub.wait_verdicts(len(frames), timeout=60)}
        assert app.pipeline is not None
        status = app.pipeline.models.production.summary()  # what `inspectd model status` shows
    assert status["score_margins"] == ["length_px"] and status["gauges"] == ["straightness_px"]
    for i in range(len(parts["ok"])):
        v = by_id[f"ok-{i}"]
        assert (v["verdict"], v["reason"]) == ("PASS", "model"), v
    for i, img in enumerate(parts["short"]):
        v = by_id[f"short-{i}"]
        assert (v["verdict"], v["reason"]) == ("REJECT", "model"), v
        expected = margins.term(estimate_pose(img, params).measurements)
        assert expected > 20
        assert v["detail"]["margins"]["length_px"] == pytest.approx(expected, abs=1e-3)
        added = v["detail"]["model_logit"] + expected
        assert v["score"] == pytest.approx(1 / (1 + np.exp(-added)), abs=1e-6)
