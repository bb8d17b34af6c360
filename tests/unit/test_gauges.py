"""engine.gauges, training.gauge_fit, engine.gauge_plot and ``inspectd calibrate-gauges`` on synthetic screws
(tools.synth) and hand-made measurements."""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from engine.gauge_plot import gauge_figure
from engine.gauges import Band, GaugeSet, Violation, check, load_gauges, outside_any, pose_mismatch
from engine.pose import Measurements, PoseParams, estimate_pose
from tools.synth import image_seed, render_screw, write_dataset
from training.gauge_fit import DEFAULT_BANDS, fit_gauge_set, kfold_cost, kfold_flags, learn_bands

N_OK, N_SHORT = 40, 10


def _m(
    length: float = 910.0, straight: float = 5.0, head: float = 284.0, tip: float = 100.0, crest: float = 0.5
) -> Measurements:
    return Measurements(length, head, tip, (1.0,) * 4, straight, 1.1e5, crest)


@pytest.fixture(scope="module")
def synthetic() -> tuple[list[Measurements], list[Measurements]]:
    """Measurements of 40 OK synthetic screws and of 10 with a manipulated (shortened, often bent) front."""
    ok = [estimate_pose(render_screw(image_seed(1, i, False))[0]).measurements for i in range(N_OK)]
    short = [
        estimate_pose(render_screw(image_seed(1, i, True), "manipulated_front")[0]).measurements
        for i in range(N_SHORT)
    ]
    return ok, short


def _gauges(bands: tuple[Band, ...]) -> GaugeSet:
    return GaugeSet(
        bands=bands, pose=PoseParams().to_dict(), n_ok=40, false_reject_estimate={"length_px": 0.0}
    )


# ------------------------------------------------------------------------------------------- synthetic screws
def test_length_band_catches_shortened_fronts_and_passes_ok(
    synthetic: tuple[list[Measurements], list[Measurements]],
) -> None:
    ok, short = synthetic
    gauges = _gauges(learn_bands(ok))
    for m in short:
        v = check(m, gauges)
        length = [x for x in v if x.name == "length_px"]
        assert length, f"shortened front {m.length_px:.1f} px passed the length band"
        assert length[0].value == m.length_px and length[0].low is not None and m.length_px < length[0].low
    # Judged by bands that never saw them (k-fold), nearly all OK parts pass every default band.
    cost = kfold_cost(ok, k=5, seed=0)
    assert set(cost) == set(DEFAULT_BANDS)
    assert cost["length_px"] <= 0.05 and cost["straightness_px"] <= 0.05, cost
    assert cost["crest_dip_px"] <= 0.05, cost


def test_kfold_judges_each_part_by_bands_learned_without_it() -> None:
    # One OK part far longer than the rest: in-sample it sets the band's upper edge itself (q_hi = 1.0), so
    # only a k-fold that leaves it out of its own band can flag it.
    ok = [_m(900.0 + (i % 7)) for i in range(29)] + [_m(960.0)]
    assert check(ok[-1], _gauges(learn_bands(ok, q=(0.0, 1.0)))) == []
    flags = kfold_flags(ok, k=5, seed=3, q=(0.0, 1.0), margin_px=1.0)
    assert flags["length_px"].tolist() == [False] * 29 + [True]
    assert kfold_cost(ok, k=5, seed=3, q=(0.0, 1.0), margin_px=1.0)["length_px"] == pytest.approx(1 / 30)


def test_fit_gauge_set_gives_the_bands_their_costs_and_honest_ok_flags() -> None:
    """What ``inspectd train`` learns: the bands, the k-fold OK flags it calibrates with (the long OK part is
    flagged only by bands learnt without it), the NG caught per type (by the bands; NG never shape them)."""
    ok = [_m(900.0 + (i % 7)) for i in range(29)] + [_m(960.0)]
    ng = {"manipulated_front": [_m(800.0), _m(903.0)], "scratch_head": [_m(903.0, straight=40.0)]}
    gauges, flags = fit_gauge_set(ok, ng, pose=PoseParams().to_dict(), q=(0.0, 1.0), margin_px=1.0, seed=3)
    assert gauges.bands == learn_bands(ok, q=(0.0, 1.0), margin_px=1.0)
    assert flags.tolist() == [False] * 29 + [True]
    assert gauges.false_reject_estimate == {
        "length_px": 1 / 30,
        "straightness_px": 0.0,
        "crest_dip_px": 0.0,
        "any": 1 / 30,
    }
    assert gauges.ng_caught == {"manipulated_front": [1, 2], "scratch_head": [1, 1]}
    assert (gauges.n_ok, gauges.kfold, gauges.quantiles) == (30, 5, (0.0, 1.0))
    assert outside_any(ng["manipulated_front"] + ng["scratch_head"], gauges.bands).tolist() == [
        True,
        False,
        True,
    ]
    assert [bool(check(m, gauges)) for m in ok] == outside_any(ok, gauges.bands).tolist()


