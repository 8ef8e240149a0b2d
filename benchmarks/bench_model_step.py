"""Training-step throughput of our MIMModel against timm's Eva of the same size.

One step = forward + negative cosine loss on masked tokens + backward + AdamW step, for both
models on the same images, masks and targets, with the same initial weights and optimizer.
Measurements alternate between the two models round by round (and which goes first); rates are
medians over rounds and the ratio is the median of the per-round ratios, so drift and bursts of
load from other processes hit both alike. Prints one JSON object.

    python benchmarks/bench_model_step.py                                   # CPU, tiny, fp32
    python benchmarks/bench_model_step.py --device cuda --variant giant --batch 16 \
        --precision bf16 --peak-tflops 989                                  # EVA-g on an H100
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time

import numpy as np
import torch
from timm.models.eva import Eva
from torch import Tensor, nn

from eva.loss import negative_cosine_loss
from eva.masking import BlockMaskGenerator
from eva.mim import MIMModel, create_mim_model, param_groups
from eva.train.monitor import train_flops_per_image
from eva.vit import timm_eva_kwargs
from report import machine  # benchmarks/, this script's directory

EVA_MASK_RATIO = 105 / 256
EVA_MIN_BLOCK_RATIO = 16 / 256


class TimmMIM(nn.Module):
    """The same MIM model written on timm's Eva: mask token in after the patch embedding, timm's
    position embedding, blocks and norm, then the same head on the masked tokens."""

    def __init__(self, ours: MIMModel):
        super().__init__()
        self.backbone = Eva(**timm_eva_kwargs(ours.backbone.kwargs), drop_path_rate=ours.backbone.kwargs["drop_path_rate"])
        self.backbone.load_state_dict(ours.backbone.state_dict())
        self.mask_token = nn.Parameter(ours.mask_token.detach().clone())
        self.head = nn.Linear(ours.backbone.embed_dim, ours.target_dim)
        self.head.load_state_dict(ours.head.state_dict())

    def forward(self, images: Tensor, mask: Tensor) -> Tensor:
        eva = self.backbone
        x = eva.patch_embed(images)  # [B, N, D]
        x = torch.where(mask.unsqueeze(-1), self.mask_token, x)
        x, _ = eva._pos_embed(x)  # [B, 1+N, D]
        for blk in eva.blocks:
            x = blk(x)
        x = eva.norm(x)
        return self.head(x[:, 1:][mask])  # [M, target_dim]

    def no_weight_decay(self) -> set[str]:
        return {"backbone.pos_embed", "backbone.cls_token"}  # as MIMModel: the mask token is decayed


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mim_loss(model: nn.Module, images: Tensor, mask: Tensor, targets: Tensor, width: int) -> Tensor:
    """The loss as each model's trainer computes it: ours on padded predictions at the mask's
    width (as eva.train.loop does), timm's on the boolean-selected rows."""
    if isinstance(model, MIMModel):
        out = model(images, mask, width)
        return negative_cosine_loss(out.pred, out.gather(targets), out.valid)
    return negative_cosine_loss(model(images, mask), targets[mask])


def make_step(model: nn.Module, device: torch.device, precision: str, width: int):
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step(images: Tensor, mask: Tensor, targets: Tensor) -> None:
        autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with autocast:
            loss = mim_loss(model, images, mask, targets, width)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per model")
    parser.add_argument("--rounds", type=int, default=20, help="alternations between the models")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--target-dim", type=int, default=768)
    parser.add_argument("--drop-path", type=float, default=0.0)
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (e.g. 989 for H100 bf16 dense)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps % args.rounds:
        parser.error(f"--steps {args.steps} must be a multiple of --rounds {args.rounds}")

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ours = create_mim_model(args.variant, args.target_dim, drop_path_rate=args.drop_path)
    theirs = TimmMIM(ours)
    ours, theirs = ours.to(device), theirs.to(device)
    grid = ours.backbone.grid_size
    n = ours.backbone.num_patches
    masker = BlockMaskGenerator(grid, round(EVA_MASK_RATIO * n), max(1, round(EVA_MIN_BLOCK_RATIO * n)))
    width = masker.num_masking_patches
    steps = {name: make_step(model, device, args.precision, width) for name, model in (("ours", ours), ("timm", theirs))}
    rng = np.random.default_rng(args.seed)
    mask = torch.from_numpy(np.stack([masker(rng).reshape(-1) for _ in range(args.batch)])).to(device)
    size = ours.backbone.img_size
    images = torch.randn(args.batch, 3, size, size, device=device)
    targets = torch.randn(args.batch, n, args.target_dim, device=device)  # [B, N, D]

    with torch.no_grad():  # same weights and algorithm: the same predictions before training
        torch.testing.assert_close(ours.eval()(images, mask).rows(), theirs.eval()(images, mask), atol=1e-4, rtol=1e-4)
    ours.train(), theirs.train()

    for step in steps.values():
        for _ in range(args.warmup):
            step(images, mask, targets)
    synchronize(device)

    rates = {"ours": [], "timm": []}  # img/s per round
    per_round = args.steps // args.rounds
    for r in range(args.rounds):
        for name in ("ours", "timm") if r % 2 == 0 else ("timm", "ours"):
            start = time.perf_counter()
            for _ in range(per_round):
                steps[name](images, mask, targets)
            synchronize(device)
            rates[name].append(args.batch * per_round / (time.perf_counter() - start))

    img_s = {name: float(np.median(values)) for name, values in rates.items()}
    ratio = float(np.median(np.array(rates["ours"]) / np.array(rates["timm"])))
    flops = train_flops_per_image(ours.backbone.kwargs, ours.target_dim, float(mask.sum()) / args.batch)
    result = {
        "benchmark": "model_step",
        "machine": machine(device),
        "variant": args.variant,
        "precision": args.precision,
        "batch": args.batch,
        "steps": args.steps,
        "ours_img_s": round(img_s["ours"], 2),
        "timm_img_s": round(img_s["timm"], 2),
        "ratio": round(ratio, 3),
        "ratio_range": [round(float(x), 3) for x in np.percentile(np.array(rates["ours"]) / np.array(rates["timm"]), [10, 90])],
        "train_gflops_per_img": round(flops / 1e9, 3),
        "ours_tflops": round(img_s["ours"] * flops / 1e12, 3),
    }
    if args.peak_tflops:
        result["ours_mfu"] = round(img_s["ours"] * flops / (args.peak_tflops * 1e12), 4)
        result["timm_mfu"] = round(img_s["timm"] * flops / (args.peak_tflops * 1e12), 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
