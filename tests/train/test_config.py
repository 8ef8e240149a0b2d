"""Training config: shipped configs load, overrides parse as YAML scalars, bad keys/types are refused."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from eva.train.config import Config, ConfigError, config_from_dict, load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO_ROOT / "configs" / "pretrain").glob("*.yaml"))
MINIMAL = {"model": {"name": "tiny"}, "data": {"train": "d"}, "run_dir": "r",
           "train": {"steps": 10, "batch_size": 4, "lr": 1.0e-3}}


def test_shipped_configs_load():
    names = {path.name for path in CONFIGS}
    assert {"tiny_cpu.yaml", "base.yaml", "large.yaml", "eva_giant.yaml"} <= names
    for path in CONFIGS:
        cfg = load_config(path)
        assert isinstance(cfg, Config)
        assert cfg.train.steps > 0 and cfg.precision in ("fp32", "bf16", "fp16")


def test_eva_giant_config_is_the_eva01_recipe():
    cfg = load_config(REPO_ROOT / "configs" / "pretrain" / "eva_giant.yaml")
    assert cfg.model.name == "giant" and cfg.model.drop_path == pytest.approx(0.1)
    assert cfg.train.batch_size == 32 and cfg.train.lr == pytest.approx(1e-3) and cfg.train.min_lr == pytest.approx(1e-5)
    assert cfg.train.betas == [0.9, 0.98] and cfg.train.eps == pytest.approx(1e-6)
    assert cfg.train.weight_decay == pytest.approx(0.05) and cfg.train.clip_grad == pytest.approx(3.0)
    assert cfg.train.warmup_steps == 2 * 7242 and cfg.train.steps == 150 * 7242
    assert (cfg.mask.num_masking_patches, cfg.mask.min_num_patches, cfg.mask.min_aspect) == (105, 16, pytest.approx(0.3))
    assert cfg.data.views.scale == [0.2, 1.0] and cfg.data.views.flip_p == 0.5
    assert cfg.zero_stage == 1
    assert (cfg.loss_scale.initial_scale_power, cfg.loss_scale.window, cfg.loss_scale.hysteresis) == (16, 500, 2)


def test_overrides_are_yaml_scalars():
    cfg = config_from_dict(MINIMAL, ["train.lr=2e-4", "train.stop_at=5", "data.views.scale=[0.3, 1.0]",
                                     "precision=fp32", "model.target_dim=null", "log.tensorboard=false"])
    assert cfg.train.lr == pytest.approx(2e-4)  # PyYAML reads 2e-4 as a string: floats accept it
    assert cfg.train.stop_at == 5 and cfg.data.views.scale == [0.3, 1.0]
    assert cfg.model.target_dim is None and cfg.log.tensorboard is False and cfg.precision == "fp32"


def test_resolved_config_round_trips():
    cfg = config_from_dict(MINIMAL, ["train.warmup_steps=3"])
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["train.lr_peak=1"], "unknown config key train.lr_peak"),
    (["modle.name=tiny"], "unknown config key modle.name"),
    (["train.steps=ten"], "config key train.steps: expected int"),
    (["train.steps=1.5"], "config key train.steps: expected int"),
    (["log.tensorboard=3"], "config key log.tensorboard: expected bool"),
    (["data.views.scale=0.5"], "config key data.views.scale: expected a list"),
    (["precision=fp8"], "config key precision = 'fp8': must be one of fp32, bf16, fp16"),
    (["model.compile_mode=fast"], "config key model.compile_mode = 'fast': must be one of default, reduce-overhead"),
    (["data.targets=online"], "config key data.teacher.model"),
    (["train.stop_at=11"], "config key train.stop_at = 11"),
    (["train.steps"], "not of the form dotted.key=value"),
    (["loss_scale.min_scale=0.5"], "config key loss_scale.min_scale = 0.5: must be a whole number >= 1"),
    (["loss_scale.window=0"], "config key loss_scale.window = 0: must be >= 1"),
])
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        config_from_dict(MINIMAL, overrides)


def test_unknown_and_missing_keys_in_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "train": {**MINIMAL["train"], "warmup": 5}}))
    with pytest.raises(ConfigError, match=f"{path}: unknown config key train.warmup;"):
        load_config(path)
    path.write_text(yaml.safe_dump({k: v for k, v in MINIMAL.items() if k != "run_dir"}))
    with pytest.raises(ConfigError, match="config key run_dir is required"):
        load_config(path)
