"""The profile summary of ``inspectd bench --profile`` (py-spy raw stacks → threads, GIL, top functions)."""

from __future__ import annotations

from bench.profile import summarise

RAW = """\
thread (11): inference;Thread.run (threading.py:982);InferenceWorker._process (daemon/inference.py:223);Session.run (onnxruntime/capi/x.py:406) 60
thread (12): inference-1;Thread.run (threading.py:982);InferenceWorker._process (daemon/inference.py:223);Session.run (onnxruntime/capi/x.py:406) 40
thread (13): preprocess_0;Thread.run (threading.py:982);FramePreprocessor.__call__ (daemon/prep.py:71);estimate_pose (engine/pose.py:327) 20
thread (13): preprocess_0;Thread.run (threading.py:982);FramePreprocessor.__call__ (daemon/prep.py:80);Preprocessor.equalised (engine/preprocess.py:200) 30
"""


def test_threads_are_pooled_by_name_and_shares_are_of_the_possible_samples() -> None:
    s = summarise(RAW, possible=100)
    assert s["samples"] == 150
    assert s["threads_busy"] == {"inference": 1.0, "preprocess": 0.5}  # two workers: 100 of 100 each → pooled
    assert s["top_self"][0] == {
        "function": "Session.run (onnxruntime/capi/x.py)",
        "share": round(100 / 150, 3),
    }
    inclusive = {e["function"]: e["share"] for e in s["top_inclusive"]}
    # Line numbers are dropped, so one function counts once per stack wherever its line was.
    assert inclusive["FramePreprocessor.__call__ (daemon/prep.py)"] == round(50 / 150, 3)
    assert "Thread.run (threading.py)" not in inclusive  # this project's code only


def test_an_empty_profile_summarises_to_nothing() -> None:
    s = summarise("", possible=100)
    assert s["samples"] == 0 and s["threads_busy"] == {} and s["top_self"] == []
