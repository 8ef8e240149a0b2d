"""Engine settings: the LR schedule and the DeepSpeed config the recipe turns into."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from trainer_fixtures import REPO_ROOT, free_port
from eva.train.config import load_config
from eva.train.engine import deepspeed_config, lr_at

GIANT = REPO_ROOT / "configs" / "pretrain" / "eva_giant.yaml"


def test_lr_warms_up_linearly_from_zero_then_follows_a_cosine_to_min_lr():
    cfg = load_config(GIANT, ["train.steps=1000", "train.warmup_steps=100", "train.lr=1e-3", "train.min_lr=1e-5"])
    assert lr_at(0, cfg) == 0.0
    assert lr_at(50, cfg) == pytest.approx(0.5e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-3)
    assert lr_at(550, cfg) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(1000, cfg) == pytest.approx(1e-5)
    schedule = [lr_at(step, cfg) for step in range(100, 1001)]
    assert all(a >= b for a, b in zip(schedule, schedule[1:]))


def test_eva_giant_deepspeed_config_is_zero1_fp16_with_evas_loss_scaling():
    config = deepspeed_config(load_config(GIANT))
    assert config["train_micro_batch_size_per_gpu"] == 32 and config["gradient_accumulation_steps"] == 1
    assert config["gradient_clipping"] == 3.0 and config["zero_optimization"] == {"stage": 1, "contiguous_gradients": False}
    assert config["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 500,
                              "hysteresis": 2, "min_loss_scale": 1.0}
    assert "bf16" not in config


def test_bf16_and_fp32_configs():
    bf16 = deepspeed_config(load_config(GIANT, ["precision=bf16", "train.grad_accum=4", "zero_stage=2"]))
    assert bf16["bf16"] == {"enabled": True} and "fp16" not in bf16
    assert bf16["gradient_accumulation_steps"] == 4 and bf16["zero_optimization"] == {"stage": 2, "contiguous_gradients": True}
    fp32 = deepspeed_config(load_config(GIANT, ["precision=fp32"]))
    assert "bf16" not in fp32 and "fp16" not in fp32


OVERFLOW_CHECK = r'''
import json, sys
import numpy as np
import torch
from eva.loss import negative_cosine_loss
from eva.masking import BlockMaskGenerator
from eva.mim import create_mim_model
from eva.train import engine as engine_lib
from eva.train.config import config_from_dict
from eva.train.loop import DTYPES

precision = sys.argv[1]
cfg = config_from_dict({"model": {"name": "tiny"}, "data": {"train": "unused"}, "run_dir": "unused",
                        "precision": precision, "train": {"steps": 10, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0}})
dist_info = engine_lib.init_distributed()
torch.manual_seed(0)
model = create_mim_model("tiny", 16)
engine = engine_lib.build_engine(model, cfg, dist_info)

def forbidden(*args, **kwargs):
    raise AssertionError("the per-tensor overflow pass ran")

engine.optimizer.has_overflow_partitioned_grads_serial = forbidden
device = dist_info.device  # where the engine put the model (CUDA for fp16)
images = torch.randn(2, 3, 64, 64).to(device, DTYPES[precision])
mask = torch.from_numpy(np.stack([BlockMaskGenerator((8, 8), 26, 4)(np.random.default_rng(i)).reshape(-1) for i in range(2)])).to(device)
targets = torch.randn(2, 64, 16, device=device)

def step(poison: bool):
    out = engine(images, mask, 26)
    loss = negative_cosine_loss(out.pred, out.gather(targets), out.valid)
    hook = model.head.weight.register_hook(lambda g: torch.full_like(g, float("nan"))) if poison else None
    engine.backward(loss)
    engine.step()
    if hook is not None:
        hook.remove()
    return {"loss_finite": bool(torch.isfinite(loss)), "applied": engine.was_step_applied()}

def weights():
    return {name: p.detach().clone() for name, p in engine.module.named_parameters()}

before = weights()
poisoned = step(poison=True)
unchanged = all(torch.equal(before[name], p) for name, p in weights().items())
clean = step(poison=False)
changed = any(not torch.equal(before[name], p) for name, p in weights().items())
print(json.dumps({"poisoned": poisoned, "unchanged_after_poisoned": unchanged, "clean": clean, "changed_after_clean": changed,
                  "fast_path": engine.optimizer.has_overflow(True) is False}))
'''


@pytest.mark.parametrize("precision", [
    "bf16", pytest.param("fp16", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="DeepSpeed runs fp16 on CUDA only"))])
def test_a_non_finite_gradient_with_a_finite_loss_skips_the_step_without_the_per_tensor_pass(precision):
    """The gradient-norm check alone catches a NaN gradient (the loss is finite): the step is not
    applied and no weight moves; the next clean step applies. DeepSpeed's separate per-tensor
    overflow pass never runs (it would raise)."""
    result = subprocess.run([sys.executable, "-c", OVERFLOW_CHECK, precision], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome == {"poisoned": {"loss_finite": True, "applied": False}, "unchanged_after_poisoned": True,
                       "clean": {"loss_finite": True, "applied": True}, "changed_after_clean": True, "fast_path": True}


NORM_CHECK = r'''
import json, sys
from pathlib import Path
import numpy as np
import torch
from eva.loss import negative_cosine_loss
from eva.masking import BlockMaskGenerator
from eva.mim import create_mim_model
from eva.train import engine as engine_lib
from eva.train.config import config_from_dict

cfg = config_from_dict({"model": {"name": "tiny"}, "data": {"train": "unused"}, "run_dir": "unused", "precision": "bf16",
                        "train": {"steps": 10, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0}})
dist_info = engine_lib.init_distributed()
torch.manual_seed(0)
engine = engine_lib.build_engine(create_mim_model("tiny", 16), cfg, dist_info)
optimizer = engine.optimizer
one_pass = optimizer.get_grad_norm_direct
norms = []

def both(gradients, params, norm_type=2):  # the trainer's norm, and DeepSpeed's on the same gradients
    ours = one_pass(gradients, params, norm_type)
    norms.append([float(ours), float(type(optimizer).get_grad_norm_direct(optimizer, gradients, params, norm_type))])
    return ours

optimizer.get_grad_norm_direct = both
torch.manual_seed(1 + dist_info.rank)  # each rank its own batch: the partitions' gradients differ
images = torch.randn(2, 3, 64, 64).to(torch.bfloat16)
mask = torch.from_numpy(np.stack([BlockMaskGenerator((8, 8), 26, 4)(np.random.default_rng(i)).reshape(-1) for i in range(2)]))
targets = torch.randn(2, 64, 16)
for _ in range(2):
    out = engine(images, mask, 26)
    engine.backward(negative_cosine_loss(out.pred, out.gather(targets), out.valid))
    engine.step()
outcome = {"rank": dist_info.rank, "norms": norms, "replaced": one_pass is not type(optimizer).get_grad_norm_direct}
(Path(sys.argv[1]) / f"rank{dist_info.rank}.json").write_text(json.dumps(outcome))  # not stdout: ranks share it
'''


@pytest.mark.parametrize("processes", [1, 2])
def test_the_one_pass_gradient_norm_equals_deepspeeds_per_tensor_norm(tmp_path, processes):
    """The trainer's gradient norm (one multi-tensor kernel) gives DeepSpeed's per-tensor result for
    each parameter group and step, also when ZeRO-1 splits the gradients over two ranks."""
    script = tmp_path / "norm_check.py"
    script.write_text(NORM_CHECK)
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    result = subprocess.run(launcher + [str(script), str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(o["rank"] for o in outcomes) == list(range(processes))
    for outcome in outcomes:
        assert outcome["replaced"]
        assert len(outcome["norms"]) == 4  # two parameter groups (decay, no decay) x two steps
        for ours, deepspeeds in outcome["norms"]:
            assert ours > 0 and ours == pytest.approx(deepspeeds, rel=1e-5)
    if processes == 2:  # the global norm: the same on every rank
        ours_by_rank = [[ours for ours, _ in outcome["norms"]] for outcome in outcomes]
        assert ours_by_rank[0] == pytest.approx(ours_by_rank[1], rel=1e-6)


def test_deepspeeds_fp16_scaler_giving_up_is_recognised():
    """The loop turns this exception into NonFiniteLossError (naming the step and last checkpoint)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from eva.train.engine import loss_scale_exhausted

    scaler = DynamicLossScaler(init_scale=1.0, scale_window=10, min_scale=1.0, delayed_shift=1, consecutive_hysteresis=False)
    with pytest.raises(Exception) as raised:
        scaler.update_scale(True)  # an overflow at the minimum scale
    assert loss_scale_exhausted(raised.value) and not loss_scale_exhausted(RuntimeError("CUDA out of memory"))


