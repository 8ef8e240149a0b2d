"""The MIM wrapper (mask token, head on masked tokens), its parameter groups, and the loss."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from eva.loss import negative_cosine_loss
from eva.masking import BlockMaskGenerator
from eva.mim import MIMModel, create_mim_model, param_groups

TARGET_DIM = 32


def block_masks(batch: int, seed: int = 0) -> torch.Tensor:
    """[B, 64] bool masks for the tiny 8x8 grid, with varying counts per image."""
    generator = BlockMaskGenerator(grid=(8, 8), num_masking_patches=26, min_num_patches=4)
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([generator(rng).reshape(-1) for _ in range(batch)]))


@pytest.fixture
def model() -> MIMModel:
    torch.manual_seed(0)
    return create_mim_model("tiny", TARGET_DIM).eval()


def test_forward_returns_masked_tokens_in_boolean_index_order(model):
    images = torch.randn(4, 3, 64, 64)
    mask = block_masks(4)
    mask[0, :] = False
    mask[0, :3] = True  # counts differ per image
    assert len(set(mask.sum(1).tolist())) > 1
    pred = model(images, mask).rows()
    assert pred.shape == (int(mask.sum()), TARGET_DIM)
    # image by image, concatenated: the rows of tensor[mask]
    one_by_one = torch.cat([model(images[i : i + 1], mask[i : i + 1]).rows() for i in range(4)])
    torch.testing.assert_close(pred, one_by_one, atol=1e-5, rtol=1e-5)


def full_last_block(model: MIMModel, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The plain definition: every token through every block, then the masked ones to the head."""
    tokens = model.backbone.forward_features(images, mask, model.mask_token)
    return model.head(tokens[:, 1:][mask])


