"""The target-cache stage's unit of work: one image shard in, one train shard out.

`ShardTargetCacher(config)(shard_id)` reads image shard `shard_id`, draws K views per image
(seeded by seed, key and view index: a rerun draws the same views), runs the teacher on every
view and writes train shard `shard_id`: the same keys in the same order, minus duplicates,
each sample with its image bytes, its json plus the views, and the targets `[K, N, D]`.

Decoding and view cropping run in a thread pool ahead of the teacher (PIL releases the GIL in
decode and resize); the teacher sees fixed-size batches of views under no_grad and autocast,
one batch in flight on the accelerator while the previous one is written. A sample whose image
does not decode gets a failure row with its reason and no tar sample, never a substitute.

`TargetCacheActor` holds one `ShardTargetCacher` (and so one teacher) per device in a Ray actor.
"""
from __future__ import annotations

import io
import json
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from eva.teacher import Teacher, TeacherSpec, build_teacher
from eva.views import ViewPolicy, draw_views, normalize_pixels, render_view
from shards import contract
from shards.manifest import file_sha256
from shards.reader import dump_npy, iter_tar, read_duplicates, read_rows
from shards.writer import ShardWriter

STATUS_DECODE_ERROR = "decode_error"      # the stored image no longer decodes
STATUS_BAD_METADATA = "bad_metadata"      # its json member is not a JSON object
STATUS_MISSING_SAMPLE = "missing_sample"  # a success row upstream without a tar sample

