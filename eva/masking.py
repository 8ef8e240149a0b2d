"""BEiT block-wise masking, as EVA-01 uses it: 105 of 16x16 patches in rectangles of >= 16 patches.

Randomness comes only from the numpy Generator passed in, so the caller (the trainer, seeded per
rank and step) fully controls determinism.
"""
from __future__ import annotations

import math

import numpy as np

MAX_TRIES_PER_BLOCK = 10  # BEiT: after 10 failed placements the mask is returned as is


class BlockMaskGenerator:
    """Draws a [H, W] bool mask (True = masked) as a union of random rectangles.

    Each rectangle has a target area uniform in [min_num_patches, patches still to mask] and an
    aspect ratio log-uniform in [min_aspect, max_aspect]. Rectangles may overlap; one is accepted
    when it adds between 1 and the remaining number of patches, so a mask never exceeds
    `num_masking_patches`, and it can fall a few short when no block fits (94-105 of 105 at 16x16).
    """

    def __init__(
        self,
        grid: tuple[int, int] = (16, 16),
        num_masking_patches: int = 105,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ):
        self.height, self.width = grid
        if not 0 < num_masking_patches <= self.height * self.width:
            raise ValueError(f"num_masking_patches {num_masking_patches} must be in [1, {self.height * self.width}] for grid {grid}")
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        if min_aspect <= 0:
            raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (
            f"BlockMaskGenerator(grid=({self.height}, {self.width}), num_masking_patches={self.num_masking_patches}, "
            f"min_num_patches={self.min_num_patches}, max_num_patches={self.max_num_patches}, "
            f"aspect=({math.exp(self.log_aspect_ratio[0]):.3g}, {math.exp(self.log_aspect_ratio[1]):.3g}))"
        )

    def _add_block(self, mask: np.ndarray, max_mask_patches: int, rng: np.random.Generator) -> int:
        """Masks one rectangle in place; returns how many patches it newly masked (0: none fitted)."""
        low, high = self.log_aspect_ratio
        for _ in range(MAX_TRIES_PER_BLOCK):
            # one draw of 4 uniforms per try: a Generator call costs more than the arithmetic
            u_area, u_aspect, u_top, u_left = rng.random(4).tolist()
            # as Python's random.uniform: below min_num_patches when few patches remain
            target_area = self.min_num_patches + (max_mask_patches - self.min_num_patches) * u_area
            aspect_ratio = math.exp(low + (high - low) * u_aspect)
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = int(u_top * (self.height - h + 1))    # uniform over 0 .. height - h
                left = int(u_left * (self.width - w + 1))
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:
                    block[...] = True
                    return new
        return 0

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masking_patches:
            max_mask_patches = min(self.num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, max_mask_patches, rng)
            if added == 0:
                break
            count += added
        return mask
