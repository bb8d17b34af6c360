"""INT8 quantisation: written and recorded only when verdicts agree with FP32; stale or swapped INT8 files
are refused by the ONNX Runtime backend; the parity helpers it relies on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from engine.backend import BackendError, create_backend
from engine.package import Decision, load_package
from engine.parity import Tolerance, compare, list_images, stratified_sample, verdicts
from engine.quantize import QuantizeRefused, QuantizeSettings, quantize_package
from inspectd.cli import main
from tests.helpers import drawn_image, tiny_package

SIZE = (48, 48)


def _enter(kind: str, package: Any, **options: Any) -> None:
    """Open and close a backend: what is under test happens in ``__enter__``."""
    with create_backend(kind, package, **options):
        pass


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    for label, n in (("good", 12), ("not-good", 6)):
        (data / label).mkdir(parents=True)
        for i in range(n):
            img = drawn_image(96, seed=100 + 7 * i + len(label))
            img = cv2.add(img, 10 * (i % 4)) if label == "good" else cv2.subtract(img, 9 * (i % 5))
            cv2.imwrite(str(data / label / f"{label}{i:03d}.png"), img)
    pkg_dir = tmp_path / "pkg"
    # Scores of this tiny model lie in 0.5–0.65: threshold 0.9 keeps them clear of it, so INT8 noise
    # cannot flip a verdict by luck (the refusal test below flips them on purpose).
    tiny_package(pkg_dir, input_size=SIZE, seed=6, threshold=0.9)
    return pkg_dir, data


def _split(pkg_dir: Path, data: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from engine.parity import preprocess_images

    pkg = load_package(pkg_dir)
    images = list_images(data)
    calib = stratified_sample(images, 8, seed=0)
    val = stratified_sample(images, None, seed=1, exclude=[im.path for im in calib])
    return preprocess_images(pkg, calib), preprocess_images(pkg, val), [im.path.name for im in val]


def test_quantize_writes_records_and_serves_int8(setup) -> None:  # type: ignore[no-untyped-def]
    pkg_dir, data = setup
    calib, val, names = _split(pkg_dir, data)
    everything = QuantizeSettings(fp32_stem=False, fp32_head=False)  # the tiny model is only stem + head
    result = quantize_package(
        load_package(pkg_dir), calib, val, val_files=names, data=str(data), settings=everything
    )
    assert result.path == pkg_dir / "model.int8.onnx" and result.comparison.flips == 0
    pkg = load_package(pkg_dir)  # model.json rewritten, still a valid package
    rec = pkg.meta.variant("int8")
    assert rec is not None and rec["file"] == "model.int8.onnx"
    assert rec["source_onnx_sha256"] == pkg.meta.onnx_sha256
    assert rec["quantization"]["per_channel"] is True and rec["quantization"]["reduce_range"] is True
    assert rec["quantization"]["fp32_stem"] is False
    assert rec["agreement"]["n"] == len(val) == 10 and rec["agreement"]["verdict_agreement"] == 1.0
    assert rec["calibration"]["n_images"] == 8
    import onnx

    ops = {n.op_type for n in onnx.load(str(result.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # really QDQ-quantised
    with create_backend("onnxruntime", pkg, max_batch=16) as fp32:
        ref = fp32.infer(val)
    with create_backend("onnxruntime", pkg, max_batch=16, model_file="model.int8.onnx") as int8:
        assert int8.precision == "int8"
        got = int8.infer(val)
    assert not np.array_equal(got, ref)  # it is a different model …
    np.testing.assert_allclose(got, ref, atol=0.1 * float(np.abs(ref).max()) + 1e-3)  # … that agrees


def _conv_inputs(path: Path) -> list[str]:
    import onnx

    graph = onnx.load(str(path)).graph
    producers = {out: n.op_type for n in graph.node for out in n.output}
    (conv,) = [n for n in graph.node if n.op_type == "Conv"]
    return [producers.get(name, "graph input/initializer") for name in conv.input[:2]]


def test_default_keeps_the_stem_conv_and_head_in_fp32(setup) -> None:  # type: ignore[no-untyped-def]
    pkg_dir, data = setup
    calib, val, _ = _split(pkg_dir, data)
    result = quantize_package(load_package(pkg_dir), calib, val)
    assert _conv_inputs(result.path) == ["graph input/initializer", "graph input/initializer"]
    assert result.record["quantization"]["fp32_stem"] is True
    (pkg_dir / "model.int8.onnx").unlink()
    full = quantize_package(
        load_package(pkg_dir), calib, val, settings=QuantizeSettings(fp32_stem=False, fp32_head=False)
    )
    assert _conv_inputs(full.path) == ["DequantizeLinear", "DequantizeLinear"]


def _sabotaging_quantizer(
    src: Path, dst: Path, calib: np.ndarray, input_name: str, s: QuantizeSettings
) -> None:
    """Writes a "quantised" model whose NG logit is shifted by +10: every PASS becomes REJECT."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    for init in model.graph.initializer:
        if init.name == "b2":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(10), "b2"))
    onnx.save(model, str(dst))


