"""The training loop: `train_one_step` (one optimizer step, its costly lines in plain sight) and
`run` (set up, resume, loop, checkpoint, stop), which every entry point calls.
"""
from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from eva.loss import negative_cosine_loss
from eva.float8 import float8_support_error
from eva.mim import MIMModel, create_mim_model
from eva.teacher import load_teacher
from eva.train import checkpointing, engine as engine_lib
from eva.train.checkpointing import TrainProgress
from eva.train.config import Config, ConfigError, changed_keys
from eva.train.data import LoaderState, TrainData, close_loader_iterator, dequantize_targets, make_loader, open_train_data
from eva.train.monitor import Monitor, device_peak_tflops, train_flops_per_image
from eva.views import normalize_pixels
from eva.vit import VARIANTS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The loss stayed non-finite for `train.nonfinite_patience` consecutive steps."""


@dataclass
class StepContext:
    """What one step needs besides the engine and the data."""

    device: torch.device
    dtype: torch.dtype
    mean: torch.Tensor                 # [1, 3, 1, 1] student normalisation
    std: torch.Tensor
    grad_accum: int
    mask_width: int                    # prediction rows per image: the mask's num_masking_patches bounds the count
    teacher: torch.nn.Module | None = None   # online mode
    teacher_mean: torch.Tensor | None = None
    teacher_std: torch.Tensor | None = None

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Teacher features [B, N, D] float32: cached (dequantised) or computed now on the same pixels."""
        if self.teacher is None:
            return dequantize_targets(batch, self.device)
        pixels = batch.get("teacher_images", batch["images"]).to(self.device, non_blocking=True)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.teacher(normalize_pixels(pixels, self.teacher_mean, self.teacher_std)).float()  # [B, N, D]


def _no_mark(phase: str) -> None:
    pass


def train_one_step(engine, batches: Iterator[dict], lr: float, ctx: StepContext,
                   mark: Callable[[str], None] = _no_mark) -> dict[str, Any]:
    """One optimizer step over `ctx.grad_accum` micro-batches; returns this rank's stats.

    `mark(phase)` is called as each phase ends ("forward_loss", "backward", "optimizer_step" per
    micro-batch, then "stats"): the GPU benchmark times them there.
    """
    engine_lib.set_lr(engine, lr)
    loss_sum = torch.zeros((), device=ctx.device)
    data_seconds = 0.0
    for _ in range(ctx.grad_accum):
        started = time.perf_counter()
        batch = next(batches)
        data_seconds += time.perf_counter() - started
        images = normalize_pixels(batch["images"].to(ctx.device, non_blocking=True), ctx.mean, ctx.std).to(ctx.dtype)  # [B, 3, S, S]
        mask = batch["mask"].to(ctx.device, non_blocking=True)                        # [B, N] bool
        out = engine(images, mask, ctx.mask_width)                                    # forward: [B, Q, D] predictions
        loss = negative_cosine_loss(out.pred, out.gather(ctx.targets(batch)), out.valid)  # over masked patches
        mark("forward_loss")
        engine.backward(loss)                                                         # backward (+ reduce at the boundary)
        mark("backward")
        engine.step()                                                                 # optimizer step at the boundary
        mark("optimizer_step")
        loss_sum += loss.detach()
    stats = {
        "loss": loss_sum / ctx.grad_accum,   # tensor: averaged over ranks by the caller
        "lr": lr,
        "loss_scale": engine_lib.loss_scale(engine),
        "grad_norm": engine_lib.grad_norm(engine),
        "applied": engine.was_step_applied(),
        "data_seconds": data_seconds,
    }
    mark("stats")
    return stats


def share_step_results(loss: torch.Tensor, stop_requested: bool, dist_info: engine_lib.DistInfo) -> tuple[float, bool]:
    """One small all-reduce per step: the loss averaged over ranks, and whether any rank got SIGTERM
    (so every rank takes the same decision to stop, save, or give up on non-finite losses)."""
    shared = torch.stack([loss.float(), torch.tensor(float(stop_requested), device=dist_info.device)])
    dist.all_reduce(shared)
    return shared[0].item() / dist_info.world_size, shared[1].item() > 0


