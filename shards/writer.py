"""Write one shard: tar and parquet first, the stats marker last.

A killed writer leaves at most hidden temp files, never a shard that counts as done: readers and
resume logic trust only shards whose `NNNNNN_stats.json` exists.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shards import contract


def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def remove_stale_temp_files(directory: Path) -> int:
    """Drop temp files a killed writer left behind; returns how many."""
    removed = 0
    for path in Path(directory).glob(".*.tmp-*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


class ShardWriter:
    """Collects the samples and rows of one shard and publishes them atomically on `close`.

    Tar members get fixed metadata (mtime 0, mode 0444, no owner), so the same samples give the
    same bytes on every rerun.
    """

    def __init__(self, directory: Path, shard_id: int, parquet_schema: pa.Schema | None = None):
        self.directory = Path(directory)
        self.shard_id = shard_id
        self.parquet_schema = parquet_schema
        self.directory.mkdir(parents=True, exist_ok=True)
        stem = contract.shard_stem(shard_id)
        self._tar_tmp = self.directory / f".{stem}.tar.tmp-{os.getpid()}"
        self._tar = tarfile.open(self._tar_tmp, "w", format=tarfile.USTAR_FORMAT)
        self._keys: set[str] = set()
        self._rows: list[dict[str, Any]] = []
        self._started = time.time()
        self.sample_count = 0

    def add_sample(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample; `members` maps extension (`jpg`, `json`, `tgt.npy`, ...) to bytes."""
        if not contract.is_valid_key(key):
            raise ValueError(f"shard {self.shard_id}: key {key!r} is not digit-only")
        if key in self._keys:
            raise ValueError(f"shard {self.shard_id}: key {key} written twice")
        if contract.EXT_IMAGE not in members:
            raise ValueError(f"shard {self.shard_id}: sample {key} has no .{contract.EXT_IMAGE}")
        self._keys.add(key)
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self.sample_count += 1

    def add_row(self, row: dict[str, Any]) -> None:
        """Add the parquet status row of one input row (success or failure)."""
        self._rows.append(row)

    def close(self, stats: dict[str, Any] | None = None) -> dict[str, Any]:
        """Publish tar, parquet, then the stats marker; returns the stats written."""
        self._tar.close()
        stats = dict(stats or {})
        statuses: dict[str, int] = {}
        for row in self._rows:
            statuses[row["status"]] = statuses.get(row["status"], 0) + 1
        success_rows = statuses.get(contract.STATUS_SUCCESS, 0)
        if success_rows != self.sample_count:
            self.abort()
            raise RuntimeError(
                f"shard {self.shard_id}: {success_rows} success rows but {self.sample_count} samples"
            )
        stats.update(
            schema_version=contract.SCHEMA_VERSION,
            shard_id=self.shard_id,
            count=self.sample_count,
            rows=len(self._rows),
            status_counts=dict(sorted(statuses.items())),
            seconds=round(time.time() - self._started, 3),
        )
        parquet_final = contract.parquet_path(self.directory, self.shard_id)
        parquet_tmp = parquet_final.with_name(f".{parquet_final.name}.tmp-{os.getpid()}")
        table = pa.Table.from_pylist(self._rows, schema=self.parquet_schema)
        pq.write_table(table, parquet_tmp)
        os.replace(self._tar_tmp, contract.tar_path(self.directory, self.shard_id))
        os.replace(parquet_tmp, parquet_final)
        write_json_atomic(contract.stats_path(self.directory, self.shard_id), stats)
        return stats

    def abort(self) -> None:
        if not self._tar.closed:
            self._tar.close()
        self._tar_tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
