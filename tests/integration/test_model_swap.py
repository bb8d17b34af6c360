"""Issue 15 on the real daemon: ``inspectd serve`` as a child process, real ZeroMQ (camera, verdicts, control),
real ONNX Runtime, ``inspectd model …`` as the operator runs it, /metrics over HTTP.

- Frames stream at 20 fps while a candidate is loaded, shadowed, promoted, rolled back and promoted again, five
  times: every frame gets exactly one verdict, ``seq`` runs 1…N without a hole, nothing is rejected
  uninspected, each verdict's ``model`` changes exactly at the ``seq`` the switches reported, and each score is
  the one the named model gives that image offline.
- Candidates with a bad sha256, one that fails warm-up (raises at run; not an ONNX file), one with another
  input size, and a package that does not exist are each refused with their message, while production serves
  on untouched.
- Shadow tallies (Prometheus, ``model status``, the log, the audit archive) equal the disagreements computed
  offline with ONNX Runtime on the same frames.
"""

from __future__ import annotations

import collections
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.control import ControlClient
from daemon.settings import Settings
from engine.package import ModelPackage, load_package
from tests.helpers import tiny_package, wait_until
from tests.integration.daemon_harness import VerdictCollector, daemon_settings, offline_scores, synth_images
from tests.integration.model_support import (
    MARGIN,
    Streamer,
    bad_sha_package,
    failing_package,
    gap_midpoint,
    image_of,
    model_cli,
    not_onnx_package,
    sample,
    scrape,
    with_threshold,
)
from tools.daemon_process import DaemonProcess

pytestmark = pytest.mark.integration

N_IMAGES = 24


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [img for img, _ in synth_images(N_IMAGES, size=128, seed=11)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, images: list[np.ndarray]) -> dict[str, Any]:
    """Production "a" and candidate "b" (two networks), each with its operating point at a gap of its own offline
    scores (a near its median, b lower: b rejects more parts), so verdicts are mixed, the two disagree on some
    parts, and no score sits on a threshold; with their offline scores."""
    root = tmp_path_factory.mktemp("models")
    out: dict[str, Any] = {}
    for name, seed, quantile in (("a", 3, 0.5), ("b", 8, 0.25)):
        tiny_package(root / name, input_size=(32, 32), seed=seed, name=name)
        scores = offline_scores(load_package(root / name), images)
        out[name] = with_threshold(root / name, gap_midpoint(scores, quantile))
        out[f"{name}_scores"] = offline_scores(out[name], images)
    return out


def settings_for(package: ModelPackage, workers: int = 1, **overrides: Any) -> Settings:
    batching = {"max_batch": 4, "max_wait_ms": 2, "inference_workers": workers}
    return daemon_settings(package.directory, batching=batching, **overrides)


def check_stream(verdicts: list[dict[str, Any]], sent: list[str]) -> list[dict[str, Any]]:
    """Exactly one verdict per frame sent, seq 1…N of one boot, every part inspected. Returns them by seq."""
    by_seq = sorted(verdicts, key=lambda v: v["seq"])
    assert [v["seq"] for v in by_seq] == list(range(1, len(sent) + 1))
    assert len({v["boot_id"] for v in by_seq}) == 1
    counts = collections.Counter(v["frame_id"] for v in by_seq)
    assert set(counts) == set(sent) and set(counts.values()) == {1}
    reasons = collections.Counter(v["reason"] for v in by_seq)
    assert set(reasons) == {"model"}, reasons  # no deadline, overload or engine_error: nothing uninspected
    return by_seq