class StopRequest:
    """SIGTERM sets a flag; the loop checks it after each step (on every rank, via all-reduce)."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():  # Ray Train runs us in a thread
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _outcome(step: int, cfg: Config) -> str | None:
    if step >= cfg.train.steps:
        return "finished"
    if cfg.train.stop_at is not None and step >= cfg.train.stop_at:
        return "stopped"
    return None


def _variant_geometry(name: str) -> tuple[int, tuple[int, int]]:
    if name not in VARIANTS:
        raise ConfigError(f"config key model.name = {name!r}: not a model variant; known: {', '.join(VARIANTS)}")
    variant = VARIANTS[name]
    side = variant["img_size"] // variant["patch_size"]
    return variant["img_size"], (side, side)


def make_model(cfg: Config, target_dim: int) -> MIMModel:
    """The MIM model as the config asks: architecture, drop path, attention path, and the runtime
    choices that leave the weights alone (gradient checkpointing, float8 matmuls)."""
    model = create_mim_model(cfg.model.name, target_dim, drop_path_rate=cfg.model.drop_path, fused_attn=cfg.model.fused_attn)
    model.backbone.set_grad_checkpointing(cfg.model.grad_checkpointing)
    model.backbone.set_float8_matmuls(cfg.model.float8_matmuls)
    return model


def _channel_tensor(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)


def _resume_loader_state(meta: dict, cfg: Config, data: TrainData, world_size: int) -> LoaderState:
    """The saved data position, or (if the loader layout changed) the start of the next epoch."""
    saved = meta["config"]
    same_layout = (saved["data"]["num_workers"] == cfg.data.num_workers
                   and saved["train"]["batch_size"] == cfg.train.batch_size and meta["world_size"] == world_size)
    position = meta["data_position"]
    if same_layout:
        return LoaderState(position["start_epoch"], position["batches"])
    next_epoch = max(position["start_epoch"] + 1, math.ceil(meta["samples_seen"] / data.total_count))
    print(f"warning: data loader layout changed since the checkpoint (num_workers, batch size or world size); "
          f"resume is not sample-exact: data restarts at epoch {next_epoch}", flush=True)
    return LoaderState(next_epoch, 0)


def _resume(engine, run_dir: Path, cfg: Config, data: TrainData, dist_info) -> tuple[TrainProgress, Path | None]:
    """Load the run's latest checkpoint into `engine` if there is one; returns where training stands."""
    resume_dir = checkpointing.find_resume_checkpoint(run_dir)
    if resume_dir is None:
        torch.manual_seed(cfg.seed * 100003 + dist_info.rank + 1)  # per-rank drop path
        return TrainProgress(), None
    meta = checkpointing.load_checkpoint(engine, resume_dir, dist_info)
    engine_lib.apply_optimizer_settings(engine, cfg)  # the load restored the checkpoint's settings
    if meta["train_manifest_sha256"] != data.manifest_sha256:
        raise checkpointing.ResumeError(
            f"{data.directory} changed since checkpoint {resume_dir} (manifest sha256 {meta['train_manifest_sha256'][:12]}... "
            f"then, {data.manifest_sha256[:12]}... now): start a new run_dir to train on other data")
    progress = TrainProgress(meta["step"], meta["samples_seen"], meta["skipped_steps"],
                             _resume_loader_state(meta, cfg, data, dist_info.world_size))
    changed = [k for k in changed_keys(meta["config"], cfg.to_dict()) if k != "train.stop_at"]
    if dist_info.is_main:
        print(f"resuming from {resume_dir} at step {progress.step}"
              + (f" (config changed: {', '.join(changed)})" if changed else ""), flush=True)
    return progress, resume_dir


