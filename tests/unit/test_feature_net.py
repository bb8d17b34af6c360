"""training.feature_net: the slimmed 1-channel ResNet18 trains a few steps on synthetic crops, and its features
feed the patch memory, whose leave-one-out logits and held-out scores come out finite and ranked."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training.feature_net import (  # noqa: E402
    FeatureNet,
    NetSettings,
    cell_mask,
    fit_memory,
    memory_logits,
    net_features,
    train_net,
)
from training.patch_memory import PatchSettings  # noqa: E402

H, W = 32, 96


def _bands(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 (n, H + 4, W) dark threaded bars on a light background, and their part masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : H + 4, 0:W].astype(np.float32)
    out = []
    for _ in range(n):
        crest = 3 * np.abs(((xx + rng.uniform(0, 12)) % 12) / 6 - 1)
        bar = np.abs(yy - (H + 4) / 2) < 8 + crest
        out.append(np.where(bar, -1.0, 1.0) + rng.normal(0, 0.05, bar.shape))
    x = np.stack(out).astype(np.float32)
    return x, x < 0


def test_feature_net_shapes_and_torchvision_width() -> None:
    net = FeatureNet(width=8).eval()
    x = torch.zeros(2, 1, H, W)
    assert net(x).shape == (2, H // 8, W // 8)
    assert net.features(x).shape == (2, 48, H // 8, W // 8)
    assert (
        FeatureNet(width=64).features(torch.zeros(1, 1, H, W)).shape[1] == 384
    )  # resnet18's layer2 ⊕ layer3
    assert FeatureNet(width=8, pool=2)(torch.zeros(1, 1, 2 * H, 2 * W)).shape == (1, H // 8, W // 8)


def test_train_then_memory_scores_damage_above_good() -> None:
    torch.manual_seed(0)
    bands, parts = _bands(12, 0)
    net = train_net(
        bands,
        parts,
        NetSettings(width=8, steps=3, batch=4, crop=64, shift=2),
        rows=(2, 2 + H),
        log=lambda _: None,
    )
    good = torch.from_numpy(bands[:, None, 2 : 2 + H])
    feats = [net_features(net, good), net_features(net, good, 4)]
    mask = cell_mask(parts[:, 2 : 2 + H], tuple(feats[0].shape[2:]), share=0.0)
    mem, loo, proj = fit_memory(feats, mask, PatchSettings(dims=8, window=(1, 1), top_k=2, bank_size=10))
    assert loo.shape == (12,) and np.isfinite(loo).all()
    assert proj is not None and proj.shape == (48, 8)
    test, _ = _bands(2, 1)
    broken = test[:, None, 2 : 2 + H].copy()
    broken[1, 0, 10:22, 30:60] = 3.0  # a large bright blotch across the bar
    z = memory_logits(mem, net_features(net, torch.from_numpy(broken)), proj)
    assert np.isfinite(z).all() and z[1] > z[0]
