"""The ViT backbone: variants, EVA-g size against timm, init, attention paths, precision."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.eva import Eva

from eva.vit import VARIANTS, Attention, LayerNorm, VisionTransformer, create_vit, timm_eva_kwargs, timm_model_name

EVA_G_BACKBONE_PARAMS = 1_011_146_112  # EVA-01 paper: 1,011.1M
TRUNC_STD = 0.015 * 0.53956  # std of a normal truncated at +-1 std


def twin(model: VisionTransformer, **changes) -> VisionTransformer:
    """Same weights, some constructor kwargs changed."""
    other = VisionTransformer(**{**model.kwargs, **changes})
    other.load_state_dict(model.state_dict())
    return other


def test_variants_build_with_their_grid():
    torch.manual_seed(0)
    tiny = create_vit("tiny")
    assert (tiny.img_size, tiny.patch_size, tiny.grid_size, tiny.num_patches, tiny.embed_dim) == (64, 8, (8, 8), 64, 96)
    assert tiny.pos_embed.shape == (1, 65, 96) and tiny.cls_token.shape == (1, 1, 96)
    assert len(tiny.blocks) == 4
    assert tiny.forward_features(torch.randn(2, 3, 64, 64)).shape == (2, 65, 96)
    assert tiny.no_weight_decay() <= dict(tiny.named_parameters()).keys()
    # kwargs rebuild the same architecture
    assert {k: v.shape for k, v in VisionTransformer(**tiny.kwargs).state_dict().items()} == {
        k: v.shape for k, v in tiny.state_dict().items()
    }
    for name in ("small", "base", "large", "giant"):
        assert VARIANTS[name]["img_size"] // VARIANTS[name]["patch_size"] == 16  # CLIP-L/14 target grid
    assert create_vit("tiny", drop_path_rate=0.1).kwargs["drop_path_rate"] == 0.1


def test_create_vit_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"'huge'.*tiny, small, base, large, giant"):
        create_vit("huge")
    with pytest.raises(ValueError, match="drop_path"):
        create_vit("tiny", drop_path=0.1)
    with pytest.raises(ValueError, match="not divisible"):
        create_vit("tiny", img_size=60)


def test_eva_giant_matches_timm_architecture_on_meta_device():
    with torch.device("meta"):
        ours = create_vit("giant")
        theirs = timm.create_model("eva_giant_patch14_224", pretrained=False, num_classes=0, global_pool="token")
    assert sum(p.numel() for p in ours.parameters()) == EVA_G_BACKBONE_PARAMS
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert timm_model_name(ours.kwargs) == "eva_giant_patch14_224"
    with torch.device("meta"):  # the kwargs an export records rebuild it in timm too
        rebuilt = Eva(**timm_eva_kwargs(ours.kwargs))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert timm_model_name(create_vit("tiny").kwargs) is None
    # training knobs do not change the architecture; an input size does
    assert timm_model_name({**VARIANTS["giant"], "drop_path_rate": 0.1, "fused_attn": False}) == "eva_giant_patch14_224"
    assert timm_model_name({**VARIANTS["giant"], "img_size": 336}) is None


def test_init_follows_eva():
    torch.manual_seed(0)
    model = create_vit("tiny", embed_dim=192, num_heads=3, mlp_hidden_dim=768)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        elif ".norm" in name or name.startswith("norm."):
            assert torch.all(p == 1), name
        else:  # weights, pos_embed, cls_token: truncated normal std 0.015 cut at +-0.015
            assert p.abs().max() <= 0.015, name
            assert p.std() > 0.3 * TRUNC_STD, name
    for name in ("blocks.0.attn.qkv.weight", "blocks.2.mlp.fc1.weight", "patch_embed.proj.weight", "pos_embed"):
        assert model.get_parameter(name).std().item() == pytest.approx(TRUNC_STD, rel=0.05), name
    for i, blk in enumerate(model.blocks, start=1):  # BEiT rescale of residual outputs
        for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
            assert w.std().item() == pytest.approx(TRUNC_STD / math.sqrt(2 * i), rel=0.05)
            assert w.abs().max() <= 0.015 / math.sqrt(2 * i) + 1e-9
    assert not hasattr(model.blocks[0].attn, "k_bias")  # no k bias (BEiT)
    assert isinstance(model.blocks[0].mlp.act, torch.nn.GELU) and model.blocks[0].mlp.act.approximate == "none"
    assert model.norm.eps == 1e-6 and model.blocks[0].norm1.eps == 1e-6


def saved_activation_bytes(model: VisionTransformer, x: torch.Tensor) -> tuple[int, dict[str, torch.Tensor], torch.Tensor]:
    """Bytes autograd keeps for backward (parameters excluded), the gradients, and the output."""
    params = {p.data_ptr() for p in model.parameters()}
    saved = []

    def pack(tensor):
        if tensor.data_ptr() not in params:
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.forward_features(x)
    out.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return sum(saved), grads, out.detach()


def test_grad_checkpointing_gives_the_same_gradients_with_fewer_saved_activations():
    torch.manual_seed(0)
    model = create_vit("tiny", drop_path_rate=0.3).train()  # drop path: recomputation must redraw the same mask
    x = torch.randn(4, 3, 64, 64)
    torch.manual_seed(1)
    plain_bytes, plain_grads, plain_out = saved_activation_bytes(model, x)
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    ckpt_bytes, ckpt_grads, ckpt_out = saved_activation_bytes(model, x)
    assert torch.equal(plain_out, ckpt_out)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert ckpt_bytes < plain_bytes / 3, (ckpt_bytes, plain_bytes)  # block inputs only, not their insides
    assert "grad_checkpointing" not in model.kwargs  # a runtime choice: checkpoints and exports do not carry it


def test_float8_matmuls_follow_the_exact_model_and_keep_less_for_backward():
    torch.manual_seed(0)
    model = create_vit("tiny").train()
    x = torch.randn(16, 3, 64, 64)  # 16 x 65 tokens: rows a multiple of 16, as float8 matmuls need
    exact_bytes, exact_grads, exact_out = saved_activation_bytes(model, x)
    keys = model.state_dict().keys()
    model.set_float8_matmuls(True)
    fp8_bytes, fp8_grads, fp8_out = saved_activation_bytes(model, x)
    assert not torch.allclose(fp8_out, exact_out, rtol=1e-3, atol=1e-3)  # the blocks did run in float8
    assert F.cosine_similarity(fp8_out.flatten(), exact_out.flatten(), dim=0) > 0.999
    for name, grad in exact_grads.items():
        assert F.cosine_similarity(fp8_grads[name].flatten(), grad.flatten(), dim=0) > 0.99, name
    assert fp8_bytes < 0.8 * exact_bytes, (fp8_bytes, exact_bytes)  # linear inputs kept as 1-byte float8
    assert model.state_dict().keys() == keys and "float8_matmuls" not in model.kwargs  # a runtime choice
    model.set_float8_matmuls(False)
    assert torch.equal(model.forward_features(x), exact_out)


def test_drop_path_is_linear_over_depth_and_off_in_eval():
    torch.manual_seed(0)
    model = create_vit("tiny", drop_path_rate=0.3)
    rates = [getattr(blk.drop_path1, "p", 0.0) for blk in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    x = torch.randn(4, 3, 64, 64)
    model.eval()
    assert torch.equal(model.forward_features(x), model.forward_features(x))
    model.train()
    assert not torch.allclose(model.forward_features(x), model.forward_features(x))


def test_sdpa_matches_explicit_attention_forward_and_backward():
    torch.manual_seed(0)
    fused = create_vit("tiny")
    explicit = twin(fused, fused_attn=False)
    assert not explicit.blocks[0].attn.fused_attn
    x = torch.randn(3, 3, 64, 64)
    out_fused, out_explicit = fused.forward_features(x), explicit.forward_features(x)
    torch.testing.assert_close(out_fused, out_explicit, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(out_fused)
    (out_fused * weights).sum().backward()
    (out_explicit * weights).sum().backward()
    for (name, a), b in zip(fused.named_parameters(), explicit.parameters()):
        assert (a.grad - b.grad).abs().max() <= 1e-5 * a.grad.abs().max(), name  # fp32 rounding only


@pytest.mark.parametrize("fused_attn", [True, False])
def test_bf16_autocast_is_finite_and_close_to_fp32(fused_attn):
    torch.manual_seed(0)
    model = create_vit("tiny", fused_attn=fused_attn).eval()
    x = torch.randn(2, 3, 64, 64)
    reference = model.forward_features(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_features(x)
    assert torch.isfinite(out).all()
    assert F.cosine_similarity(out.float(), reference, dim=-1).min() > 0.99


@pytest.mark.parametrize("fused_attn", [True, False])
def test_attention_logits_do_not_overflow_in_fp16(fused_attn):
    """q.k of 5e5 overflows fp16 (max 65504): the logits must be held in fp32."""
    torch.manual_seed(0)
    attn = Attention(dim=64, num_heads=2, fused_attn=fused_attn)
    with torch.no_grad():
        attn.qkv.weight.zero_()
        attn.q_bias.fill_(300.0)  # q = 300
        attn.qkv.weight[64:128].fill_(300.0 / 64)  # k = 300 for inputs of ones
        attn.v_bias.copy_(torch.randn(64))
    attn = attn.half()
    x = (1 + 0.001 * torch.randn(2, 5, 64)).half()
    out = attn(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    reference = Attention(dim=64, num_heads=2, fused_attn=False)
    reference.load_state_dict({k: v.float() for k, v in attn.state_dict().items()})
    torch.testing.assert_close(out.float(), reference(x.float()), atol=0.05, rtol=0.01)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layernorm_computes_in_fp32_for_half_inputs(device, dtype):
    """Output and gradients equal the explicit fp32 computation (on CUDA the half kernel is called
    directly: at most one rounding step apart)."""
    norm = LayerNorm(1408, eps=1e-6).to(device, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 1408))
        norm.bias.copy_(torch.linspace(-0.1, 0.1, 1408))
    x = (300 + torch.randn(64, 1408, device=device)).to(dtype).requires_grad_()  # x^2 exceeds the fp16 range
    out = norm(x)
    x32, w32, b32 = (t.detach().float().requires_grad_() for t in (x, norm.weight, norm.bias))
    expected = F.layer_norm(x32, (1408,), w32, b32, 1e-6)
    grad = torch.randn_like(expected)
    out.backward(grad.to(dtype))
    expected.backward(grad.to(dtype).float())
    one_step = torch.finfo(dtype).eps  # relative spacing of the half type
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected.to(dtype).float(), rtol=one_step, atol=one_step)
    for ours, reference in ((x, x32), (norm.weight, w32), (norm.bias, b32)):
        torch.testing.assert_close(ours.grad.float(), reference.grad.to(dtype).float(), rtol=2 * one_step, atol=2 * one_step)


def test_half_model_forward_is_finite_and_close_to_fp32():
    torch.manual_seed(0)
    model = create_vit("tiny").eval()
    x = torch.randn(2, 3, 64, 64)
    reference = model.forward_features(x)
    out = twin(model).half().eval().forward_features(x.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert F.cosine_similarity(out.float(), reference, dim=-1).min() > 0.99


def test_forward_features_rejects_bad_inputs():
    model = create_vit("tiny")
    token = torch.zeros(1, 1, 96)
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
        model.forward_features(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="together"):
        model.forward_features(torch.randn(1, 3, 64, 64), mask=torch.zeros(1, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        model.forward_features(torch.randn(1, 3, 64, 64), torch.zeros(1, 63, dtype=torch.bool), token)
    with pytest.raises(ValueError, match="mask must be bool"):
        model.forward_features(torch.randn(1, 3, 64, 64), torch.zeros(1, 64), token)