@pytest.mark.timeout(240)
@pytest.mark.parametrize("workers", [1, 2], ids=["1-worker", "2-workers"])
def test_five_cycles_of_load_shadow_promote_rollback_promote_at_20_fps(
    models: dict[str, Any], images: list[np.ndarray], tmp_path: Path, workers: int
) -> None:
    """With two inference workers two batches may be in flight at once: a switch waits for both."""
    a, b = models["a"], models["b"]
    ids = {a.meta.model_id: "a_scores", b.meta.model_id: "b_scores"}
    settings = settings_for(a, workers)
    with (
        DaemonProcess(settings, tmp_path, name="swap") as d,
        VerdictCollector(d.publisher_endpoint, settings.line) as sub,
    ):
        endpoint = d.ready["control"]
        client = ControlClient(endpoint)

        def decided_after(seq: int, n: int = 8) -> None:
            wait_until(lambda: len(sub.verdicts) >= seq - 1 + n, 30, f"{n} verdicts from seq {seq} on")

        def switch(action: str) -> dict[str, Any]:
            assert model_cli(action, endpoint=endpoint) == 0
            record: dict[str, Any] = client.status()["switches"][-1]
            assert record["action"] == action
            decided_after(record["first_seq"])
            return record

        with Streamer(d.camera_endpoint, images, fps=20) as camera:
            production, other = a, b
            for cycle in range(5):
                if cycle:  # the model rolled back to, then promoted away from: previous now; reload it fresh
                    assert model_cli("drop", "previous", endpoint=endpoint) == 0
                assert model_cli("load", str(other.directory), "--shadow", endpoint=endpoint) == 0
                status = client.status()
                assert status["state"] == "shadow" and status["candidate"]["model"] == other.meta.model_id
                wait_until(lambda: client.status()["shadow"]["scored"] >= 8, 30, "the candidate shadowing")
                switch("promote")
                switch("rollback")
                switch("promote")
                production, other = other, production
            assert client.status()["production"]["model"] == production.meta.model_id
        verdicts = sub.wait_verdicts(len(camera.sent), timeout=60)
        switches = client.status()["switches"]
    assert d.exit_code == 0

    by_seq = check_stream(verdicts, camera.sent)
    assert [s["action"] for s in switches] == ["promote", "rollback", "promote"] * 5
    boundaries = [(1, a.meta.model_id)] + [(s["first_seq"], s["to"]) for s in switches]
    for (_, before), s in zip(boundaries, switches, strict=False):
        assert s["from"] == before  # each switch started from the model the one before it installed
    # The model field changes exactly at the reported seqs, and nowhere else.
    changes = [cur["seq"] for prev, cur in itertools.pairwise(by_seq) if prev["model"] != cur["model"]]
    assert changes == [s["first_seq"] for s in switches]
    for v in by_seq:
        expected = next(m for first, m in reversed(boundaries) if first <= v["seq"])
        assert v["model"] == expected, v
        # …and the named model made it: its score is the one that model gives that image.
        offline = models[ids[v["model"]]][image_of(v["frame_id"], len(images))]
        assert v["score"] == pytest.approx(offline, abs=1e-5), v