# ----------------------------------------------------------------------------------------- band arithmetic
def test_bands_are_quantiles_plus_margin_and_straightness_is_one_sided() -> None:
    ok = [_m(900.0 + i, straight=float(i % 10)) for i in range(101)]  # lengths 900…1000
    length, straight, crest = learn_bands(ok, q=(0.01, 0.99), margin_px=3.0)
    assert (length.name, length.unit) == ("length_px", "px")
    assert crest.name == "crest_dip_px" and crest.low is None  # one-sided: only a deeper dip is a defect
    assert crest.high == pytest.approx(0.5 + 3.0, abs=0.01)
    assert length.low == pytest.approx(901.0 - 3.0, abs=0.01) and length.high == pytest.approx(
        999.0 + 3.0, abs=0.01
    )
    assert straight.low is None and straight.high == pytest.approx(9.0 + 3.0, abs=0.01)
    (two_sided,) = learn_bands(ok, names=["straightness_px"], q=(0.01, 0.99), margin_px=3.0, one_sided={})
    assert two_sided.low == pytest.approx(-3.0, abs=0.01)
    (area,) = learn_bands(ok, names=["area_px2"], margin_px=2.0)
    assert area.unit == "px2" and area.low == pytest.approx(
        1.1e5 - 2.0 * 950.0, abs=0.01
    )  # margin × median length


def test_band_limits_are_rounded_outwards_to_a_hundredth() -> None:
    ok = [_m(900.123456 + 0.0137 * i, straight=3.33333 + 0.01 * i) for i in range(50)]
    length, straight, _ = learn_bands(ok, q=(0.0, 1.0), margin_px=0.0)
    assert length.low is not None and length.high is not None and straight.high is not None
    for limit in (length.low, length.high, straight.high):
        assert limit == round(limit, 2)
    assert length.low <= 900.123456 and length.high >= 900.123456 + 0.0137 * 49
    assert straight.high >= 3.33333 + 0.49


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"names": ["thread_pitch_px"]}, "thread_pitch_px"),
        ({"q": (0.9, 0.1)}, "quantiles"),
        ({"margin_px": -1.0}, "margin_px"),
        ({"one_sided": {"length_px": "up"}}, "one_sided"),
    ],
)
def test_learn_bands_rejects_bad_options(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        learn_bands([_m(), _m(911.0)], **kwargs)


def test_learn_bands_needs_parts_and_finite_values() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        learn_bands([_m()])
    with pytest.raises(ValueError, match="non-finite"):
        learn_bands([_m(), _m(math.nan)])
    with pytest.raises(ValueError, match="too few"):
        kfold_cost([_m()] * 9, k=5)


# ---------------------------------------------------------------------------------------------------- check
def test_check_reports_value_and_band() -> None:
    gauges = _gauges((Band("length_px", 900.0, 940.0), Band("straightness_px", None, 15.0)))
    assert check(_m(910.0, 5.0), gauges) == []
    assert check(_m(900.0, 15.0), gauges) == []  # edges are inside
    v = check(_m(880.5, 20.0), gauges)
    assert v == [Violation("length_px", 880.5, 900.0, 940.0), Violation("straightness_px", 20.0, None, 15.0)]
    assert v[0].to_dict() == {"name": "length_px", "value": 880.5, "low": 900.0, "high": 940.0}
    assert json.loads(json.dumps([x.to_dict() for x in v]))[1]["low"] is None
    assert "880.5" in v[0].describe() and "900.0" in v[0].describe()
    assert [x.name for x in check(_m(math.nan), gauges)] == ["length_px"]  # untrustworthy never passes


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize(
    "band",
    [
        Band("straightness_px", None, 15.0),  # open below: -inf used to be "inside"
        Band("length_px", 900.0, None),  # open above: +inf used to be "inside"
        Band("length_px", 900.0, 940.0),
    ],
    ids=["high-only", "low-only", "two-sided"],
)
def test_a_non_finite_measurement_is_never_inside_a_band(band: Band, value: float) -> None:
    """Issue 16, finding 3: NaN compares False against every limit, and ±inf satisfies the limit of a band that
    is open on its side; neither may ever count as within tolerance (a violation, so REJECT)."""
    assert not band.contains(value)
    m = replace(_m(), **{band.name: value})
    (violation,) = check(m, _gauges((band,)))
    assert violation.name == band.name and (violation.value == value or math.isnan(violation.value))


def test_check_takes_microseconds() -> None:
    gauges = _gauges((Band("length_px", 900.0, 940.0), Band("straightness_px", None, 15.0)))
    m = _m(880.0, 20.0)
    n = 20_000
    t0 = time.perf_counter()
    for _ in range(n):
        check(m, gauges)
    per_call_us = (time.perf_counter() - t0) / n * 1e6
    assert per_call_us < 50.0, per_call_us  # ~3 µs on one idle core; generous for a shared CI machine


# --------------------------------------------------------------------------------------------- model.json
def _full_set() -> GaugeSet:
    return GaugeSet(
        bands=(Band("length_px", 903.8, 939.9), Band("straightness_px", None, 17.5)),
        pose=PoseParams().to_dict(),
        margin_px=2.0,
        quantiles=(0.005, 0.995),
        n_ok=250,
        kfold=5,
        false_reject_estimate={"length_px": 0.008, "straightness_px": 0.0, "any": 0.008},
        ng_caught={"manipulated_front": [10, 10]},
        created="2025-01-01T00:00:00+00:00",
    )


def test_gauge_set_roundtrips_through_json() -> None:
    gs = _full_set()
    assert GaugeSet.from_dict(json.loads(json.dumps(gs.to_dict()))) == gs


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.update(tolerance=1.0), "tolerance"),
        (lambda d: d["bands"][0].update(sigma=3), "sigma"),
        (lambda d: d["pose"].update(blur=3), "blur"),
        (lambda d: d["bands"].append(dict(d["bands"][0])), "more than one band"),
        (lambda d: d["bands"][0].update(name="thread_pitch_px"), "thread_pitch_px"),
        (lambda d: d["bands"][0].update(low=950.0), "low"),
        (lambda d: d.pop("bands"), "bands"),
        (lambda d: d.update(schema_version=2), "schema_version"),
        (lambda d: d["bands"][0].pop("name"), "malformed"),
        (lambda d: d.update(quantiles=None), "malformed"),
        (lambda d: d.update(quantiles=[0.9, 0.1]), "quantiles"),
        (lambda d: d.update(bands=[3]), "JSON object"),
    ],
)
def test_gauge_set_from_dict_is_strict(edit: Callable[[dict[str, Any]], object], match: str) -> None:
    d = _full_set().to_dict()
    edit(d)
    with pytest.raises(ValueError, match=match):
        GaugeSet.from_dict(d)