def test_quantize_refuses_flips_and_leaves_the_package_untouched(setup) -> None:  # type: ignore[no-untyped-def]
    pkg_dir, data = setup
    calib, val, names = _split(pkg_dir, data)
    before = {p.name: p.read_bytes() for p in pkg_dir.iterdir()}
    with pytest.raises(QuantizeRefused, match=r"disagrees with FP32 on 10 of 10 .*Nothing written") as exc:
        quantize_package(load_package(pkg_dir), calib, val, val_files=names, quantizer=_sabotaging_quantizer)
    assert exc.value.comparison.flips == 10
    assert {p.name: p.read_bytes() for p in pkg_dir.iterdir()} == before  # no file, model.json unchanged


def test_stale_or_swapped_int8_file_is_refused(setup) -> None:  # type: ignore[no-untyped-def]
    pkg_dir, data = setup
    calib, val, _ = _split(pkg_dir, data)
    quantize_package(load_package(pkg_dir), calib, val)
    int8 = pkg_dir / "model.int8.onnx"
    saved = int8.read_bytes()
    int8.write_bytes(saved + b"\0")
    with pytest.raises(BackendError, match="does not match its model.json record"):
        _enter("onnxruntime", load_package(pkg_dir), model_file="model.int8.onnx")
    int8.write_bytes(saved)
    # Retrain (new model.onnx) but keep model.json's variants: the INT8 file is now stale.
    meta = json.loads((pkg_dir / "model.json").read_text())
    tiny_package(pkg_dir, input_size=SIZE, seed=7)
    fresh = json.loads((pkg_dir / "model.json").read_text())
    fresh["variants"] = meta["variants"]
    (pkg_dir / "model.json").write_text(json.dumps(fresh))
    with pytest.raises(BackendError, match="was made from another model.onnx"):
        _enter("onnxruntime", load_package(pkg_dir), model_file="model.int8.onnx")


def test_quantize_cli(setup, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    pkg_dir, data = setup
    assert main(["quantize", str(pkg_dir), "--data", str(data), "--calib", "6"]) == 0
    out = capsys.readouterr().out
    assert "calibrated on 6 images; on 12 validation images verdict agreement 100.0 % (0 flips)" in out
    assert (
        main(["check-backends", str(pkg_dir), "--data", str(data), "--backends", "onnxruntime cpu int8"]) == 0
    )
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("onnxruntime cpu int8"))
    assert line.split()[3] == "int8" and line.rstrip().endswith("ok")


def test_verdicts_compare_and_sampling() -> None:
    d = Decision(threshold=0.5, grey_zone=(0.3, 0.7))
    logits = np.array([-3.0, -0.5, 0.0, 0.5, 3.0], np.float32)  # p ≈ .05 .38 .5 .62 .95
    assert verdicts(logits, d).tolist() == [0, 2, 2, 2, 1]
    assert verdicts(logits, Decision(threshold=0.5)).tolist() == [0, 0, 1, 1, 1]
    c = compare(logits, logits + np.float32(1.0), d)  # p .38→.62 stays grey; .5→.73 and .62→.82 → REJECT
    assert c.flips == 2 and c.flip_indices == (2, 3) and c.agreement == pytest.approx(0.6)
    assert c.max_abs_logit == pytest.approx(1.0) and c.max_abs_score == pytest.approx(0.245, abs=1e-3)
    assert c.passes(Tolerance(max_flips=2)) and not c.passes(Tolerance())
    assert not c.passes(Tolerance(max_flips=5, max_score_delta=0.01))
    nan = compare(logits, np.full(5, np.nan, np.float32), Decision())
    assert not nan.passes(Tolerance(max_flips=99))  # a broken engine never passes

    from engine.parity import LabelledImage

    items = [LabelledImage(Path(f"ok{i}.png"), 0) for i in range(20)] + [
        LabelledImage(Path(f"ng{i}.png"), 1) for i in range(5)
    ]
    s = stratified_sample(items, 10, seed=3)
    assert len(s) == 10 and sum(im.label == 1 for im in s) == 2  # class proportions kept
    assert s == stratified_sample(items, 10, seed=3)  # fixed sample
    rest = stratified_sample(items, None, exclude=[im.path for im in s])
    assert len(rest) == 15 and not {im.path for im in rest} & {im.path for im in s}


def test_list_images_labels_by_folder(tmp_path: Path) -> None:
    for rel in ("good/a.png", "not-good/b.png", "NG/c.bmp", "other/d.png", "e.png", "good/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    got = {im.path.name: im.label for im in list_images(tmp_path)}
    assert got == {"a.png": 0, "b.png": 1, "c.bmp": 1, "d.png": None, "e.png": None}
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        list_images(tmp_path / "missing")


def test_quantize_cli_calibrates_on_another_folder(
    setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    pkg_dir, data = setup
    calib_dir = tmp_path / "train" / "good"
    calib_dir.mkdir(parents=True)
    for i in range(5):
        cv2.imwrite(str(calib_dir / f"t{i}.png"), drawn_image(96, seed=500 + i))
    assert main(["quantize", str(pkg_dir), "--data", str(data), "--calib-data", str(calib_dir.parent)]) == 0
    out = capsys.readouterr().out
    assert "calibrated on 5 images; on 18 validation images" in out  # every image of --data validates
    rec = load_package(pkg_dir).meta.variant("int8")
    assert rec is not None and rec["agreement"]["n"] == 18
    assert rec["calibration"] == {**rec["calibration"], "n_images": 5, "data": str(calib_dir.parent)}
