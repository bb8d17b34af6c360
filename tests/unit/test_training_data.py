"""Data discovery and stratified splits: layouts, errors that name the problem, no leakage, reuse."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.dataset import DataError, defect_type_from_name, discover, subset
from engine.split import Split, allocate, make_kfold, make_split


def _png(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((16, 16), value, np.uint8))


def _folders(root: Path, ok: str = "good", ng: str = "not-good", n_ok: int = 20, per_type: int = 4) -> Path:
    for i in range(n_ok):
        _png(root / ok / f"ok{i:03d}.png")
    for kind in ("scratch_head", "thread_top", "manipulated_front"):
        for i in range(per_type):
            _png(root / ng / f"{kind}{i:03d}.png", 60)
    return root


@pytest.mark.parametrize("ok, ng", [("good", "not-good"), ("OK", "NG"), ("ok", "ng"), ("Good", "Not_Good")])
def test_class_folders_and_defect_type_from_the_file_name(tmp_path: Path, ok: str, ng: str) -> None:
    ds = discover(_folders(tmp_path, ok, ng))
    assert ds.layout == "folders"
    assert ds.counts() == {"OK": 20, "manipulated_front": 4, "scratch_head": 4, "thread_top": 4}
    assert all(not s.path.startswith("/") for s in ds.samples)  # relative: the folder may move


@pytest.mark.parametrize(
    "stem, kind",
    [
        ("manipulated_front003", "manipulated_front"),
        ("thread_top_00012", "thread_top"),
        ("scratch-head-7", "scratch-head"),
        ("ng_0001", ""),
        ("000123", ""),
        ("photo", ""),
    ],
)
def test_defect_type_from_name(stem: str, kind: str) -> None:
    assert defect_type_from_name(stem) == kind


def test_defect_type_from_sub_folders_of_the_ng_folder(tmp_path: Path) -> None:
    _png(tmp_path / "OK" / "a.png")
    _png(tmp_path / "NG" / "Bent_Tip" / "x1.png")
    assert {s.group for s in discover(tmp_path).samples} == {"OK", "bent_tip"}


def test_mvtec_layout(tmp_path: Path) -> None:
    _png(tmp_path / "train" / "good" / "000.png")
    _png(tmp_path / "test" / "good" / "000.png")
    _png(tmp_path / "test" / "scratch_neck" / "000.png")
    _png(tmp_path / "ground_truth" / "scratch_neck" / "000_mask.png")
    ds = discover(tmp_path)
    assert ds.layout == "mvtec"
    assert sorted((s.path, s.label, s.defect_type) for s in ds.samples) == [
        ("test/good/000.png", 0, ""),
        ("test/scratch_neck/000.png", 1, "scratch_neck"),
        ("train/good/000.png", 0, ""),
    ]


def test_csv_with_and_without_defect_type(tmp_path: Path) -> None:
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "thread_side_01.png")
    _png(tmp_path / "img" / "c.png")
    (tmp_path / "labels.csv").write_text(
        "path,label,defect_type\nimg/a.png,OK,\nimg/thread_side_01.png,NG,\nimg/c.png,1,dent\n"
    )
    ds = discover(tmp_path)
    assert ds.layout == "csv"
    assert [(s.path, s.label, s.defect_type) for s in ds.samples] == [
        ("img/a.png", 0, ""),
        ("img/thread_side_01.png", 1, "thread_side"),
        ("img/c.png", 1, "dent"),
    ]
    (tmp_path / "labels.csv").write_text("path,label\nimg/a.png,maybe\n")
    with pytest.raises(DataError, match="line 2: label 'maybe'"):
        discover(tmp_path)
    (tmp_path / "labels.csv").write_text("path,label\n../outside.png,OK\n")
    with pytest.raises(DataError, match="inside"):
        discover(tmp_path)


def test_missing_class_and_empty_folder_are_named(tmp_path: Path) -> None:
    _png(tmp_path / "good" / "a.png")
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DataError, match=r"no an NG class folder.*sub-folders here: \['good', 'stuff'\]"):
        discover(tmp_path)
    (tmp_path / "NG").mkdir()
    with pytest.raises(DataError, match="NG holds no images"):
        discover(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        discover(tmp_path / "nope")


def test_unreadable_images_are_listed_not_fatal_unless_all(tmp_path: Path) -> None:
    root = _folders(tmp_path)
    (root / "good" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    ds = discover(root)
    assert ds.unreadable == ("good/broken.png",) and len(ds.samples) == 32
    assert "1 unreadable" in ds.describe()
    for p in (root / "not-good").iterdir():
        p.write_bytes(b"garbage")
    with pytest.raises(DataError, match="no readable NG images"):
        discover(root)


def test_content_hash_changes_with_a_pixel(tmp_path: Path) -> None:
    root = _folders(tmp_path)
    before = discover(root).content_hash()
    _png(root / "good" / "ok000.png", 129)
    assert discover(root).content_hash() != before


@pytest.mark.parametrize(
    "n, fr, expect",
    [
        (10, (0.8, 0.1, 0.1), [8, 1, 1]),
        (250, (0.8, 0.1, 0.1), [200, 25, 25]),
        (7, (0.8, 0.1, 0.1), [5, 1, 1]),
        (2, (0.8, 0.1, 0.1), [2, 0, 0]),
    ],
)
def test_allocate(n: int, fr: tuple[float, float, float], expect: list[int]) -> None:
    assert allocate(n, fr) == expect


def _real_like(tmp_path: Path) -> list:  # type: ignore[type-arg]
    """250 OK + 5 defect types × 10, like screws-300 (tiny images)."""
    root = tmp_path / "d"
    for i in range(250):
        _png(root / "good" / f"ok{i:03d}.png")
    for kind in ("manipulated_front", "scratch_head", "scratch_neck", "thread_side", "thread_top"):
        for i in range(10):
            _png(root / "not-good" / f"{kind}{i:03d}.png", 60)
    return list(discover(root, check_readable=False).samples)


def test_split_has_no_leakage_and_is_stratified(tmp_path: Path) -> None:
    samples = _real_like(tmp_path)
    split = make_split(samples, seed=3)
    parts = [set(split.train), set(split.val), set(split.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert parts[0] | parts[1] | parts[2] == {s.path for s in samples}
    group = {s.path: s.group for s in samples}
    for part, per_type, n_ok in ((split.val, 1, 25), (split.test, 1, 25), (split.train, 8, 200)):
        c = Counter(group[p] for p in part)
        assert c.pop("OK") == n_ok and set(c.values()) == {per_type} and len(c) == 5
    assert make_split(samples, seed=3) == split  # deterministic
    assert make_split(samples, seed=4).test != split.test


def test_small_strata_still_put_ng_into_val_and_test(tmp_path: Path) -> None:
    root = _folders(tmp_path, n_ok=30, per_type=2)  # 3 types × 2 NG: no stratum can give one to val by itself
    split = make_split(discover(root).samples, seed=0)
    labels = {s.path: s.label for s in discover(root).samples}
    assert sum(labels[p] for p in split.val) == 1 and sum(labels[p] for p in split.test) == 1


def test_kfold_test_parts_partition_the_data(tmp_path: Path) -> None:
    samples = _real_like(tmp_path)
    splits = [make_kfold(samples, folds=5, fold=f, seed=1) for f in range(5)]
    tests = [set(s.test) for s in splits]
    assert sum(len(t) for t in tests) == len(samples) and set().union(*tests) == {s.path for s in samples}
    group = {s.path: s.group for s in samples}
    for s in splits:
        assert not set(s.val) & set(s.test) and not set(s.train) & (set(s.val) | set(s.test))
        c = Counter(group[p] for p in s.test)
        assert c.pop("OK") == 50 and set(c.values()) == {2}
        assert Counter(group[p] for p in s.val)["OK"] == 25


def test_split_file_roundtrip_and_reuse(tmp_path: Path) -> None:
    samples = _real_like(tmp_path)
    split = make_split(samples, seed=0, data_hash="abc")
    path = split.save(tmp_path / "split.json")
    again = Split.load(path)
    assert again == split
    ds = discover(tmp_path / "d", check_readable=False)
    assert [s.path for s in subset(ds, again.test)] == list(again.test)
    (tmp_path / "d" / "good" / "ok000.png").unlink()
    ds = discover(tmp_path / "d", check_readable=False)
    with pytest.raises(DataError, match="data folder changed"):
        subset(ds, again.part("all"))


def test_a_split_with_an_image_in_two_parts_is_refused() -> None:
    with pytest.raises(DataError, match="both train and test"):
        Split(train=("a", "b"), val=("c",), test=("a",))
