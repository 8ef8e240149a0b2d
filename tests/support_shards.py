"""Test helpers: write small image shard directories and tiny teacher weights without the builder.

Import from any test module as `from support_shards import make_image_shard_dir` (tests/ is on
sys.path through tests/conftest.py).
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from shards import contract
from shards.manifest import write_manifest
from shards.writer import ShardWriter

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_TEACHER_CONFIG = REPO_ROOT / "configs" / "teachers" / "tiny.json"

IMAGE_ROW_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("url", pa.string()), ("path", pa.string()),
    ("status", pa.string()), ("error_message", pa.string()), ("sha256", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()),
    ("original_width", pa.int32()), ("original_height", pa.int32()),
])


def photo_jpeg(width: int, height: int, seed: int) -> bytes:
    """A smooth random RGB field as JPEG quality 95 (compresses like a photo, differs per seed)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(5, 5, 3), dtype=np.uint8)
    image = Image.fromarray(coarse, "RGB").resize((width, height), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@dataclass
class ImageShardDir:
    path: Path
    shard_keys: dict[int, list[str]]           # every row's key per shard, in order
    success_keys: dict[int, list[str]]          # rows with status success (tar samples), in order
    duplicates: dict[str, str] = field(default_factory=dict)  # duplicate key -> first key
    excluded: set[str] = field(default_factory=set)
    corrupt: set[str] = field(default_factory=set)  # success rows whose JPEG bytes no longer decode

    def expected_train_keys(self, shard_id: int) -> list[str]:
        """Keys of the train shard's rows: upstream success keys minus duplicates, in order."""
        return [k for k in self.success_keys[shard_id] if k not in self.duplicates]


def make_image_shard_dir(
    directory: Path,
    shard_sizes: tuple[int, ...] = (6, 5),
    *,
    shard_size: int = 100,
    image_size: int = 96,
    duplicates: dict[tuple[int, int], tuple[int, int]] | None = None,
    excluded: set[tuple[int, int]] | frozenset = frozenset(),
    corrupt: set[tuple[int, int]] | frozenset = frozenset(),
    captions: bool = True,
    seed: int = 0,
) -> ImageShardDir:
    """Write an image shard directory (stage "images") with shards of `shard_sizes` rows.

    Positions are (shard id, row index). `duplicates` maps a position to an earlier one whose
    bytes it repeats (listed in duplicates.parquet, as the builder's dedupe does); `excluded`
    rows get status "excluded" and no tar sample; `corrupt` rows are success rows whose stored
    JPEG is truncated garbage (an image that "no longer decodes"). Image sizes vary per row;
    the shorter side is at most `image_size`.
    """
    directory = Path(directory)
    duplicates = duplicates or {}
    rng = np.random.default_rng(seed)
    key_of = lambda shard, index: contract.make_key(shard, index, shard_size)  # noqa: E731
    result = ImageShardDir(directory, {}, {})
    payload: dict[tuple[int, int], bytes] = {}
    for shard_id, rows in enumerate(shard_sizes):
        writer = ShardWriter(directory, shard_id, IMAGE_ROW_SCHEMA)
        result.shard_keys[shard_id], result.success_keys[shard_id] = [], []
        for index in range(rows):
            position, key = (shard_id, index), key_of(shard_id, index)
            result.shard_keys[shard_id].append(key)
            long_side = int(rng.integers(image_size, int(image_size * 1.6) + 1))
            width, height = (long_side, image_size) if index % 2 == 0 else (image_size, long_side)
            if position in duplicates:
                data = payload[duplicates[position]]
                result.duplicates[key] = key_of(*duplicates[position])
            else:
                data = photo_jpeg(width, height, seed=seed * 100_003 + shard_id * 1000 + index)
            payload[position] = data
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
            row = {"key": key, "source": "test", "url": None, "path": f"images/{key}.jpg",
                   "status": contract.STATUS_SUCCESS, "error_message": None,
                   "sha256": hashlib.sha256(data).hexdigest(), "width": width, "height": height,
                   "original_width": width, "original_height": height}
            if position in excluded:
                result.excluded.add(key)
                writer.add_row({**row, "status": contract.STATUS_EXCLUDED, "error_message": "sha256 on the exclusion list"})
                continue
            stored = data
            if position in corrupt:
                result.corrupt.add(key)
                stored = data[: len(data) // 2]  # header intact, scan data cut off: fails on load
            members = {contract.EXT_IMAGE: stored,
                       contract.EXT_META: json.dumps({"key": key, "width": width, "height": height,
                                                      "source": "test"}).encode()}
            if captions:
                members[contract.EXT_CAPTION] = f"caption of {key}".encode()
            writer.add_sample(key, members)
            writer.add_row(row)
            result.success_keys[shard_id].append(key)
        writer.close()
    if result.duplicates:
        sha = {key_of(*p): hashlib.sha256(d).hexdigest() for p, d in payload.items()}
        pq.write_table(pa.table({"key": list(result.duplicates), "first_key": list(result.duplicates.values()),
                                 "sha256": [sha[k] for k in result.duplicates]}),
                       directory / contract.DUPLICATES_FILE)
    write_manifest(directory, contract.STAGE_IMAGES, {"image_size": image_size, "shard_size": shard_size})
    return result


def save_tiny_teacher_weights(path: Path, seed: int = 1234) -> Path:
    """An open_clip CLIP state dict for configs/teachers/tiny.json, seeded, saved with torch.save."""
    import open_clip
    import torch

    config = json.loads(TINY_TEACHER_CONFIG.read_text())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.model.CLIP(**config)
    torch.save(model.state_dict(), path)
    return Path(path)
