"""Exact duplicates and exclusions, both by the sha256 of the source bytes.

Exclusion (an evaluation set's hashes, `--exclude-hashes`) happens while shards are built: the
row gets status `excluded` and no sample. Duplicates are found after the build, across all
sources: the first key in key order keeps its sample, the others are listed in
`duplicates.parquet` (key, first_key, sha256), which later stages skip.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shards import contract

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
DUPLICATES_SCHEMA = pa.schema([("key", pa.string()), ("first_key", pa.string()), ("sha256", pa.string())])


class ExcludeHashesError(ValueError):
    pass


def load_excluded_hashes(path: Path) -> frozenset[str]:
    """sha256 hex digests from a text file (one per line, `#` comments) or a parquet `sha256` column."""
    path = Path(path)
    if not path.is_file():
        raise ExcludeHashesError(f"--exclude-hashes {path}: no such file")
    if path.suffix == ".parquet":
        schema = pq.read_schema(path)
        if "sha256" not in schema.names:
            raise ExcludeHashesError(f"--exclude-hashes {path}: no 'sha256' column (columns: {schema.names})")
        values = [v for v in pq.read_table(path, columns=["sha256"]).column("sha256").to_pylist() if v]
        lines = [(f"row {i + 1}", str(v).strip().lower()) for i, v in enumerate(values)]
    else:
        lines = [(f"line {i + 1}", line.split("#", 1)[0].strip().lower())
                 for i, line in enumerate(path.read_text().splitlines())]
    hashes = set()
    for where, value in lines:
        if not value:
            continue
        if not _SHA256_RE.match(value):
            raise ExcludeHashesError(f"--exclude-hashes {path}: {where}: {value[:80]!r} is not a sha256 hex digest")
        hashes.add(value)
    return frozenset(hashes)


def find_duplicates(directory: Path, shard_ids: list[int]) -> pa.Table:
    """(key, first_key, sha256) for every stored sample whose bytes an earlier key already holds."""
    tables = []
    for shard_id in shard_ids:
        table = pq.read_table(contract.parquet_path(directory, shard_id), columns=["key", "status", "sha256"])
        tables.append(table.filter(pc.equal(table["status"], contract.STATUS_SUCCESS)).select(["key", "sha256"]))
    if not tables:
        return DUPLICATES_SCHEMA.empty_table()
    stored = pa.concat_tables(tables)
    # Keys have one width in a directory, so the smallest string is the first key.
    firsts = stored.group_by("sha256").aggregate([("key", "min")]).rename_columns(["sha256", "first_key"])
    joined = stored.join(firsts, "sha256")
    duplicates = joined.filter(pc.not_equal(joined["key"], joined["first_key"]))
    return duplicates.select(["key", "first_key", "sha256"]).cast(DUPLICATES_SCHEMA).sort_by("key")


def write_duplicates(directory: Path, duplicates: pa.Table) -> None:
    final = Path(directory) / contract.DUPLICATES_FILE
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    pq.write_table(duplicates, tmp)
    os.replace(tmp, final)
