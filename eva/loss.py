"""EVA's MIM loss: negative cosine similarity between predicted and teacher features."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def negative_cosine_loss(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """-cos(pred, target) per row, averaged over rows: [..., D], [..., D] -> scalar in [-1, 1].

    With `valid` (bool, pred's shape without D) the mean is over the valid rows only: padded
    predictions (eva.mim.MaskedPredictions) without selecting rows, which would wait for the device.
    Computed in fp32 whatever the input dtypes or autocast state (EVA casts both to float).
    """
    if pred.ndim < 2 or pred.shape != target.shape:
        raise ValueError(f"pred and target must both be [..., D] with the same shape, got {list(pred.shape)} and {list(target.shape)}")
    if valid is not None and valid.shape != pred.shape[:-1]:
        raise ValueError(f"valid must be {list(pred.shape[:-1])} (pred's rows), got {list(valid.shape)}")
    if pred[..., 0].numel() == 0:
        raise ValueError("negative_cosine_loss needs at least one masked token, got none")
    with torch.autocast(pred.device.type, enabled=False):
        cosine = F.cosine_similarity(pred.float(), target.float(), dim=-1)
        if valid is None:
            return -cosine.mean()
        return -torch.where(valid, cosine, 0.0).sum() / valid.sum()  # NaN if no row is valid: the loop reports it
