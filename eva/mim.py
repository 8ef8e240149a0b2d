"""The MIM model: backbone with a learned mask token, and a linear head to the teacher's feature dim.

BEiT-style, as EVA-01: masked patch embeddings are replaced by the mask token, every token goes
through every block, and the head predicts teacher features for the masked tokens only. Since
nothing else is read, the last block computes outputs for the masked tokens only (attending to
all of them): the same predictions and gradients for less work.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from eva.vit import VisionTransformer, create_vit, init_trunc_normal_


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

    def forward(self, images: Tensor, mask: Tensor) -> Tensor:
        """[B, 3, H, W] images, [B, N] bool mask -> [M, target_dim] predictions, M = mask.sum().

        Rows follow `tensor[mask]` order (row-major), so `loss(pred, targets[mask])` pairs them up
        whatever the number of masked patches per image.
        """
        # The last block computes only the masked tokens (the loss reads nothing else): their
        # indices per image in patch order, padded to the largest count with a repeat.
        counts = mask.sum(1)  # [B]
        order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)  # masked patches first
        width = int(counts.max())
        queries = order[:, :width] + 1  # [B, Q]: +1 skips the cls token
        x = self.backbone.forward_tokens(images, mask, self.mask_token, last_queries=queries)  # [B, Q, D]
        x = x[torch.arange(width, device=mask.device) < counts.unsqueeze(1)]  # [M, D], tensor[mask] order
        return self.head(self.backbone.norm(x))  # [M, target_dim]; LayerNorm is per token

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{name}" for name in self.backbone.no_weight_decay()} | {"mask_token"}


def create_mim_model(variant: str, target_dim: int, **overrides) -> MIMModel:
    """MIMModel around a named backbone variant (see eva.vit.VARIANTS), with backbone overrides."""
    return MIMModel(create_vit(variant, **overrides), target_dim)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices only; none on the model's `no_weight_decay()`
    names (position embedding, cls and mask tokens), biases and other 1-d parameters (norms)."""
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