def test_pose_mismatch_ignores_crop_only_parameters() -> None:
    gs = _full_set()
    assert pose_mismatch(gs, PoseParams(crop_width=1024, crop_height=400, fill="replicate")) == []
    assert pose_mismatch(gs, PoseParams(end_fraction=0.2, straightness_window_px=31.0)) == [
        "end_fraction",
        "straightness_window_px",
    ]


def test_load_gauges_refuses_bands_measured_differently_from_the_model() -> None:
    d = _full_set().to_dict()
    assert load_gauges(None, None) is None
    assert load_gauges(d, None) == _full_set()
    assert load_gauges(d, PoseParams(crop_width=1024).to_dict()) == _full_set()
    with pytest.raises(ValueError, match="end_fraction.*calibrate-gauges"):
        load_gauges(d, PoseParams(end_fraction=0.2).to_dict())


def test_gauge_figure_is_a_png(synthetic: tuple[list[Measurements], list[Measurements]]) -> None:
    ok, short = synthetic
    gs = _gauges(learn_bands(ok))
    for png in (
        gauge_figure(ok, {"manipulated_front": short}, gs),
        gauge_figure(ok, short, None, names=["length_px", "straightness_px"]),  # plain NG list, no bands
    ):
        img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and img is not None and img.shape[0] > 200


