"""On-disk model weights of a run, shared by the trainer (writer) and export/evaluation (readers).

    RUN_DIR/checkpoints/step_00001000/model.pt    MIMModel state dict, fp32 tensors (torch.save)
    RUN_DIR/checkpoints/step_00001000/meta.json   {"variant", "model_kwargs", "target_dim", "step", ...}
    RUN_DIR/checkpoints/latest                    the name of the newest complete checkpoint dir

Every file is written to a temporary name, flushed to disk and renamed into place, and `latest`
is moved only after a checkpoint is complete and on disk (`flush_to_disk`), so a crash, of the
process or of the machine, never leaves `latest` naming a half-written checkpoint.
An exported backbone (`python -m eva.export`) is a .safetensors file in timm's Eva key layout
whose metadata holds the model kwargs; `load_backbone` reads it too.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from eva.mim import MIMModel
from eva.vit import VisionTransformer

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MODEL_FILE = "model.pt"
META_FILE = "meta.json"
EXPORT_FORMAT = "eva-mim/timm-eva-backbone/v1"  # the "format" entry of an export's metadata


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a directory too: that makes its renames durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flush_to_disk(directory: Path) -> None:
    """fsync every file under `directory`, then the directories. Until then a rename can reach the
    disk before the data it names: after a machine crash, files of full length but empty."""
    directory = Path(directory)
    paths = list(directory.rglob("*"))
    for path in [p for p in paths if p.is_file()] + [p for p in paths if p.is_dir()] + [directory]:
        _fsync(path)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_model_weights(ckpt_dir: Path, model: MIMModel, meta: dict) -> None:
    """Writes `model.pt` then `meta.json` into ckpt_dir (created if needed), each atomically.

    `meta` needs "variant" and "step"; "model_kwargs" and "target_dim" are taken from the model.
    """
    missing = [key for key in ("variant", "step") if key not in meta]
    if missing:
        raise ValueError(f"checkpoint meta for {ckpt_dir} lacks {missing}")
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    meta = {**meta, "model_kwargs": model.backbone.kwargs, "target_dim": model.target_dim}
    _write_atomic(ckpt_dir / MODEL_FILE, lambda tmp: torch.save(state, tmp))
    _write_atomic(ckpt_dir / META_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2, sort_keys=True)))


def set_latest(run_dir: Path, ckpt_dir: Path) -> None:
    """Points RUN_DIR/checkpoints/latest at ckpt_dir (a complete checkpoint under that folder)."""
    run_dir, ckpt_dir = Path(run_dir), Path(ckpt_dir)
    checkpoints = run_dir / CHECKPOINTS
    if ckpt_dir.parent.resolve() != checkpoints.resolve():
        raise ValueError(f"checkpoint {ckpt_dir} is not directly under {checkpoints}")
    if not (ckpt_dir / META_FILE).is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_dir} is incomplete: no {META_FILE}")
    _write_atomic(checkpoints / LATEST, lambda tmp: tmp.write_text(ckpt_dir.name + "\n"))


def latest_checkpoint(run_dir: Path) -> Path:
    """The checkpoint directory RUN_DIR/checkpoints/latest names."""
    run_dir = Path(run_dir)
    latest = run_dir / CHECKPOINTS / LATEST
    if not latest.is_file():
        raise FileNotFoundError(f"no checkpoint in run directory {run_dir}: {latest} does not exist")
    ckpt_dir = run_dir / CHECKPOINTS / latest.read_text().strip()
    if not (ckpt_dir / META_FILE).is_file():
        raise FileNotFoundError(f"{latest} names {ckpt_dir.name}, but {ckpt_dir / META_FILE} does not exist")
    return ckpt_dir


def _resolve_checkpoint(path: Path) -> Path:
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        return path
    if (path / CHECKPOINTS).is_dir():
        return latest_checkpoint(path)
    raise FileNotFoundError(f"{path} is neither a run directory (no {CHECKPOINTS}/) nor a checkpoint directory (no {MODEL_FILE})")


def read_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict]:
    """(MIMModel state dict, meta) of a run directory's latest checkpoint or of a checkpoint directory."""
    ckpt_dir = _resolve_checkpoint(path)
    meta = json.loads((ckpt_dir / META_FILE).read_text())
    state = torch.load(ckpt_dir / MODEL_FILE, map_location="cpu", weights_only=True)
    return state, meta


def _load_into(model: nn.Module, state: dict[str, Tensor], source: Path) -> None:
    # The model was built on the meta device: assign takes the loaded tensors, no init wasted.
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"weights in {source} do not match the model they describe: {err}") from None


def load_mim_model(path: Path) -> tuple[MIMModel, dict]:
    """MIMModel (CPU, fp32, train mode) and meta from a run directory or a checkpoint directory."""
    state, meta = read_checkpoint(path)
    with torch.device("meta"):
        model = MIMModel(VisionTransformer(**meta["model_kwargs"]), meta["target_dim"])
    _load_into(model, state, Path(path))
    return model, meta


def load_backbone(path: Path) -> VisionTransformer:
    """Backbone (CPU, fp32) from a run directory, a checkpoint directory or an exported .safetensors file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != EXPORT_FORMAT:
                raise ValueError(f"{path} is not an exported backbone: metadata format {metadata.get('format')!r}, expected {EXPORT_FORMAT!r}")
            state = {key: f.get_tensor(key) for key in f.keys()}
        kwargs = json.loads(metadata["model_kwargs"])
        with torch.device("meta"):
            backbone = VisionTransformer(**kwargs)
        _load_into(backbone, state, path)
        return backbone
    return load_mim_model(path)[0].backbone
