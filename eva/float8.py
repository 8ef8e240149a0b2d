"""Float8 matmuls for the blocks' linear layers: an option for GPUs with float8 tensor cores
(compute capability 8.9+: H100, L40S, ...), not EVA-01's recipe.

Matmuls are ~60% of an EVA-g step's device time; H100 runs float8 at twice the rate of bf16.
Each linear layer's three matmuls (output, input gradient, weight gradient) run in float8 with
fp32 accumulation and write the usual dtype. Scaling is per tensor and dynamic, the "tensorwise"
recipe of Transformer Engine and torchao: each operand is scaled so that its largest magnitude
lands on the format's largest value, then cast. Activations and weights use e4m3 (more mantissa),
gradients e5m2 (more range). Weights, optimizer, norms, attention and residuals stay as they
were. A layer's input is kept for backward in float8, half the memory of bf16.

A non-finite operand gives a non-finite result (its scale becomes 0 or NaN), so an fp16 overflow
still reaches DeepSpeed's loss scaler and the step is skipped as without float8.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATION_DTYPE = torch.float8_e4m3fn
GRADIENT_DTYPE = torch.float8_e5m2
# torch._scaled_mm on CUDA needs every dimension a multiple of 16; other shapes take F.linear
DIM_MULTIPLE = 16
AMAX_FLOOR = 1e-12  # an all-zero tensor keeps a finite scale
MIN_CAPABILITY = (8, 9)


def float8_support_error(device: torch.device, capability: tuple[int, int] | None = None) -> str | None:
    """Why float8 matmuls cannot run on `device`, or None. CPU runs them (slowly: tests)."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"float8 matmuls run on CUDA (compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+) or CPU, not {device.type}"
    capability = capability or torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_CAPABILITY:
        return (f"float8 matmuls need compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (H100, L40S, ...); "
                f"{device} has {capability[0]}.{capability[1]}")
    return None


def to_float8(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(x scaled so max |x| is the largest `dtype` value and cast to it, the inverse scale as fp32)."""
    largest = torch.finfo(dtype).max
    scale = largest / x.abs().amax().float().clamp(min=AMAX_FLOOR)
    return (x.float() * scale).clamp(-largest, largest).to(dtype), scale.reciprocal()


def _column_major(x: Tensor) -> Tensor:
    """The same matrix laid out column by column: _scaled_mm's second operand must be."""
    return x.t().contiguous().t()


class _Float8Matmul(torch.autograd.Function):
    """[M, K] @ [N, K]^T with float8 operands, in both directions."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        # casts keep their input's strides, and _scaled_mm's first operand must be row-major
        x8, x_inverse = to_float8(x.contiguous(), ACTIVATION_DTYPE)
        w8, w_inverse = to_float8(weight.contiguous(), ACTIVATION_DTYPE)
        ctx.save_for_backward(x8, x_inverse, w8, w_inverse)
        ctx.weight_dtype = weight.dtype
        # fast accumulation in the forward, full-precision accumulation for gradients (as torchao does)
        return torch._scaled_mm(x8, w8.t(), scale_a=x_inverse, scale_b=w_inverse, out_dtype=x.dtype, use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor]:
        x8, x_inverse, w8, w_inverse = ctx.saved_tensors
        g8, g_inverse = to_float8(grad_out.contiguous(), GRADIENT_DTYPE)
        grad_x = torch._scaled_mm(g8, _column_major(w8), scale_a=g_inverse, scale_b=w_inverse, out_dtype=grad_out.dtype)
        grad_w = torch._scaled_mm(g8.t().contiguous(), _column_major(x8), scale_a=g_inverse, scale_b=x_inverse,
                                  out_dtype=ctx.weight_dtype)
        return grad_x, grad_w


def float8_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear` with float8 matmuls. A shape _scaled_mm cannot take (no rows, or a dimension that
    is not a multiple of 16, such as an odd batch) runs as `F.linear` instead."""
    *lead, in_features = x.shape
    rows, out_features = math.prod(lead), weight.shape[0]
    if not rows or rows % DIM_MULTIPLE or in_features % DIM_MULTIPLE or out_features % DIM_MULTIPLE:
        return F.linear(x, weight, bias)
    out = _Float8Matmul.apply(x.reshape(rows, in_features), weight).reshape(*lead, out_features)
    return out if bias is None else out + bias
