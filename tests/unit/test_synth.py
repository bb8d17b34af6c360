"""tools.synth: deterministic synthetic screws whose classes differ by the defect, not by a global statistic."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from tools.synth import DEFECT_TYPES, contact_sheet, image_seed, render_screw, write_dataset


def silhouette_length(img: np.ndarray) -> float:
    """Length of the dark part along its principal axis, measured on pixels only (no metadata).

    Otsu on the blurred image, capped at 0.65 × the background median so the soft cast shadow stays out; largest
    component; long side of its minimum-area rectangle.
    """
    blur = cv2.GaussianBlur(img, (0, 0), 1.0)
    otsu, _ = cv2.threshold(blur, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = (blur < min(otsu, 0.65 * float(np.median(img)))).astype(np.uint8)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask)
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    contours, _ = cv2.findContours(
        (labels == biggest).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
    )
    (_, _), (w, h), _ = cv2.minAreaRect(max(contours, key=cv2.contourArea))
    return float(max(w, h))


@pytest.mark.parametrize("defect", [None, *DEFECT_TYPES])
def test_same_seed_same_image(defect: str | None) -> None:
    a, meta_a = render_screw(11, defect, size=128)
    b, meta_b = render_screw(11, defect, size=128)
    assert np.array_equal(a, b)
    assert meta_a == meta_b


def test_different_seeds_differ() -> None:
    a, _ = render_screw(1, None, size=128)
    b, _ = render_screw(2, None, size=128)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 5


@pytest.mark.parametrize("size", [128, 256, 1024])
def test_shape_dtype_and_metadata(size: int) -> None:
    img, meta = render_screw(3, None, size=size)
    assert img.shape == (size, size) and img.dtype == np.uint8
    assert meta["size"] == size and meta["defect"] is None and meta["defect_bbox"] is None
    assert 0.88 * size < meta["length_px"] < 0.92 * size  # 904–938 px at 1024², as on the real line
    for x, y in (meta["head_xy"], meta["tip_xy"]):
        assert 0 <= x < size and 0 <= y < size
    # A dark part on a light background, not a blank or saturated frame.
    assert 10 < img.min() < 90 and img.max() > 180


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_every_defect_renders_inside_its_box(defect: str) -> None:
    """Same seed ⇒ same part, pose and light; the NG image differs from its OK twin, and mostly inside the box."""
    for seed in range(3):
        ok, _ = render_screw(seed, None, size=256)
        ng, meta = render_screw(seed, defect, size=256)
        assert meta["defect"] == defect
        x0, y0, x1, y1 = meta["defect_bbox"]
        assert 0 <= x0 < x1 < 256 and 0 <= y0 < y1 < 256
        changed = np.abs(ng.astype(int) - ok.astype(int)) > 25
        assert changed.sum() >= 3, "defect invisible"
        if defect != "manipulated_front":  # a shorter part is re-centred, so its whole outline moves
            inside = changed[y0 - 2 : y1 + 3, x0 - 2 : x1 + 3].sum()
            assert inside >= 0.8 * changed.sum()


def test_unknown_defect_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown defect"):
        render_screw(0, "rust")


def test_manipulated_front_is_measurably_short() -> None:
    """A length gauge separates it: by metadata and by the dark silhouette's extent in the pixels."""
    size = 256
    ok = [render_screw(image_seed(5, i, False), None, size) for i in range(6)]
    ng = [render_screw(image_seed(5, i, True), "manipulated_front", size) for i in range(6)]
    ok_meta = [m["length_px"] for _, m in ok]
    ng_meta = [m["length_px"] for _, m in ng]
    assert max(ng_meta) < 0.95 * min(ok_meta)
    ok_px = [silhouette_length(img) for img, _ in ok]
    ng_px = [silhouette_length(img) for img, _ in ng]
    assert max(ng_px) < min(ok_px)
    for measured, meta in zip(ok_px + ng_px, ok_meta + ng_meta, strict=True):
        assert measured == pytest.approx(meta, rel=0.04)


def test_brightness_does_not_give_the_class_away() -> None:
    """Over 40 images, NG and OK means differ by much less than the ~15 gray levels of the real confound."""
    seeds = range(20)
    ng = [render_screw(s, DEFECT_TYPES[s % 5], 128)[0].mean() for s in seeds]
    ok = [render_screw(s, None, 128)[0].mean() for s in seeds]  # the NG images' OK twins: same light
    assert abs(np.mean(ng) - np.mean(ok)) < 1.5
    # Lighting varies between images as between sessions, the same way for both classes.
    assert np.std(ok) > 3 and np.std(ng) > 3


def read(path: Path) -> bytes:
    return path.read_bytes()


def test_write_dataset(tmp_path: Path) -> None:
    rows = write_dataset(tmp_path / "a", n_ok=3, n_ng=6, seed=7, size=128)
    again = write_dataset(tmp_path / "b", n_ok=3, n_ng=6, seed=7, size=128)
    assert rows == again
    root = tmp_path / "a"
    assert sorted(p.name for p in (root / "OK").iterdir()) == ["ok_00000.png", "ok_00001.png", "ok_00002.png"]
    assert len(list((root / "NG").iterdir())) == 6
    with open(root / "labels.csv", newline="") as fh:
        lines = list(csv.reader(fh))
    assert lines[0] == ["file", "label", "defect_type", "seed"]
    assert lines[1:] == [[r["file"], r["label"], r["defect_type"], str(r["seed"])] for r in rows]
    ng = [r for r in rows if r["label"] == "NG"]
    assert [r["defect_type"] for r in ng] == [*DEFECT_TYPES, DEFECT_TYPES[0]]  # cycles through the types
    assert all(r["defect_type"] == "" for r in rows if r["label"] == "OK")
    assert len({r["seed"] for r in rows}) == len(rows)
    for r in rows:  # byte-identical files, and each one is its seed's image
        assert read(root / r["file"]) == read(tmp_path / "b" / r["file"])
        img = cv2.imread(str(root / r["file"]), cv2.IMREAD_UNCHANGED)
        assert img is not None
        assert np.array_equal(img, render_screw(r["seed"], r["defect_type"] or None, 128)[0])
    assert read(root / "labels.csv") == read(tmp_path / "b" / "labels.csv")


def test_contact_sheet(tmp_path: Path) -> None:
    path = contact_sheet(tmp_path / "sheet.png", seed=0, tile=64)
    sheet = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert sheet is not None and sheet.shape == (2 * (18 + 64), 3 * 64)  # a label strip above each tile