# ---------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def screws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """22 OK + 5 NG synthetic screws (one of each defect type) and one blank OK frame (a pose failure)."""
    root = tmp_path_factory.mktemp("screws")
    write_dataset(root, n_ok=22, n_ng=5, seed=11)
    cv2.imwrite(str(root / "OK" / "blank.png"), np.full((1024, 1024), 180, np.uint8))
    with open(root / "labels.csv", "a", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerow(["OK/blank.png", "OK", "", 0])
    return root


@pytest.fixture
def package(tmp_path: Path) -> Path:
    from tests.helpers import tiny_package

    tiny_package(tmp_path / "pkg")
    return tmp_path / "pkg"


def test_cli_writes_gauges_into_model_json(
    screws: Path, package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.package import load_package
    from inspectd.cli import main

    before = load_package(package).meta
    figure = tmp_path / "gauges.png"
    rc = main(
        [
            "calibrate-gauges",
            "--data",
            str(screws),
            "--out",
            str(package),
            "--k",
            "4",
            "--figure",
            str(figure),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    after = load_package(package).meta  # verifies the ONNX sha256 against model.json
    assert after.onnx_sha256 == before.onnx_sha256
    assert replace(after, gauges=None) == before  # nothing else changed
    assert after.gauges is not None
    gs = GaugeSet.from_dict(after.gauges)
    assert [b.name for b in gs.bands] == list(DEFAULT_BANDS)
    assert gs.n_ok == 22 and gs.kfold == 4 and gs.pose == PoseParams().to_dict()
    assert set(gs.false_reject_estimate) == {*DEFAULT_BANDS, "any"}
    assert gs.ng_caught["manipulated_front"] == [1, 1]
    assert "pose failures: 1/28" in out and "OK/blank.png: no_part" in out
    assert figure.read_bytes()[:4] == b"\x89PNG"


def test_cli_chosen_bands_dry_run_and_package_pose(
    screws: Path, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.package import load_package, write_meta
    from inspectd.cli import main

    # A model that crops by pose: the gauges must be measured with its pose parameters, and say so.
    meta = load_package(package).meta
    pose = PoseParams(end_fraction=0.12, crop_width=990).to_dict()
    write_meta(package, replace(meta, preprocess=replace(meta.preprocess, pose=pose)))
    before = (package / "model.json").read_bytes()
    args = ["calibrate-gauges", "--data", str(screws), "--out", str(package), "--k", "4"]
    assert main([*args, "--bands", "length_px,tip_width_px", "--dry-run"]) == 0
    assert (package / "model.json").read_bytes() == before
    assert (
        main(
            [
                *args,
                "--bands",
                "length_px,tip_width_px",
                "--margin",
                "5",
                "--quantiles",
                "0",
                "1",
                "--one-sided",
                "length_px:low",
            ]
        )
        == 0
    )
    meta = json.loads((package / "model.json").read_text())
    gs = GaugeSet.from_dict(meta["gauges"])
    assert [b.name for b in gs.bands] == ["length_px", "tip_width_px"]
    assert gs.margin_px == 5.0 and gs.quantiles == (0.0, 1.0)
    assert gs.bands[0].high is None and gs.bands[1].low is not None and gs.bands[1].high is not None
    assert gs.pose == pose
    assert "pose parameters from the package" in capsys.readouterr().out


def test_cli_refuses_too_few_ok_images(
    screws: Path, package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from inspectd.cli import main

    few = tmp_path / "few"
    shutil.copytree(screws, few)
    with open(few / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    keep = [r for r in rows if r["label"] == "NG"] + [r for r in rows if r["label"] == "OK"][:8]
    with open(few / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(keep)
    before = (package / "model.json").read_bytes()
    assert main(["calibrate-gauges", "--data", str(few), "--out", str(package)]) == 2
    assert "only 8 OK images" in capsys.readouterr().err
    assert (package / "model.json").read_bytes() == before


def test_cli_refuses_a_package_whose_onnx_was_swapped(
    screws: Path, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from inspectd.cli import main

    with open(package / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    before = (package / "model.json").read_bytes()
    assert main(["calibrate-gauges", "--data", str(screws), "--out", str(package)]) == 2
    assert "sha256" in capsys.readouterr().err
    assert (package / "model.json").read_bytes() == before


def test_cli_keeps_the_margins_the_threshold_was_calibrated_with(
    screws: Path, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.gauges import Margin, Margins
    from engine.package import load_package, write_meta
    from inspectd.cli import main

    margins = Margins((Margin("length_px", 901.5, 1.25, "both"),), k=3.0, weight=0.5)
    old = GaugeSet(bands=(Band("length_px", 800.0, 1000.0),), pose=PoseParams().to_dict(), margins=margins)
    meta = load_package(package).meta
    write_meta(package, replace(meta, gauges=old.to_dict()))
    assert main(["calibrate-gauges", "--data", str(screws), "--out", str(package), "--k", "4"]) == 0
    gs = GaugeSet.from_dict(json.loads((package / "model.json").read_text())["gauges"])
    assert gs.bands != old.bands  # the bands were learnt again …
    assert gs.margins == margins  # … the margins in the score were not
    assert "kept the package's gauge margins" in capsys.readouterr().out
