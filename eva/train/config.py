"""Training config: a typed dataclass schema, loaded from YAML with `dotted.key=value` overrides.

Unknown keys and wrong types are errors that name the key. Override values are parsed as YAML
scalars (`train.lr=2e-4`, `train.stop_at=null`, `data.views.scale=[0.2,1.0]`). The resolved
config is written to the run directory as `config.yaml` and into every checkpoint's meta.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eva.views import CLIP_MEAN, CLIP_STD

REQUIRED = "???"  # marks a value the config file or an override must provide

PRECISIONS = ("fp32", "bf16", "fp16")
TARGET_MODES = ("cached", "online")
COMPILE_SCOPES = ("model", "blocks")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


class ConfigError(ValueError):
    """A config that cannot be used: names the key and what is wrong."""


@dataclass
class ModelConfig:
    name: str = REQUIRED           # a variant of eva.vit.VARIANTS
    drop_path: float = 0.0         # stochastic depth rate of the last block (linear over depth)
    target_dim: int | None = None  # head width; null: the teacher's dim (manifest or online teacher)
    fused_attn: bool = True        # scaled_dot_product_attention
    compile: bool = False          # torch.compile (in place: the state-dict keys stay)
    compile_scope: str = "model"   # model: the whole MIM forward as one graph (faster); blocks: each block alone (short compile)
    compile_mode: str = "default"  # torch.compile mode; reduce-overhead replays CUDA graphs (fewer host launches)
    grad_checkpointing: bool = False  # recompute block activations in backward: less memory, ~1/3 more compute
    float8_matmuls: bool = False   # blocks' linear layers in float8 (eva.float8; H100-class GPUs): not EVA-01's recipe


@dataclass
class ViewsConfig:
    """RandomResizedCrop + flip policy: must equal the train manifest's in cached mode."""

    scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    flip_p: float = 0.5


@dataclass
class TeacherConfig:
    """Online mode: the teacher to run; cached mode: if set, must be the manifest's teacher."""

    model: str | None = None  # open_clip model name or config JSON path
    weights: str = "none"     # open_clip pretrained tag, checkpoint path, or none (seeded random init)
    seed: int = 0             # init seed when weights is none


@dataclass
class DataConfig:
    train: str = REQUIRED               # train shard dir (cached) or image shard dir (online)
    targets: str = "cached"             # cached | online
    shuffle_buffer: int = 2000          # samples held per loader worker
    num_workers: int = 4                # loader processes per rank (0: in the training process)
    prefetch_factor: int = 4            # batches queued per loader worker
    views: ViewsConfig = field(default_factory=ViewsConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))  # student normalisation
    std: list[float] = field(default_factory=lambda: list(CLIP_STD))


@dataclass
class MaskConfig:
    """BEiT block-wise masking (eva.masking.BlockMaskGenerator); EVA-01: 105 of 16x16, blocks >= 16."""

    num_masking_patches: int = 105
    min_num_patches: int = 16
    max_num_patches: int | None = None
    min_aspect: float = 0.3
    max_aspect: float | None = None


@dataclass
class TrainConfig:
    steps: int = REQUIRED           # optimizer steps: defines the LR schedule
    batch_size: int = REQUIRED      # per device, per micro-step
    lr: float = REQUIRED            # peak learning rate
    min_lr: float = 1e-5            # cosine floor
    warmup_steps: int = 0           # linear warmup from 0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    clip_grad: float = 3.0          # global grad norm; 0 disables
    grad_accum: int = 1             # micro-steps per optimizer step
    stop_at: int | None = None      # save and stop after this step, schedule unchanged
    nonfinite_patience: int = 20    # stop after this many consecutive non-finite losses


@dataclass
class LossScaleConfig:
    """fp16 dynamic loss scaling (DeepSpeed); EVA-01: 2^16, window 500, hysteresis 2."""

    initial_scale_power: int = 16
    window: int = 500
    hysteresis: int = 2
    min_scale: float = 1.0


@dataclass
class CheckpointConfig:
    every: int = 1000               # steps between checkpoints


