"""Streaming loader: shards -> samples -> (view, mask, targets) -> batches, deterministic and resumable.

Per epoch, each loader worker of each rank reads its own shards through a visible list of
webdataset stages (`worker_epoch_pipeline`): shard list (epoch-seeded order, split by rank then
worker), tar reading, duplicate filter, seeded shuffle buffer, resume skip, decode. Batches are
made continuously across epochs, so a worker's output is one infinite, deterministic stream.

Exact resume: torch's DataLoader hands out batches round-robin over its workers, so after `b`
batches worker `w` has contributed ceil((b - w) / n) of them and worker `b % n` serves next. A
resumed loader relabels its workers so that DataLoader worker 0 is logical worker `b % n`, and
each logical worker drops (before decoding) the samples it had already contributed. The data
position is then one number per rank: batches consumed since `start_epoch` began.

Per-sample randomness (which stored view, the fresh view in online mode, the block mask) comes
from a generator seeded by (seed, key, epoch): it does not depend on batching or worker count.
Each of the loader's random streams starts its seed with a tag of its own (STREAM_TAGS), so they
repeat neither each other nor the target stage's view streams (eva.views.view_rng, seeded by
(seed, key, view index)) unless a seed equals a tag: without it, epoch e's mask would reuse the very
numbers that drew stored view e.

Each worker stacks its batches into a ring of reused shared-memory buffers (BatchBuffers); the
trainer hands a batch's buffers back by asking for the next batch (ReleasingIterator).
"""
from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from eva.masking import BlockMaskGenerator
from eva.views import ViewPolicy, render_view, sample_view
from shards import contract
from shards.manifest import manifest_hash
from shards.reader import iter_tar, load_manifest, load_npy, read_duplicates
from shards.tarstream import TarFormatError

VIEW_MATCH_TOLERANCE = 1e-6


class DataError(ValueError):
    """A train directory this run cannot read as asked: names the directory and what is wrong."""


class ManifestMismatch(DataError):
    """The train directory was made for another model or view policy than this config's."""


@dataclass
class TrainData:
    """What the loader reads: a checked shard directory and the shapes it must produce."""

    directory: Path
    mode: str                         # cached | online
    shard_names: list[str]            # NNNNNN.tar, manifest order
    shard_counts: list[int]           # samples per shard that the loader yields (duplicates removed)
    manifest_sha256: str
    image_size: int                   # student input size
    grid: tuple[int, int]             # student patch grid
    target_dim: int                   # D of the targets (manifest's, or the online teacher's)
    views_per_sample: int = 0         # K (cached mode)
    target_dtype: str = "float16"     # cached mode storage dtype
    teacher_size: int = 0             # online mode: teacher input size
    duplicates: frozenset[str] = field(default_factory=frozenset)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def total_count(self) -> int:
        return sum(self.shard_counts)


def _mismatch(what: str, config_value: Any, manifest_value: Any, directory: Path, config_key: str) -> ManifestMismatch:
    return ManifestMismatch(
        f"train directory {directory} does not match this run: {what} is {manifest_value!r} in its "
        f"manifest but {config_value!r} for this run ({config_key}); use a train directory made for this "
        f"model and view policy, or change the config")


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(float(x) - float(y)) <= VIEW_MATCH_TOLERANCE for x, y in zip(a, b))


def _same_teacher(configured: str, recorded: str | None) -> bool:
    """Same open_clip model name, or the same config file however the path was written."""
    return recorded is not None and (configured == recorded or Path(configured).resolve() == Path(recorded).resolve())


def _shard_list(directory: Path, manifest: dict) -> tuple[list[str], list[int]]:
    names, counts = [], []
    for shard in manifest.get("shards", []):
        if contract.parse_shard_file(shard["name"]) is None or not shard["name"].endswith(".tar"):
            raise DataError(f"{directory}/{contract.MANIFEST_FILE}: shard name {shard['name']!r} is not a contract tar name")
        if shard["count"] > 0:
            names.append(shard["name"])
            counts.append(int(shard["count"]))
    if not names:
        raise DataError(f"train directory {directory} holds no samples (its manifest lists no non-empty shard)")
    return names, counts


