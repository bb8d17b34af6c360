"""``inspectd bench`` runs end to end (real daemon subprocess, real ZeroMQ, real ONNX Runtime, the naive loop)
and writes JSON and markdown of the documented shape. Structure only: speed is never asserted in tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inspectd.cli import main
from tests.helpers import tiny_package

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOP_LEVEL = {
    "machine_limit_img_s",
    "daemon_img_s",
    "ratio_to_limit",
    "ratio_to_measured_limit",
    "baseline_img_s",
    "speedup_vs_baseline",
    "latency",
    "peak_rss_mb",
    "stages",
    "backends",
    "machine",
    "machine_limit",
    "daemon",
    "cpu",
    "targets",
    "gpu",
    "config",
}


@pytest.mark.timeout(240)
def test_bench_writes_the_documented_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny_package(tmp_path / "pkg", input_size=(64, 64))
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    rc = main(
        [
            "bench",
            "--model",
            str(tmp_path / "pkg"),
            "--images",
            "synth",
            "--count",
            "2",
            "--seconds",
            "1",
            "--rates",
            "5",
            "--batch-sizes",
            "1,2",
            "--max-batch",
            "2",
            "--deadline-ms",
            "2000",
            "--out",
            str(out),
            "--markdown",
            str(md),
            "--quiet",
        ]
    )
    assert rc == 0
    r = json.loads(out.read_text())
    assert r.keys() >= TOP_LEVEL

    assert r["machine"]["cores"] >= 1 and r["machine"]["loadavg_before"] and r["machine"]["loadavg_after"]
    for stage in ("decode_png", "clahe", "resize", "normalise", "frame_raw", "frame_png"):
        assert r["stages"][stage]["core_ms"] >= 0 and r["stages"][stage]["wall_ms"] > 0
    fp32 = r["backends"]["onnxruntime-fp32-t1"]["batch"]
    assert set(fp32) >= {"1", "2"} and all(v["img_s"] > 0 for v in fp32.values())
    assert "error" in r["backends"]["torch-fp32-t1"]  # the tiny package has no model.pt: reported, not fatal

    lim = r["machine_limit"]
    assert lim["raw"]["img_s"] == r["machine_limit_img_s"] > 0 and "process CPU time" in lim["method"]
    # Charged at the batch the daemon ran (max_batch as capped at its start-up), which the table then holds.
    assert 1 <= r["daemon"]["max_batch"] <= 2 and lim["batch"] == r["daemon"]["max_batch"]
    assert str(lim["batch"]) in fp32
    # The limit measured with every core busy: one thread per core, at the same batch, raw and PNG.
    for enc in ("raw", "png"):
        m = lim[enc]["measured"]
        assert m["threads"] == r["machine"]["cores"] and m["batch"] == lim["batch"]
        assert m["img_s"] > 0 and m["core_ms_per_img"] > 0 and m["seconds"] > 0
        assert m["scaling"] == round(m["img_s"] / lim[enc]["img_s"], 3)
    assert r["ratio_to_measured_limit"] == round(r["daemon_img_s"] / lim["raw"]["measured"]["img_s"], 3)
    sat = r["daemon"]["saturation"]
    for enc in ("raw", "png"):
        assert sat[enc]["sent"] > 0 and sat[enc]["missing"] == 0  # exactly one verdict per frame sent
    assert r["daemon_img_s"] == sat["raw"]["img_s"]
    # The service time is taken where the daemon runs a lone frame: its lone-frame session, if it kept one.
    lone, service = r["daemon"]["lone_frame"], r["single_image_service_ms"]
    assert {"threads", "worker_b1_ms", "lone_b1_ms", "reason"} <= lone.keys()
    threads = lone["threads"] or r["config"]["intra_op_threads"]
    assert service["backend"] == f"onnxruntime-fp32-t{threads}" and service["backend"] in r["backends"]
    assert service["ms"] > 0 and service["worker_ms"] > 0
    if not lone["threads"]:
        assert service["ms"] == service["worker_ms"]
    assert r["daemon"]["exit_code"] == 0 and r["daemon"]["seq_gaps"] == 0

    assert set(r["latency"]) == {"5fps", "80pct_sat"}
    for row in r["latency"].values():
        assert {
            "p50",
            "p95",
            "p99",
            "max",
            "deadline_misses",
            "below_saturation",
            "p99_over_service",
        } <= row.keys()
        assert row["sent"] > 0
        # Every frame passed through each stage, and the stages lie inside the daemon's latency.
        st = row["stage_ms"]
        assert {"decode", "preprocess", "queue", "infer", "publish", "other", "latency"} <= st.keys()
        assert all(st[k] >= 0 for k in ("decode", "preprocess", "queue", "infer", "publish"))
        assert 0 < st["preprocess"] + st["infer"] < st["latency"]
    # The daemon inspected frames at saturation, so it used CPU: 0 cores would mean the measurement is broken.
    assert r["peak_rss_mb"] > 0 and r["cpu"]["daemon_cores_at_saturation"] > 0
    assert r["cpu"]["daemon_cores_at_saturation"] == sat["raw"]["daemon_cores"]
    assert r["baseline_img_s"] > 0 and r["speedup_vs_baseline"] is not None
    # No torch state in the package: the naive loop runs its own model.onnx, not some other network.
    assert all(run["weights"] == "package model.onnx" for run in r["baseline"]["runs"].values())
    assert r["int8"]["gate"] == "absent" and r["gpu"]["measured"] is False
    rss = r["targets"]["peak RSS (MB)"]
    assert rss["value"] == r["peak_rss_mb"] and rss["met"] is (rss["value"] <= rss["target"])
    for name, t in r["targets"].items():  # every target: met is exactly the comparison of value and goal
        expected = (
            None
            if t["value"] is None
            else (t["value"] >= t["target"] if t["higher"] else t["value"] <= t["target"])
        )
        assert t["met"] is expected, name
    # Issue 19's whole set: the ratios against both limits, core efficiency, PNG, each rate's tail.
    assert r["targets"]["core efficiency (fp32, raw)"]["value"] == r["cpu"]["core_efficiency"]
    assert r["targets"]["ratio_to_limit (PNG)"]["value"] == sat["png"]["ratio_to_limit"]
    assert r["targets"]["p99 at 5fps / single-image service time"]["target"] == 1.5
    (near,) = [t for n, t in r["targets"].items() if "% of saturation" in n]
    assert (near["target"], near["higher"]) == (2.5, False)
    assert near["value"] == r["latency"]["80pct_sat"]["p99_over_service"]
    speed = r["targets"]["speedup_vs_baseline (fp32)"]
    linear = r["machine_limit_img_s"] / r["baseline_img_s"]
    measured = r["machine_limit"]["raw"]["measured"]["img_s"] / r["baseline_img_s"]
    assert (speed["target"], speed["note"]) == (
        4.0,
        f"at most {linear:.2f} × here (the linear limit ÷ the naive loop; the limit measured with every core "
        f"busy: {measured:.2f} ×)",
    )

    text = md.read_text()
    assert "**Headline**" in text and "| machine limit (fp32, raw) |" in text
    # A target's ratio prints with the digits that decided it (0.898 is not "0.90 ≥ 0.90: no").
    png_ratio = r["targets"]["ratio_to_limit (PNG)"]["value"]
    assert f"| ratio_to_limit (PNG) | {png_ratio:.3f} | ≥ 0.90 |" in text
    assert "| machine limit, every core busy (fp32, raw) |" in text
    assert "Where a frame's time goes at each rate" in text
    assert "| naive loop, ONNX Runtime default thread(s), package model.onnx" in text
    # The collector's pauses per phase (inspectd_gc_pause_seconds), a row each, zero collections included.
    assert all("gc" in row for row in r["latency"].values()) and "gc" in sat["raw"]
    assert "The daemon's garbage collections at each rate" in text and "| saturation raw |" in text
    assert text in capsys.readouterr().out  # the same tables are printed


@pytest.mark.timeout(240)
def test_bench_shadow_reports_the_cost_of_shadow_scoring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_package(tmp_path / "pkg", input_size=(64, 64))
    out = tmp_path / "shadow.json"
    rc = main(
        [
            "bench",
            "--shadow-only",
            "--model",
            str(tmp_path / "pkg"),
            "--count",
            "2",
            "--seconds",
            "1",
            "--shadow-rate",
            "10",
            "--max-batch",
            "2",
            "--deadline-ms",
            "2000",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    s = json.loads(out.read_text())["shadow"]
    assert "error" not in s and s["exit_code"] == 0 and s["seq_gaps"] == 0
    assert s["candidate"].startswith("tiny-shadow@")
    for phase in ("without", "with"):
        for kind in ("rate", "saturation"):
            p = s[phase][kind]
            assert p["sent"] > 0 and p["core_ms_per_frame"] is not None and p["core_ms_per_frame"] >= 0
    # Without a candidate nothing is offered; with one, what it scored is a share of what production decided.
    assert s["without"]["rate"]["offered"] == 0 and s["without"]["saturation"]["sampled_share"] is None
    w = s["with"]
    assert w["rate"]["offered"] > 0 and 0 <= w["rate"]["scored"] <= w["rate"]["offered"]
    assert 0.0 <= s["sampled_share_at_saturation"] <= 1.0
    assert s["sampled_share_at_saturation"] == w["saturation"]["sampled_share"]
    assert s["shadow_core_ms_per_frame"] == round(
        w["rate"]["core_ms_per_frame"] - s["without"]["rate"]["core_ms_per_frame"], 2
    )
    assert "shadow_thread_core_ms_per_frame" in s  # None only if it never scored (yielding all along)
    text = capsys.readouterr().out
    assert "**Shadow scoring**" in text and "sampled share at saturation" in text
