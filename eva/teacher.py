"""The frozen CLIP teacher whose patch features are EVA-01's regression targets (DESIGN.md, recipe).

Target = the last block's patch tokens (cls dropped), after `ln_post`, times the visual projection,
no further normalisation. open_clip's `VisionTransformer` returns exactly the tokens after
`ln_post` when `output_tokens` is set; the projection is applied here.

The teacher is an open_clip model named by a built-in model name (`ViT-L-14` for EVA-01) or the
path of an open_clip model config JSON, with weights from an open_clip pretrained tag, a local
checkpoint file, or `none` (seeded random init, for tests and demos). Weights are loaded with
`open_clip.load_checkpoint(strict=False)` and the result is checked here: open_clip's own
`create_model(pretrained=...)` can fall back to random init with only a log line, and a silently
random teacher would poison every target it writes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

WEIGHTS_NONE = "none"
LAYER = "last block patch tokens (cls dropped) -> ln_post -> visual.proj"


class TeacherError(ValueError):
    """A teacher that cannot be built or trusted: names the input and what is wrong."""


class Teacher(nn.Module):
    """Frozen open_clip vision tower that returns per-patch targets `[B, N, D]`.

    `forward` takes images `[B, 3, S, S]` already normalised with `mean`/`std`.
    """

    def __init__(self, visual: nn.Module, identity: dict[str, Any]):
        super().__init__()
        self.visual = visual
        self.visual.output_tokens = True  # (pooled, tokens after ln_post)
        self.input_size: int = int(visual.image_size[0])
        self.grid: tuple[int, int] = (int(visual.grid_size[0]), int(visual.grid_size[1]))
        self.dim: int = int(visual.proj.shape[1])
        self.mean: tuple = tuple(float(v) for v in visual.preprocess_cfg["mean"])
        self.std: tuple = tuple(float(v) for v in visual.preprocess_cfg["std"])
        self._identity = dict(identity)
        self.requires_grad_(False)
        self.eval()

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # frozen: dropout and patch dropout stay off

    def forward(self, images: Tensor) -> Tensor:
        size = self.input_size
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (size, size):
            raise ValueError(f"teacher input must be [B, 3, {size}, {size}], got {list(images.shape)}")
        _, tokens = self.visual(images)  # [B, N, W], after ln_post, cls dropped
        return tokens @ self.visual.proj  # [B, N, D]

    def describe(self) -> dict[str, Any]:
        """The manifest's "targets" fields (storage dtype aside, which the target stage adds)."""
        return {
            **self._identity,
            "input_size": self.input_size,
            "grid": list(self.grid),
            "dim": self.dim,
            "layer": LAYER,
            "normalisation": {"mean": list(self.mean), "std": list(self.std)},
        }


@dataclass(frozen=True)
class TeacherSpec:
    """A resolved, picklable teacher description: what a remote worker needs to build the same teacher.

    `name` and `weights` are the user's strings (recorded in manifests); `checkpoint` is the
    resolved file (None for random init); `tag` is set when the file came from a pretrained tag,
    so a worker on another node can fetch it into its own cache.
    """

    name: str
    weights: str
    model_cfg: dict
    preprocess_cfg: dict
    checkpoint: str | None
    tag: str | None = None


def load_teacher(model: str, weights: str = WEIGHTS_NONE, device: str = "cpu", seed: int = 0) -> Teacher:
    """Build the teacher, load and check its weights, and probe its output shape.

    `model`: open_clip built-in name or config JSON path. `weights`: `none` (random init from
    `seed`), a local checkpoint (loaded with weights_only=True), or a pretrained tag of `model`.
    """
    return build_teacher(resolve_teacher(model, weights), device=device, seed=seed)


def resolve_teacher(model: str, weights: str = WEIGHTS_NONE) -> TeacherSpec:
    """Read the config and locate the weights (downloading a pretrained tag); build nothing yet."""
    model_cfg, preprocess_cfg, source = _resolve_config(model)
    checkpoint, tag_cfg = _resolve_weights(model, weights, source)
    if tag_cfg.get("quick_gelu"):
        model_cfg["quick_gelu"] = True  # e.g. OpenAI weights were trained with QuickGELU
    for key in ("mean", "std"):
        if key in tag_cfg:
            preprocess_cfg[key] = list(tag_cfg[key])
    return TeacherSpec(
        name=model, weights=weights, model_cfg=model_cfg, preprocess_cfg=preprocess_cfg,
        checkpoint=str(Path(checkpoint).resolve()) if checkpoint is not None else None,
        tag=weights if tag_cfg else None,
    )


