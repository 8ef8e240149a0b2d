"""Float8 matmuls (eva.float8): what they compute, in both directions, at any scale of the inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eva.float8 import ACTIVATION_DTYPE, float8_linear, float8_support_error, to_float8


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def linear_and_grads(linear, x, weight, bias, grad_out):
    x, weight, bias = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    out = linear(x, weight, bias)
    out.backward(grad_out)
    return out.detach(), x.grad, weight.grad, bias.grad


@pytest.mark.parametrize("x_scale, w_scale", [(1.0, 1.0), (1e-4, 1e3), (1e4, 1e-3)])
def test_float8_linear_follows_the_exact_matmul_at_any_input_scale(x_scale, w_scale):
    # Unscaled, 1e-4 inputs would all flush to zero in e4m3 (smallest subnormal ~2e-3)
    torch.manual_seed(0)
    x, weight = torch.randn(4, 16, 96) * x_scale, torch.randn(48, 96) * 0.02 * w_scale
    bias, grad_out = torch.zeros(48), torch.randn(4, 16, 48)
    fp8 = linear_and_grads(float8_linear, x, weight, bias, grad_out)
    exact = linear_and_grads(F.linear, x, weight, bias, grad_out)
    # e4m3 keeps 3 mantissa bits (forward), e5m2 2 (gradients): errors of a few percent
    assert relative_error(fp8[0], exact[0]) < 0.06
    assert relative_error(fp8[1], exact[1]) < 0.1 and relative_error(fp8[2], exact[2]) < 0.1
    torch.testing.assert_close(fp8[3], exact[3])  # the bias gradient is an exact sum


def test_float8_linear_computes_with_the_float8_values_of_its_operands():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(32, 64), torch.randn(80, 64), torch.randn(80)
    x8, x_inverse = to_float8(x, ACTIVATION_DTYPE)
    w8, w_inverse = to_float8(weight, ACTIVATION_DTYPE)
    assert x8.dtype == ACTIVATION_DTYPE and x8.float().abs().max() == torch.finfo(ACTIVATION_DTYPE).max
    dequantized = F.linear(x8.float() * x_inverse, w8.float() * w_inverse, bias)
    out = float8_linear(x, weight, bias)
    torch.testing.assert_close(out, dequantized, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, F.linear(x, weight, bias), rtol=1e-3, atol=1e-3)  # it did round


def test_shapes_scaled_mm_cannot_take_run_as_the_ordinary_linear():
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 96), torch.randn(48)
    for x in (torch.randn(5, 13, 96), torch.randn(16, 90), torch.randn(0, 96)):  # 65 rows; 90 features; none
        w = weight if x.shape[-1] == 96 else weight[:, :90]
        assert torch.equal(float8_linear(x, w, bias), F.linear(x, w, bias))


def test_a_non_finite_input_or_gradient_gives_non_finite_results():
    # an fp16 overflow must still reach the loss scaler, which then skips the step
    torch.manual_seed(0)
    x, weight = torch.randn(64, 96), torch.randn(48, 96)
    x[3, 5] = float("inf")
    assert not float8_linear(x, weight).isfinite().all()
    x = torch.randn(64, 96, requires_grad=True)
    weight.requires_grad_()
    grad_out = torch.randn(64, 48)
    grad_out[0, 0] = float("nan")
    float8_linear(x, weight).backward(grad_out)
    assert not x.grad.isfinite().all() and not weight.grad.isfinite().all()


def test_float8_support_error_names_the_device_and_what_it_lacks():
    assert float8_support_error(torch.device("cpu")) is None
    assert float8_support_error(torch.device("cuda", 0), (9, 0)) is None
    message = float8_support_error(torch.device("cuda", 0), (8, 0))  # A100
    assert "8.9+" in message and "cuda:0 has 8.0" in message
    assert "not mps" in float8_support_error(torch.device("mps"))


@pytest.mark.skipif(not (torch.cuda.is_available() and float8_support_error(torch.device("cuda")) is None),
                    reason="needs a CUDA device with float8 tensor cores")
@pytest.mark.parametrize("compiled", [False, True])
def test_float8_linear_on_a_float8_gpu_at_eva_g_widths(compiled):
    # CUDA's _scaled_mm wants row-major first and column-major second operands in all three
    # matmuls: the input and the incoming gradient here are laid out transposed, on purpose
    torch.manual_seed(0)
    device, dtype = torch.device("cuda"), torch.bfloat16
    x = torch.randn(2, 1408, 256, device=device, dtype=dtype).transpose(1, 2)              # [2, 256, 1408]
    weight = torch.randn(6144, 1408, device=device, dtype=dtype) * 0.02
    bias = torch.randn(6144, device=device, dtype=dtype)
    grad_out = torch.randn(2, 6144, 256, device=device, dtype=dtype).transpose(1, 2)       # [2, 256, 6144]
    linear = torch.compile(float8_linear) if compiled else float8_linear
    fp8 = linear_and_grads(linear, x, weight, bias, grad_out)
    exact = linear_and_grads(F.linear, x.float(), weight.float(), bias.float(), grad_out.float())
    assert fp8[0].dtype == dtype and fp8[2].dtype == dtype
    assert relative_error(fp8[0], exact[0]) < 0.06
    assert relative_error(fp8[1], exact[1]) < 0.1 and relative_error(fp8[2], exact[2]) < 0.1
