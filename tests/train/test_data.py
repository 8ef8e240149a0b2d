"""The streaming loader: the student sees the stored view's pixels, every sample once per epoch,
resume continues the stream exactly, int8 targets, online mode, and manifest refusals."""
from __future__ import annotations

import io
import itertools
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer_fixtures import POLICY, TINY_CONFIG, TINY_TEACHER, build_image_dir, build_train_dir
from eva.masking import BlockMaskGenerator
from eva.teacher import load_teacher
from eva.train.config import load_config
from eva.train.data import (BatchBuffers, DataError, LoaderState, ManifestMismatch, ShardStream, close_loader_iterator, collate,
                            dequantize_targets, make_loader, npy_view, open_train_data, sample_rng)
from eva.views import CLIP_MEAN, CLIP_STD, normalize_pixels, render_view, sample_view, to_normalized_tensor, view_rng
from shards import contract
from shards.reader import dump_npy, iter_tar, load_npy

GRID = (8, 8)


def tiny_cfg(train_dir: Path, *overrides: str):
    return load_config(TINY_CONFIG, [f"data.train={train_dir}", "run_dir=unused", *overrides])


def stored_samples(directory: Path) -> dict[str, dict[str, bytes]]:
    return {key: members for tar in sorted(directory.glob("*.tar")) for key, members in iter_tar(tar)}


def tiny_mask_generator() -> BlockMaskGenerator:
    return BlockMaskGenerator(GRID, num_masking_patches=26, min_num_patches=4, min_aspect=0.3)


def test_batch_is_the_stored_view_its_targets_and_a_seeded_mask(tiny_train_dir):
    cfg = tiny_cfg(tiny_train_dir, "data.num_workers=0", "train.batch_size=8")
    data = open_train_data(cfg, 64, GRID)
    batch = next(iter(ShardStream(data, cfg, 0, 1, LoaderState())))
    assert batch["images"].dtype == torch.uint8 and list(batch["images"].shape) == [8, 3, 64, 64]
    assert batch["mask"].dtype == torch.bool and list(batch["mask"].shape) == [8, 64]
    assert batch["targets"].dtype == torch.float16 and list(batch["targets"].shape) == [8, 64, 64]
    samples = stored_samples(tiny_train_dir)
    for i, key in enumerate(batch["keys"]):
        members = samples[key]
        rng = sample_rng(cfg.seed, key, 0)
        views = json.loads(members["json"])["views"]
        index = int(rng.integers(len(views)))
        stored = Image.open(io.BytesIO(members["jpg"])).convert("RGB")
        expected = np.asarray(render_view(stored, views[index], 64)).transpose(2, 0, 1)
        assert np.array_equal(batch["images"][i].numpy(), expected), key
        assert np.array_equal(batch["targets"][i].numpy(), load_npy(members["tgt.npy"])[index]), key
        assert np.array_equal(batch["mask"][i].numpy(), tiny_mask_generator()(rng).reshape(-1)), key
    masked = batch["mask"].sum(1)
    assert masked.max() <= 26 and masked.min() >= 20


def test_an_epochs_sample_stream_is_not_the_stream_that_drew_the_stored_view_of_that_number():
    # Same seed in both stages (both default to 0): epoch e's view choice and mask must not reuse
    # the numbers that drew stored view e's box and flip, or the mask would follow the crop.
    for key in ("000000000", "000000007", "000003141"):
        for epoch in range(3):
            trainer, target_stage = sample_rng(0, key, epoch).random(8), view_rng(0, key, epoch).random(8)
            assert not np.any(np.isclose(trainer, target_stage)), (key, epoch)


def test_student_normalisation_equals_the_views_module():
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 3, 16, 16), dtype=np.uint8))
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    ours = normalize_pixels(images, mean, std)
    for i in range(4):
        reference = to_normalized_tensor(Image.fromarray(images[i].permute(1, 2, 0).numpy()))
        assert torch.equal(ours[i], reference)


def test_each_sample_once_per_epoch_across_ranks_and_workers(tiny_train_dir):
    cfg = tiny_cfg(tiny_train_dir, "data.num_workers=2")
    data = open_train_data(cfg, 64, GRID)
    all_keys = set(stored_samples(tiny_train_dir))
    orders = []
    for epoch in (0, 1):
        keys = []
        for rank in (0, 1):
            stream = ShardStream(data, cfg, rank, 2, LoaderState())
            for worker in (0, 1):
                keys += [s["__key__"] for s in stream.worker_epoch_pipeline(worker, epoch)]
        assert len(keys) == len(all_keys) and set(keys) == all_keys
        orders.append(keys)
    assert orders[0] != orders[1]  # shard order and shuffle change per epoch


