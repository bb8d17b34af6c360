"""Export a trained network as a self-checking model package: ``model.onnx`` (one file) + ``model.json``.

Exporter choice: the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``). For this network
(a plain ResNet18 plus an einsum CAM head) it writes exactly the requested opset (17) into one self-contained
file in about a second. The torch.export-based ("dynamo") exporter, the default since torch 2.9, silently raises
opset 17 to 18 (its onnxscript version converter fails on ReduceMean axes and keeps 18) and writes the weights
to a side ``model.onnx.data`` file, which a package must not have. Should a later torch drop the TorchScript
exporter, ``exporter="dynamo"`` is used as a fallback (or on request): its output is loaded with its external
data and re-saved as one file. Either way the opset written into ``model.json`` is read back from the saved
file's ``opset_import``, never assumed.

Then the package checks itself before anything reaches ``out_dir``: ``onnx.checker``, a dynamic-batch check,
and torch vs ONNX Runtime on ``verify_batch`` (real validation images where the caller has them): the max abs
logit difference must be ≤ ``LOGIT_ATOL + LOGIT_RTOL·|logit|`` and the verdicts at the decision threshold (and grey zone) identical.
A failure raises :class:`ExportError` and leaves ``out_dir`` untouched.

Beside the ONNX file the export writes the torch state (``model.pt``: the network's state dict, tensors only,
so ``torch.load(weights_only=True)`` reads it and ``engine.model.load_state`` rebuilds the network, the ResNet18
or the patch memory), recorded in ``model.json`` as the variant ``torch`` with its sha256 and the sha256 of the
model.onnx it belongs to. It is checked too: loaded back as the torch backend loads it, it must give the very
logits of the network it was saved from. A network engine.model cannot rebuild (a toy net in a test) gets no
torch state; it serves on ONNX Runtime and TensorRT.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import io
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.package import (
    META_NAME,
    ONNX_NAME,
    TORCH_NAME,
    TORCH_VARIANT,
    Decision,
    ModelMeta,
    sha256_file,
    write_meta,
)
from engine.parity import verdicts  # the daemon's PASS/REJECT/grey-zone rule, in one place
from engine.preprocess import PreprocessParams

if TYPE_CHECKING:  # pragma: no cover
    import torch

OPSET = 17
LOGIT_ATOL = 1e-4
# float32 resolution for large logits: the patch memory scores a glaring defect at |logit| ~ 1e4, where 1e-4 is
# below one unit in the last place. A ResNet18 logit (|z| < 20) keeps essentially the absolute bound.
LOGIT_RTOL = 1e-5
CAM_RTOL = 1e-3  # CAM values are O(10); compared relative to the largest |cam| in the batch
INPUT_NAME, LOGIT_NAME, CAM_NAME = "input", "logit", "cam"


class ExportError(RuntimeError):
    """The export, or its self-check, failed; no package was written."""


def _versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for dist in ("torch", "onnx", "onnxruntime", "inspectd"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """DDP / DataParallel → the plain module."""
    inner = getattr(model, "module", None)
    return inner if inner is not None and hasattr(inner, "fc") else model


def _export_onnx(net: torch.nn.Module, example: torch.Tensor, path: Path, *, exporter: str) -> str:
    """Write ``net`` to ``path`` as one ONNX file; returns the exporter actually used."""
    import onnx
    import torch

    outputs = [LOGIT_NAME, CAM_NAME][: _n_outputs(net, example)]
    if exporter == "torchscript":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore", DeprecationWarning
                )  # the legacy exporter warns; chosen knowingly
                # The patch memory's shifted slices cannot be constant-folded; they are computed at run time.
                warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
                torch.onnx.export(
                    net,
                    (example,),
                    str(path),
                    dynamo=False,
                    input_names=[INPUT_NAME],
                    output_names=outputs,
                    dynamic_axes={name: {0: "N"} for name in [INPUT_NAME, *outputs]},
                    opset_version=OPSET,
                    do_constant_folding=True,
                )
            return "torchscript"
        except (
            Exception
        ) as exc:  # e.g. a torch without the TorchScript exporter: the dynamo one is checked the same way
            warnings.warn(
                f"TorchScript ONNX exporter failed ({exc}); falling back to the dynamo exporter", stacklevel=3
            )
            for p in path.parent.glob(f"{path.name}*"):
                p.unlink()
    raw = path.with_name("raw.onnx")
    quiet = logging.getLogger("onnxscript")
    level = quiet.level
    # Its failed 18→17 down-conversion logs a traceback; the opset actually written is read back instead.
    quiet.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(
                net,
                (example,),
                str(raw),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=outputs,
                dynamic_shapes=({0: torch.export.Dim("N", min=1, max=4096)},),
                opset_version=OPSET,
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
    model = onnx.load(str(raw), load_external_data=True)
    onnx.save_model(model, str(path), save_as_external_data=False)
    for p in path.parent.glob("raw.onnx*"):
        p.unlink()
    return "dynamo"


def _n_outputs(net: torch.nn.Module, example: torch.Tensor) -> int:
    import torch

    with torch.no_grad():
        out = net(example[:1])
    return len(out) if isinstance(out, tuple) else 1


def _torch_outputs(net: torch.nn.Module, batch: np.ndarray) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        out = net(torch.from_numpy(batch))
    outs = out if isinstance(out, tuple) else (out,)
    return [o.detach().cpu().numpy().astype(np.float32) for o in outs]


def _check(
    path: Path, net: torch.nn.Module, batch: np.ndarray, decision: Decision, heatmap: bool
) -> dict[str, Any]:
    """onnx.checker + torch vs ONNX Runtime on ``batch``; raises ExportError, returns the parity record."""
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises ValidationError and friends
        raise ExportError(f"onnx.checker rejected the exported model: {exc}") from None
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = max(1, min(4, os.cpu_count() or 1))
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    want = [LOGIT_NAME, CAM_NAME] if heatmap else [LOGIT_NAME]
    if names != want or [i.name for i in sess.get_inputs()] != [INPUT_NAME]:
        raise ExportError(
            f"exported graph has inputs {[i.name for i in sess.get_inputs()]} and outputs {names}; "
            f"expected ['{INPUT_NAME}'] and {want}"
        )
    ref = _torch_outputs(net, batch)
    got = [np.asarray(o, dtype=np.float32) for o in sess.run(None, {INPUT_NAME: batch})]
    if got[0].shape != (batch.shape[0],):
        raise ExportError(f"ONNX logit shape {got[0].shape}, expected ({batch.shape[0]},)")
    single = sess.run([LOGIT_NAME], {INPUT_NAME: batch[:1]})[0]  # dynamic batch really is dynamic
    # The whole batch, and its first image run alone (batch 1); NaN anywhere propagates and fails below.
    err = np.abs(np.concatenate([ref[0] - got[0], ref[0][:1] - np.asarray(single).reshape(-1)]))
    bound = LOGIT_ATOL + LOGIT_RTOL * np.abs(np.concatenate([ref[0], ref[0][:1]]))
    diff = float(np.max(err))
    record: dict[str, Any] = {
        "n_images": int(batch.shape[0]),
        "max_abs_logit_diff": diff,
        "logit_atol": LOGIT_ATOL,
        "logit_rtol": LOGIT_RTOL,
    }
    if not float(np.max(err - bound)) <= 0.0:  # also catches NaN
        raise ExportError(
            f"torch and ONNX Runtime disagree: max |logit diff| {diff:.3g} exceeds "
            f"{LOGIT_ATOL} + {LOGIT_RTOL} × |logit|"
        )
    v_ref, v_got = verdicts(ref[0], decision), verdicts(got[0], decision)
    flips = np.flatnonzero(v_ref != v_got)
    if flips.size:
        raise ExportError(
            f"torch and ONNX Runtime give different verdicts for {flips.size} of {batch.shape[0]} images "
            f"(indices {flips[:10].tolist()}; logits torch {ref[0][flips[:3]].tolist()} vs ORT "
            f"{got[0][flips[:3]].tolist()}) at threshold {decision.threshold}"
        )
    record["verdicts_equal"] = True
    if heatmap:
        if got[1].shape != ref[1].shape:
            raise ExportError(f"ONNX cam shape {got[1].shape} differs from torch's {ref[1].shape}")
        scale = max(float(np.max(np.abs(ref[1]))), 1e-6)
        cam_diff = float(np.max(np.abs(ref[1] - got[1])))
        record["max_abs_cam_diff"] = cam_diff
        if not cam_diff <= CAM_RTOL * scale:
            raise ExportError(
                f"torch and ONNX Runtime CAMs differ by {cam_diff:.3g} (> {CAM_RTOL} × {scale:.3g})"
            )
    return record


def export_package(
    model: torch.nn.Module,
    out_dir: str | Path,
    *,
    preprocess: PreprocessParams,
    decision: Decision,
    name: str,
    heatmap: bool = True,
    verify_batch: np.ndarray | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
    gauges: dict[str, Any] | None = None,
    score_reference: dict[str, Any] | None = None,
    exporter: str = "torchscript",
) -> ModelMeta:
    """Export ``model`` (engine.model.build_model's network, trained) to ``out_dir`` and return its meta.

    ``verify_batch``: float32 (N, 1, H, W) images preprocessed with ``preprocess`` (real validation images);
    None uses 8 seeded random images, which checks numerics but not verdicts near the threshold. On any
    failure :class:`ExportError` is raised and ``out_dir`` is left as it was. ``score_reference``: the
    calibration's OK logits (engine.drift.ScoreReference.to_dict()), what the daemon measures drift against.
    """
    import onnx
    import torch

    from engine.model import CamHead

    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    h, w = preprocess.input_size
    source = "given"
    if verify_batch is None:
        verify_batch = np.random.default_rng(0).normal(0.0, 1.0, (8, 1, h, w)).astype(np.float32)
        source = "random"
    verify_batch = np.ascontiguousarray(verify_batch, dtype=np.float32)
    if verify_batch.ndim != 4 or verify_batch.shape[1:] != (1, h, w) or verify_batch.shape[0] < 1:
        raise ExportError(
            f"verify_batch must be (N ≥ 1, 1, {h}, {w}) to match preprocess.input_size, "
            f"got {verify_batch.shape}"
        )

    base = copy.deepcopy(_unwrap(model)).cpu().float().eval()
    net = CamHead.wrap(base).eval() if heatmap else _logit_only(base).eval()
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    work.chmod(
        0o777 & ~umask
    )  # mkdtemp makes 0700; the daemon may run as another user and must read the package
    try:
        onnx_path = work / ONNX_NAME
        used = _export_onnx(net, torch.from_numpy(verify_batch[:2]), onnx_path, exporter=exporter)
        if any(work.glob("*.data")):
            raise ExportError("the exporter wrote external weight data; the package must be one file")
        opsets = {
            o.domain or "ai.onnx": int(o.version)
            for o in onnx.load(str(onnx_path), load_external_data=False).opset_import
        }
        opset = opsets.get("ai.onnx")
        parity = _check(onnx_path, net, verify_batch, decision, heatmap)
        parity["source"] = source
        variants: dict[str, Any] = {}
        torch_state = _save_torch_state(base, work / TORCH_NAME, sha256_file(onnx_path), verify_batch[:2])
        if torch_state is not None:
            variants[TORCH_VARIANT] = torch_state
        meta = ModelMeta(
            name=name,
            preprocess=preprocess,
            decision=decision,
            input_name=INPUT_NAME,
            output_name=LOGIT_NAME,
            heatmap_output=CAM_NAME if heatmap else None,
            opset=opset,
            gauges=gauges,
            score_reference=score_reference,
            calibration=dict(calibration or {}),
            training=dict(training or {}),
            metrics=dict(metrics or {}),
            variants=variants,
            created_by={**_versions(), "exporter": used, "opset_imports": opsets, "parity": parity},
        )
        meta = write_meta(work, meta)
        _install(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return replace(meta)


def _save_torch_state(
    net: torch.nn.Module, path: Path, onnx_sha256: str, batch: np.ndarray
) -> dict[str, Any] | None:
    """Write ``net``'s state dict to ``path`` and return its variant record, after checking that it rebuilds
    ``net``: loaded back exactly as the torch backend loads it, it must give the same logits on ``batch``.
    None (nothing written) for a network engine.model does not know."""
    import torch

    from engine.model import is_engine_model, load_state

    if not is_engine_model(net):
        return None
    state = {k: v.detach().cpu().clone().contiguous() for k, v in net.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    try:
        again = load_state(data, source=f"the exported {TORCH_NAME}")
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    x = torch.from_numpy(np.ascontiguousarray(batch))
    with torch.no_grad():
        same = torch.equal(net(x), again(x))
    if not same:
        raise ExportError(f"the exported {TORCH_NAME} does not rebuild the network: its logits differ")
    path.write_bytes(data)
    return {
        "file": TORCH_NAME,
        "sha256": hashlib.sha256(data).hexdigest(),
        "source_onnx_sha256": onnx_sha256,
        "bytes": len(data),
        "network": type(net).__name__,
        "format": "torch state dict: torch.load(weights_only=True), then engine.model.load_state",
        "made_by": "inspectd export",
    }


def _install(work: Path, out: Path) -> None:
    """Move the checked files into ``out``: a rename of the whole directory when it is new, else file by file
    (model.onnx first: a reader in between sees a sha256 mismatch and refuses, never a wrong model; model.pt
    before model.json, whose record it must match)."""
    if not out.exists():
        os.replace(work, out)
        return
    if not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    os.replace(work / ONNX_NAME, out / ONNX_NAME)
    if (work / TORCH_NAME).exists():
        os.replace(work / TORCH_NAME, out / TORCH_NAME)
    else:
        (out / TORCH_NAME).unlink(missing_ok=True)  # an older network's state: never beside this model
    os.replace(work / META_NAME, out / META_NAME)
    stale = out / f"{ONNX_NAME}.data"
    if stale.exists():
        stale.unlink()
    shutil.rmtree(work, ignore_errors=True)


def _logit_only_cls() -> type:
    import torch

    class LogitOnly(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.net(x)[:, 0]
            return out

    return LogitOnly


def _logit_only(net: torch.nn.Module) -> torch.nn.Module:
    module: torch.nn.Module = _logit_only_cls()(net)
    return module