def output_and_grads(model, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`compute()` -> (output to compare, loss); backward, then the output and every gradient."""
    torch.manual_seed(1)  # drop path draws the same per-sample masks for every `compute`
    output, loss = compute()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return output.detach(), grads


def assert_same_output_and_grads(first, second, atol: float) -> None:
    (output, grads), (reference, reference_grads) = first, second
    torch.testing.assert_close(output, reference, atol=atol, rtol=1e-5)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("fused_attn", [True, False])
def test_last_block_on_masked_tokens_only_equals_the_full_computation(fused_attn):
    torch.manual_seed(0)
    model = create_mim_model("tiny", TARGET_DIM, drop_path_rate=0.2, fused_attn=fused_attn).train()
    images, mask = torch.randn(4, 3, 64, 64), block_masks(4, seed=3)
    mask[1, :] = False
    mask[1, 5] = True  # one masked patch: most of this image's query rows are padding
    targets = torch.randn(4, 64, TARGET_DIM)[mask]

    def compute(forward):
        pred = forward(images, mask)
        return pred, negative_cosine_loss(pred, targets)

    assert_same_output_and_grads(output_and_grads(model, lambda: compute(lambda i, m: model(i, m).rows())),
                                 output_and_grads(model, lambda: compute(lambda i, m: full_last_block(model, i, m))),
                                 atol=1e-5)


def test_pixels_inside_masked_patches_do_not_matter(model):
    images = torch.randn(2, 3, 64, 64)
    mask = block_masks(2, seed=1)
    pixel_mask = mask.reshape(2, 1, 8, 8).repeat_interleave(8, 2).repeat_interleave(8, 3)  # [B, 1, 64, 64]
    changed = torch.where(pixel_mask, 1e3 * torch.randn_like(images), images)
    tokens = model.backbone.forward_features(images, mask, model.mask_token)
    assert torch.equal(tokens, model.backbone.forward_features(changed, mask, model.mask_token))
    assert torch.equal(model(images, mask).rows(), model(changed, mask).rows())
    # ... while the visible pixels do
    visible_changed = torch.where(pixel_mask, images, images + 1)
    assert not torch.allclose(model(images, mask).rows(), model(visible_changed, mask).rows())


def test_training_step_reaches_every_parameter(model):
    model.train()
    images, mask = torch.randn(2, 3, 64, 64), block_masks(2)
    targets = torch.randn(2, 64, TARGET_DIM)
    loss = negative_cosine_loss(model(images, mask).rows(), targets[mask])
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_init_of_mask_token_and_head(model):
    assert model.mask_token.shape == (1, 1, 96)
    for p in (model.mask_token, model.head.weight):
        assert 0 < p.abs().max() <= 0.015
    assert torch.all(model.head.bias == 0)


def test_eva_g_mim_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = create_mim_model("giant", 768)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 1_012_229_632


def test_param_groups_exempt_embeddings_tokens_biases_and_norms(model):
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, weight_decay=0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decayed.isdisjoint(exempt) and decayed | exempt == set(names.values())
    assert model.no_weight_decay() == {"backbone.pos_embed", "backbone.cls_token"}  # as BEiT and EVA-02 pretrain
    assert model.no_weight_decay() <= exempt
    assert {"blocks.0.attn.q_bias", "blocks.0.norm1.weight", "norm.bias"} <= {n.removeprefix("backbone.") for n in exempt}
    assert all(n.endswith(".weight") and "norm" not in n for n in decayed - {"mask_token"})
    assert {"mask_token", "head.weight", "backbone.patch_embed.proj.weight", "backbone.blocks.3.mlp.fc2.weight"} <= decayed
    torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.98), eps=1e-6)


def test_loss_is_negative_cosine_in_fp32():
    pred = torch.randn(10, 16)
    assert negative_cosine_loss(pred, pred).item() == pytest.approx(-1.0)
    assert negative_cosine_loss(pred, -3 * pred).item() == pytest.approx(1.0)
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert negative_cosine_loss(orthogonal, orthogonal.flip(1)).item() == pytest.approx(0.0, abs=1e-6)
    # mean over rows: one identical row, one opposite row
    mixed = negative_cosine_loss(torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.tensor([[2.0, 2.0], [-1.0, 0.0]]))
    assert mixed.item() == pytest.approx(0.0, abs=1e-6)
    half = negative_cosine_loss(pred.half(), pred.bfloat16())
    assert half.dtype == torch.float32 and half.item() == pytest.approx(-1.0, abs=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert negative_cosine_loss(pred, pred).dtype == torch.float32


def test_loss_rejects_mismatched_or_empty_inputs():
    with pytest.raises(ValueError, match=r"\[10, 16\] and \[10, 8\]"):
        negative_cosine_loss(torch.randn(10, 16), torch.randn(10, 8))
    with pytest.raises(ValueError, match="got none"):
        negative_cosine_loss(torch.randn(0, 16), torch.randn(0, 16))
    with pytest.raises(ValueError, match=r"valid must be \[2, 5\]"):
        negative_cosine_loss(torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.ones(2, 4, dtype=torch.bool))


def test_padded_loss_equals_the_loss_over_masked_rows():
    """The training path (fixed width, padding rows weighted out) gives the loss and gradients of
    the plain definition over tensor[mask] rows; padding never leaks in, not even a NaN."""
    torch.manual_seed(0)
    model = create_mim_model("tiny", TARGET_DIM).train()
    images, mask = torch.randn(4, 3, 64, 64), block_masks(4, seed=5)
    mask[2, :] = False
    mask[2, 7] = True
    targets = torch.randn(4, 64, TARGET_DIM)
    width = int(mask.sum(1).max()) + 6  # padding rows in every image
    out = model(images, mask, width)
    assert out.pred.shape == (4, width, TARGET_DIM) and out.valid.sum() == mask.sum()
    assert torch.equal(out.gather(targets)[out.valid], targets[mask])

    def padded():
        out = model(images, mask, width)
        loss = negative_cosine_loss(out.pred, out.gather(targets), out.valid)
        return loss, loss

    def rows():
        loss = negative_cosine_loss(model(images, mask).rows(), targets[mask])
        return loss, loss

    assert_same_output_and_grads(output_and_grads(model, padded), output_and_grads(model, rows), atol=1e-6)
    pred, valid = torch.randn(2, 3, 8), torch.tensor([[True, True, False], [True, False, False]])
    pred[~valid] = float("nan")
    assert torch.isfinite(negative_cosine_loss(pred, torch.randn(2, 3, 8), valid))


def test_width_must_hold_every_masked_patch():
    model = create_mim_model("tiny", TARGET_DIM).eval()
    images, mask = torch.randn(2, 3, 64, 64), block_masks(2, seed=2)
    most = int(mask.sum(1).max())
    assert model(images, mask, most).valid.sum() == mask.sum()
    for width in (0, 65):
        with pytest.raises(ValueError, match=rf"width {width} must be in \[1, 64\]"):
            model(images, mask, width)
    with pytest.raises(RuntimeError):  # checked on the device (here: the CPU, at once)
        model(images, mask, most - 1)