def build_teacher(spec: TeacherSpec, device: str = "cpu", seed: int = 0) -> Teacher:
    """Instantiate `spec` (seeded random init on CPU), load and check weights, probe, move to `device`."""
    import open_clip

    checkpoint = spec.checkpoint
    if spec.tag is not None and not (checkpoint and os.path.isfile(checkpoint)):
        checkpoint = str(_resolve_weights(spec.name, spec.tag, "builtin")[0])  # another node's cache
    clip = _create_random(open_clip, spec.name, spec.model_cfg, spec.preprocess_cfg, seed)
    _check_vision_tower(spec.name, clip.visual)
    if checkpoint is not None:
        _load_checked(open_clip, clip, Path(checkpoint), spec.name)
    identity = {
        "teacher": spec.name,
        "teacher_config_sha256": _json_sha256(spec.model_cfg),
        "weights": spec.weights,
        "weights_sha256": _file_sha256(Path(checkpoint)) if checkpoint is not None else None,
        "random_init": checkpoint is None,
        "init_seed": seed if checkpoint is None else None,
    }
    teacher = Teacher(clip.visual, identity)
    del clip  # the text tower is not needed
    _probe(teacher, spec.name)
    return teacher.to(device)


def _resolve_config(model: str) -> tuple[dict, dict, str]:
    """(model config, preprocess config, "builtin" or "file") for a model name or config path."""
    import open_clip

    looks_like_path = model.endswith(".json") or os.sep in model or Path(model).is_file()
    if not looks_like_path:
        cfg = open_clip.get_model_config(model)
        if cfg is None:
            raise TeacherError(
                f"teacher {model!r} is neither an open_clip model name (for example ViT-L-14; "
                f"{len(open_clip.list_models())} are built in) nor a config JSON file")
        return cfg, {}, "builtin"
    path = Path(model)
    try:
        raw = json.loads(path.read_text())
    except OSError as error:
        raise TeacherError(f"teacher config {path}: cannot be read ({error.strerror or error})") from error
    except ValueError as error:
        raise TeacherError(f"teacher config {path}: not valid JSON ({error})") from error
    # Accept a plain model config and the open_clip_config.json layout {"model_cfg", "preprocess_cfg"}
    cfg = raw.get("model_cfg", raw) if isinstance(raw, dict) else None
    preprocess = raw.get("preprocess_cfg", {}) if isinstance(raw, dict) else {}
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise TeacherError(f"teacher config {path}: not an open_clip model config (missing {missing})")
    return cfg, dict(preprocess), "file"


