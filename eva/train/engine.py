"""The DeepSpeed engine: process group, ZeRO config, AdamW with EVA's settings, LR schedule, and
checkpoint I/O that never unpickles arbitrary objects.

One engine for every precision and world size: fp32, bf16 or fp16 (dynamic loss scaling), ZeRO
stage 1 by default, gradient clipping and accumulation done by DeepSpeed.
"""
from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass

import deepspeed
import deepspeed.comm
import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils import safe_get_full_fp32_param
from deepspeed.utils.tensor_fragment import fragment_address

from eva.mim import MIMModel, param_groups

# DeepSpeed's checkpoints pickle a few of its own plain-data classes next to the tensors, and its
# TorchCheckpointEngine loads them with weights_only=False. Ours loads with weights_only=True and
# allows exactly these classes (what ZeRO 1/2 optimizer states hold in fp32, bf16 and fp16).
DEEPSPEED_STATE_CLASSES = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with torch.load(weights_only=True)."""

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(DEEPSPEED_STATE_CLASSES):
            return torch.load(path, map_location=map_location, weights_only=True)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join the process group that torchrun, the deepspeed launcher or Ray Train set up, or make a
    one-process group on 127.0.0.1 for a plain `python -m eva.train`."""
    if not dist.is_initialized() and "RANK" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def deepspeed_config(cfg) -> dict:
    t = cfg.train
    config = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.clip_grad,
        "zero_optimization": {
            "stage": cfg.zero_stage,
            # ZeRO-1 (without overlap_comm) reduces the gradients in a Python loop over the tensors
            # after the backward, while a GPU has little queued. DeepSpeed's default contiguous
            # buffer adds two copies per tensor there: ~20 ms of host time a step at EVA-g's 529
            # tensors (benchmarks/bench_host_overhead.py). Without it, each bucket is flattened and
            # all-reduced as before: bit-identical results (tests/train/test_engine.py).
            "contiguous_gradients": cfg.zero_stage >= 2,
        },
        "steps_per_print": 2**31 - 1,  # progress is ours (eva.train.monitor)
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer waits for the device at every forward and step; ours does not
        "timers": {"throughput": {"enabled": False}},
    }
    if cfg.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        s = cfg.loss_scale
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": s.initial_scale_power,
                          "loss_scale_window": s.window, "hysteresis": s.hysteresis, "min_loss_scale": s.min_scale}
    return config


