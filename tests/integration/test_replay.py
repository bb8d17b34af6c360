"""``inspectd replay`` end to end: labelled synthetic folders through the real App, the report checked against
an offline computation (ONNX Runtime + engine.preprocess directly), ``--compare`` against a moved threshold,
the CI gates' exit status, split selection, and the torch-free import path."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from engine.package import Decision, ModelPackage, load_package, write_meta
from inspectd.cli import main
from replay.runner import replay_settings
from replay.runner import run as run_replay
from replay.selection import select
from tests.integration.daemon_harness import calibrated_package, daemon_settings, offline_scores
from tools.synth import write_dataset

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
REPO = Path(__file__).resolve().parents[2]
RELAXED = ["--max-latency-ms", "5000"]  # a loaded CI machine must not turn slowness into deadline rejects


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, n_ok=8, n_ng=6, seed=5, size=160)  # OK/, NG/ (the type in the name), labels.csv
    return root


def _with_cam_output(directory: Path) -> None:
    """Add a class-activation-like second output ``cam`` (N, h, w) to the tiny model, as export does."""
    model = onnx.load(str(directory / "model.onnx"))
    model.graph.node.append(helper.make_node("ReduceMean", ["r"], ["cam"], axes=[1], keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", "h", "w"]))
    onnx.checker.check_model(model)
    onnx.save(model, str(directory / "model.onnx"))


@pytest.fixture(scope="module")
def package(data: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    from engine.preprocess import load_gray

    images = [load_gray(str(p)) for p in sorted(data.rglob("*.png"))]
    d = tmp_path_factory.mktemp("pkg") / "tiny"
    calibrated_package(d, images)  # threshold at the median score: both verdicts occur
    _with_cam_output(d)
    pkg = load_package(d, verify=False)
    write_meta(d, dataclasses.replace(pkg.meta, heatmap_output="cam"))
    return load_package(d)


def offline(package: ModelPackage, data: Path, threshold: float) -> dict[str, dict[str, Any]]:
    """file → label, defect type, score, verdict: no daemon code, one image at a time."""
    rows = [line.split(",") for line in (data / "labels.csv").read_text().splitlines()[1:]]
    scores = offline_scores(package, [(data / r[0]).read_bytes() for r in rows])
    return {
        r[0]: {
            "label": r[1],
            "type": r[2],
            "score": float(s),
            "verdict": "REJECT" if s >= threshold else "PASS",
        }
        for r, s in zip(rows, scores, strict=True)
    }


def expected_summary(ref: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ok = [v for v in ref.values() if v["label"] == "OK"]
    ng = [v for v in ref.values() if v["label"] == "NG"]
    tp = sum(v["verdict"] == "REJECT" for v in ng)
    fp = sum(v["verdict"] == "REJECT" for v in ok)
    per_type = {}
    for kind in sorted({v["type"] for v in ng}):
        rows = [v for v in ng if v["type"] == kind]
        per_type[kind] = sum(v["verdict"] == "REJECT" for v in rows) / len(rows)
    return {
        "confusion": {"tp": tp, "fn": len(ng) - tp, "fp": fp, "tn": len(ok) - fp},
        "ng_recall": tp / len(ng),
        "false_reject_rate": fp / len(ok),
        "per_type": per_type,
        "misclassified": sorted(
            f for f, v in ref.items() if (v["label"] == "NG") != (v["verdict"] == "REJECT")
        ),
    }


def replay(*argv: str) -> tuple[int, dict[str, Any]]:
    out = Path(argv[argv.index("--out") + 1])
    rc = main(["replay", *argv, *RELAXED, "--no-progress"])
    return rc, json.loads((out / "replay.json").read_text())


@pytest.fixture(scope="module")
def first(
    package: ModelPackage, data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, int, dict[str, Any]]:
    out = tmp_path_factory.mktemp("replay") / "first"
    rc, report = replay(str(data), "--model", str(package.directory), "--out", str(out),
                        "--max-missed-ng", "99", "--max-false-reject-rate", "1")  # fmt: skip
    return out, rc, report


def test_report_equals_an_offline_computation(first: tuple[Path, int, dict[str, Any]], package: ModelPackage,
                                              data: Path) -> None:  # fmt: skip
    out, rc, report = first
    assert rc == 0 and all(g["passed"] for g in report["gates"]) and len(report["gates"]) == 2
    ref = offline(package, data, package.meta.decision.threshold)
    s = report["summary"]
    assert s["n"] == len(ref) == 14 and (s["n_ok"], s["n_ng"]) == (8, 6)
    assert {r["reason"] for r in report["images"]} == {"model"}  # every verdict a model decision
    got = {r["file"]: r for r in report["images"]}
    assert got.keys() == ref.keys()
    for f, v in ref.items():
        assert got[f]["score"] == pytest.approx(v["score"], abs=1e-5), f
        assert got[f]["verdict"] == v["verdict"], f
        assert (got[f]["label"], got[f]["defect_type"]) == (v["label"], v["type"] or None), f
    want = expected_summary(ref)
    assert s["confusion"] == want["confusion"]
    assert s["ng_recall"] == pytest.approx(want["ng_recall"])
    assert s["false_reject_rate"] == pytest.approx(want["false_reject_rate"])
    assert {k: v["recall"] for k, v in s["per_type"].items()} == pytest.approx(want["per_type"])
    assert sorted(s["misclassified"]) == want["misclassified"]
    assert s["reject_reasons"].get("model", {}).get("total", 0) == sum(
        v["verdict"] == "REJECT" for v in ref.values()
    )
    lat = np.array([r["latency_ms"] for r in report["images"]])
    assert s["latency_ms"]["p99"] == pytest.approx(np.percentile(lat, 99), abs=1e-3)
    assert s["latency_ms"]["max"] == pytest.approx(lat.max(), abs=1e-3)
    assert sorted(r["seq"] for r in report["images"]) == list(range(1, 15))
    assert report["run"]["wire"] == {"received": 14, "published": 14, "gaps": 0, "duplicates": 0}
    # Heatmaps from the package's second output, for exactly the misclassified files; one self-contained page.
    assert sorted(report["heatmaps"]) == want["misclassified"]
    assert all((out / p).is_file() for p in report["heatmaps"].values())
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 1 + len(want["misclassified"])  # + the confusion matrix


def test_compare_lists_the_verdicts_a_moved_threshold_flipped(
    first: tuple[Path, int, dict[str, Any]], package: ModelPackage, data: Path, tmp_path: Path
) -> None:
    """Move the threshold above every NG score: each file scored between the two thresholds flips to PASS."""
    first_out, _, before = first
    old_t = package.meta.decision.threshold
    scores = sorted(r["score"] for r in before["images"])
    top_ng = max(r["score"] for r in before["images"] if r["label"] == "NG")
    above = [x for x in scores if x > top_ng]
    new_t = (top_ng + above[0]) / 2 if above else 1.0
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "model.onnx").write_bytes(package.onnx_path.read_bytes())
    write_meta(moved, dataclasses.replace(package.meta, decision=Decision(threshold=new_t)))

    rc, after = replay(str(data), "--model", str(moved), "--out", str(tmp_path / "second"),
                       "--compare", str(first_out), "--max-flips", "0", "--max-missed-ng", "0")  # fmt: skip
    assert rc == 1  # both gates fail: flips, and every NG now passes
    ref = offline(package, data, new_t)
    expected_flips = sorted(f for f, v in ref.items() if old_t <= v["score"] < new_t)
    assert expected_flips  # the median threshold rejects half the images, so some must flip
    c = after["compare"]
    assert [r["file"] for r in c["flips"]] == expected_flips
    assert all(r["before"] == "REJECT" and r["after"] == "PASS" for r in c["flips"])
    assert all(r["effect"] == ("broken" if ref[r["file"]]["label"] == "NG" else "fixed") for r in c["flips"])
    assert c["previous"]["threshold"] == pytest.approx(old_t) and c["common"] == 14
    gates = {g["gate"]: g for g in after["gates"]}
    assert gates["--max-flips"]["value"] == len(expected_flips) and not gates["--max-flips"]["passed"]
    assert gates["--max-missed-ng"]["value"] == 6 and not gates["--max-missed-ng"]["passed"]
    assert after["summary"]["confusion"] == expected_summary(ref)["confusion"]


def test_split_selects_the_held_out_images(package: ModelPackage, data: Path, tmp_path: Path) -> None:
    files = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    test = [f for f in files if f.startswith("NG/")][:2] + [f for f in files if f.startswith("OK/")][:2]
    split = {"version": 1, "train": [f for f in files if f not in test], "val": [], "test": test}
    pkg_dir = tmp_path / "pkg"
    pkg_dir.mkdir()
    (pkg_dir / "model.onnx").write_bytes(package.onnx_path.read_bytes())
    write_meta(pkg_dir, dataclasses.replace(package.meta, training={"split": split}))
    everything = select(data, package=load_package(pkg_dir))
    assert len(everything.items) == 14 and any("--split test" in n for n in everything.notes)
    rc, report = replay(str(data), "--model", str(pkg_dir), "--split", "test", "--out", str(tmp_path / "r"))
    assert rc == 0
    assert sorted(r["file"] for r in report["images"]) == sorted(test) and report["part"] == "test"


def test_a_gate_that_cannot_be_evaluated_fails(package: ModelPackage, data: Path, tmp_path: Path) -> None:
    """Images without ground truth are replayed, but a recall gate on them fails rather than passing vacuously."""
    loose = tmp_path / "line-batch"
    loose.mkdir()
    for p in sorted((data / "OK").glob("*.png"))[:3]:
        (loose / p.name).write_bytes(p.read_bytes())
    rc, report = replay(str(loose), "--model", str(package.directory), "--out", str(tmp_path / "r"),
                        "--min-ng-recall", "0.5")  # fmt: skip
    assert rc == 1
    assert report["summary"]["n_unlabelled"] == 3 and report["summary"]["verdicts"]
    assert report["gates"][0]["passed"] is False and "cannot be evaluated" in report["gates"][0]["why"]


def test_a_fixed_rate_is_never_exceeded(package: ModelPackage, data: Path) -> None:
    settings = replay_settings(
        daemon_settings(package.directory, deadlines={"max_latency_ms": 5000}), metrics_port=None
    )
    items = select(data).items[:8]
    result = run_replay(settings, items, rate=20.0)
    assert result.complete and len(result.records) == 8
    assert result.seconds >= 7 / 20.0  # 8 frames on a 50 ms schedule span at least 350 ms


def test_replay_never_imports_torch(package: ModelPackage, data: Path, tmp_path: Path) -> None:
    """The QA command runs where the daemon runs: no torch, and no training package at all (its ground truth
    comes from engine.dataset, its heat maps from engine.heatmap)."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from inspectd.cli import main\n"
        f"rc = main(['replay', {str(data)!r}, '--model', {str(package.directory)!r}, '--out', "
        f"{str(tmp_path / 'r')!r}, '--no-progress', '--max-latency-ms', '5000'])\n"
        "assert rc == 0, rc\n"
        "assert 'engine.dataset' in sys.modules and 'engine.heatmap' in sys.modules\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'training'], 'training imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=100)