@dataclass
class LogConfig:
    every: int = 10                 # steps between progress lines / log.jsonl records
    tensorboard: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    precision: str = "bf16"         # fp32 | bf16 | fp16
    zero_stage: int = 1             # DeepSpeed ZeRO stage (1: optimizer states partitioned)
    run_dir: str = REQUIRED
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp`, or a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key}: expected a list of {_type_name(item_type)}, got {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        # PyYAML reads `1e-3` (no dot) as a string: accept any string float() parses
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config schema type {tp} of {key} is not supported")
    raise ConfigError(f"config key {key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config key {prefix.rstrip('.') or '<root>'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}; known keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in values:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, values[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(values[name], tp, f"{prefix}{name}")
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cls: Any = Config
    node = tree
    for depth, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            where = ".".join(parts[:depth]) or "the top level"
            known = ", ".join(fields) if fields else "none (it is a value, not a section)"
            raise ConfigError(f"unknown config key {dotted} in override; keys under {where}: {known}")
        cls = typing.get_type_hints(cls)[part]
        if depth == len(parts) - 1:
            node[part] = value
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {'.'.join(parts[:depth + 1])} is not a section")


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    pairs = []
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: value is not a YAML scalar ({error})") from None
        pairs.append((key.strip(), value))
    return pairs


def _check_values(cfg: Config) -> None:
    missing = [k for k, v in _flatten(cfg.to_dict()).items() if v == REQUIRED]
    if missing:
        raise ConfigError(f"config key {missing[0]} is required (set it in the YAML file or as {missing[0]}=...)")
    rules = [
        ("precision", cfg.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
        ("data.targets", cfg.data.targets in TARGET_MODES, f"one of {', '.join(TARGET_MODES)}"),
        ("zero_stage", cfg.zero_stage in (1, 2), "1 or 2"),
        ("train.steps", cfg.train.steps > 0, "> 0"),
        ("train.batch_size", cfg.train.batch_size > 0, "> 0"),
        ("train.lr", cfg.train.lr > 0, "> 0"),
        ("train.min_lr", 0 <= cfg.train.min_lr <= cfg.train.lr, "between 0 and train.lr"),
        ("train.warmup_steps", 0 <= cfg.train.warmup_steps <= cfg.train.steps, "between 0 and train.steps"),
        ("train.grad_accum", cfg.train.grad_accum >= 1, ">= 1"),
        ("train.betas", len(cfg.train.betas) == 2 and all(0 <= b < 1 for b in cfg.train.betas), "two values in [0, 1)"),
        ("train.clip_grad", cfg.train.clip_grad >= 0, ">= 0"),
        ("train.stop_at", cfg.train.stop_at is None or 0 < cfg.train.stop_at <= cfg.train.steps, "null or in [1, train.steps]"),
        ("train.nonfinite_patience", cfg.train.nonfinite_patience >= 1, ">= 1"),
        # what DeepSpeed's fp16 config accepts, checked before the engine is built
        ("loss_scale.initial_scale_power", cfg.loss_scale.initial_scale_power >= 0, ">= 0"),
        ("loss_scale.window", cfg.loss_scale.window >= 1, ">= 1"),
        ("loss_scale.hysteresis", cfg.loss_scale.hysteresis >= 1, ">= 1"),
        ("loss_scale.min_scale", cfg.loss_scale.min_scale >= 1 and float(cfg.loss_scale.min_scale).is_integer(), "a whole number >= 1"),
        ("checkpoint.every", cfg.checkpoint.every >= 1, ">= 1"),
        ("log.every", cfg.log.every >= 1, ">= 1"),
        ("data.num_workers", cfg.data.num_workers >= 0, ">= 0"),
        ("data.prefetch_factor", cfg.data.prefetch_factor >= 1, ">= 1"),
        ("data.shuffle_buffer", cfg.data.shuffle_buffer >= 1, ">= 1"),
        ("data.views.scale", len(cfg.data.views.scale) == 2 and 0 < cfg.data.views.scale[0] <= cfg.data.views.scale[1] <= 1, "[low, high] in (0, 1]"),
        ("data.views.ratio", len(cfg.data.views.ratio) == 2 and 0 < cfg.data.views.ratio[0] <= cfg.data.views.ratio[1], "[low, high], 0 < low <= high"),
        ("data.views.flip_p", 0 <= cfg.data.views.flip_p <= 1, "in [0, 1]"),
        ("data.mean", len(cfg.data.mean) == 3, "three values (RGB)"),
        ("data.std", len(cfg.data.std) == 3 and all(s > 0 for s in cfg.data.std), "three positive values (RGB)"),
        ("model.drop_path", 0 <= cfg.model.drop_path < 1, "in [0, 1)"),
        ("model.compile_scope", cfg.model.compile_scope in COMPILE_SCOPES, f"one of {', '.join(COMPILE_SCOPES)}"),
        ("model.compile_mode", cfg.model.compile_mode in COMPILE_MODES, f"one of {', '.join(COMPILE_MODES)}"),
        ("data.teacher.model", cfg.data.targets != "online" or cfg.data.teacher.model, "set when data.targets is online"),
    ]
    for key, ok, expected in rules:
        if not ok:
            value = get_dotted(cfg, key)
            raise ConfigError(f"config key {key} = {value!r}: must be {expected}")


def get_dotted(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_from_dict(values: dict[str, Any], overrides: list[str] = ()) -> Config:
    """A checked Config from a nested dict (as YAML gives) plus `dotted.key=value` overrides."""
    tree = copy.deepcopy(values or {})
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree, "")
    _check_values(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"config file {path}: cannot be read ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path}: not valid YAML ({error})") from None
    try:
        return config_from_dict(values or {}, overrides)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two resolved configs."""
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
