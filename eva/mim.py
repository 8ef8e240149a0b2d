"""The MIM model: backbone with a learned mask token, and a linear head to the teacher's feature dim.

BEiT-style, as EVA-01: masked patch embeddings are replaced by the mask token, every token goes
through every block, and the head predicts teacher features for the masked tokens only. Since
nothing else is read, the last block computes outputs for the masked tokens only (attending to
all of them): the same predictions and gradients for less work.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from eva.vit import VisionTransformer, create_vit, init_trunc_normal_


class MaskedPredictions(NamedTuple):
    """The head's output for each image's masked patches, padded to a common width.

    Row q of image b predicts patch `index[b, q]`; rows past that image's masked count are padding
    (`valid` False). Fixed shapes, so the training step never waits on the device for a count.
    """

    pred: Tensor   # [B, Q, target_dim]
    index: Tensor  # [B, Q] patch index (0..N-1) of each row: masked patches in patch order, then padding
    valid: Tensor  # [B, Q] bool, False for padding

    def rows(self) -> Tensor:
        """[M, target_dim], M = mask.sum(): the valid rows in `tensor[mask]` order (reads the device)."""
        return self.pred[self.valid]

    def gather(self, per_patch: Tensor) -> Tensor:
        """[B, N, D] per-patch values (teacher targets) -> [B, Q, D], row for row with `pred`."""
        return per_patch.gather(1, self.index.unsqueeze(-1).expand(-1, -1, per_patch.shape[-1]))


class MIMModel(nn.Module):
    def __init__(self, backbone: VisionTransformer, target_dim: int):
        super().__init__()
        self.backbone = backbone
        self.target_dim = target_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.embed_dim))
        self.head = nn.Linear(backbone.embed_dim, target_dim)
        with torch.no_grad():
            init_trunc_normal_(self.mask_token)
            init_trunc_normal_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, images: Tensor, mask: Tensor, width: int | None = None) -> MaskedPredictions:
        """[B, 3, H, W] images, [B, N] bool mask -> predictions for the masked patches.

        `width`: rows per image, at least the largest masked count per image (the mask generator's
        `num_masking_patches` bounds it). Training passes it: fixed shapes, and no wait on the device.
        Left out, it is read from the mask, which waits for the device.
        """
        counts = mask.sum(1)  # [B]
        if width is None:
            width = int(counts.max())
        elif not 0 < width <= mask.shape[1]:
            raise ValueError(f"width {width} must be in [1, {mask.shape[1]}] (patches per image)")
        else:  # checked on the device without waiting for it; a larger count would lose masked patches
            torch._assert_async(counts.max() <= width)
        # The last block computes only the masked tokens (the loss reads nothing else): their
        # indices per image in patch order, then unmasked ones as padding.
        index = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :width]  # [B, Q]
        valid = torch.arange(width, device=mask.device) < counts.unsqueeze(1)          # [B, Q]
        x = self.backbone.forward_tokens(images, mask, self.mask_token, last_queries=index + 1)  # +1: cls token
        return MaskedPredictions(self.head(self.backbone.norm(x)), index, valid)  # LayerNorm is per token

    def no_weight_decay(self) -> set[str]:
        # BEiT's and EVA-02's pretraining models: pos_embed and cls_token; the mask token is decayed
        return {f"backbone.{name}" for name in self.backbone.no_weight_decay()}


def create_mim_model(variant: str, target_dim: int, **overrides) -> MIMModel:
    """MIMModel around a named backbone variant (see eva.vit.VARIANTS), with backbone overrides."""
    return MIMModel(create_vit(variant, **overrides), target_dim)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices only; none on the model's `no_weight_decay()`
    names (position embedding, cls token), biases and other 1-d parameters (norms)."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name in skip or name.endswith(".bias") or param.ndim <= 1:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