def test_a_pose_crop_package_replays(tmp_path: Path) -> None:
    """A package whose preprocessing starts with the pose crop (what training exports by default): the daemon
    warms its preprocessing threads with a blank frame, which has no part; that must not stop start-up."""
    from engine.pose import PoseParams
    from tests.helpers import tiny_package

    d = tmp_path / "pose-pkg"
    meta = tiny_package(d, input_size=(32, 96))
    write_meta(
        d,
        dataclasses.replace(
            meta, preprocess=dataclasses.replace(meta.preprocess, pose=PoseParams().to_dict())
        ),
    )
    data = tmp_path / "data"
    write_dataset(data, n_ok=1, n_ng=1, seed=2, size=1024)
    rc, report = replay(str(data), "--model", str(d), "--out", str(tmp_path / "r"))
    assert rc == 0
    assert [r["reason"] for r in report["images"]] == ["model", "model"]  # both posed and inferred


def test_replay_settings_keep_the_pipeline_and_drop_what_a_station_shares(tmp_path: Path) -> None:
    """From a station's config: its batching, deadlines and backend stay; its sockets, CURVE keys, audit archive,
    metrics port and package watching do not (a replay must not collide with the daemon running beside it)."""
    station = daemon_settings(
        tmp_path,
        sources={"camera": {"endpoint": "tcp://0.0.0.0:5555"}, "folder": {"enabled": True, "path": str(tmp_path)}},
        publisher={"endpoint": "tcp://0.0.0.0:5556"},
        security={"server_secret_key": str(tmp_path / "d.key_secret"), "camera_clients": str(tmp_path),
                  "subscriber_clients": str(tmp_path)},
        audit={"enabled": True, "path": str(tmp_path / "audit")},
        metrics={"port": 9108},
        batching={"max_batch": 4, "max_wait_ms": 7.0},
        deadlines={"max_latency_ms": 123},
        model={"path": str(tmp_path), "watch_s": 5.0},
    )  # fmt: skip
    r = replay_settings(station, metrics_port=None)
    assert not r.sources.camera.enabled and not r.sources.folder.enabled
    assert r.publisher.endpoint == "tcp://127.0.0.1:*" and not r.security.curve
    assert not r.audit.enabled and not r.metrics.enabled and r.model.watch_s == 0
    assert (r.batching, r.deadlines, r.model.backend) == (
        station.batching,
        station.deadlines,
        station.model.backend,
    )
    assert replay_settings(station, metrics_port=9200).metrics.port == 9200