def is_weights_path(weights: str) -> bool:
    """Whether `weights` names a local checkpoint file (existing or not) rather than `none` or a tag."""
    return weights != WEIGHTS_NONE and (os.path.isfile(weights) or os.sep in weights
                                        or Path(weights).suffix in (".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def _resolve_weights(model: str, weights: str, config_source: str) -> tuple[Path | None, dict]:
    """(checkpoint file or None for random init, the pretrained tag's config or {})."""
    import open_clip

    if weights == WEIGHTS_NONE:
        return None, {}
    if os.path.isfile(weights):
        return Path(weights), {}
    if is_weights_path(weights):
        raise TeacherError(f"teacher weights {weights}: no such file")
    tag_cfg = open_clip.get_pretrained_cfg(model, weights) if config_source == "builtin" else {}
    if not tag_cfg:
        known = open_clip.list_pretrained_tags_by_model(model) if config_source == "builtin" else []
        raise TeacherError(
            f"teacher weights {weights!r}: not 'none', not an existing file, and not a pretrained tag "
            f"of {model!r} (known tags: {known or 'none'})")
    try:
        path = open_clip.download_pretrained(tag_cfg)
    except Exception as error:
        raise TeacherError(f"teacher weights {model}/{weights}: download failed ({error})") from error
    if not path or not os.path.isfile(path):
        raise TeacherError(f"teacher weights {model}/{weights}: the pretrained tag resolved to no file")
    return Path(path), tag_cfg


@contextlib.contextmanager
def _quiet_open_clip_warnings() -> Iterator[None]:
    """open_clip logs "initialized randomly" even when weights are loaded right after."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _create_random(open_clip, model: str, model_cfg: dict, preprocess_cfg: dict, seed: int) -> nn.Module:
    """Instantiate the architecture with seeded random weights, on CPU (same values everywhere)."""
    with tempfile.TemporaryDirectory() as tmp:
        # open_clip's `local-dir:` schema builds a model from a config without a global registry
        config_file = Path(tmp) / "open_clip_config.json"
        config_file.write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}))
        with torch.random.fork_rng(devices=[]), _quiet_open_clip_warnings():
            torch.manual_seed(seed)
            try:
                return open_clip.create_model(f"local-dir:{tmp}", device="cpu", precision="fp32")
            except Exception as error:
                raise TeacherError(f"teacher {model!r}: open_clip cannot build it ({error})") from error


def _check_vision_tower(model: str, visual: nn.Module) -> None:
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise TeacherError(
            f"teacher {model!r}: vision tower is {type(visual).__name__}; the patch grid and feature dim "
            f"of EVA's target (patch tokens after ln_post, times visual.proj) are only defined for "
            f"open_clip VisionTransformer towers")
    if visual.attn_pool is not None or visual.final_ln_after_pool or visual.proj is None:
        raise TeacherError(
            f"teacher {model!r}: its tokens are not EVA's target (attentional pooling, ln_post after pooling "
            f"or no visual projection)")
    if visual.image_size[0] != visual.image_size[1]:
        raise TeacherError(f"teacher {model!r}: non-square input {visual.image_size} is not supported")


def _checkpoint_position_tokens(checkpoint: Path) -> int | None:
    """Token count of the checkpoint's vision position embedding, or None where it cannot be
    peeked at (then the key check in `_load_checked` speaks). Memory-mapped: reads no weights."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip-format torch file: open_clip's loader reports what it is
        return None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        return None
    for key, value in state.items():
        if isinstance(key, str) and key.endswith("visual.positional_embedding") and torch.is_tensor(value):
            return int(value.shape[0])
    return None


def _load_checked(open_clip, clip: nn.Module, checkpoint: Path, model: str) -> None:
    """Load `checkpoint` and refuse anything but a complete vision tower of this architecture."""
    visual_keys = {k for k in clip.state_dict() if k.startswith("visual.")}
    tokens, expected = _checkpoint_position_tokens(checkpoint), clip.visual.positional_embedding.shape[0]
    if tokens is not None and tokens != expected:
        # open_clip would interpolate the embedding to the config's grid without a word
        raise TeacherError(
            f"teacher weights {checkpoint}: position embedding for {tokens} tokens, but {model!r} at "
            f"{clip.visual.image_size[0]} px takes {expected} (a {'x'.join(map(str, clip.visual.grid_size))} "
            f"grid and cls): weights of another input size; use the config they were trained with")
    try:
        with _quiet_open_clip_warnings():
            result = open_clip.load_checkpoint(clip, str(checkpoint), strict=False, weights_only=True)
    except StopIteration as error:  # open_clip peeks at the first key
        raise TeacherError(f"teacher weights {checkpoint}: holds no tensors") from error
    except RuntimeError as error:
        message = str(error).split("\n")
        detail = " ".join(line.strip() for line in message[:4])
        raise TeacherError(f"teacher weights {checkpoint}: do not fit {model!r} ({detail[:600]})") from error
    except Exception as error:  # unreadable, truncated, not a torch file, or needs unpickling
        raise TeacherError(
            f"teacher weights {checkpoint}: cannot be read as a weights-only checkpoint "
            f"({type(error).__name__}: {str(error)[:300]})") from error
    if not hasattr(result, "missing_keys"):
        raise TeacherError(f"teacher weights {checkpoint}: format not supported (no state dict)")
    missing = sorted(k for k in result.missing_keys if k in visual_keys)
    unexpected = sorted(result.unexpected_keys)
    matched = len(visual_keys) - len(missing)
    if missing or unexpected:
        raise TeacherError(
            f"teacher weights {checkpoint}: matched {matched} of {len(visual_keys)} vision-tower tensors of "
            f"{model!r}; missing {len(missing)} (e.g. {missing[:3]}), unexpected {len(unexpected)} "
            f"(e.g. {unexpected[:3]}): is it a checkpoint of another model?")


def _probe(teacher: Teacher, model: str) -> None:
    """Run one blank image: the output must be [1, N, D] with N the grid and D the projection."""
    expected = (1, teacher.num_patches, teacher.dim)
    try:
        with torch.no_grad():
            shape = tuple(teacher(torch.zeros(1, 3, teacher.input_size, teacher.input_size)).shape)
    except Exception as error:
        raise TeacherError(f"teacher {model!r}: a forward pass fails, so its grid and feature dim "
                           f"cannot be determined ({error})") from error
    if shape != expected:
        raise TeacherError(f"teacher {model!r}: output shape {list(shape)}, expected [1, N, D] = {list(expected)} "
                           f"for a {teacher.grid[0]}x{teacher.grid[1]} grid")


def _json_sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
