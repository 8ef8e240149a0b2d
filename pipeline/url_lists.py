"""URL-list sources: find the list files, check their columns, cut them into per-shard input files.

Reading and cutting is img2dataset's own `Reader` (the same pyarrow readers, the same
`number_sample_per_shard` slicing, one Arrow file per shard). One departure: plain-text lists are
read line by line here first, because img2dataset reads them with pyarrow's CSV parser, which
fails on the first URL that contains a comma (common in CDN resize parameters).
"""
from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.sources import SourcesError, SourceSpec

LIST_FORMATS = ("txt", "txt.gz", "csv", "csv.gz", "tsv", "tsv.gz", "jsonl", "jsonl.gz", "parquet")
TXT_FORMATS = ("txt", "txt.gz")


def format_of(path: Path) -> str | None:
    name = path.name.lower()
    for fmt in sorted(LIST_FORMATS, key=len, reverse=True):
        if name.endswith("." + fmt):
            return fmt
    return None


def list_files(spec: SourceSpec) -> list[tuple[Path, str]]:
    """(file, format) of a URL source: the file itself, or the list files of a folder in name order."""
    root = Path(spec.root)
    if spec.format is not None and spec.format not in LIST_FORMATS:
        raise SourcesError(f"source {spec.name!r}: field 'format': {spec.format!r} is not one of {list(LIST_FORMATS)}")
    if root.is_file():
        fmt = spec.format or format_of(root)
        if fmt is None:
            raise SourcesError(f"source {spec.name!r}: field 'path': cannot tell the list format of {root.name} "
                               f"(name it .{'/.'.join(LIST_FORMATS)} or set 'format')")
        return [(root, fmt)]
    files = []
    for path in sorted(root.iterdir()):
        fmt = format_of(path)
        if path.is_file() and fmt is not None and (spec.format is None or fmt == spec.format):
            files.append((path, fmt))
    if not files:
        raise SourcesError(f"source {spec.name!r}: field 'path': {root} holds no URL list files "
                           f"({', '.join(LIST_FORMATS)})")
    return files


def _open_text(path: Path) -> IO[str]:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


def list_columns(path: Path, fmt: str) -> list[str]:
    """Column names of a list file, read from its header alone (no full read before the build)."""
    base = fmt.removesuffix(".gz")
    if base == "txt":
        return ["url"]
    if base == "parquet":
        return list(pq.read_schema(path).names)
    with _open_text(path) as handle:
        if base in ("csv", "tsv"):
            header = next(csv.reader(handle, delimiter="\t" if base == "tsv" else ","), [])
            return [name.strip() for name in header]
        for line in handle:  # jsonl: the keys of the first record
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"first record is a {type(record).__name__}, not an object")
                return list(record)
    return []


def check_url_source(sources_file: Path, spec: SourceSpec) -> None:
    """Fail before any work when a list file lacks the URL or caption column."""
    where = f"{sources_file}: source {spec.name!r}"
    for path, fmt in list_files(spec):
        if fmt in TXT_FORMATS:
            if spec.caption_column is not None:
                raise SourcesError(f"{where}: field 'caption_column': {path.name} is a plain URL list without columns")
            if spec.url_column != "url":
                raise SourcesError(f"{where}: field 'url_column': {path.name} is a plain URL list without columns")
            continue
        try:
            columns = list_columns(path, fmt)
        except Exception as error:  # unreadable header: the list itself is bad input
            raise SourcesError(f"{where}: field 'path': cannot read the header of {path} ({error})") from error
        for field, column in (("url_column", spec.url_column), ("caption_column", spec.caption_column)):
            if column is not None and column not in columns:
                raise SourcesError(f"{where}: field {field!r}: column {column!r} is not in {path.name} "
                                   f"(its columns: {columns})")


def _txt_to_parquet(path: Path, out: Path) -> Path:
    with _open_text(path) as handle:
        urls = [line.strip() for line in handle if line.strip()]
    pq.write_table(pa.table({"url": pa.array(urls, pa.string())}), out)
    return out


def stage_url_source(spec: SourceSpec, first_shard_id: int, shard_size: int, staging: Path) -> list[tuple[int, Path, int]]:
    """Cut the lists of `spec` into Arrow files of at most `shard_size` rows, ids from `first_shard_id`.

    Returns (shard id, file, rows) in shard order; `limit` cuts the tail. Columns: `url` and, with a
    caption column, `caption` (img2dataset's renaming).
    """
    from pipeline.img2dataset_parts import Reader  # driver only: importing img2dataset is heavy

    staged: list[tuple[int, Path, int]] = []
    remaining = spec.limit
    next_id = first_shard_id
    for file_index, (path, fmt) in enumerate(list_files(spec)):
        if remaining == 0:
            break
        if fmt in TXT_FORMATS:
            path, fmt = _txt_to_parquet(path, staging / f"{spec.name}-list-{file_index:06d}.parquet"), "parquet"
        reader = Reader(str(path), fmt, spec.url_column, spec.caption_column, None, None, None,
                        shard_size, set(), str(staging), next_id)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its progress prints are meant for its own CLI
                produced = list(reader)
        except Exception as error:
            raise SourcesError(f"source {spec.name!r}: field 'path': cannot read {path} as {fmt} ({error})") from error
        for shard_id, shard_file in produced:
            shard_file = Path(shard_file)
            if remaining == 0:
                shard_file.unlink()
                continue
            with pa.memory_map(str(shard_file)) as source:
                table = pa.ipc.open_file(source).read_all()
            if remaining is not None and table.num_rows > remaining:
                table = table.slice(0, remaining)
                with pa.OSFile(str(shard_file), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                    writer.write_table(table)
            if remaining is not None:
                remaining -= table.num_rows
            staged.append((shard_id, shard_file, table.num_rows))
        next_id += len(produced)
    return staged