TARGET_ROW_SCHEMA = pa.schema([
    ("key", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
    ("sha256", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
])
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
INT8_MAX = 127


class TargetStageError(RuntimeError):
    """The stage refuses to run or to continue: names the input and what is wrong."""


class ShardsFailedError(TargetStageError):
    """Shards still failed after their retries; finished shards are kept for a rerun."""


@dataclass(frozen=True)
class CacheConfig:
    """Everything one shard task needs; picklable, sent once to each actor."""

    images: str
    output: str
    teacher: TeacherSpec
    identity: dict | None     # stage identity (targets, views, upstream) recorded in every shard's stats
    upstream_tar_sha256: dict  # {tar name: sha256} from the image directory's manifest
    views: int = 2
    dtype: str = "float16"
    batch_size: int = 64
    device: str = "cpu"
    precision: str = "fp32"
    seed: int = 0
    teacher_seed: int = 0
    policy: ViewPolicy = ViewPolicy()
    decode_workers: int = 2
    torch_threads: int | None = None


@dataclass
class Sample:
    """One upstream success row on its way to the train shard."""

    key: str
    row: dict
    members: dict[str, bytes] | None = None
    meta: dict | None = None
    views: list[dict] | None = None
    pixels: np.ndarray | None = None   # [K, S, S, 3] uint8, dropped once sent to the teacher
    status: str = contract.STATUS_SUCCESS
    error: str = ""
    width: int | None = None
    height: int | None = None
    targets: np.ndarray | None = None  # [K, N, D] float16 or int8
    scales: np.ndarray | None = None   # [K, N] float32, int8 only
    filled: int = 0

    def complete(self, k: int) -> bool:
        return self.status != contract.STATUS_SUCCESS or self.filled == k


def stage_identity(teacher_description: dict, views: int, policy: ViewPolicy, seed: int, dtype: str,
                   precision: str, upstream_manifest_sha256: str) -> dict:
    """What a train directory's targets depend on; a rerun must match it field by field."""
    return {
        "targets": {**teacher_description, "dtype": dtype, "precision": precision},
        "views": {"k": views, **policy.to_dict(), "seed": seed},
        "upstream_manifest_sha256": upstream_manifest_sha256,
    }


def identity_differences(recorded: Any, current: Any, where: str = "") -> list[str]:
    """`field: recorded X, now Y` for every field that differs (dotted names)."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        lines = []
        for key in sorted(set(recorded) | set(current)):
            lines += identity_differences(recorded.get(key), current.get(key), f"{where}.{key}" if where else key)
        return lines
    return [] if recorded == current else [f"{where}: recorded {recorded!r}, now {current!r}"]


def normalize_views(pixels: torch.Tensor, mean: Iterable[float] | torch.Tensor,
                    std: Iterable[float] | torch.Tensor) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> float32 [B, 3, S, S], through the trainer's normalisation."""
    return normalize_pixels(pixels.permute(0, 3, 1, 2).contiguous(), mean, std)  # NCHW, as the patch conv expects


def quantize_targets(targets: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[..., N, D] float -> (stored, per-token scales [..., N] or None); int8 value ~ q * scale.

    Targets are compared by cosine, so a symmetric per-token scale (max |x| -> 127) loses nothing
    that matters.
    """
    if dtype == "float16":
        return targets.to(torch.float16), None
    if dtype != "int8":
        raise ValueError(f"target dtype must be one of {contract.TARGET_DTYPES}, got {dtype!r}")
    x = targets.float()
    scales = x.abs().amax(dim=-1).clamp_min(1e-12) / INT8_MAX  # [..., N]; the floor keeps 0/0 away
    q = torch.round(x / scales.unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scales


def dequantize_targets(stored: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """Stored targets back to float32 [K, N, D]."""
    if scales is None:
        return stored.astype(np.float32)
    return stored.astype(np.float32) * scales[..., None].astype(np.float32)


def decode_rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.convert("RGB") if image.mode != "RGB" else image.copy()


def prepare_sample(sample: Sample, config: CacheConfig, size: int) -> Sample:
    """Decode, draw the K views and render their pixels; failures are recorded on the sample."""
    if sample.members is None:
        sample.status, sample.error = STATUS_MISSING_SAMPLE, "success row in the image shard's parquet, no sample in its tar"
        return sample
    members = sample.members
    try:
        meta = json.loads(members.get(contract.EXT_META, b"{}"))
        if not isinstance(meta, dict):
            raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
    except ValueError as error:
        sample.status, sample.error = STATUS_BAD_METADATA, f"{contract.EXT_META} member: {error}"
        return sample
    if contract.EXT_IMAGE not in members:
        sample.status, sample.error = STATUS_DECODE_ERROR, f"no .{contract.EXT_IMAGE} member"
        return sample
    try:
        image = decode_rgb(members[contract.EXT_IMAGE])
    except Exception as error:  # PIL raises many types for broken files; each one is this sample's failure
        sample.status, sample.error = STATUS_DECODE_ERROR, f"{type(error).__name__}: {error}"[:500]
        return sample
    sample.meta, sample.width, sample.height = meta, image.width, image.height
    sample.views = draw_views(sample.key, config.seed, config.views, image.width, image.height, config.policy)
    sample.pixels = np.stack([np.asarray(render_view(image, view, size)) for view in sample.views])
    return sample


def ordered_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, window: int) -> Iterator:
    """pool.map with at most `window` results waiting, in input order."""
    futures: deque = deque()
    for item in items:
        futures.append(pool.submit(fn, item))
        if len(futures) >= window:
            yield futures.popleft().result()
    while futures:
        yield futures.popleft().result()


def aligned_samples(tar: Path, expected_rows: list[dict]) -> Iterator[Sample]:
    """One Sample per expected row, in row order, with its tar members (None when absent).

    Streams the tar; tar members of keys not expected (duplicates, failure rows) are skipped.
    """
    index = {row["key"]: i for i, row in enumerate(expected_rows)}
    next_index = 0
    for key, members in iter_tar(tar):
        i = index.get(key)
        if i is None or i < next_index:
            continue
        for row in expected_rows[next_index:i]:
            yield Sample(key=row["key"], row=row)
        yield Sample(key=key, row=expected_rows[i], members=members)
        next_index = i + 1
    for row in expected_rows[next_index:]:
        yield Sample(key=row["key"], row=row)


@dataclass
class _Batch:
    slots: list[tuple[Sample, int]]
    stored: torch.Tensor
    scales: torch.Tensor | None
    finite: torch.Tensor
    done: Any = None  # CUDA event


@dataclass
class ShardCounters:
    images: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    teacher_seconds: float = 0.0


class ShardTargetCacher:
    """img2dataset-style unit of work: config in `__init__`, one shard per `__call__`, stats out.

    Picklable: the teacher is built lazily on the worker and never pickled.
    """

    def __init__(self, config: CacheConfig):
        self.config = config
        self._teacher: Teacher | None = None
        self._duplicates: set[str] | None = None
        self._normalisation: tuple[torch.Tensor, torch.Tensor] | None = None

    def __getstate__(self) -> dict:
        return {"config": self.config, "_teacher": None, "_duplicates": None, "_normalisation": None}

    @property
    def device(self) -> torch.device:
        return torch.device(self.config.device)

    @property
    def teacher(self) -> Teacher:
        if self._teacher is None:
            self._teacher = self._load_teacher()
        return self._teacher

    def _load_teacher(self) -> Teacher:
        config = self.config
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        teacher = build_teacher(config.teacher, device=config.device, seed=config.teacher_seed)
        if config.identity is None:  # a benchmark worker writes nothing
            return teacher
        recorded = {k: v for k, v in config.identity["targets"].items() if k not in ("dtype", "precision")}
        # the user's strings may name the same file differently on this node; contents must agree
        names = ("teacher", "weights")
        differences = identity_differences({k: v for k, v in recorded.items() if k not in names},
                                           {k: v for k, v in teacher.describe().items() if k not in names})
        if differences:
            raise TargetStageError("the teacher built on this worker differs from the driver's: "
                                   + "; ".join(f"targets.{d}" for d in differences))
        return teacher

    def describe_worker(self) -> dict:
        """Build the teacher now (fail early) and say where it runs."""
        teacher = self.teacher
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"device": name, "torch_threads": torch.get_num_threads(), "grid": list(teacher.grid),
                "dim": teacher.dim}

    def duplicates(self) -> set[str]:
        if self._duplicates is None:
            self._duplicates = set(read_duplicates(Path(self.config.images)))
        return self._duplicates

    def __call__(self, shard_id: int) -> dict:
        config = self.config
        images, output = Path(config.images), Path(config.output)
        tar = contract.tar_path(images, shard_id)
        teacher = self.teacher
        expected_sha = config.upstream_tar_sha256.get(tar.name)
        actual_sha = file_sha256(tar)
        if expected_sha != actual_sha:
            raise TargetStageError(f"image shard {tar}: checksum {actual_sha[:12]}... differs from the image "
                                   f"directory's manifest ({str(expected_sha)[:12]}...): the shard changed")
        duplicates = self.duplicates()
        expected_rows = [row for row in read_rows(images, shard_id)
                         if row["status"] == contract.STATUS_SUCCESS and row["key"] not in duplicates]
        counters = ShardCounters()
        started = time.time()
        with ShardWriter(output, shard_id, TARGET_ROW_SCHEMA) as writer:
            self._run(aligned_samples(tar, expected_rows), teacher, lambda s: self._write(writer, s, counters),
                      counters)
            views = counters.images * config.views
            seconds = max(time.time() - started, 1e-9)
            stats = writer.close({
                "identity": config.identity,
                "upstream_tar_sha256": actual_sha,
                "images": counters.images,
                "views": views,
                "failed_samples": counters.failed,
                "teacher_seconds": round(counters.teacher_seconds, 3),
                "views_per_s": round(views / seconds, 2),
            })
        return stats

    # -- the pipeline: prepare (threads) -> teacher batches -> ordered write --------------------

    def _run(self, samples: Iterator[Sample], teacher: Teacher, write: Callable[[Sample], None],
             counters: ShardCounters) -> None:
        config = self.config
        k, batch_size = config.views, config.batch_size
        window = 2 * math.ceil(batch_size / k) + 2 * config.decode_workers
        pending: deque[Sample] = deque()  # in upstream order, waiting for their targets
        queued: list[tuple[Sample, int]] = []
        in_flight: _Batch | None = None

        def flush() -> None:
            while pending and pending[0].complete(k):
                write(pending.popleft())

        with ThreadPoolExecutor(max_workers=config.decode_workers, thread_name_prefix="views") as pool:
            prepare = lambda sample: prepare_sample(sample, config, teacher.input_size)  # noqa: E731
            for sample in ordered_map(pool, prepare, samples, window):
                pending.append(sample)
                if sample.status == contract.STATUS_SUCCESS:
                    queued.extend((sample, view) for view in range(k))
                while len(queued) >= batch_size:
                    in_flight = self._step(teacher, queued[:batch_size], in_flight, counters)
                    queued = queued[batch_size:]
                flush()
        if queued:
            in_flight = self._step(teacher, queued, in_flight, counters)
        self._step(teacher, [], in_flight, counters)
        flush()
        if pending:
            raise RuntimeError(f"{len(pending)} samples never received their targets")

    def _step(self, teacher: Teacher, slots: list[tuple[Sample, int]], previous: _Batch | None,
              counters: ShardCounters) -> _Batch | None:
        """Launch `slots` on the teacher, then collect `previous`: the device never waits on writes."""
        started = time.time()
        launched = self._launch(teacher, slots) if slots else None
        if previous is not None:
            self._collect(previous)
        counters.teacher_seconds += time.time() - started
        return launched

    def _launch(self, teacher: Teacher, slots: list[tuple[Sample, int]]) -> _Batch:
        config, device = self.config, self.device
        pixels = torch.from_numpy(np.stack([sample.pixels[view] for sample, view in slots]))  # [B, S, S, 3]
        for sample, view in slots:
            if view == config.views - 1:
                sample.pixels = None  # all its views are in a batch now
        if device.type == "cuda":
            pixels = pixels.pin_memory().to(device, non_blocking=True)
        if self._normalisation is None:  # on the device once: no host copies inside the pipeline
            self._normalisation = tuple(torch.tensor(v, dtype=torch.float32, device=device)
                                        for v in (teacher.mean, teacher.std))
        x = normalize_views(pixels, *self._normalisation)  # [B, 3, S, S]
        autocast_dtype = PRECISIONS[config.precision]
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                             enabled=autocast_dtype is not None):
            y = teacher(x)  # [B, N, D]
        stored, scales = quantize_targets(y.float(), config.dtype)
        finite = torch.isfinite(stored if scales is None else y).all()
        if device.type != "cuda":
            return _Batch(slots, stored, scales, finite)
        batch = _Batch(slots, stored.to("cpu", non_blocking=True),
                       None if scales is None else scales.to("cpu", non_blocking=True),
                       finite.to("cpu", non_blocking=True), torch.cuda.Event())
        batch.done.record()
        return batch

    def _collect(self, batch: _Batch) -> None:
        if batch.done is not None:
            batch.done.synchronize()
        if not bool(batch.finite):
            keys = sorted({sample.key for sample, _ in batch.slots})
            raise TargetStageError(f"teacher produced non-finite targets (inf/nan) for a batch with keys "
                                   f"{keys[:5]}: check the weights and --precision")
        stored = batch.stored.numpy()
        scales = None if batch.scales is None else batch.scales.numpy().astype(np.float32)
        k = self.config.views
        for i, (sample, view) in enumerate(batch.slots):
            if sample.targets is None:
                sample.targets = np.empty((k, *stored.shape[1:]), dtype=stored.dtype)
                if scales is not None:
                    sample.scales = np.empty((k, scales.shape[1]), dtype=np.float32)
            sample.targets[view] = stored[i]
            if scales is not None:
                sample.scales[view] = scales[i]
            sample.filled += 1

    def _write(self, writer: ShardWriter, sample: Sample, counters: ShardCounters) -> None:
        row = {"key": sample.key, "sha256": sample.row.get("sha256"), "width": sample.width,
               "height": sample.height}
        if sample.status != contract.STATUS_SUCCESS:
            writer.add_row({**row, "status": sample.status, "error_message": sample.error})
            counters.failed[sample.status] = counters.failed.get(sample.status, 0) + 1
            return
        meta = {**sample.meta, "views": sample.views}
        members = {
            contract.EXT_IMAGE: sample.members[contract.EXT_IMAGE],
            contract.EXT_META: json.dumps(meta).encode(),
        }
        if contract.EXT_CAPTION in sample.members:
            members[contract.EXT_CAPTION] = sample.members[contract.EXT_CAPTION]
        members[contract.EXT_TARGETS] = dump_npy(sample.targets)
        if sample.scales is not None:
            members[contract.EXT_TARGET_SCALES] = dump_npy(sample.scales)
        writer.add_sample(sample.key, members)
        writer.add_row({**row, "status": contract.STATUS_SUCCESS, "error_message": None})
        counters.images += 1

    def time_bare_forward(self, iterations: int, warmup: int = 2) -> dict:
        """views/s of the teacher alone on this worker: same device, batch size and precision.

        The benchmark's baseline: a normalised batch already on the device, the forward under
        no_grad and autocast, synchronised; no decode, no transfers, no writes.
        """
        config, teacher, device = self.config, self.teacher, self.device
        size = teacher.input_size
        x = torch.randn(config.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        autocast_dtype = PRECISIONS[config.precision]

        def forward() -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                                 enabled=autocast_dtype is not None):
                teacher(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        for _ in range(warmup):
            forward()
        started = time.time()
        for _ in range(iterations):
            forward()
        seconds = time.time() - started
        return {"views_per_s": round(iterations * config.batch_size / seconds, 2), "seconds": round(seconds, 3),
                "batch_size": config.batch_size, "iterations": iterations, "torch_threads": torch.get_num_threads()}


class TargetCacheActor:
    """A Ray actor holding one teacher on one device (wrap with ray.remote(...))."""

    def __init__(self, config: CacheConfig):
        self.cacher = ShardTargetCacher(config)

    def ready(self) -> dict:
        return self.cacher.describe_worker()

    def cache_shard(self, shard_id: int) -> dict:
        return self.cacher(shard_id)

    def time_bare_forward(self, iterations: int) -> dict:
        return self.cacher.time_bare_forward(iterations)
