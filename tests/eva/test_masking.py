"""BEiT block-wise masking with EVA's parameters: counts, block shapes, determinism."""
from __future__ import annotations

import random

import numpy as np
import pytest

from eva.masking import BlockMaskGenerator


def masked_neighbours(mask: np.ndarray) -> float:
    """Mean number of masked 4-neighbours of a masked patch: ~1.6 for random masks at 41%."""
    padded = np.pad(mask, 1).astype(int)
    neighbours = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    return float(neighbours[mask].mean())


def test_eva_defaults_mask_94_to_105_of_256_patches_in_blocks():
    generator = BlockMaskGenerator()
    rng = np.random.default_rng(0)
    masks = [generator(rng) for _ in range(200)]
    assert all(m.shape == (16, 16) and m.dtype == bool for m in masks)
    counts = np.array([m.sum() for m in masks])
    assert counts.max() <= 105 and counts.min() >= 94
    assert counts.mean() > 102  # most masks reach the full 105
    assert np.mean([masked_neighbours(m) for m in masks]) > 3.0  # blocks, not scattered patches


def test_one_block_is_a_rectangle_with_eva_area_and_aspect():
    generator = BlockMaskGenerator()
    rng = np.random.default_rng(1)
    areas, aspects = [], []
    for _ in range(200):
        mask = np.zeros((16, 16), dtype=bool)
        added = generator._add_block(mask, 105, rng)
        rows, cols = np.nonzero(mask)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert added == mask.sum() == h * w  # a filled rectangle
        areas.append(added)
        aspects.append(h / w)
    # target area >= 16 and aspect in [0.3, 1/0.3] before rounding the sides to whole patches,
    # which allows areas down to 12 (2x6) and aspects in [1/4, 4]
    assert min(areas) >= 12 and max(areas) <= 105 and np.median(areas) > 40
    assert 0.25 <= min(aspects) < 0.45 and 2.5 < max(aspects) <= 4.0


def test_same_seed_same_masks_and_no_global_random_state():
    generator = BlockMaskGenerator()
    random.seed(1)
    np.random.seed(1)
    first = [generator(np.random.default_rng(7)) for _ in range(3)]
    random.seed(2)
    np.random.seed(2)
    rng = np.random.default_rng(7)
    assert np.array_equal(first[0], generator(rng))
    assert all(np.array_equal(first[0], m) for m in first)
    other_seed = [generator(np.random.default_rng(seed)) for seed in range(8, 12)]
    assert not any(np.array_equal(first[0], m) for m in other_seed)
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    assert all(np.array_equal(generator(rng_a), generator(rng_b)) for _ in range(20))


def test_custom_grid_and_limits():
    generator = BlockMaskGenerator(grid=(8, 12), num_masking_patches=30, min_num_patches=4, max_num_patches=10)
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = generator(rng)
        assert mask.shape == (8, 12)
        assert 20 <= mask.sum() <= 30
    assert "num_masking_patches=30" in repr(generator)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_masking_patches=300), "num_masking_patches 300"),
        (dict(num_masking_patches=0), "num_masking_patches 0"),
        (dict(min_num_patches=0), "min_num_patches"),
        (dict(min_aspect=0.0), "min_aspect"),
    ],
)
def test_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlockMaskGenerator(**kwargs)
