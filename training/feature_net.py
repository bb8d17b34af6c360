"""A ResNet18 trained in-domain as the patch memory's feature extractor (research code for issue 14).

No pretrained weights can be had here, so the network learns its features from the good crops alone: it is
trained from scratch to find synthetic damage (training.synth_damage) on good thread bands, per cell at stride
8 (a segmentation head, DRAEM-style) and per image (the top cells). Its layer2 ⊕ upsampled layer3 maps, each
3 × 3 average pooled (PatchCore), then replace the PCA codes in the same patch memory: per-cell bank (coreset),
± 1 cell search, leave-one-out z-scores, top-k mean (:func:`fit_memory`, the math of training.patch_memory.fit
on given feature maps, reusing engine.patch_model.PatchMemory for distances and scores).

``width`` 64 is torchvision's ``resnet18(weights=None)`` itself (conv1 made 1-channel); smaller widths build the
same topology (BasicBlocks [2, 2, 2], stem 7 × 7 / 2 + max-pool) with fewer channels, since a CPU frame budget
of a few core-ms does not pay for 64 channels at full resolution. Only conv1 … layer3 exist: layer4 and the fc
are never used.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock

from engine.patch_model import PatchMemory
from training.patch_memory import CHUNK, PatchSettings, _coreset, _pool
from training.synth_damage import damage


@dataclass(frozen=True, slots=True)
class NetSettings:
    width: int = 16  # channels of layer1 (layer2: 2×, layer3: 4×); 64 = torchvision's resnet18
    pool: int = 1  # the input is averaged over pool × pool blocks first (2 = half resolution)
    steps: int = 300  # optimiser steps
    batch: int = 16
    crop: int = 288  # training windows: this many input columns of the band (full-resolution pixels)
    lr: float = 2e-3
    damaged: float = 0.5  # share of each batch that gets synthetic damage
    shift: int = 4  # ± rows of vertical jitter (the crop's row offset); columns move with the window
    brightness: float = 0.1  # ± offset in normalised units
    dims: int = 0  # > 0: PCA of the memory features to this many dimensions


class FeatureNet(nn.Module):
    """conv1 … layer3 of a (slimmed) 1-channel ResNet18, a per-cell damage head at stride 8 and ``features``."""

    def __init__(self, width: int = 16, pool: int = 1) -> None:
        super().__init__()
        self.pool = int(pool)
        if width == 64:
            r = resnet18(weights=None)
            r.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
            self.stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool)
            self.layer1, self.layer2, self.layer3 = r.layer1, r.layer2, r.layer3
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(1, width, 7, 2, 3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
            self.layer1 = _layer(width, width, 1)
            self.layer2 = _layer(width, 2 * width, 2)
            self.layer3 = _layer(2 * width, 4 * width, 2)
        self.channels = 6 * width  # layer2 ⊕ layer3
        self.head = nn.Conv2d(self.channels, 1, 1)

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) → (B, 6·width, H/8/pool, W/8/pool): layer2 ⊕ layer3 upsampled to layer2's grid."""
        if self.pool > 1:
            x = F.avg_pool2d(x, self.pool)
        l2 = self.layer2(self.layer1(self.stem(x)))
        l3 = self.layer3(l2)
        up = F.interpolate(l3, size=l2.shape[2:], mode="bilinear", align_corners=False)
        return torch.cat([l2, up], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) → (B, gh, gw) damage logits per cell."""
        return self.head(self.maps(x))[:, 0]

    def features(self, x: torch.Tensor, local: int = 3) -> torch.Tensor:
        """The memory's patch features: the maps, each ``local`` × ``local`` average pooled (a cell sees its
        neighbours, as PatchCore); 1 = the maps as they are."""
        m = self.maps(x)
        return (
            m if local <= 1 else F.avg_pool2d(m, local, stride=1, padding=local // 2, count_include_pad=False)
        )


def _layer(cin: int, cout: int, stride: int) -> nn.Sequential:
    down = None
    if stride != 1 or cin != cout:
        down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    return nn.Sequential(BasicBlock(cin, cout, stride, down), BasicBlock(cout, cout))


def train_net(
    bands: np.ndarray,
    parts: np.ndarray,
    settings: NetSettings = NetSettings(),
    *,
    rows: tuple[int, int],
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> FeatureNet:
    """Train on good ``bands`` (float32 (N, H', W'), a margin of ``settings.shift`` rows above and below the
    ``rows`` = (top, bottom) the memory will see) with their part masks ``parts`` (bool, same shape): each
    batch is random windows of ``crop`` columns, half of them damaged; the target is the damage mask per cell."""
    s = settings
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net = FeatureNet(s.width, s.pool)
    opt = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, s.lr, total_steps=s.steps, pct_start=0.15)
    n, _, w = bands.shape
    top, bottom = rows
    t0 = time.monotonic()
    net.train()
    for step in range(s.steps):
        xs, ms = [], []
        for _ in range(s.batch):
            i = int(rng.integers(n))
            dy = top + int(rng.integers(-s.shift, s.shift + 1))
            dx = int(rng.integers(0, w - s.crop + 1))
            img = bands[i, dy : dy + bottom - top, dx : dx + s.crop]
            part = parts[i, dy : dy + bottom - top, dx : dx + s.crop]
            mask = np.zeros(img.shape, bool)
            if rng.random() < s.damaged and part.sum() >= 64:
                img, mask = damage(img, part, rng)
            xs.append(img + np.float32(rng.uniform(-s.brightness, s.brightness)))
            ms.append(mask)
        x = torch.from_numpy(np.stack(xs)[:, None].astype(np.float32))
        m = torch.from_numpy(np.stack(ms)[:, None].astype(np.float32))
        logits = net(x)
        target = F.adaptive_max_pool2d(m, logits.shape[1:])[:, 0]
        # Cells: damaged cells are rare, so they weigh as much as all the good cells together. Image: the
        # mean of the top 4 cell logits says "damaged somewhere".
        pos = target.sum().clamp_min(1.0)
        weight = torch.where(
            target > 0, target.numel() / (2 * pos), target.numel() / (2 * (target.numel() - pos))
        )
        cell_loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight)
        img_logit = logits.flatten(1).topk(4, dim=1).values.mean(1)
        img_loss = F.binary_cross_entropy_with_logits(img_logit, target.flatten(1).amax(1))
        loss = cell_loss + img_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == s.steps - 1:
            log(
                f"step {step}: loss {loss.item():.3f} (cells {cell_loss.item():.3f}) {time.monotonic() - t0:.0f} s"
            )
    return net.eval()


def net_features(
    net: FeatureNet, x: np.ndarray | torch.Tensor, shift_px: int = 0, local: int = 3
) -> torch.Tensor:
    """(N, 1, H, W) crops → (N, C, gh, gw) memory features; ``shift_px`` moves the input towards the tip first
    (the thread phase copies the memory stores)."""
    t = torch.as_tensor(x, dtype=torch.float32)
    if shift_px > 0:
        t = torch.cat([t[..., :1].expand(*t.shape[:-1], shift_px), t[..., :-shift_px]], dim=-1)
    with torch.no_grad():
        return torch.cat([net.features(t[i : i + CHUNK], local) for i in range(0, len(t), CHUNK)])


def head_scores(
    net: FeatureNet, x: np.ndarray | torch.Tensor, mask: torch.Tensor, top_k: int = 4
) -> np.ndarray:
    """(N,) the damage head's own verdict: the mean of the ``top_k`` largest cell logits on the part."""
    t = torch.as_tensor(x, dtype=torch.float32)
    with torch.no_grad():
        cells = torch.cat([net(t[i : i + CHUNK]) for i in range(0, len(t), CHUNK)])
    masked = torch.where(mask > 0, cells, torch.full_like(cells, -1e4)).flatten(1)
    return masked.topk(top_k, dim=1).values.mean(1).numpy()