def test_a_gauged_package_reports_what_the_gauges_caught(tmp_path: Path) -> None:
    """The report shows the measurements OK vs NG with the bands, and the NG parts only the gauges caught."""
    from engine.gauges import GaugeSet
    from engine.pose import PoseParams, estimate_pose
    from engine.preprocess import load_gray
    from tests.helpers import tiny_package
    from training.gauge_fit import learn_bands

    data = tmp_path / "data"
    write_dataset(data, n_ok=6, n_ng=5, seed=4, size=1024)  # one NG of each type; manipulated_front is short
    oks = sorted((data / "OK").glob("*.png"))
    measured = [estimate_pose(load_gray(str(p))).measurements for p in oks]
    d = tmp_path / "pkg"
    meta = tiny_package(d, input_size=(32, 32), threshold=1.0)  # the model alone passes every part
    gauges = GaugeSet(bands=learn_bands(measured), pose=PoseParams().to_dict(), n_ok=len(measured))
    write_meta(d, dataclasses.replace(meta, gauges=gauges.to_dict()))
    out = tmp_path / "r"
    rc, report = replay(str(data), "--model", str(d), "--out", str(out))
    assert rc == 0
    caught = report["summary"]["caught_by_gauges_only"]
    assert "NG/manipulated_front_00000.png" in caught  # shortened: outside the length band
    # (with bands from only 6 OK parts a chipped head can fall outside the head-width band too)
    assert {r["reason"] for r in report["images"] if r["file"] in caught} == {"out_of_tolerance"}
    assert report["gauges"]["measured"] == {"OK": 6, "NG": 5, "failed": 0}
    assert (out / "gauges.png").stat().st_size > 10_000
    assert (
        f"NG parts the gauges caught that the model missed ({len(caught)})"
        in (out / "report.html").read_text()
    )
