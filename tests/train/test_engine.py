"""Engine settings: the LR schedule and the DeepSpeed config the recipe turns into."""
from __future__ import annotations

import math

import pytest

from trainer_fixtures import REPO_ROOT
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
    assert config["gradient_clipping"] == 3.0 and config["zero_optimization"] == {"stage": 1}
    assert config["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 500,
                              "hysteresis": 2, "min_loss_scale": 1.0}
    assert "bf16" not in config


def test_bf16_and_fp32_configs():
    bf16 = deepspeed_config(load_config(GIANT, ["precision=bf16", "train.grad_accum=4", "zero_stage=2"]))
    assert bf16["bf16"] == {"enabled": True} and "fp16" not in bf16
    assert bf16["gradient_accumulation_steps"] == 4 and bf16["zero_optimization"] == {"stage": 2}
    fp32 = deepspeed_config(load_config(GIANT, ["precision=fp32"]))
    assert "bf16" not in fp32 and "fp16" not in fp32