def lr_at(step: int, cfg) -> float:
    """LR of optimizer step `step` (0-based): linear warmup from 0, then cosine down to min_lr."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * step / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_engine(model: MIMModel, cfg, dist_info: DistInfo):
    """DeepSpeed engine around `model` with AdamW (EVA's betas/eps, decay 0.05 except pos_embed,
    cls token, biases and norms); the LR is set per step by the loop (`set_lr`)."""
    if cfg.model.compile:  # in place: the state-dict keys stay
        if cfg.model.compile_scope == "model":
            # one graph: fusions across blocks; every gradient arrives at the end of backward. The
            # forward alone, not nn.Module.compile(), which would trace DeepSpeed's module hooks too.
            model.forward = torch.compile(model.forward, mode=cfg.model.compile_mode)
        else:
            for block in model.backbone.blocks:
                block.compile(mode=cfg.model.compile_mode)  # regional: short compile; gradients arrive block by block
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
        eps=cfg.train.eps, fused=dist_info.device.type == "cuda",
    )
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg),
                                      dist_init_required=False)
    detect_overflow_through_the_norm(engine.optimizer)
    compute_the_grad_norm_in_one_pass(engine.optimizer)
    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__}")
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)
    return engine


def detect_overflow_through_the_norm(optimizer) -> None:
    """Let ZeRO's gradient-norm check alone catch inf/NaN gradients.

    Before the norm, DeepSpeed's ZeRO optimizer tests every gradient tensor for inf/NaN (about
    seven small kernels per tensor, 529 tensors on EVA-g) and then waits for the device. The global
    norm it computes next is non-finite exactly when some gradient is, and an invalid norm already
    skips the step and backs off the fp16 loss scale (`DeepSpeedZeroOptimizer.step`). The first
    pass is redundant work plus a device sync. It is kept wherever that norm check does not run:
    no norm computed, or bf16 with DeepSpeed's overflow checking off.
    """
    norm_check_runs = getattr(optimizer, "compute_grad_norm", False) and getattr(optimizer, "check_grad_overflow", False)
    if norm_check_runs and callable(getattr(optimizer, "has_overflow", None)):
        optimizer.has_overflow = lambda partition_gradients=True: False


def compute_the_grad_norm_in_one_pass(optimizer) -> None:
    """ZeRO's gradient norm from one multi-tensor kernel instead of two kernels per tensor.

    DeepSpeed's `get_grad_norm_direct` casts each gradient to fp32 and norms it on its own: on
    EVA-g that is ~1,060 kernel launches a step from a Python loop, while the device has nothing
    else queued (the step's sync follows). `torch._foreach_norm` with an fp32 result gives the
    same per-tensor norms in a few launches; the rest is DeepSpeed's: the sum of squares over the
    data-parallel group, the root, inf/NaN masked to -1 (which skips the step). Kept as it is where
    DeepSpeed counts replicated model- or pipeline-parallel gradients once, with MoE, and with
    CPU offload (a different norm path), none of which this trainer sets up.
    """
    groups = getattr(optimizer, "bit16_groups", None)  # ZeRO 1/2's parameters, decided on once here
    plain_data_parallel = (groups is not None and getattr(optimizer, "model_parallel_world_size", 1) == 1
                           and not getattr(optimizer, "has_moe_layers", False) and not getattr(optimizer, "cpu_offload", False)
                           and not any(getattr(p, "ds_pipe_replicated", False) for group in groups for p in group))
    if not plain_data_parallel or not callable(getattr(optimizer, "get_grad_norm_direct", None)):
        return
    per_tensor = optimizer.get_grad_norm_direct

    def grad_norm(gradients, params, norm_type=2):
        if float(norm_type) != 2.0:
            return per_tensor(gradients, params, norm_type)
        grads = [g for g in gradients if not getattr(g, "_zero_padding", False)]
        if grads:
            total = torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)).square().sum()
        else:
            total = torch.zeros((), dtype=torch.float32, device=optimizer.device)
        deepspeed.comm.all_reduce(total, op=deepspeed.comm.ReduceOp.SUM, group=optimizer.dp_process_group)
        total = total.sqrt()
        mask_nan_or_inf_with_val_inplace(total, device=optimizer.device)
        return total

    optimizer.get_grad_norm_direct = grad_norm


def apply_optimizer_settings(engine, cfg) -> None:
    """Put the config's AdamW, clipping and fp16 loss-scaling settings in force after a checkpoint load.

    DeepSpeed's load restores the checkpoint's param-group settings (weight decay, betas, eps), its
    clipping threshold and its whole loss scaler. A run resumed with a changed config announces the
    change, so it must then train with the new values. The LR is set every step (`set_lr`); the
    loss scale itself and its counters are the run's state and stay as loaded.
    """
    t = cfg.train
    # eva.mim.param_groups order: the decayed weights, then the rest
    for group, weight_decay in zip(engine.optimizer.param_groups, (t.weight_decay, 0.0)):
        group.update(weight_decay=weight_decay, betas=tuple(t.betas), eps=t.eps)
    engine.optimizer.clip_grad = t.clip_grad
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if isinstance(scaler, DynamicLossScaler):
        apply_loss_scale_settings(scaler, cfg.loss_scale)


def apply_loss_scale_settings(scaler: DynamicLossScaler, settings) -> None:
    scaler.scale_window, scaler.min_scale, scaler.delayed_shift = settings.window, settings.min_scale, settings.hysteresis
    scaler.cur_hysteresis = min(scaler.cur_hysteresis, settings.hysteresis)


def loss_scale_exhausted(error: BaseException) -> bool:
    """Whether `error` is DeepSpeed's fp16 scaler giving up (a bare Exception): gradients overflowed
    again at the minimum loss scale."""
    return "loss scale already at minimum" in str(error)


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def loss_scale(engine) -> float:
    """fp16: DeepSpeed's current dynamic loss scale; 1.0 otherwise."""
    return float(getattr(engine.optimizer, "loss_scale", 1.0)) if engine.fp16_enabled() else 1.0


def grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def full_fp32_state_dict(engine) -> dict[str, torch.Tensor]:
    """The model's fp32 master weights, whole (gathered from the ZeRO partitions) on CPU.

    Collective: every rank must call it.
    """
    state = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is None:
            raise RuntimeError(f"DeepSpeed holds no fp32 master copy of parameter {name}")
        state[name] = full.detach().to("cpu", torch.float32)
    for name, buffer in engine.module.named_buffers():
        state[name] = buffer.detach().to("cpu", torch.float32)
    return state

