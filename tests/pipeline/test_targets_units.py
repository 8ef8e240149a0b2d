"""pipeline.targets pieces without Ray: batched normalisation, int8 storage, identity diffs, one shard."""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eva.teacher import build_teacher, resolve_teacher
from eva.views import CLIP_MEAN, CLIP_STD, ViewPolicy, render_view, to_normalized_tensor
from pipeline.target_stage import inspect_upstream
from pipeline.targets import (
    CacheConfig, ShardTargetCacher, TargetStageError, dequantize_targets, identity_differences, normalize_views,
    quantize_targets, stage_identity,
)
from shards import contract
from shards.reader import iter_tar, load_npy, read_rows
from support_shards import TINY_TEACHER_CONFIG, make_image_shard_dir, photo_jpeg


def test_batched_normalisation_is_exactly_the_trainers():
    image = Image.open(io.BytesIO(photo_jpeg(120, 90, seed=3))).convert("RGB")
    views = [{"box": [5, 7, 60, 50], "flip": False}, {"box": [30, 0, 90, 90], "flip": True}]
    rendered = [render_view(image, view, 64) for view in views]
    batch = torch.from_numpy(np.stack([np.asarray(r) for r in rendered]))  # [2, 64, 64, 3] uint8
    got = normalize_views(batch, CLIP_MEAN, CLIP_STD)
    assert got.shape == (2, 3, 64, 64) and got.is_contiguous()
    for i, r in enumerate(rendered):
        assert torch.equal(got[i], to_normalized_tensor(r))


def test_int8_targets_keep_direction_and_survive_zero_tokens():
    targets = torch.randn(2, 5, 768, generator=torch.Generator().manual_seed(0)) * 3
    targets[1, 2] = 0  # an all-zero token must not become NaN
    stored, scales = quantize_targets(targets, "int8")
    assert stored.dtype == torch.int8 and scales.shape == (2, 5) and scales.dtype == torch.float32
    value = torch.from_numpy(dequantize_targets(stored.numpy(), scales.numpy()))
    assert torch.isfinite(value).all() and torch.equal(value[1, 2], torch.zeros(768))
    cosine = torch.nn.functional.cosine_similarity(value, targets, dim=-1)
    cosine[1, 2] = 1
    assert cosine.min() > 0.999
    half, none = quantize_targets(targets, "float16")
    assert half.dtype == torch.float16 and none is None
    with pytest.raises(ValueError, match="bfloat16"):
        quantize_targets(targets, "bfloat16")


def test_identity_differences_name_each_field():
    a = {"targets": {"dtype": "float16", "grid": [8, 8]}, "views": {"k": 2}}
    b = {"targets": {"dtype": "int8", "grid": [8, 8]}, "views": {"k": 2, "seed": 1}}
    assert identity_differences(a, b) == ["targets.dtype: recorded 'float16', now 'int8'",
                                          "views.seed: recorded None, now 1"]
    assert identity_differences(a, a) == []


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory) -> Path:
    return make_image_shard_dir(tmp_path_factory.mktemp("unit") / "images", (5,), corrupt={(0, 2)}).path


def cacher_for(images: Path, output: Path, device: str = "cpu", precision: str = "fp32",
               weights: str = "none") -> ShardTargetCacher:
    upstream = inspect_upstream(images)
    spec = resolve_teacher(str(TINY_TEACHER_CONFIG), weights)
    description = build_teacher(spec).describe()
    identity = stage_identity(description, 2, ViewPolicy(), 0, "float16", precision, upstream.manifest_sha256)
    return ShardTargetCacher(CacheConfig(
        images=str(images), output=str(output), teacher=spec, identity=identity,
        upstream_tar_sha256=upstream.tar_sha256, views=2, batch_size=3, device=device, precision=precision,
        decode_workers=1))


def test_one_shard_in_process_with_a_batch_that_splits_samples(one_shard, tmp_path):
    cacher = cacher_for(one_shard, tmp_path)
    stats = cacher(0)  # 4 good images x 2 views in batches of 3
    shipped = pickle.loads(pickle.dumps(cacher))  # what Ray sends: the config, never the teacher
    assert shipped._teacher is None and shipped.config == cacher.config
    assert stats["count"] == 4 and stats["failed_samples"] == {"decode_error": 1}
    rows = read_rows(tmp_path, 0)
    assert [r["status"] for r in rows] == ["success", "success", "decode_error", "success", "success"]
    for key, members in iter_tar(contract.tar_path(tmp_path, 0)):
        assert load_npy(members["tgt.npy"]).shape == (2, 64, 64)
        assert len(json.loads(members["json"])["views"]) == 2


def test_changed_upstream_shard_is_refused(one_shard, tmp_path):
    cacher = cacher_for(one_shard, tmp_path)
    cacher.config.upstream_tar_sha256[contract.tar_path(one_shard, 0).name] = "0" * 64
    with pytest.raises(TargetStageError, match="differs from the image directory's manifest"):
        cacher(0)
    assert not contract.stats_path(tmp_path, 0).exists() and not list(tmp_path.glob(".*.tmp-*"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_targets_agree_with_cpu_fp32(one_shard, tmp_path):
    cacher_for(one_shard, tmp_path / "cpu")(0)
    cacher_for(one_shard, tmp_path / "cuda", device="cuda", precision="bf16")(0)
    cpu = dict(iter_tar(contract.tar_path(tmp_path / "cpu", 0)))
    cuda = dict(iter_tar(contract.tar_path(tmp_path / "cuda", 0)))
    assert cpu.keys() == cuda.keys()
    for key in cpu:
        a = torch.from_numpy(load_npy(cpu[key]["tgt.npy"]).astype(np.float32))
        b = torch.from_numpy(load_npy(cuda[key]["tgt.npy"]).astype(np.float32))
        assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99
