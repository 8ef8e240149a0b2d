"""EVA's MIM loss: negative cosine similarity between predicted and teacher features."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def negative_cosine_loss(pred: Tensor, target: Tensor) -> Tensor:
    """-cos(pred, target) per row, averaged over rows: [M, D], [M, D] -> scalar in [-1, 1].

    Computed in fp32 whatever the input dtypes or autocast state (EVA casts both to float).
    """
    if pred.ndim != 2 or pred.shape != target.shape:
        raise ValueError(f"pred and target must both be [M, D] with the same shape, got {list(pred.shape)} and {list(target.shape)}")
    if pred.shape[0] == 0:
        raise ValueError("negative_cosine_loss needs at least one masked token, got M = 0")
    with torch.autocast(pred.device.type, enabled=False):
        return -F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()
