"""Read shard directories: completed shards, samples, status rows, manifest, skip lists.

Nothing here unpickles: `.npy` members load with allow_pickle=False and json is plain json.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq

from shards import contract
from shards.tarstream import iter_tar_members


def completed_shards(directory: Path) -> list[int]:
    """Ids of shards whose stats marker exists (the only shards that count as done)."""
    ids = []
    for path in Path(directory).glob("*_stats.json"):
        shard_id = contract.parse_shard_file(path.name)
        if shard_id is not None:
            ids.append(shard_id)
    return sorted(ids)


def present_tars(directory: Path) -> list[int]:
    ids = [contract.parse_shard_file(p.name) for p in Path(directory).glob("*.tar")]
    return sorted(i for i in ids if i is not None)


def read_stats(directory: Path, shard_id: int) -> dict[str, Any]:
    return json.loads(contract.stats_path(directory, shard_id).read_text())


def iter_tar(path: Path, copy: bool = True) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) per sample, grouping consecutive members by key.
    `copy=False`: memoryviews into the mapped file instead of bytes (shards.tarstream)."""
    key, members = None, {}
    for name, data in iter_tar_members(path, copy=copy):
        member_key, ext = contract.split_member_name(name)
        if member_key != key and key is not None:
            yield key, members
            members = {}
        key = member_key
        members[ext] = data
    if key is not None:
        yield key, members


def read_rows(directory: Path, shard_id: int) -> list[dict[str, Any]]:
    return pq.read_table(contract.parquet_path(directory, shard_id)).to_pylist()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def dump_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def load_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / contract.MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{directory} is not a finished shard directory: {contract.MANIFEST_FILE} is missing"
        )
    manifest = json.loads(path.read_text())
    version = manifest.get("schema_version")
    if version != contract.SCHEMA_VERSION:
        raise ValueError(
            f"{path}: schema_version {version!r}, this code reads {contract.SCHEMA_VERSION}"
        )
    return manifest


def read_duplicates(directory: Path) -> dict[str, str]:
    """{duplicate key: first key with the same sha256}; empty when the file is absent."""
    path = Path(directory) / contract.DUPLICATES_FILE
    if not path.exists():
        return {}
    table = pq.read_table(path, columns=["key", "first_key"]).to_pydict()
    return dict(zip(table["key"], table["first_key"]))