def test_resumed_loader_continues_the_stream_exactly(tiny_train_dir):
    """Batches b.. of a loader resumed at b equal those of an uninterrupted loader (2 workers,
    across an epoch boundary: 192 samples = 12 batches of 16 per epoch)."""
    cfg = tiny_cfg(tiny_train_dir, "data.num_workers=2", "train.batch_size=16", "data.shuffle_buffer=64")
    data = open_train_data(cfg, 64, GRID)

    def take(state: LoaderState, count: int) -> list[dict]:
        batches = iter(make_loader(data, cfg, 0, 1, state, pin_memory=False))
        try:
            # a batch's buffers are refilled once the next is asked for: keep copies
            return [{k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()} for b in itertools.islice(batches, count)]
        finally:
            close_loader_iterator(batches)

    straight = take(LoaderState(), 17)
    resumed = take(LoaderState(0, 7), 10)
    assert [b["keys"] for b in straight[7:]] == [b["keys"] for b in resumed]
    for a, b in zip(straight[7:], resumed):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["mask"], b["mask"])
    assert straight[16]["epoch"] == 1


def test_int8_targets_are_dequantised_with_their_scales(tmp_path):
    directory = build_train_dir(tmp_path / "int8", shards=1, per_shard=8, views=1, dtype="int8")
    cfg = tiny_cfg(directory, "data.num_workers=0", "train.batch_size=4")
    batch = next(iter(ShardStream(open_train_data(cfg, 64, GRID), cfg, 0, 1, LoaderState())))
    assert batch["targets"].dtype == torch.int8 and list(batch["target_scales"].shape) == [4, 64]
    targets = dequantize_targets(batch, torch.device("cpu"))
    assert torch.equal(targets, batch["targets"].float() * batch["target_scales"].unsqueeze(-1))
    assert targets.abs().max() > 0


def test_online_mode_draws_fresh_views_and_skips_duplicates(tmp_path):
    duplicates = [contract.make_key(0, 3, 8), contract.make_key(1, 5, 8)]
    directory = build_image_dir(tmp_path / "images", shards=2, per_shard=8, duplicates=duplicates)
    cfg = tiny_cfg(directory, "data.targets=online", f"data.teacher.model={TINY_TEACHER}", "data.num_workers=0")
    teacher = load_teacher(str(TINY_TEACHER), "none")
    data = open_train_data(cfg, 64, GRID, teacher)
    assert data.total_count == 14 and data.target_dim == teacher.dim
    stream = ShardStream(data, cfg, 0, 1, LoaderState())
    samples = list(stream.worker_epoch_pipeline(0, 0))
    assert sorted(s["__key__"] for s in samples) == sorted(set(stored_samples(directory)) - set(duplicates))
    stored = stored_samples(directory)
    for sample in samples[:4]:
        key = sample["__key__"]
        image = Image.open(io.BytesIO(stored[key]["jpg"])).convert("RGB")
        rng = sample_rng(cfg.seed, key, 0)
        view = sample_view(rng, image.width, image.height, POLICY)
        assert np.array_equal(sample["images"], np.asarray(render_view(image, view, 64)).transpose(2, 0, 1))
        assert np.array_equal(sample["mask"], tiny_mask_generator()(rng).reshape(-1))
        assert "targets" not in sample and "teacher_images" not in sample  # teacher input size = student's


@pytest.mark.parametrize("overrides, geometry, message", [
    ([], (224, (16, 16)), r"the patch grid is \[8, 8\] in its manifest but \[16, 16\] for this run \(model.name=tiny\)"),
    (["model.target_dim=32"], (64, GRID), r"the feature dim is 64 in its manifest but 32 for this run \(model.target_dim\)"),
    (["data.views.flip_p=0.0"], (64, GRID), r"the view flip_p is 0.5 in its manifest but 0.0 for this run"),
    (["data.views.scale=[0.08, 1.0]"], (64, GRID), r"the view scale is \[0.2, 1.0\] in its manifest but \[0.08, 1.0\]"),
    (["data.teacher.model=ViT-L-14"], (64, GRID), r"the teacher is '.*tiny.json' in its manifest but 'ViT-L-14'"),
    (["data.targets=online", "data.teacher.model=x"], (64, GRID), r"the stage is 'targets' in its manifest but 'images'"),
])
def test_manifest_mismatch_is_refused_naming_both_values(tiny_train_dir, overrides, geometry, message):
    cfg = tiny_cfg(tiny_train_dir, *overrides)
    with pytest.raises(ManifestMismatch, match=message):
        open_train_data(cfg, *geometry)