def cell_mask(parts: np.ndarray, grid: tuple[int, int], share: float = 0.6) -> torch.Tensor:
    """(gh, gw) cells covered by the silhouette of more than ``share`` of the good parts (as the PCA memory's
    mask: the silhouette anywhere under a cell and its half-cell margin)."""
    sil = torch.from_numpy(parts.astype(np.float32))[:, None]
    gh, gw = grid
    cy, cx = sil.shape[2] // gh, sil.shape[3] // gw
    cover = F.max_pool2d(sil, (2 * cy, 2 * cx), stride=(cy, cx), padding=(cy // 2, cx // 2))[:, 0, :gh, :gw]
    return (cover.mean(0) > share).float()


def fit_memory(
    feats: list[torch.Tensor], mask: torch.Tensor, s: PatchSettings
) -> tuple[PatchMemory, np.ndarray, torch.Tensor | None]:
    """training.patch_memory.fit's memory, on given feature maps: ``feats[0]`` (N, K, gh, gw) the good images,
    ``feats[1:]`` their axially moved copies. Returns the memory (its kernel a placeholder: call ``z_of`` /
    ``score_of`` on features), the good images' leave-one-out logits, and the PCA projection (K, dims) if any."""
    n, k, gh, gw = feats[0].shape
    proj = None
    if 0 < s.dims < k:
        f = feats[0].permute(0, 2, 3, 1).reshape(-1, k)
        mean = f.mean(0)
        evals, evecs = torch.linalg.eigh(torch.cov((f - mean).T.double()))
        proj = evecs[:, torch.argsort(evals, descending=True)[: s.dims]].float()
        feats = [torch.einsum("nkhw,kd->ndhw", t, proj) for t in feats]
        k = s.dims
    bank = torch.cat(feats, 0).reshape(n * len(feats), k, gh * gw).permute(2, 1, 0).contiguous()
    keep = _coreset(bank, s.bank_size) if 0 < s.bank_size < bank.shape[2] else None
    origin = None
    if keep is not None:
        bank = torch.gather(bank, 2, keep[:, None, :].expand(-1, k, -1)).contiguous()
        origin = keep % n
    offsets = torch.tensor(
        [
            (dy, dx)
            for dy in range(-s.window[0], s.window[0] + 1)
            for dx in range(-s.window[1], s.window[1] + 1)
        ]
    )
    model = PatchMemory(torch.zeros(k, 1, 1, 1), bank, mask, offsets, 8, top_k=min(s.top_k, int(mask.sum())))
    with torch.no_grad():
        parts = []
        for i in range(0, n, CHUNK):
            ids = torch.arange(i, min(i + CHUNK, n))
            if origin is not None:
                parts.append(model.distances(feats[0][ids], exclude=ids, origin=origin))
            else:
                own = torch.stack([ids + p * n for p in range(len(feats))], 1)
                parts.append(model.distances(feats[0][ids], exclude=own))
        loo = torch.cat(parts)
        mu, sd = loo.mean(0), loo.std(0)
        floor = s.sd_floor * sd.median()
        model.mu.copy_(mu)
        model.sd.copy_(torch.maximum(_pool(sd, s.sd_pool), floor).clamp_min(1e-6))
        d = loo.double()
        s1, s2 = d.sum(0), (d * d).sum(0)
        mu_i = (s1 - d) / (n - 1)
        var_i = ((s2 - d * d) - (n - 1) * mu_i * mu_i) / max(n - 2, 1)
        sd_i = torch.maximum(_pool(var_i.clamp_min(0.0).sqrt(), s.sd_pool), floor.double()).clamp_min(1e-6)
        scores = model.score_of(((d - mu_i) / sd_i).float())
        shift, scale = float(scores.mean() + 3.0 * scores.std()), float(scores.std().clamp_min(1e-3))
        model.shift.fill_(shift)
        model.scale.fill_(scale)
    return model.eval(), ((scores - shift) / scale).numpy().astype(np.float32), proj


def memory_logits(model: PatchMemory, feats: torch.Tensor, proj: torch.Tensor | None) -> np.ndarray:
    """(N, K, gh, gw) features → (N,) logits of a :func:`fit_memory` model."""
    if proj is not None:
        feats = torch.einsum("nkhw,kd->ndhw", feats, proj)
    with torch.no_grad():
        return np.concatenate(
            [model.score_of(model.z_of(feats[i : i + CHUNK])).numpy() for i in range(0, len(feats), CHUNK)]
        )