def open_train_data(cfg, image_size: int, grid: tuple[int, int], teacher=None) -> TrainData:
    """Read and check `cfg.data.train` against the model (grid, target dim) and the config (views).

    `teacher` (online mode) is the loaded eva.teacher.Teacher. Raises ManifestMismatch naming both
    values when the directory was made for something else.
    """
    directory = Path(cfg.data.train).resolve()
    try:
        manifest = load_manifest(directory)
    except (OSError, ValueError) as error:
        raise DataError(f"data.train: {error}") from None
    expected_stage = contract.STAGE_TARGETS if cfg.data.targets == "cached" else contract.STAGE_IMAGES
    if manifest.get("stage") != expected_stage:
        raise _mismatch("the stage", expected_stage, manifest.get("stage"), directory, f"data.targets={cfg.data.targets}")
    names, counts = _shard_list(directory, manifest)
    common = dict(directory=directory, mode=cfg.data.targets, manifest_sha256=manifest_hash(directory),
                  image_size=image_size, grid=tuple(grid))
    if cfg.data.targets == "online":
        duplicates = frozenset(read_duplicates(directory))
        if teacher.grid != tuple(grid):
            raise DataError(f"the online teacher {cfg.data.teacher.model} has a {list(teacher.grid)} patch grid, the "
                            f"student (model.name={cfg.model.name}) {list(grid)}: targets must be per student patch")
        target_dim = teacher.dim
        if cfg.model.target_dim is not None and cfg.model.target_dim != target_dim:
            raise DataError(f"the online teacher {cfg.data.teacher.model} gives {target_dim}-d targets, but "
                            f"model.target_dim is {cfg.model.target_dim}")
        return TrainData(shard_names=names, shard_counts=_counts_without(names, counts, duplicates, directory),
                         target_dim=target_dim, teacher_size=teacher.input_size, duplicates=duplicates, **common)

    targets, views = manifest.get("targets") or {}, manifest.get("views") or {}
    manifest_grid = list(targets.get("grid", []))
    if manifest_grid != list(grid):
        raise _mismatch("the patch grid", list(grid), manifest_grid, directory, f"model.name={cfg.model.name}")
    dim = targets.get("dim")
    if cfg.model.target_dim is not None and cfg.model.target_dim != dim:
        raise _mismatch("the feature dim", cfg.model.target_dim, dim, directory, "model.target_dim")
    if cfg.data.teacher.model is not None and not _same_teacher(cfg.data.teacher.model, targets.get("teacher")):
        raise _mismatch("the teacher", cfg.data.teacher.model, targets.get("teacher"), directory, "data.teacher.model")
    policy = cfg.data.views
    for key in ("scale", "ratio"):
        if not _close(getattr(policy, key), views.get(key, [])):
            raise _mismatch(f"the view {key}", getattr(policy, key), views.get(key), directory, f"data.views.{key}")
    if abs(policy.flip_p - float(views.get("flip_p", -1))) > VIEW_MATCH_TOLERANCE:
        raise _mismatch("the view flip_p", policy.flip_p, views.get("flip_p"), directory, "data.views.flip_p")
    dtype = targets.get("dtype")
    if dtype not in contract.TARGET_DTYPES:
        raise DataError(f"{directory}: manifest targets.dtype {dtype!r} is not one of {contract.TARGET_DTYPES}")
    k = int(views.get("k", 0))
    if k < 1:
        raise DataError(f"{directory}: manifest views.k {views.get('k')!r} must be >= 1")
    return TrainData(shard_names=names, shard_counts=counts, target_dim=int(dim), views_per_sample=k,
                     target_dtype=dtype, **common)


def _counts_without(names: list[str], counts: list[int], duplicates: frozenset[str], directory: Path) -> list[int]:
    # Keys start with their shard's id (contract.make_key), so duplicates are counted per shard.
    per_shard: dict[int, int] = {}
    for key in duplicates:
        shard_id = int(key[: contract.SHARD_ID_DIGITS])
        per_shard[shard_id] = per_shard.get(shard_id, 0) + 1
    result = []
    for name, count in zip(names, counts):
        kept = count - per_shard.get(contract.parse_shard_file(name), 0)
        if kept < 0:
            raise DataError(f"{directory}: {contract.DUPLICATES_FILE} lists more keys of {name} than it holds")
        result.append(kept)
    return result


