"""EVA-01 Vision Transformer backbone: BEiT-style pre-norm ViT with learned absolute position embedding.

Module and parameter names are those of timm's `Eva` (`timm/models/eva.py`), so the backbone's
state dict loads into `timm.models.eva.Eva(**timm_eva_kwargs(kwargs))` unchanged: see
`checkpoint_filter_fn` and `timm_eva_kwargs`.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from eva.float8 import float8_linear

INIT_STD = 0.015  # EVA/BEiT: truncated normal cut at +-1 std

# Architectures by name. All but "tiny" use EVA's 224px / patch-14 input (a 16x16 grid, matching
# CLIP-L/14 targets); "tiny" is the CPU test size: 64px / patch 8, an 8x8 grid like the tiny teacher.
VARIANTS: dict[str, dict] = {
    "tiny": dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, mlp_hidden_dim=384),
    "small": dict(img_size=224, patch_size=14, embed_dim=384, depth=12, num_heads=6, mlp_hidden_dim=1536),
    "base": dict(img_size=224, patch_size=14, embed_dim=768, depth=12, num_heads=12, mlp_hidden_dim=3072),
    "large": dict(img_size=224, patch_size=14, embed_dim=1024, depth=24, num_heads=16, mlp_hidden_dim=4096),
    # EVA-g (EVA-01): 1,011.1M backbone parameters, the architecture of timm's eva_giant_patch14_224
    "giant": dict(img_size=224, patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_hidden_dim=6144),
}

# timm model names whose architecture equals one of ours (exported files record it)
TIMM_MODEL_NAMES = {"giant": "eva_giant_patch14_224"}
ARCHITECTURE_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_hidden_dim", "ln_eps")
TIMM_LN_EPS = 1e-6  # timm's Eva default norm layer


def init_trunc_normal_(t: Tensor) -> Tensor:
    return nn.init.trunc_normal_(t, std=INIT_STD, a=-INIT_STD, b=INIT_STD)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (EVA's fp16 recipe); returns the input dtype.

    Needed for half weights (DeepSpeed fp16/bf16 engines); autocast itself never lowers layer_norm.
    On CUDA the half kernel already reads half, computes in fp32 and writes half, so it is called
    directly: the same numbers as the explicit upcast without its three extra passes over memory.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda and x.dtype == self.weight.dtype:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        y = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2:] != (self.img_size, self.img_size):
            raise ValueError(f"images must be [B, 3, {self.img_size}, {self.img_size}], got {list(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D]


class Attention(nn.Module):
    """Multi-head self-attention with q and v biases but no k bias (BEiT/EVA).

    `fused_attn` picks F.scaled_dot_product_attention; the explicit path is kept for checks. Both
    hold the logits q.k in fp32 under fp16/bf16: the explicit path casts, and every SDPA backend
    accumulates q.k and the softmax in fp32 (flash/memory-efficient kernels by design, the math
    backend because torch upcasts half inputs unless allow_fp16_bf16_reduction_math_sdp is set).
    """

    def __init__(self, dim: int, num_heads: int, fused_attn: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.linear = F.linear  # or eva.float8.float8_linear: VisionTransformer.set_float8_matmuls

    def forward(self, x: Tensor, queries: Tensor | None = None) -> Tensor:
        """[B, T, D] -> [B, T, D]; with `queries` ([B, Q] token indices) only those tokens' outputs,
        [B, Q, D], still attending to all T tokens."""
        B, T, D = x.shape
        qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))  # k has no bias
        qkv = self.linear(x, self.qkv.weight, qkv_bias).reshape(B, T, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, h, T, d] each
        rows = T
        if queries is not None:
            rows = queries.shape[1]
            q = q.gather(2, queries[:, None, :, None].expand(B, self.num_heads, rows, self.head_dim))  # [B, h, Q, d]
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            with torch.autocast(x.device.type, enabled=False):
                attn = (q.float() * self.scale) @ k.float().transpose(-2, -1)  # [B, h, T or Q, T]
                attn = attn.softmax(dim=-1)
            x = attn.to(v.dtype) @ v
        return self.linear(x.transpose(1, 2).reshape(B, rows, D), self.proj.weight, self.proj.bias)  # [B, T or Q, D]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()  # exact (erf) GELU
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.linear = F.linear  # or eva.float8.float8_linear: VisionTransformer.set_float8_matmuls

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.act(self.linear(x, self.fc1.weight, self.fc1.bias))
        return self.linear(hidden, self.fc2.weight, self.fc2.bias)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        keep = 1.0 - self.p
        return x * x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(keep) / keep


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden_dim: int, drop_path: float, fused_attn: bool, ln_eps: float):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=ln_eps)
        self.attn = Attention(dim, num_heads, fused_attn)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=ln_eps)
        self.mlp = Mlp(dim, mlp_hidden_dim)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, queries: Tensor | None = None) -> Tensor:
        """[B, T, D] -> [B, T, D], or [B, Q, D] for the tokens `queries` ([B, Q] indices) names."""
        shortcut = x if queries is None else x.gather(1, queries.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = shortcut + self.drop_path1(self.attn(self.norm1(x), queries))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 14,
        embed_dim: int = 1408,
        depth: int = 40,
        num_heads: int = 16,
        mlp_hidden_dim: int = 6144,
        drop_path_rate: float = 0.0,
        fused_attn: bool = True,
        ln_eps: float = 1e-6,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.kwargs = dict(
            img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_hidden_dim=mlp_hidden_dim, drop_path_rate=drop_path_rate, fused_attn=fused_attn, ln_eps=ln_eps,
        )
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.embed_dim = embed_dim

        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim))
        # drop path grows linearly over depth (plain floats: works under torch.device("meta"))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_hidden_dim, rate, fused_attn, ln_eps) for rate in rates
        )
        self.norm = LayerNorm(embed_dim, eps=ln_eps)
        self.grad_checkpointing = False  # runtime choices, not architecture: not in kwargs
        self.float8_matmuls = False
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                init_trunc_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        init_trunc_normal_(self.pos_embed)
        init_trunc_normal_(self.cls_token)
        # BEiT's rescale: residual branch outputs shrink with depth (block i is 1-based)
        for i, blk in enumerate(self.blocks, start=1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * i))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * i))

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of keeping them: about a third
        more compute for one block's activations instead of all of them (EVA-g on 40 GB cards).
        Drop path draws the same mask when recomputing (checkpoint restores the RNG state)."""
        self.grad_checkpointing = enable

    def set_float8_matmuls(self, enable: bool = True) -> None:
        """Run the blocks' linear layers (qkv, proj, fc1, fc2) as float8 matmuls (eva.float8): on
        H100-class GPUs, for speed; not EVA-01's recipe. Patch embedding and heads are untouched."""
        linear = float8_linear if enable else F.linear
        for blk in self.blocks:
            blk.attn.linear = blk.mlp.linear = linear
        self.float8_matmuls = enable

    def forward_features(self, x: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None) -> Tensor:
        """[B, 3, H, W] images -> [B, 1+N, D] tokens after the final norm (see `forward_tokens`)."""
        return self.norm(self.forward_tokens(x, mask, mask_token))

    def forward_tokens(self, x: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None,
                       last_queries: Tensor | None = None) -> Tensor:
        """[B, 3, H, W] images -> [B, 1+N, D] tokens after the last block, before the final norm
        (per token, so a caller that needs a few tokens normalises only those).

        With `mask` ([B, N] bool, True = masked) the patch embeddings of masked patches are replaced
        by `mask_token` ([1, 1, D]) before the position embedding is added (BEiT); every token goes
        through every block. With `last_queries` ([B, Q] token indices) the last block computes
        only those tokens, [B, Q, D]: the others' outputs would be thrown away.
        """
        if (mask is None) != (mask_token is None):
            raise ValueError("mask and mask_token must be given together")
        x = self.patch_embed(x)  # [B, N, D]
        if mask is not None:
            if mask.dtype != torch.bool or mask.shape != x.shape[:2]:
                raise ValueError(f"mask must be bool [{x.shape[0]}, {self.num_patches}], got {mask.dtype} {list(mask.shape)}")
            x = torch.where(mask.unsqueeze(-1), mask_token, x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed  # [B, 1+N, D]
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled()
        for i, blk in enumerate(self.blocks):
            queries = last_queries if i == len(self.blocks) - 1 else None
            x = checkpoint(blk, x, queries, use_reentrant=False) if checkpointing else blk(x, queries)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)