def test_more_readers_than_shards_is_refused(tiny_train_dir):
    cfg = tiny_cfg(tiny_train_dir, "data.num_workers=3")
    with pytest.raises(DataError, match=r"4 shards, fewer than the 6 readers \(world size 2 x data.num_workers 3\)"):
        ShardStream(open_train_data(cfg, 64, GRID), cfg, 0, 2, LoaderState())


def test_npy_view_reads_targets_without_copying_and_never_unpickles():
    for array in (np.arange(2 * 4 * 3, dtype=np.float16).reshape(2, 4, 3), np.array([[-5, 7]], dtype=np.int8)):
        view = npy_view(dump_npy(array))
        assert view.dtype == array.dtype and np.array_equal(view, array) and not view.flags.writeable
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="dtype object"):
        npy_view(pickled.getvalue())


def synthetic_samples() -> list[dict]:
    targets = np.arange(12, dtype=np.float16).reshape(4, 3)
    targets.setflags(write=False)  # like the targets read from a mapped shard
    return [{"__key__": f"k{i}", "epoch": i % 2, "images": np.full((3, 2, 2), i, np.uint8).transpose(0, 2, 1),
             "targets": targets * i, "mask": np.arange(4) % (i + 1) == 0} for i in range(3)]


class CollateInAWorker(torch.utils.data.IterableDataset):
    def __iter__(self):
        batch = collate(synthetic_samples())
        yield {"shared_where_made": {k: batch[k].is_shared() for k in ("images", "targets", "mask")}, "batch": batch}


def test_collate_stacks_into_shared_memory_inside_a_worker_only():
    """In a DataLoader worker the batch is made in shared memory (it reaches the trainer without
    another copy); in-process it is plain memory. The values are np.stack's either way."""
    samples = synthetic_samples()
    expected = {k: np.stack([s[k] for s in samples]) for k in ("images", "targets", "mask")}
    in_process = collate(samples)
    [from_worker] = list(torch.utils.data.DataLoader(CollateInAWorker(), batch_size=None, num_workers=1))
    assert from_worker["shared_where_made"] == {"images": True, "targets": True, "mask": True}
    for batch in (in_process, from_worker["batch"]):
        for key, array in expected.items():
            assert batch[key].dtype == torch.from_numpy(array).dtype and np.array_equal(batch[key].numpy(), array)
        assert batch["keys"] == ["k0", "k1", "k2"] and batch["epoch"] == 1
    assert not any(in_process[k].is_shared() for k in expected)


def fresh_tensor_batches(data, cfg, count: int) -> list[dict]:
    """The same loader with a new tensor for every batch (no buffer ring): the reference."""
    loader = torch.utils.data.DataLoader(ShardStream(data, cfg, 0, 1, LoaderState()), batch_size=None,
                                         num_workers=cfg.data.num_workers,
                                         prefetch_factor=cfg.data.prefetch_factor if cfg.data.num_workers else None,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    batches = iter(loader)
    try:
        return list(itertools.islice(batches, count))
    finally:
        close_loader_iterator(batches)


@pytest.mark.parametrize("workers", [0, 2])
def test_reused_batch_buffers_give_the_batches_fresh_tensors_give(tiny_train_dir, workers):
    # 2 workers with prefetch 1: rings of 3 slots each, refilled 3 times in 18 batches
    cfg = tiny_cfg(tiny_train_dir, f"data.num_workers={workers}", "data.prefetch_factor=1", "train.batch_size=8")
    data = open_train_data(cfg, 64, GRID)
    batches = make_loader(data, cfg, 0, 1, LoaderState(), pin_memory=False)
    try:
        seen, storages = [], []
        for batch in itertools.islice(batches, 18):
            storages.append(batch["targets"].untyped_storage().data_ptr())
            seen.append({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
    finally:
        close_loader_iterator(batches)
    expected = fresh_tensor_batches(data, cfg, 18)
    for ours, reference in zip(seen, expected):
        assert ours["keys"] == reference["keys"] and "producer" not in ours
        for key in ("images", "targets", "mask"):
            assert torch.equal(ours[key], reference[key]), (key, ours["keys"])
    if workers == 0:  # in this process the reuse shows in the addresses: two slots, taken in turn
        assert storages[2::2] == storages[:-2:2] and storages[0] != storages[1]


def test_a_buffer_is_refilled_only_once_the_consumer_has_released_its_batch():
    released = torch.zeros((), dtype=torch.int64)
    ring = BatchBuffers(released, slots=2)
    first, second = ring.next_slot(), ring.next_slot()
    assert first is not second
    taken = []
    waiter = threading.Thread(target=lambda: taken.append(ring.next_slot()))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and not taken  # batch 0 is still held: its slot must wait
    released += 1
    waiter.join(5)
    assert not waiter.is_alive() and taken[0] is first