def test_a_loaded_loss_scaler_takes_the_configs_settings_and_keeps_its_scale():
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from eva.train.engine import apply_loss_scale_settings

    saved = DynamicLossScaler(init_scale=2.0**16, scale_window=500, min_scale=1.0, delayed_shift=2, consecutive_hysteresis=False)
    saved.cur_hysteresis = 1  # the run's state: one overflow absorbed
    cfg = load_config(GIANT, ["loss_scale.window=100", "loss_scale.hysteresis=4", "loss_scale.min_scale=8"])
    apply_loss_scale_settings(saved, cfg.loss_scale)
    assert (saved.scale_window, saved.delayed_shift, saved.min_scale) == (100, 4, 8)
    assert saved.cur_scale == 2.0**16 and saved.cur_hysteresis == 1


GRADIENT_PATH_CHECK = r'''
import json, sys
from pathlib import Path
import numpy as np
import torch
from eva.loss import negative_cosine_loss
from eva.masking import BlockMaskGenerator
from eva.mim import create_mim_model
from eva.train import engine as engine_lib
from eva.train.config import config_from_dict

out_dir, setting = Path(sys.argv[1]), sys.argv[2]
if setting == "deepspeed_default":  # DeepSpeed's own ZeRO-1 gradient path: the contiguous buffer
    trainer_config = engine_lib.deepspeed_config
    def with_contiguous(cfg):
        config = trainer_config(cfg)
        del config["zero_optimization"]["contiguous_gradients"]
        return config
    engine_lib.deepspeed_config = with_contiguous
cfg = config_from_dict({"model": {"name": "tiny"}, "data": {"train": "unused"}, "run_dir": "unused", "precision": "bf16",
                        "train": {"steps": 10, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0, "grad_accum": 2}})
dist_info = engine_lib.init_distributed()
torch.manual_seed(0)
engine = engine_lib.build_engine(create_mim_model("tiny", 16), cfg, dist_info)
contiguous = engine.optimizer.contiguous_gradients
generator = torch.Generator().manual_seed(1 + dist_info.rank)  # each rank its own micro-batches
losses = []
for micro_step in range(6):  # three optimizer steps of two micro-batches
    images = torch.randn(2, 3, 64, 64, generator=generator).to(torch.bfloat16)
    mask = torch.from_numpy(np.stack([BlockMaskGenerator((8, 8), 26, 4)(np.random.default_rng([micro_step, i, dist_info.rank])).reshape(-1)
                                      for i in range(2)]))
    out = engine(images, mask, 26)
    loss = negative_cosine_loss(out.pred, out.gather(torch.randn(2, 64, 16, generator=generator)), out.valid)
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
weights = {name: p.detach().float() for name, p in engine.module.named_parameters()}
torch.save(weights, out_dir / f"{setting}_rank{dist_info.rank}.pt")
(out_dir / f"{setting}_rank{dist_info.rank}.json").write_text(json.dumps({"losses": losses, "contiguous": contiguous}))
'''


def test_zero1_without_deepspeeds_contiguous_gradient_buffer_trains_bit_identically(tmp_path):
    """The trainer turns ZeRO-1's contiguous gradient buffer off (host time, benchmarks/
    bench_host_overhead.py): two ranks, gradient accumulation, the same losses and weights."""
    script = tmp_path / "gradient_path.py"
    script.write_text(GRADIENT_PATH_CHECK)
    for setting in ("trainer", "deepspeed_default"):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
        result = subprocess.run(launcher + [str(script), str(tmp_path), setting], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        ours, default = (json.loads((tmp_path / f"{s}_rank{rank}.json").read_text()) for s in ("trainer", "deepspeed_default"))
        assert (ours["contiguous"], default["contiguous"]) == (False, True)
        assert ours["losses"] == default["losses"] and len(set(ours["losses"])) == 6
        a, b = (torch.load(tmp_path / f"{s}_rank{rank}.pt", weights_only=True) for s in ("trainer", "deepspeed_default"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
