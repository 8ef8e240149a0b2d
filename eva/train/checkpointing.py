"""Checkpoints that describe themselves, and exact resume.

    RUN_DIR/checkpoints/step_00001000/
        model.pt, meta.json     fp32 weights + description (eva.checkpoints: what export/eval read)
        deepspeed/              DeepSpeed engine state: ZeRO optimizer partitions, loss scaler, steps
        rng/rank_00000.pt       per-rank torch RNG state (drop path), plain tensors
    RUN_DIR/checkpoints/latest  moved last, by rank 0, once every rank has written its part

meta.json holds the model kwargs, the resolved config, the step, samples seen, the data position,
the skipped-step count, the train manifest's hash and the parameters AdamW does not decay (ZeRO lays
out its optimizer state by parameter group). Everything is loaded with weights_only=True.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from eva.checkpoints import (CHECKPOINTS, LATEST, META_FILE, checkpoint_dir_name, flush_to_disk, latest_checkpoint, set_latest,
                             write_model_weights)
from eva.mim import MIMModel, param_groups
from eva.train.data import LoaderState
from eva.train.engine import DistInfo, full_fp32_state_dict
from eva.vit import ARCHITECTURE_KEYS, VisionTransformer

DEEPSPEED_TAG = "deepspeed"
RNG_DIR = "rng"


class ResumeError(ValueError):
    """A checkpoint this run cannot resume from: names it and why."""


@dataclass
class TrainProgress:
    """Counters a checkpoint carries besides weights and optimizer state."""

    step: int = 0                 # optimizer steps taken (applied or skipped)
    samples_seen: int = 0         # over all ranks
    skipped_steps: int = 0        # steps whose update was dropped (fp16 overflow, non-finite grads)
    loader: LoaderState = field(default_factory=LoaderState)  # data position (same on every rank)


def undecayed_parameters(model: MIMModel) -> list[str]:
    """Names of the parameters in AdamW's no-decay group (eva.mim.param_groups)."""
    names = {id(p): name for name, p in model.named_parameters()}
    _, no_decay = param_groups(model, 0.0)
    return sorted(names[id(p)] for p in no_decay["params"])


def _rng_file(ckpt_dir: Path, rank: int) -> Path:
    return ckpt_dir / RNG_DIR / f"rank_{rank:05d}.pt"


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(engine, run_dir: Path, progress: TrainProgress, meta: dict[str, Any], dist_info: DistInfo) -> Path:
    """Write one complete checkpoint (collective) and point `latest` at it; returns its directory."""
    ckpt_dir = Path(run_dir) / CHECKPOINTS / checkpoint_dir_name(progress.step)
    engine.save_checkpoint(str(ckpt_dir), tag=DEEPSPEED_TAG, save_latest=False)
    _rng_file(ckpt_dir, dist_info.rank).parent.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(dist_info.device), _rng_file(ckpt_dir, dist_info.rank))
    weights = full_fp32_state_dict(engine)
    if dist_info.is_main:
        with torch.device("meta"):
            model = MIMModel(VisionTransformer(**engine.module.backbone.kwargs), engine.module.target_dim)
        model.load_state_dict(weights, strict=True, assign=True)
        write_model_weights(ckpt_dir, model, {
            **meta,
            "step": progress.step,
            "samples_seen": progress.samples_seen,
            "skipped_steps": progress.skipped_steps,
            "data_position": {"start_epoch": progress.loader.start_epoch, "batches": progress.loader.batches},
            "world_size": dist_info.world_size,
            "undecayed_parameters": undecayed_parameters(engine.module),
            "deepspeed_state": DEEPSPEED_TAG,       # subdirectory: ZeRO optimizer partitions, loss scaler, steps
            "rng_state": f"{RNG_DIR}/rank_*.pt",    # per-rank torch RNG
        })
    dist.barrier()  # every rank has written its part
    if dist_info.local_rank == 0:  # one process a node: the node's page cache holds what its ranks wrote
        flush_to_disk(ckpt_dir)
    dist.barrier()  # on disk everywhere before `latest` names it
    if dist_info.is_main:
        set_latest(run_dir, ckpt_dir)
    dist.barrier()
    return ckpt_dir


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    if not (Path(run_dir) / CHECKPOINTS / LATEST).is_file():
        return None
    return latest_checkpoint(run_dir)


def read_meta(ckpt_dir: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt_dir) / META_FILE).read_text())


def load_checkpoint(engine, ckpt_dir: Path, dist_info: DistInfo) -> dict[str, Any]:
    """Restore engine (weights, optimizer, loss scaler) and this rank's RNG; returns the meta."""
    meta = read_meta(ckpt_dir)
    model = engine.module
    saved = {k: meta["model_kwargs"].get(k) for k in ARCHITECTURE_KEYS} | {"target_dim": meta["target_dim"]}
    ours = {k: model.backbone.kwargs[k] for k in ARCHITECTURE_KEYS} | {"target_dim": model.target_dim}
    if saved != ours:
        raise ResumeError(f"checkpoint {ckpt_dir} holds another model ({meta['variant']}: {saved}) than this config "
                          f"builds ({ours}): use a new run_dir")
    if meta["world_size"] != dist_info.world_size:
        raise ResumeError(
            f"checkpoint {ckpt_dir} was written by {meta['world_size']} ranks, this run has "
            f"{dist_info.world_size}: ZeRO partitions the optimizer state per rank, so resume with the same "
            f"world size (or start a new run_dir from its model.pt)")
    saved_groups, groups = meta.get("undecayed_parameters"), undecayed_parameters(model)
    if saved_groups is not None and saved_groups != groups:  # absent: written before it was recorded
        moved = sorted(set(saved_groups) ^ set(groups))
        raise ResumeError(
            f"checkpoint {ckpt_dir} was written with other weight-decay groups (moved: {', '.join(moved[:4])}"
            f"{', ...' if len(moved) > 4 else ''}); ZeRO lays out the optimizer state by group, so it cannot be "
            f"loaded here: start a new run_dir from its model.pt")
    load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise ResumeError(f"checkpoint {ckpt_dir}: DeepSpeed state {ckpt_dir / DEEPSPEED_TAG} is missing")
    rng = torch.load(_rng_file(ckpt_dir, dist_info.rank), map_location="cpu", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if dist_info.device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], dist_info.device)
    return meta