# the first seed word of each of the loader's random streams: keeps them apart (module docstring)
STREAM_TAGS = {"shard_order": 2**31 + 1, "shuffle": 2**31 + 2, "sample": 2**31 + 3}


def sample_rng(seed: int, key: str, epoch: int) -> np.random.Generator:
    """The generator for one sample in one epoch: view choice (or fresh view), then mask."""
    return np.random.default_rng(np.random.SeedSequence([STREAM_TAGS["sample"], seed, int(key), epoch]))


def epoch_shards(data: TrainData, seed: int, epoch: int, rank: int, world_size: int, worker: int, num_workers: int) -> list[int]:
    """Indices of the shards that logical `worker` of `rank` reads in `epoch` (split by node, then worker)."""
    rng = np.random.default_rng(np.random.SeedSequence([STREAM_TAGS["shard_order"], seed, epoch]))
    order = rng.permutation(len(data.shard_names))
    return [int(i) for i in order[rank::world_size][worker::num_workers]]


class TarSamples:
    """webdataset stage: shard urls -> raw samples `{"__key__", "__url__", ext: data}`, members
    grouped by key as `wds.tarfile_to_samples` does. The data are read-only memoryviews into the
    mapped shard (shards.tarstream): tarfile's small reads into fresh buffers were a sixth of the
    loader's time, and the targets are then copied once, into the batch."""

    def __call__(self, sources: Iterator[dict]) -> Iterator[dict]:
        for source in sources:
            url = source["url"]
            try:
                for key, members in iter_tar(url, copy=False):
                    yield {"__key__": key, "__url__": url, **members}
            except (OSError, TarFormatError, ValueError) as error:
                raise DataError(f"shard {url} cannot be read: {error}") from error


class SkipDuplicates:
    def __init__(self, duplicates: frozenset[str]):
        self.duplicates = duplicates

    def __call__(self, sample: dict) -> bool:
        return sample["__key__"] not in self.duplicates


class DecodeSample:
    """Raw tar sample -> arrays: the view's pixels (uint8 CHW), its targets, and a block mask."""

    def __init__(self, data: TrainData, seed: int, epoch: int, mask_generator: BlockMaskGenerator, policy: ViewPolicy):
        self.data, self.seed, self.epoch = data, seed, epoch
        self.mask_generator, self.policy = mask_generator, policy

    def _where(self, sample: dict) -> str:
        return f"sample {sample['__key__']} of {sample.get('__url__', '?')}"

    def __call__(self, sample: dict) -> dict[str, Any]:
        data, key = self.data, sample["__key__"]
        rng = sample_rng(self.seed, key, self.epoch)
        try:
            image = Image.open(io.BytesIO(sample[contract.EXT_IMAGE]))
            image.load()
            if image.mode != "RGB":  # stored images are RGB; convert("RGB") of one would copy it
                image = image.convert("RGB")
        except Exception as error:
            raise DataError(f"{self._where(sample)}: image cannot be decoded ({error})") from error
        out: dict[str, Any] = {"epoch": self.epoch}
        if data.mode == "cached":
            views = json.loads(bytes(sample[contract.EXT_META]))["views"]
            if len(views) != data.views_per_sample:
                raise DataError(f"{self._where(sample)}: {len(views)} views, manifest says {data.views_per_sample}")
            index = int(rng.integers(len(views)))
            view = views[index]
            targets = npy_view(sample[contract.EXT_TARGETS])  # [K, N, D]
            expected = (data.views_per_sample, data.num_patches, data.target_dim)
            if targets.shape != expected or targets.dtype != np.dtype(data.target_dtype):
                raise DataError(f"{self._where(sample)}: targets {targets.dtype} {list(targets.shape)}, "
                                 f"manifest says {data.target_dtype} {list(expected)}")
            out["targets"] = targets[index]  # [N, D]
            if data.target_dtype == "int8":
                out["target_scales"] = npy_view(sample[contract.EXT_TARGET_SCALES])[index].astype(np.float32)  # [N]
        else:
            view = sample_view(rng, image.width, image.height, self.policy)
            if data.teacher_size != data.image_size:
                out["teacher_images"] = _chw(render_view(image, view, data.teacher_size))
        out["images"] = _chw(render_view(image, view, data.image_size))
        out["mask"] = self.mask_generator(rng).reshape(-1)  # [N] bool
        return out


