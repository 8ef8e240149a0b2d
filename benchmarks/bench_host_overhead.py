"""Host time per training step outside the model's own work: the trainer's DeepSpeed ZeRO-1 step
against plain torch, with EVA-g's 529 parameter tensors, on the CPU.

A GPU idles whenever its host has queued nothing. DeepSpeed's ZeRO-1 (stage 1, no overlap_comm)
reduces the gradients in a Python loop over the tensors after the backward (with its default
contiguous buffer: two copies per tensor), and its step walks the tensors again. That host cost depends on the number
of tensors, not their size. So this runs EVA-g's layout (40 blocks: 529 tensors with the MIM head)
at a toy width, where the model's own compute is small. Both sides run the same forward, loss
and backward in bf16. Ours: `eva.train.engine.build_engine` (the trainer's engine). Plain:
foreach AdamW with foreach clipping. Rounds alternate between the two; each phase is a median
over rounds. Prints one JSON object.

    python benchmarks/bench_host_overhead.py [--rounds 20] [--steps-per-round 5] [--zero contiguous_gradients=true]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from eva.loss import negative_cosine_loss
from eva.masking import BlockMaskGenerator
from eva.mim import create_mim_model, param_groups
from eva.train import engine as engine_lib
from eva.train.config import config_from_dict
from gpu_train_step import use_deepspeed_overrides  # benchmarks/, this script's directory
from report import emit, machine

# EVA-g's depth (so its tensor count) at a width where the model's own compute is a few ms
TOY_GIANT = dict(depth=40, embed_dim=32, num_heads=2, mlp_hidden_dim=64, img_size=32, patch_size=8)
PHASES = ("forward", "backward", "step")


def timed_step(forward, backward, step) -> dict[str, float]:
    """Milliseconds of each phase of one training step."""
    times, start = {}, time.perf_counter()
    for name, phase in zip(PHASES, (forward, backward, step)):
        loss = phase() if name == "forward" else phase(loss)
        now = time.perf_counter()
        times[name], start = (now - start) * 1e3, now
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps-per-round", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--zero", action="append", default=[], metavar="KEY=JSON",
                        help="extra DeepSpeed zero_optimization setting for our engine (diagnosis), e.g. overlap_comm=true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    zero = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.zero)}
    torch.set_num_threads(1)  # host time: one thread, as the training process's Python runs

    cfg = config_from_dict({"model": {"name": "tiny"}, "data": {"train": "unused"}, "run_dir": "unused", "precision": "bf16",
                            "train": {"steps": 10, "batch_size": args.batch, "lr": 1e-4, "warmup_steps": 0}})
    dist_info = engine_lib.init_distributed()
    torch.manual_seed(0)
    ours_model = create_mim_model("tiny", 16, **TOY_GIANT)
    plain_model = create_mim_model("tiny", 16, **TOY_GIANT).bfloat16()
    plain_model.load_state_dict(ours_model.state_dict())
    tensors = sum(1 for _ in ours_model.parameters())
    if zero:
        use_deepspeed_overrides({"zero_optimization": zero})
    engine = engine_lib.build_engine(ours_model, cfg, dist_info)
    optimizer = torch.optim.AdamW(param_groups(plain_model, 0.05), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, foreach=True)

    grid = ours_model.backbone.grid_size
    masker = BlockMaskGenerator(grid, grid[0] * grid[1] * 105 // 256 or 1, 1)
    rng = np.random.default_rng(0)
    mask = torch.from_numpy(np.stack([masker(rng).reshape(-1) for _ in range(args.batch)]))
    size = TOY_GIANT["img_size"]
    images = torch.randn(args.batch, 3, size, size).bfloat16()
    targets = torch.randn(args.batch, grid[0] * grid[1], 16)
    width = masker.num_masking_patches

    def forward(model):
        out = model(images, mask, width)
        return negative_cosine_loss(out.pred, out.gather(targets), out.valid)

    def plain_step(_loss) -> None:
        torch.nn.utils.clip_grad_norm_(plain_model.parameters(), 3.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    runs = {
        "deepspeed": (lambda: forward(engine), engine.backward, lambda _loss: engine.step()),
        "plain": (lambda: forward(plain_model), lambda loss: loss.backward(), plain_step),
    }
    for phases in runs.values():  # warm-up: DeepSpeed allocates its buckets on the first steps
        for _ in range(3):
            timed_step(*phases)
    samples = {name: {phase: [] for phase in PHASES} for name in runs}
    for r in range(args.rounds):
        for name in runs if r % 2 == 0 else reversed(list(runs)):
            steps = [timed_step(*runs[name]) for _ in range(args.steps_per_round)]
            for phase in PHASES:
                samples[name][phase].append(float(np.mean([s[phase] for s in steps])))
    median = {name: {phase: round(float(np.median(v)), 2) for phase, v in by_phase.items()} for name, by_phase in samples.items()}
    emit({
        "benchmark": "host_overhead",
        "machine": machine(),
        "parameter_tensors": tensors,
        "zero_options": zero,
        "layout": TOY_GIANT,
        "batch": args.batch,
        "rounds": args.rounds,
        "ms_per_step": median,
        "deepspeed_extra_ms": {phase: round(median["deepspeed"][phase] - median["plain"][phase], 2) for phase in PHASES},
    }, args.out)


if __name__ == "__main__":
    main()