def run(cfg: Config, report: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Train (or resume) the run `cfg` describes; returns a summary. `report` receives each log
    record on every rank (Ray Train passes ray.train.report)."""
    image_size, grid = _variant_geometry(cfg.model.name)
    dist_info = engine_lib.init_distributed()
    device = dist_info.device
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ConfigError("config key precision = 'fp16': DeepSpeed's fp16 engine needs a GPU; use bf16 or fp32 on CPU")
    if cfg.model.float8_matmuls and (reason := float8_support_error(device)):
        raise ConfigError(f"config key model.float8_matmuls = True: {reason}; set it to false")
    run_dir = Path(cfg.run_dir).resolve()

    teacher = None
    if cfg.data.targets == "online":
        t = cfg.data.teacher
        teacher = load_teacher(t.model, t.weights, device=str(device), seed=t.seed)
    data = open_train_data(cfg, image_size, grid, teacher)

    torch.manual_seed(cfg.seed)  # identical init on every rank
    model = make_model(cfg, data.target_dim)
    engine = engine_lib.build_engine(model, cfg, dist_info)
    meta_base = {"variant": cfg.model.name, "config": cfg.to_dict(), "train_manifest_sha256": data.manifest_sha256,
                 "train_dir": str(data.directory)}

    progress, resume_dir = _resume(engine, run_dir, cfg, data, dist_info)
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())

    images_per_step = cfg.train.batch_size * cfg.train.grad_accum * dist_info.world_size
    dtype = DTYPES[cfg.precision]
    ctx = StepContext(device, dtype, _channel_tensor(cfg.data.mean, device), _channel_tensor(cfg.data.std, device),
                      cfg.train.grad_accum, cfg.mask.num_masking_patches)
    if teacher is not None:
        ctx.teacher, ctx.teacher_mean, ctx.teacher_std = teacher, _channel_tensor(teacher.mean, device), _channel_tensor(teacher.std, device)
    monitor = Monitor(run_dir, cfg.log.every, dist_info.is_main, cfg.log.tensorboard, progress.step, images_per_step,
                      train_flops_per_image(model.backbone.kwargs, data.target_dim, cfg.mask.num_masking_patches),
                      device_peak_tflops(device, cfg.precision), dist_info.world_size)
    last_checkpoint = resume_dir
    stop = StopRequest()
    batches = make_loader(data, cfg, dist_info.rank, dist_info.world_size, progress.loader, device.type == "cuda")
    nonfinite_since: int | None = None  # first step of the current run of non-finite losses
    outcome = _outcome(progress.step, cfg)
    monitor.start_clock()
    try:
        while outcome is None:
            try:
                stats = train_one_step(engine, batches, engine_lib.lr_at(progress.step, cfg), ctx)
            except Exception as error:
                if not engine_lib.loss_scale_exhausted(error):
                    raise
                raise NonFiniteLossError(
                    f"fp16 gradients overflowed at the minimum loss scale (loss_scale.min_scale = {cfg.loss_scale.min_scale:g}) "
                    f"at step {progress.step + 1}; stopping. Last good checkpoint: "
                    f"{last_checkpoint or 'none (no checkpoint written yet)'}") from error
            progress.step += 1
            progress.loader.batches += cfg.train.grad_accum
            progress.samples_seen += images_per_step
            progress.skipped_steps += 0 if stats["applied"] else 1
            loss, stop_requested = share_step_results(stats["loss"], stop.requested, dist_info)
            stats["loss"] = loss
            record = monitor.update(progress.step, stats, {
                "skipped_steps": progress.skipped_steps, "samples_seen": progress.samples_seen,
                "epoch": progress.samples_seen / data.total_count,
            })
            if record is not None and report is not None:
                report(record)
            nonfinite_since = (nonfinite_since or progress.step) if not math.isfinite(loss) else None
            if nonfinite_since and progress.step - nonfinite_since + 1 >= cfg.train.nonfinite_patience:
                raise NonFiniteLossError(
                    f"loss was not finite for {progress.step - nonfinite_since + 1} consecutive steps (steps "
                    f"{nonfinite_since} to {progress.step}); stopping at step {progress.step}. Last good "
                    f"checkpoint: {last_checkpoint or 'none (no checkpoint written yet)'}")
            outcome = "terminated" if stop_requested else _outcome(progress.step, cfg)
            due = progress.step % cfg.checkpoint.every == 0 or outcome is not None
            if due and nonfinite_since is None:
                saving = time.perf_counter()
                last_checkpoint = checkpointing.save_checkpoint(engine, run_dir, progress, meta_base, dist_info)
                monitor.exclude(time.perf_counter() - saving)  # img/s and MFU count training time only
    finally:
        close_loader_iterator(batches)
        monitor.close()
        stop.restore()
    if dist_info.is_main:
        reason = {"finished": "train.steps reached", "stopped": "train.stop_at reached", "terminated": "SIGTERM"}[outcome]
        print(f"{outcome} at step {progress.step} ({reason}); last checkpoint: {last_checkpoint or 'none'}", flush=True)
    return {"outcome": outcome, "step": progress.step, "checkpoint": str(last_checkpoint) if last_checkpoint else None,
            "skipped_steps": progress.skipped_steps}
