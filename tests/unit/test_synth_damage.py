"""training.synth_damage: every kind of damage is reproducible from its seed, lands on the part and says where."""

from __future__ import annotations

import numpy as np
import pytest

from training.synth_damage import KINDS, damage, part_mask

H, W = 64, 160


def _screw(seed: int) -> np.ndarray:
    """uint8 (H, W): a dark bar with a saw-tooth 'thread' on its edges on a light, noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    crest = 6 * np.abs(((xx + rng.uniform(0, 16)) % 16) / 8 - 1)
    bar = (np.abs(yy - H / 2) < 12 + crest) & (xx > 10) & (xx < W - 10)
    img = np.where(bar, 70.0, 200.0) + 25 * np.sin(xx / 5) * bar + rng.normal(0, 3, (H, W))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", [*KINDS, None])
def test_damage_is_deterministic_inside_the_part_and_marked(kind: str | None) -> None:
    pixels = _screw(1)
    img = (pixels / 255.0 - 0.5) / 0.25  # damage works on normalised crops
    part = part_mask(pixels)
    assert 0.2 < part.mean() < 0.8
    for seed in range(8):
        out1, mask1 = damage(img, part, np.random.default_rng(seed), kind)
        out2, mask2 = damage(img, part, np.random.default_rng(seed), kind)
        np.testing.assert_array_equal(out1, out2)
        np.testing.assert_array_equal(mask1, mask2)
        assert mask1.sum() >= 4
        assert not (mask1 & ~part).any()
        changed = out1 != img.astype(np.float32)
        assert not (changed & ~part).any()  # nothing outside the part moves
        assert changed[mask1].all()  # the mask marks only pixels that changed
    a, _ = damage(img, part, np.random.default_rng(0), kind)
    b, _ = damage(img, part, np.random.default_rng(1), kind)
    assert not np.array_equal(a, b)


def test_crest_damage_sits_on_the_silhouette_edge() -> None:
    pixels = _screw(2)
    img = pixels.astype(np.float32)
    part = part_mask(pixels)
    for seed in range(6):
        _, mask = damage(img, part, np.random.default_rng(seed), "crest")
        ys, _ = np.nonzero(mask)
        # The bar's body spans rows H/2 ± 12; crest tips stand up to 6 px beyond: damage is near the edges.
        assert np.abs(ys.mean() - H / 2) > 8


def test_damage_rejects_mismatched_or_empty_masks() -> None:
    img = np.zeros((H, W), np.float32)
    with pytest.raises(ValueError):
        damage(img, np.ones((H, W + 1), bool), np.random.default_rng(0))
    with pytest.raises(ValueError):
        damage(img, np.zeros((H, W), bool), np.random.default_rng(0))
