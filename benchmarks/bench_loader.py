"""Loader throughput per CPU core: the trainer's streaming loader on EVA-sized samples.

    python benchmarks/bench_loader.py [--seconds 15] [--rounds 5] [--out results.json]

Builds a small train shard directory like the target stage writes at EVA-01's geometry (real
photos stored at shorter side 256, JPEG q95; one cached view of 256 x 768 float16 targets), then
runs the trainer's loader (`make_loader`, data.num_workers 0) in this one process (one core: tar
read, shuffle, JPEG decode, crop + bicubic resize to 224, block mask, target slice, batching into
reused buffers) and prints JSON. Target: >= 400
images/s per core, counted per CPU-second of this one-thread process (median of rounds), so
other load on the machine does not move it; wall-clock rates are printed too. Decode and render
are also timed alone, to show where the time goes. The same stream is then run in one DataLoader
worker process, as the trainer runs it, and counted per CPU-second of that worker: the figure as
deployed, with the handover of each batch to the trainer.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data as skdata  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
import sys  # noqa: E402

sys.path.insert(0, str(REPO_ROOT))

from eva.train.config import config_from_dict  # noqa: E402
from report import emit, machine  # noqa: E402  (benchmarks/, this script's directory)
from eva.train.data import LoaderState, close_loader_iterator, make_loader, open_train_data  # noqa: E402
from eva.views import ViewPolicy, draw_views, render_view  # noqa: E402
from shards import contract  # noqa: E402
from shards.manifest import write_manifest  # noqa: E402
from shards.reader import dump_npy  # noqa: E402
from shards.writer import ShardWriter  # noqa: E402

TARGET_IMAGES_PER_S = 400
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
IMAGE_SIZE, GRID, DIM, SHORT_SIDE = 224, (16, 16), 768, 256


def stored_photo(rng: np.random.Generator) -> bytes:
    """A real photo, randomly cropped, stored as the image stage does (shorter side 256, q95)."""
    photo = Image.fromarray(getattr(skdata, PHOTOS[rng.integers(len(PHOTOS))])())
    w, h = photo.size
    cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = photo.crop((left, top, left + cw, top + ch))
    scale = SHORT_SIDE / min(crop.size)
    crop = crop.resize((max(SHORT_SIDE, round(crop.width * scale)), max(SHORT_SIDE, round(crop.height * scale))), Image.BICUBIC)
    buffer = io.BytesIO()
    crop.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def build(directory: Path, shards: int, per_shard: int) -> float:
    rng = np.random.default_rng(0)
    policy = ViewPolicy()
    total_bytes = 0
    for shard_id in range(shards):
        with ShardWriter(directory, shard_id) as writer:
            for index in range(per_shard):
                key = contract.make_key(shard_id, index, per_shard)
                jpg = stored_photo(rng)
                width, height = Image.open(io.BytesIO(jpg)).size
                views = draw_views(key, 0, 1, width, height, policy)
                targets = rng.standard_normal((1, GRID[0] * GRID[1], DIM)).astype(np.float16)
                members = {"jpg": jpg, "json": json.dumps({"key": key, "views": views}).encode(), "tgt.npy": dump_npy(targets)}
                total_bytes += sum(len(v) for v in members.values())
                writer.add_sample(key, members)
                writer.add_row({"key": key, "status": "success", "error_message": None})
            writer.close()
    write_manifest(directory, contract.STAGE_TARGETS, config={"built_by": "benchmarks/bench_loader.py"}, extra={
        "targets": {"teacher": "synthetic", "weights": "none", "input_size": IMAGE_SIZE, "grid": list(GRID), "dim": DIM,
                    "dtype": "float16"},
        "views": {"k": 1, **policy.to_dict(), "seed": 0},
    })
    return total_bytes / (shards * per_shard)


def rate(fn, items: list, seconds: float) -> float:
    """Calls of `fn` per CPU-second, over `seconds` of wall time."""
    done, started, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        for item in items:
            fn(item)
        done += len(items)
    return done / (time.process_time() - cpu)


def worker_rates_per_core(data, cfg, seconds: float, rounds: int) -> list[float]:
    """The same stream in one DataLoader worker process, as the trainer runs it: images per
    CPU-second of that worker (batches reach this process through shared memory)."""
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=1, prefetch_factor=2))
    batches = make_loader(data, cfg, 0, 1, LoaderState(), pin_memory=False)
    try:
        next(batches)  # warm-up: the worker fills its shuffle buffer
        worker = psutil.Process(batches.batches._workers[0].pid)
        rates = []
        for _ in range(rounds):
            count, wall, cpu = 0, time.perf_counter(), sum(worker.cpu_times()[:2])  # user + system, all threads
            while time.perf_counter() - wall < seconds / rounds:
                count += next(batches)["images"].shape[0]
            rates.append(count / (sum(worker.cpu_times()[:2]) - cpu))
        return rates
    finally:
        close_loader_iterator(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds of the loader")
    parser.add_argument("--rounds", type=int, default=5, help="the per-core rate is the median over rounds")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        directory = Path(tmp) / "train"
        bytes_per_sample = build(directory, shards=2, per_shard=128)
        cfg = config_from_dict({"model": {"name": "base"}, "data": {"train": str(directory), "num_workers": 0,
                                                                   "shuffle_buffer": 256},
                                "train": {"steps": 1, "batch_size": 64, "lr": 1.0e-3}, "run_dir": tmp})
        data = open_train_data(cfg, IMAGE_SIZE, GRID)
        batches = make_loader(data, cfg, 0, 1, LoaderState(), pin_memory=False)  # num_workers 0: this process
        next(batches)  # warm-up: fills the shuffle buffer
        # Rounds of wall and CPU time: images per CPU-second of this one-thread process is the
        # per-core rate, and is not moved by other jobs or a hypervisor taking the core away.
        cpu_rates, wall_rates = [], []
        for _ in range(args.rounds):
            count, wall, cpu = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - wall < args.seconds / args.rounds:
                count += next(batches)["images"].shape[0]
            cpu_rates.append(count / (time.process_time() - cpu))
            wall_rates.append(count / (time.perf_counter() - wall))
        loader_rate = float(np.median(cpu_rates))
        worker_rates = worker_rates_per_core(data, cfg, args.seconds, args.rounds)

        jpgs = [stored_photo(np.random.default_rng(i)) for i in range(16)]
        decode_rate = rate(lambda b: Image.open(io.BytesIO(b)).convert("RGB").load(), jpgs, 3)
        decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpgs]
        views = [draw_views(str(i), 0, 1, im.width, im.height, ViewPolicy())[0] for i, im in enumerate(decoded)]
        render_rate = rate(lambda i: render_view(decoded[i], views[i], IMAGE_SIZE), list(range(16)), 3)
    bound = 1.0 / (1.0 / decode_rate + 1.0 / render_rate)
    result = {
        "benchmark": "loader images/s per core",
        "images_per_s_per_core": round(loader_rate, 1),
        "per_round": {"images_per_cpu_s": [round(r, 1) for r in cpu_rates],
                      "images_per_wall_s": [round(r, 1) for r in wall_rates]},
        "target": TARGET_IMAGES_PER_S,
        "meets_target": loader_rate >= TARGET_IMAGES_PER_S,
        # as the trainer runs it (data.num_workers > 0): the same work plus the handover to the trainer
        "in_dataloader_worker_per_core": round(float(np.median(worker_rates)), 1),
        "in_dataloader_worker_per_round": [round(r, 1) for r in worker_rates],
        "sample": {"stored_short_side": SHORT_SIDE, "jpeg_quality": 95, "view_size": IMAGE_SIZE,
                   "targets": f"1 view x {GRID[0] * GRID[1]} x {DIM} float16", "bytes_per_sample": round(bytes_per_sample)},
        "alone_per_core": {"jpeg_decode_per_s": round(decode_rate, 1), "crop_resize_224_per_s": round(render_rate, 1)},
        # decode + render are fixed by the pixel contract (DESIGN.md "Views"): the loader's ceiling
        "decode_plus_render_per_s": round(bound, 1),
        "loader_share_of_decode_plus_render": round(loader_rate / bound, 3),
        "machine": machine(),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