@pytest.mark.timeout(180)
def test_refused_candidates_never_serve_and_production_serves_on(
    models: dict[str, Any], images: list[np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = models["a"]
    bad = tmp_path / "bad"
    tiny_package(bad / "wide", input_size=(48, 48), seed=4)
    cases = [
        (["load", str(bad_sha_package(bad / "sha", input_size=(32, 32), seed=4))], "refused: bad sha256: "),
        (
            ["load", str(failing_package(bad / "raises"))],
            "refused: candidate failed warm-up: BackendError: ONNX Runtime inference failed",
        ),
        (
            ["load", str(not_onnx_package(bad / "garbage", input_size=(32, 32)))],
            "refused: candidate failed warm-up: BackendError: ONNX Runtime cannot load",
        ),
        (
            ["load", str(bad / "wide")],
            "refused: incompatible input: preprocess.input_size [48, 48] (production: [32, 32])",
        ),
        (["load", str(bad / "missing")], "refused: no such package: "),
        (["promote"], "refused: nothing to promote"),
        (["rollback"], "refused: nothing to roll back to"),
        (["drop", "previous"], "refused: nothing to drop"),
        (["shadow", "on"], "refused: nothing to shadow"),
    ]
    settings = settings_for(a)
    with (
        DaemonProcess(settings, tmp_path, name="refusals") as d,
        VerdictCollector(d.publisher_endpoint, settings.line) as sub,
    ):
        endpoint = d.ready["control"]
        with Streamer(d.camera_endpoint, images, fps=20) as camera:
            wait_until(lambda: len(sub.verdicts) >= 5, 30, "production deciding")
            for args, message in cases:
                capsys.readouterr()
                assert model_cli(*args, endpoint=endpoint) == 1, args
                err = capsys.readouterr().err
                assert message in err, (args, err)
            n = len(sub.verdicts)
            wait_until(lambda: len(sub.verdicts) >= n + 5, 30, "production deciding after the refusals")
        verdicts = sub.wait_verdicts(len(camera.sent), timeout=30)
        status = ControlClient(endpoint).status()
        samples = scrape(d.ready["metrics_port"])
        capsys.readouterr()
        assert model_cli("status", endpoint=endpoint) == 0
        shown = capsys.readouterr().out
    assert d.exit_code == 0
    for v in check_stream(verdicts, camera.sent):
        assert v["model"] == a.meta.model_id
        assert v["score"] == pytest.approx(models["a_scores"][image_of(v["frame_id"], len(images))], abs=1e-5)
    assert status["state"] == "serving" and status["candidate"] is None and status["previous"] is None
    assert status["production"]["model"] == a.meta.model_id and status["switches"] == []
    assert status["load"]["last"]["result"] == "refused"
    assert "state       serving" in shown and f"production  {a.meta.model_id}" in shown
    loads = [c for c in cases if c[0][0] == "load"]
    assert sample(samples, "inspectd_model_loads_total", line=settings.line, result="refused") == len(loads)
    assert sample(samples, "inspectd_model_loads_total", line=settings.line, result="loaded") == 0
    assert sample(samples, "inspectd_model_switches_total", line=settings.line, action="promote") == 0
    assert sample(samples, "inspectd_ready", line=settings.line) == 1
    roles = {dict(lb)["role"] for (name, lb) in samples if name == "inspectd_model_info"}
    assert roles == {"production"}


def offline_disagreements(models: dict[str, Any], tolerance: float) -> dict[str, str]:
    """frame image index → kind, computed here: production "a" and candidate "b" scored by ONNX Runtime one
    image at a time, each decided by its own threshold."""
    out: dict[str, str] = {}
    ta, tb = models["a"].meta.decision.threshold, models["b"].meta.decision.threshold
    for i, (pa, pb) in enumerate(zip(models["a_scores"], models["b_scores"], strict=True)):
        va, vb = pa >= ta, pb >= tb
        if va != vb:
            out[str(i)] = "reject_pass" if va else "pass_reject"
        elif abs(pb - pa) > tolerance:
            out[str(i)] = "score"
    return out


@pytest.mark.timeout(180)
def test_shadow_tallies_equal_the_disagreements_computed_offline(
    models: dict[str, Any], images: list[np.ndarray], tmp_path: Path
) -> None:
    a, b = models["a"], models["b"]
    diffs = np.abs(models["b_scores"] - models["a_scores"])
    tolerance = gap_midpoint(diffs, 0.5)  # no |difference| within MARGIN of it
    assert np.all(np.abs(diffs - tolerance) > MARGIN)
    expected = offline_disagreements(models, tolerance)
    kinds = collections.Counter(expected.values())
    assert kinds["pass_reject"] + kinds["reject_pass"] > 0 and kinds["score"] > 0, kinds  # the test can tell
    settings = settings_for(
        a,
        # Every frame offered is scored (room for all, never yielding to production): the tallies are of all
        # of them, not of a sample.
        shadow={
            "score_tolerance": tolerance,
            "queue_batches": 2 * N_IMAGES,
            "yield_busy": 1.0,
            "yield_backlog": 0,
        },
        audit={"enabled": True, "path": str(tmp_path / "audit")},
    )
    with (
        DaemonProcess(settings, tmp_path, name="shadow") as d,
        VerdictCollector(d.publisher_endpoint, settings.line) as sub,
    ):
        client = ControlClient(d.ready["control"])
        record = client.load(b.directory, shadow=True)
        assert record["model"] == b.meta.model_id
        with Streamer(d.camera_endpoint, images, fps=20) as camera:
            wait_until(lambda: len(camera.sent) >= N_IMAGES, 30, "every image sent once")
        sub.wait_verdicts(len(camera.sent), timeout=30)
        sent = len(camera.sent)
        wait_until(
            lambda: client.status()["shadow"]["scored"] >= sent, 30, "the candidate scoring every frame"
        )
        status = client.status()["shadow"]
        samples = scrape(d.ready["metrics_port"])
    assert d.exit_code == 0

    # What the frames sent should have produced: the offline kinds, once per time each image was sent.
    per_frame = {
        f: expected[str(image_of(f, N_IMAGES))] for f in camera.sent if str(image_of(f, N_IMAGES)) in expected
    }
    want = collections.Counter(per_frame.values())
    line = settings.line
    assert status["offered"] == status["scored"] == sent and status["sampled_share"] == 1.0
    assert status["errors"] == 0
    assert status["disagreements"] == {k: want[k] for k in ("pass_reject", "reject_pass", "score")}
    assert sample(samples, "inspectd_shadow_frames_total", line=line) == sent
    assert sample(samples, "inspectd_shadow_offered_frames_total", line=line) == sent
    assert sample(samples, "inspectd_shadow_sampled_ratio", line=line) == 1.0
    for kind in ("pass_reject", "reject_pass", "score"):
        assert sample(samples, "inspectd_shadow_disagreements_total", line=line, kind=kind) == want[kind], (
            kind
        )
    assert sample(samples, "inspectd_shadow_score_difference_count", line=line) == sent
    roles = {dict(lb)["role"]: dict(lb)["model"] for (name, lb) in samples if name == "inspectd_model_info"}
    assert roles == {"production": a.meta.model_id, "candidate": b.meta.model_id}

    # Logged with the frame id and both scores…
    logged = {
        f["frame_id"]: f
        for e in d.log_records()
        if e.get("event") == "shadow disagreements"
        for f in e["frames"]
    }
    assert {f: e["kind"] for f, e in logged.items()} == per_frame
    # …and kept in the audit archive with both verdicts.
    kept = {}
    for path in (tmp_path / "audit").glob("*_shadow_*.json"):
        entry = json.loads(path.read_text())
        kept[entry["frame_id"]] = entry
        assert path.with_suffix(".png").is_file()  # the frame itself
    assert {f: e["kind"] for f, e in kept.items()} == per_frame
    for fid, entry in kept.items():
        i = image_of(fid, N_IMAGES)
        assert (
            entry["production"]["model"] == a.meta.model_id and entry["candidate"]["model"] == b.meta.model_id
        )
        assert entry["production"]["score"] == pytest.approx(models["a_scores"][i], abs=1e-5)
        assert entry["candidate"]["score"] == pytest.approx(models["b_scores"][i], abs=1e-5)
        assert logged[fid]["candidate"]["score"] == pytest.approx(models["b_scores"][i], abs=1e-5)