def _default_kwargs() -> dict:
    params = list(inspect.signature(VisionTransformer.__init__).parameters.values())[1:]
    return {p.name: p.default for p in params}


def create_vit(name: str, **overrides) -> VisionTransformer:
    """A named variant from VARIANTS, with keyword overrides (e.g. drop_path_rate=0.1)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown ViT variant {name!r}; known variants: {', '.join(VARIANTS)}")
    unknown = sorted(set(overrides) - set(_default_kwargs()))
    if unknown:
        raise ValueError(f"unknown VisionTransformer arguments {unknown} for variant {name!r}; known: {sorted(_default_kwargs())}")
    return VisionTransformer(**{**VARIANTS[name], **overrides})


def checkpoint_filter_fn(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Backbone weights in timm's `Eva` key layout from a VisionTransformer or MIMModel state dict.

    Our names are timm's, so this only keeps the MIM wrapper's `backbone.` entries (dropping its
    mask token and head) and strips the prefix. timm's zero k bias is a non-persistent buffer.
    """
    prefix = "backbone."
    if not any(k.startswith(prefix) for k in state_dict):
        return dict(state_dict)
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def timm_eva_kwargs(model_kwargs: dict) -> dict:
    """Arguments for `timm.models.eva.Eva` that build this backbone: the final norm on every token
    (global_pool="token") and no classifier head, so timm's forward_features equals ours."""
    dim, hidden = model_kwargs["embed_dim"], model_kwargs["mlp_hidden_dim"]
    mlp_ratio = hidden / dim
    if int(dim * mlp_ratio) != hidden:  # timm sizes the MLP as int(dim * mlp_ratio)
        raise ValueError(f"mlp_hidden_dim {hidden} cannot be expressed as timm's int(embed_dim * mlp_ratio)")
    if model_kwargs["ln_eps"] != TIMM_LN_EPS:
        raise ValueError(f"ln_eps {model_kwargs['ln_eps']} differs from timm Eva's LayerNorm eps {TIMM_LN_EPS}")
    return dict(
        img_size=model_kwargs["img_size"], patch_size=model_kwargs["patch_size"], embed_dim=dim,
        depth=model_kwargs["depth"], num_heads=model_kwargs["num_heads"], mlp_ratio=mlp_ratio,
        qkv_bias=True, global_pool="token", num_classes=0,
    )


def timm_model_name(model_kwargs: dict) -> str | None:
    """The timm model name with exactly this architecture, if there is one."""
    def architecture(kwargs: dict) -> tuple:
        full = {**_default_kwargs(), **kwargs}
        return tuple(full[k] for k in ARCHITECTURE_KEYS)

    for variant, timm_name in TIMM_MODEL_NAMES.items():
        if architecture(model_kwargs) == architecture(VARIANTS[variant]):
            return timm_name
    return None
