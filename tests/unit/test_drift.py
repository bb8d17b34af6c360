"""Score drift against the good calibration parts (engine.drift) and the daemon's sliding windows (daemon.drift):
the reference's contract in model.json, the PSI's behaviour on the shifts it must see and the NG rate it must
not, and the gauges a scrape reads."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from daemon.drift import DriftMonitor, PartImage
from engine.drift import (
    MAX_BINS,
    MIN_PARTS_PER_BIN,
    MIN_REFERENCE,
    NoReference,
    ScoreReference,
    brightness_contrast,
    load_reference,
    logit,
)
from engine.gauges import Band
from engine.package import Decision, ModelMeta
from engine.pose import Measurements
from engine.preprocess import PreprocessParams

RNG = np.random.default_rng(20)
# Good parts score around logit -3 (sd 1); the operating point passes below probability 0.5 (logit 0).
REFERENCE = ScoreReference.from_logits(RNG.normal(-3.0, 1.0, 200), "val + train OK (leave-one-out)")
PASS_BELOW = 0.5


def _good(n: int, shift: float = 0.0, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(-3.0 + shift, 1.0, n)


# -- the reference: model.json's score_reference -----------------------------------------------------------
def test_reference_round_trips_and_is_refused_when_malformed() -> None:
    d = REFERENCE.to_dict()
    assert d["kind"] == "ok_calibration_logits" and d["n"] == 200 and d["logits"] == sorted(d["logits"])
    assert ScoreReference.from_dict(d) == REFERENCE
    assert load_reference(None) is None and load_reference(d) == REFERENCE
    bad: list[tuple[dict[str, Any], str]] = [
        ({**d, "extra": 1}, "unknown score_reference key"),
        ({**d, "kind": "ok_probabilities"}, "kind"),
        ({**d, "n": 3}, "n = 3"),
        ({**d, "logits": d["logits"][::-1]}, "sorted"),
        ({**d, "logits": [*d["logits"], math.nan]}, "finite"),
        ({**d, "logits": []}, "no logits"),
        ({**d, "schema_version": 2}, "schema_version"),
        ({k: v for k, v in d.items() if k != "logits"}, "malformed"),
    ]
    for doc, message in bad:
        with pytest.raises(ValueError, match=message):
            ScoreReference.from_dict(doc)


def test_packages_without_a_reference_load_and_stay_readable_by_older_inspectd() -> None:
    meta = ModelMeta(name="m", preprocess=PreprocessParams(input_size=(32, 32)))
    d = meta.to_dict()
    assert "score_reference" not in d  # an older inspectd refuses unknown fields: none is written without one
    assert ModelMeta.from_dict(d).score_reference is None
    with_ref = dataclasses.replace(meta, score_reference=REFERENCE.to_dict())
    assert ModelMeta.from_dict(with_ref.to_dict()).score_reference == REFERENCE.to_dict()


def test_bins_hold_the_passed_reference_parts_in_equal_shares() -> None:
    bins = REFERENCE.bins(PASS_BELOW)
    passed = np.asarray([x for x in REFERENCE.logits if x < 0.0])
    assert bins.n_reference == passed.size and bins.pass_logit == 0.0
    assert len(bins.counts) == min(MAX_BINS, passed.size // MIN_PARTS_PER_BIN)
    assert sum(bins.counts) == passed.size and max(bins.counts) - min(bins.counts) <= 1
    assert not set(bins.edges) & set(REFERENCE.logits)  # no reference part on an edge
    # A stricter operating point leaves fewer good parts to compare with, in fewer bins.
    fewer = REFERENCE.bins(1 / (1 + math.exp(3.0)))  # logit -3: about half the reference passes
    assert fewer.n_reference < passed.size and len(fewer.counts) < len(bins.counts)
    with pytest.raises(NoReference, match=f"needs {MIN_REFERENCE}"):
        REFERENCE.bins(1 / (1 + math.exp(5.0)))  # logit -5: a handful pass


def test_psi_sees_a_shift_either_way_and_not_sampling_noise() -> None:
    bins = REFERENCE.bins(PASS_BELOW)
    same = [bins.psi(w[w < 0]) for w in (_good(500, seed=s) for s in range(5))]
    # Fresh samples of the same good parts: sampling alone gives ≈ (k − 1)(1/200 + 1/500) = 0.06 here.
    assert max(same) < 0.15, same
    up, down = _good(500, +1.0), _good(500, -1.0)  # one standard deviation: worse-looking, better-looking
    assert bins.psi(up[up < 0]) > 0.25 and bins.psi(down[down < 0]) > 0.25
    assert 0.4 < bins.median_rank(_good(500)) < 0.6
    assert bins.median_rank(up[up < 0]) > 0.75 and bins.median_rank(down) < 0.25
    assert math.isnan(bins.psi(np.empty(0))) and math.isnan(bins.median_rank(np.empty(0)))


def test_logit_of_the_pass_bound() -> None:
    assert logit(0.5) == 0.0 and logit(0.0) == -math.inf and logit(1.0) == math.inf
    assert logit(1 / (1 + math.exp(-2.0))) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        logit(1.5)


def test_brightness_and_contrast_of_a_crop() -> None:
    crop = np.random.default_rng(3).integers(0, 256, (320, 1000), dtype=np.uint8)
    mean, sd = brightness_contrast(crop)
    assert mean == pytest.approx(crop.mean(), abs=1.0) and sd == pytest.approx(crop.std(), abs=1.0)
    assert brightness_contrast(np.full((64, 64), 7, np.uint8)) == (7.0, 0.0)
    brighter = np.clip(crop.astype(np.int16) + 20, 0, 255).astype(np.uint8)
    assert brightness_contrast(brighter)[0] > mean + 15


# -- the daemon's windows --------------------------------------------------------------------------------
def _monitor(**kw: Any) -> DriftMonitor:
    kw.setdefault("bins", REFERENCE.bins(PASS_BELOW))
    kw.setdefault("window", 500)
    kw.setdefault("min_parts", 100)
    return DriftMonitor("L1", **kw)


def test_more_defective_parts_do_not_move_the_drift_statistic() -> None:
    # The NG rate has its own alert: parts scored above the PASS bound are left out of the comparison, so a
    # batch of defective parts (a supplier problem the NG rate shows) is not mistaken for drift, and a drift
    # in the good parts is not hidden by a change in the defect rate.
    good = _good(400)
    calm, defects = _monitor(), _monitor()
    calm.observe(good.tolist(), [])
    defects.observe(np.concatenate([good, np.linspace(0.5, 8.0, 100)]).tolist(), [])
    a, b = calm.snapshot(), defects.snapshot()
    assert b["scored_parts"] == 500 and b["passed_parts"] == a["passed_parts"]
    assert a["psi"] == b["psi"] < 0.1


def test_psi_is_withheld_until_enough_parts_passed() -> None:
    m = _monitor(min_parts=100)
    m.observe(_good(99).tolist(), [])
    s = m.snapshot()
    assert s["psi"] is None and s["median_rank"] is None and s["passed_parts"] == 99
    m.observe([-3.0], [])
    assert m.snapshot()["psi"] is not None


def test_the_window_keeps_the_last_parts_across_batches() -> None:
    m = _monitor(window=50, min_parts=10)
    for batch in range(13):  # 13 batches of 7: the ring wraps around more than once
        m.observe([-3.0 + 0.01 * batch] * 7, [PartImage(float(batch), 2.0 * batch) for _ in range(7)])
    s = m.snapshot()
    last = [b for b in range(13) for _ in range(7)][-50:]
    assert s["scored_parts"] == s["passed_parts"] == 50
    assert s["crop_brightness"] == pytest.approx(np.mean(last))
    assert s["crop_contrast"] == pytest.approx(2.0 * np.mean(last))
    m.observe([-1.0] * 120, [])  # one batch larger than the window
    assert m.snapshot()["median_rank"] == m.bins.median_rank(np.full(50, -1.0))  # type: ignore[union-attr]


def _measured(length: float) -> Measurements:
    return Measurements(length_px=length, head_width_px=280.0, tip_width_px=90.0, width_profile=(1.0,),
                        straightness_px=1.0, area_px2=1e5)  # fmt: skip


def test_a_scrape_reads_every_drift_gauge() -> None:
    bands = (Band("length_px", 880.0, 940.0), Band("straightness_px", None, 6.0))
    reg = CollectorRegistry()
    m = _monitor(bands=bands, min_parts=10)
    reg.register(m)
    lengths = np.linspace(890.0, 930.0, 41)
    m.observe(_good(41, +1.5).tolist(), [PartImage(150.0, 40.0, _measured(x)) for x in lengths])

    def get(name: str, **labels: str) -> float | None:
        return reg.get_sample_value(name, {"line": "L1", **labels})

    assert get("inspectd_score_drift_psi") > 0.25  # type: ignore[operator]
    assert get("inspectd_score_drift_median_rank") > 0.75  # type: ignore[operator]
    assert get("inspectd_score_reference_parts") == REFERENCE.bins(PASS_BELOW).n_reference
    assert get("inspectd_crop_brightness") == 150.0 and get("inspectd_crop_contrast") == 40.0
    for q, expected in (("0.05", 892.0), ("0.5", 910.0), ("0.95", 928.0)):
        assert get("inspectd_part_measurement", measurement="length_px", quantile=q) == pytest.approx(
            expected
        )
    assert get("inspectd_gauge_band", measurement="length_px", edge="low") == 880.0
    assert get("inspectd_gauge_band", measurement="length_px", edge="high") == 940.0
    assert get("inspectd_gauge_band", measurement="straightness_px", edge="low") is None  # open side
    assert get("inspectd_gauge_band", measurement="straightness_px", edge="high") == 6.0


def test_without_a_reference_the_gauges_say_so() -> None:
    m = DriftMonitor("L1", no_reference="the package has no score_reference")
    m.observe(_good(200).tolist(), [])
    s = m.snapshot()
    assert (s["psi"], s["reference_parts"], s["no_reference"]) == (
        None,
        0,
        "the package has no score_reference",
    )
    assert s["passed_parts"] == 200  # no bound without a reference: every scored part is kept
    with pytest.raises(ValueError):
        DriftMonitor("L1", window=10, min_parts=11)


def test_the_decision_sets_the_pass_bound() -> None:
    # The bound is where the package's operating point stops passing parts: the grey zone's lower edge.
    decision = Decision(threshold=0.5, grey_zone=(0.5, 0.9))
    assert REFERENCE.bins(decision.bounds[0]).pass_logit == 0.0
