"""Progress reporting: one line per logged step, TensorBoard scalars and `log.jsonl` (rank 0 only).

MFU counts the matmul FLOPs of the model (3x forward: forward plus a backward twice its cost)
against the device's dense bf16/fp16 peak, where that peak is known.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

LOG_FILE = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"

# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s, from the vendors' data sheets. The
# first key found in the device's name wins: more specific names first.
PEAK_TFLOPS = {
    "H200 NVL": 835.5,
    "H200": 989.4,
    "H100 80GB HBM3": 989.4,   # SXM
    "H100 SXM": 989.4,
    "H100 NVL": 835.5,
    "H100 PCIe": 756.0,
    "A100": 312.0,
}


def device_peak_tflops(device: torch.device, precision: str) -> float | None:
    """The device's dense bf16/fp16 peak, or None (CPU, fp32, or a card not in PEAK_TFLOPS)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    return peak_tflops_of(torch.cuda.get_device_name(device))


def peak_tflops_of(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in device_name), None)


def train_flops_per_image(model_kwargs: dict, target_dim: int, masked_tokens: float) -> float:
    """Matmul FLOPs of one training image: 3 x forward (patch embed, blocks, head on masked tokens).
    The last block computes outputs for the masked tokens only (keys and values for all)."""
    d, h, depth = model_kwargs["embed_dim"], model_kwargs["mlp_hidden_dim"], model_kwargs["depth"]
    p = model_kwargs["patch_size"]
    n = (model_kwargs["img_size"] // p) ** 2
    t, m = n + 1, masked_tokens
    block = 8 * t * d * d + 4 * t * d * h + 4 * t * t * d  # qkv+proj, mlp, q.k and attn.v
    last_block = 6 * t * d * d + 2 * m * d * d + 4 * m * d * h + 4 * m * t * d
    forward = 2 * n * 3 * p * p * d + (depth - 1) * block + last_block + 2 * m * d * target_dim
    return 3.0 * forward


class Monitor:
    """Collects per-step stats and emits them every `every` steps; only rank 0 writes."""

    def __init__(self, run_dir: Path, every: int, enabled: bool, tensorboard: bool, start_step: int,
                 images_per_step: int, flops_per_image: float, peak_tflops: float | None, world_size: int):
        self.run_dir, self.every, self.enabled = Path(run_dir), every, enabled
        self.images_per_step, self.flops_per_image = images_per_step, flops_per_image
        self.peak_tflops, self.world_size = peak_tflops, world_size
        self._window_start = time.perf_counter()
        self._steps = 0
        self._data_seconds = 0.0
        self._loss_sum, self._loss_count = 0.0, 0  # finite losses of the window (fp16 overflow skips some)
        self.writer = None
        if enabled:
            self._truncate_log(start_step)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=start_step + 1)

    def _truncate_log(self, start_step: int) -> None:
        """On resume, drop records of steps after the checkpoint: the log stays one history."""
        path = self.run_dir / LOG_FILE
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= start_step]
        path.write_text("".join(line + "\n" for line in kept))

    def start_clock(self) -> None:
        """The first window's throughput counts from here (the loop's start), not from set-up."""
        self._window_start = time.perf_counter()

    def exclude(self, seconds: float) -> None:
        """Leave time that is not training (a checkpoint save) out of the window's throughput."""
        self._window_start += seconds

    def update(self, step: int, stats: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any] | None:
        """Record one step; every `every` steps return (and on rank 0 write) the record."""
        self._steps += 1
        self._data_seconds += stats["data_seconds"]
        if math.isfinite(stats["loss"]):
            self._loss_sum += stats["loss"]
            self._loss_count += 1
        if step % self.every:
            return None
        elapsed = time.perf_counter() - self._window_start
        img_per_s = self._steps * self.images_per_step / elapsed
        record = {
            "step": step,
            "loss": stats["loss"],
            "loss_avg": self._loss_sum / self._loss_count if self._loss_count else None,  # over the window
            "lr": stats["lr"],
            "loss_scale": stats["loss_scale"],
            "grad_norm": stats["grad_norm"],
            "img_per_s": round(img_per_s, 2),
            "data_wait": round(self._data_seconds / elapsed, 4),
            "mfu": None,
            **extra,
            "time": round(time.time(), 3),
        }
        if self.peak_tflops:
            per_device = img_per_s * self.flops_per_image / self.world_size
            record["mfu"] = round(per_device / (self.peak_tflops * 1e12), 4)
        self._window_start, self._steps, self._data_seconds = time.perf_counter(), 0, 0.0
        self._loss_sum, self._loss_count = 0.0, 0
        if self.enabled:
            self._write(record)
        return record

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / LOG_FILE, "a") as handle:
            # strict JSON: a non-finite loss or gradient norm (fp16 overflow) is written as null
            finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            handle.write(json.dumps(finite, allow_nan=False) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])
        mfu = f"{record['mfu']:.1%}" if record["mfu"] is not None else "n/a"
        grad = f"{record['grad_norm']:.3f}" if record["grad_norm"] is not None else "n/a"
        average = f"{record['loss_avg']:.4f}" if record["loss_avg"] is not None else "n/a"
        print(f"step {record['step']:>7} | loss {record['loss']:.4f} (avg {average}) | lr {record['lr']:.3e} | "
              f"scale {record['loss_scale']:g} | grad {grad} | {record['img_per_s']:.1f} img/s | "
              f"data wait {record['data_wait']:.0%} | mfu {mfu} | skipped {record['skipped_steps']} | "
              f"epoch {record['epoch']:.2f}", flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
