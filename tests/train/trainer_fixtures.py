"""Helpers of the trainer tests: tiny train shard directories with real tiny-teacher targets, and a
runner for `python -m eva.train` subprocesses. (A module of its own, not conftest.py: tests import it.)"""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from eva.teacher import load_teacher
from eva.views import ViewPolicy, draw_views, render_view, to_normalized_tensor
from shards import contract
from shards.manifest import write_manifest
from shards.reader import dump_npy
from shards.writer import ShardWriter

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO_ROOT / "configs" / "pretrain" / "tiny_cpu.yaml"
TINY_TEACHER = REPO_ROOT / "configs" / "teachers" / "tiny.json"
POLICY = ViewPolicy()  # EVA-01's, as tiny_cpu.yaml
VIEW_SEED = 7


def textured_image(seed: int, width: int, height: int) -> Image.Image:
    """Random 8x8 colour blocks, bicubic-upsampled: structure at the patch scale of a 64 px view."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse, "RGB").resize((width, height), Image.BICUBIC)


def build_train_dir(directory: Path, shards: int, per_shard: int, views: int = 2, dtype: str = "float16",
                    nan_targets: bool = False) -> Path:
    """A train shard directory as the target stage writes it, with targets of the tiny teacher."""
    teacher = load_teacher(str(TINY_TEACHER), "none", seed=0)
    for shard_id in range(shards):
        with ShardWriter(directory, shard_id) as writer:
            for index in range(per_shard):
                key = contract.make_key(shard_id, index, per_shard)
                width, height = 80 + (index % 3) * 16, 72 + (index % 2) * 24
                buffer = io.BytesIO()
                textured_image(int(key), width, height).save(buffer, format="JPEG", quality=95)
                stored = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
                sample_views = draw_views(key, VIEW_SEED, views, width, height, POLICY)
                pixels = torch.stack([to_normalized_tensor(render_view(stored, v, teacher.input_size), teacher.mean, teacher.std)
                                      for v in sample_views])
                with torch.no_grad():
                    targets = teacher(pixels).numpy()  # [K, N, D]
                if nan_targets:
                    targets[:] = np.nan
                members = {"jpg": buffer.getvalue(),
                           "json": json.dumps({"key": key, "width": width, "height": height, "views": sample_views}).encode()}
                if dtype == "int8":
                    scales = np.abs(targets).max(-1) / 127.0  # [K, N]
                    members["tgt.npy"] = dump_npy(np.round(targets / scales[..., None]).astype(np.int8))
                    members["tgs.npy"] = dump_npy(scales.astype(np.float32))
                else:
                    members["tgt.npy"] = dump_npy(targets.astype(np.float16))
                writer.add_sample(key, members)
                writer.add_row({"key": key, "status": "success", "error_message": None})
            writer.close()
    write_manifest(directory, contract.STAGE_TARGETS, config={"built_by": "tests/train/conftest.py"}, extra={
        "targets": {**teacher.describe(), "dtype": dtype},
        "views": {"k": views, **POLICY.to_dict(), "seed": VIEW_SEED},
    })
    return directory


def build_image_dir(directory: Path, shards: int, per_shard: int, duplicates: list[str]) -> Path:
    """An image shard directory (stage images) with a duplicates list, as the shard pipeline writes it."""
    for shard_id in range(shards):
        with ShardWriter(directory, shard_id) as writer:
            for index in range(per_shard):
                key = contract.make_key(shard_id, index, per_shard)
                buffer = io.BytesIO()
                textured_image(int(key), 96, 72).save(buffer, format="JPEG", quality=95)
                writer.add_sample(key, {"jpg": buffer.getvalue(), "json": json.dumps({"key": key}).encode()})
                writer.add_row({"key": key, "status": "success", "error_message": None})
            writer.close()
    pq.write_table(pa.table({"key": duplicates, "first_key": ["00000000"] * len(duplicates)}),
                   directory / contract.DUPLICATES_FILE)
    write_manifest(directory, contract.STAGE_IMAGES, config={"built_by": "tests/train/test_data.py"})
    return directory


def run_trainer(*overrides: str, launcher: list[str] | None = None, timeout: float = 600,
                check: bool = True) -> subprocess.CompletedProcess:
    """`python -m eva.train --config tiny_cpu.yaml OVERRIDES` (optionally under a launcher)."""
    command = (launcher or [sys.executable]) + ["-m", "eva.train", "--config", str(TINY_CONFIG), *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"trainer exited {result.returncode}\nstdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-6000:]}")
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