def npy_view(data: bytes | memoryview) -> np.ndarray:
    """A read-only array over the bytes of an .npy file, without copying them (the loader's hot
    path: targets are ~400 KB a sample). Like shards.reader.load_npy, it never unpickles."""
    major = data[6] if data[:6] == b"\x93NUMPY" else 0
    if major not in (1, 2):  # not an npy file, or format 3.0 (utf-8 field names): the general reader
        return load_npy(data)
    offset = 10 + int.from_bytes(data[8:10], "little") if major == 1 else 12 + int.from_bytes(data[8:12], "little")
    header = bytes(data[:offset])  # a key of _NPY_HEADERS: never a view that would pin the shard's map
    if header not in _NPY_HEADERS:  # every sample of a directory has the same header: parse it once
        stream = io.BytesIO(header)
        np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(stream)
        if dtype.hasobject or fortran_order:
            raise ValueError(f"npy array of dtype {dtype} (fortran order {fortran_order}) is not a plain C array")
        _NPY_HEADERS[header] = (shape, dtype)
    shape, dtype = _NPY_HEADERS[header]
    return np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)


_NPY_HEADERS: dict[bytes, tuple[tuple[int, ...], np.dtype]] = {}


def _chw(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)  # [3, S, S]


def collate(samples: list[dict[str, Any]], buffers: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """The samples' arrays stacked into batch tensors: into `buffers` (a BatchBuffers slot, which
    keeps them for its next round) where given, else into new tensors."""
    buffers = {} if buffers is None else buffers
    batch: dict[str, Any] = {}
    for key, value in samples[0].items():
        if isinstance(value, np.ndarray):
            buffers[key] = batch[key] = _stack([s[key] for s in samples], buffers.get(key))
    batch["keys"] = [s["__key__"] for s in samples]
    batch["epoch"] = max(s["epoch"] for s in samples)
    return batch


def _stack(arrays: list[np.ndarray], out: torch.Tensor | None = None) -> torch.Tensor:
    """One batch tensor, written into `out` if it has the batch's shape and dtype. A new one is
    made in shared memory inside a DataLoader worker, as torch's default_collate does: a plain
    tensor would be copied there once more on its way to the trainer (~35 MB at EVA geometry)."""
    shape, dtype = (len(arrays), *arrays[0].shape), torch.from_numpy(np.empty(0, arrays[0].dtype)).dtype
    if out is None or out.shape != shape or out.dtype != dtype:
        if get_worker_info() is None:
            out = torch.empty(shape, dtype=dtype)
        else:
            storage = torch.UntypedStorage._new_shared(math.prod(shape) * arrays[0].itemsize)
            out = torch.empty(0, dtype=dtype).set_(storage, 0, shape)
    np.stack(arrays, out=out.numpy())
    return out


class BatchBuffers:
    """A ring of batch buffers that one producer (a loader worker) refills in turn, each once the
    consumer is done with the batch it held.

    New memory costs more than filling it: a fresh EVA-sized batch (~35 MB) faults in ~9,000
    pages, ~45 ms on the benchmark VM, against ~5 ms to refill memory already mapped. The
    consumer counts the batches it is done with in `released` (a counter in shared memory that
    only the consumer writes: ReleasingIterator). Batch `i` is written into slot `i % slots`
    once batch `i - slots` has been released.
    """

    def __init__(self, released: torch.Tensor, slots: int):
        self.released, self.slots = released, slots
        self.buffers: list[dict[str, torch.Tensor]] = [{} for _ in range(slots)]
        self.made = 0
        self.parent = os.getppid()

    def next_slot(self) -> dict[str, torch.Tensor]:
        """The buffers for the next batch (empty the first time round: collate fills them in)."""
        index, self.made = self.made, self.made + 1
        while int(self.released) < index - self.slots + 1:  # the consumer still holds that slot's batch
            if os.getppid() != self.parent:  # the trainer died while this worker waited for it
                raise SystemExit(f"loader worker {os.getpid()}: its trainer process is gone")
            time.sleep(0.001)
        return self.buffers[index % self.slots]


class ReleasingIterator:
    """The consumer's side of BatchBuffers: asking for the next batch releases the previous one to
    the worker that made it. So a batch stays valid until the next one is asked for; copy what
    must live longer (with pin_memory the trainer gets pinned copies, which stay valid)."""

    def __init__(self, loader: DataLoader, released: torch.Tensor):
        self.batches, self.released = iter(loader), released
        self.held: int | None = None  # producer of the batch the consumer holds

    def __iter__(self) -> "ReleasingIterator":
        return self

    def __next__(self) -> dict[str, Any]:
        if self.held is not None:
            self.released[self.held] += 1
            self.held = None
        batch = next(self.batches)
        self.held = batch.pop("producer")
        return batch


class CheckCount:
    """Raises at the end of an epoch if the shards held another number of samples than counted
    up front: resume arithmetic relies on those counts."""

    def __init__(self, expected: int, shard_paths: list[str]):
        self.expected, self.shard_paths = expected, shard_paths

    def __call__(self, source: Iterator[dict]) -> Iterator[dict]:
        seen = 0
        for sample in source:
            seen += 1
            yield sample
        if seen != self.expected:
            raise DataError(f"shards {self.shard_paths} held {seen} samples, their manifest says {self.expected}")


class SkipFirst:
    def __init__(self, count: int):
        self.count = count

    def __call__(self, source: Iterator[dict]) -> Iterator[dict]:
        return itertools.islice(source, self.count, None)


@dataclass
class LoaderState:
    """Where one rank's stream stands: `batches` consumed since the start of `start_epoch`."""

    start_epoch: int = 0
    batches: int = 0


class ShardStream(IterableDataset):
    """One rank's infinite stream of batches (each DataLoader worker runs one logical worker)."""

    def __init__(self, data: TrainData, cfg, rank: int, world_size: int, state: LoaderState,
                 released: torch.Tensor | None = None, slots: int = 2):
        """`released` ([workers] int64 in shared memory) and `slots`: batches are made in a ring of
        `slots` BatchBuffers per worker, released by a ReleasingIterator; without it, in new tensors."""
        self.data, self.rank, self.world_size = data, rank, world_size
        self.released, self.slots = released, slots
        self.state = dataclasses.replace(state)  # where this stream starts; the loop advances its own copy
        self.seed = cfg.seed
        self.batch_size = cfg.train.batch_size
        self.num_workers = max(1, cfg.data.num_workers)
        self.shuffle_buffer = cfg.data.shuffle_buffer
        self.policy = ViewPolicy(tuple(cfg.data.views.scale), tuple(cfg.data.views.ratio), cfg.data.views.flip_p)
        m = cfg.mask
        self.mask_generator = BlockMaskGenerator(data.grid, m.num_masking_patches, m.min_num_patches,
                                                 m.max_num_patches, m.min_aspect, m.max_aspect)
        readers = world_size * self.num_workers
        if len(data.shard_names) < readers:
            raise DataError(
                f"{data.directory} has {len(data.shard_names)} shards, fewer than the {readers} readers "
                f"(world size {world_size} x data.num_workers {self.num_workers}) that each need one: "
                f"lower data.num_workers or write more, smaller shards")

    def worker_epoch_shards(self, worker: int, epoch: int) -> tuple[list[str], int]:
        """Paths of the shards logical `worker` reads in `epoch`, and how many samples they yield."""
        indices = epoch_shards(self.data, self.seed, epoch, self.rank, self.world_size, worker, self.num_workers)
        paths = [str(self.data.directory / self.data.shard_names[i]) for i in indices]
        return paths, sum(self.data.shard_counts[i] for i in indices)

    def worker_epoch_pipeline(self, worker: int, epoch: int, skip: int = 0) -> wds.DataPipeline:
        """The webdataset stages of one logical worker's epoch; the first `skip` samples are dropped."""
        paths, count = self.worker_epoch_shards(worker, epoch)
        shuffle_seed = int(np.random.SeedSequence([STREAM_TAGS["shuffle"], self.seed, epoch, self.rank, worker])
                           .generate_state(1)[0])
        return wds.DataPipeline(
            wds.SimpleShardList(paths),                          # this worker's shards, in epoch order
            TarSamples(),                                        # tar members grouped by key (raw bytes)
            wds.select(SkipDuplicates(self.data.duplicates)),    # image shards: drop listed duplicates
            CheckCount(count, paths),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(shuffle_seed)),
            SkipFirst(skip),                                     # resume: drop what was trained on, undecoded
            wds.map(DecodeSample(self.data, self.seed, epoch, self.mask_generator, self.policy)),
        )

    def logical_worker_samples(self, worker: int) -> Iterator[dict]:
        """Samples of `worker` over epochs start_epoch, start_epoch + 1, ..., after the resume skip."""
        n, b = self.num_workers, self.state.batches
        skip = max(0, (b - worker + n - 1) // n) * self.batch_size  # samples it already contributed
        for epoch in itertools.count(self.state.start_epoch):
            _, count = self.worker_epoch_shards(worker, epoch)
            if skip >= count:  # a whole epoch already trained on: not even read
                skip -= count
                continue
            yield from self.worker_epoch_pipeline(worker, epoch, skip)
            skip = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        loader_worker = info.id if info is not None else 0
        worker = (loader_worker + self.state.batches) % self.num_workers  # see module docstring
        samples = self.logical_worker_samples(worker)
        ring = BatchBuffers(self.released[loader_worker], self.slots) if self.released is not None else None
        while True:
            batch = collate(list(itertools.islice(samples, self.batch_size)), ring.next_slot() if ring else None)
            batch["producer"] = loader_worker  # whose buffers: the ReleasingIterator hands them back
            yield batch


def _ignore_termination_signals(_worker_id: int) -> None:
    # A signal sent to the whole process group (scheduler preemption, Ctrl-C) must reach only the
    # training process, which saves a checkpoint; loader workers stop when it shuts them down.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(data: TrainData, cfg, rank: int, world_size: int, state: LoaderState, pin_memory: bool) -> ReleasingIterator:
    """This rank's batches: a DataLoader over its ShardStream (batches are made inside the workers,
    in rings of reused buffers), started now. A batch stays valid until the next is asked for."""
    workers = cfg.data.num_workers
    released = torch.zeros(max(1, workers), dtype=torch.int64).share_memory_()
    # a worker is asked for at most prefetch_factor batches ahead; the consumer holds one more
    slots = cfg.data.prefetch_factor + 2 if workers else 2
    loader = DataLoader(
        ShardStream(data, cfg, rank, world_size, state, released, slots),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=cfg.data.prefetch_factor if workers else None,
        pin_memory=pin_memory,
        worker_init_fn=_ignore_termination_signals if workers else None,
        generator=torch.Generator().manual_seed(cfg.seed),  # not the global RNG, which drop path uses
    )
    return ReleasingIterator(loader, released)


def close_loader_iterator(batches: Iterator) -> None:
    """Stop the loader's workers now (they ignore SIGTERM, so they must not outlive this call)."""
    if isinstance(batches, ReleasingIterator):
        batches = batches.batches
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's multi-process iterator
    if shutdown is not None:
        shutdown()
        for worker in getattr(batches, "_workers", []):
            if worker.is_alive():
                worker.kill()
                worker.join()


def dequantize_targets(batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Cached targets as float32 [B, N, D] on `device` (int8 times its per-token scale)."""
    targets = batch["targets"].to(device, non_blocking=True).float()
    if "target_scales" in batch:
        targets.mul_(batch["target_scales"].to(device, non_blocking=True).unsqueeze(-1))
    return targets
