"""Build one image shard: read its planned rows, fetch or read each, process, write, mark.

`ShardBuilder` is img2dataset's stage shape: a small picklable callable with the config in
`__init__` and one shard in `__call__`, returning the shard's stats (the same dict its
`NNNNNN_stats.json` marker holds). Rows run on a thread pool like img2dataset's `thread_count`,
but results are consumed in row order through a bounded window, so a shard's tar holds the same
bytes on every run.
"""
from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import pyarrow as pa

from shards import contract
from shards.reader import read_stats
from shards.writer import ShardWriter

from pipeline import statuses
from pipeline.deadline import DeadlineWatchdog
from pipeline.fetch import Fetcher, FetchPolicy
from pipeline.folders import display_path
from pipeline.images import ImagePolicy, ImageProcessor, StoredImage, source_sha256
from pipeline.plan import PlannedShard, read_shard_input
from pipeline.sources import KIND_URLS, SourceSpec
from pipeline.statuses import RowFailure

PARQUET_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("url", pa.string()), ("path", pa.string()),
    ("caption", pa.string()), ("label", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
    ("sha256", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("original_width", pa.int32()), ("original_height", pa.int32()),
])

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(func: Callable[[T], R], items: Iterable[T], threads: int, window: int) -> Iterator[R]:
    """`map` on a thread pool, results in input order, at most `window` items started but not yielded."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        iterator = iter(items)
        pending = deque(pool.submit(func, item) for _, item in zip(range(window), iterator))
        while pending:
            result = pending.popleft().result()
            for item in iterator:  # refill one slot
                pending.append(pool.submit(func, item))
                break
            yield result


@dataclass(frozen=True)
class RowOutcome:
    status: str
    message: str | None = None
    sha256: str | None = None
    image: StoredImage | None = None


def read_source_file(root: str, relative: bytes, max_bytes: int) -> bytes:
    """The bytes of one folder-source file, or RowFailure (`unreadable_file`, `too_large`)."""
    path = os.path.join(os.fsencode(root), relative)
    shown = display_path(relative)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO named *.jpg must not block the shard
    except OSError as error:
        raise RowFailure(statuses.UNREADABLE_FILE, f"cannot open {shown}: {error.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RowFailure(statuses.UNREADABLE_FILE, f"{shown} is not a regular file")
        if info.st_size > max_bytes:
            raise RowFailure(statuses.TOO_LARGE, f"{shown} has {info.st_size} bytes, over the {max_bytes}-byte cap")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(max_bytes + 1)
    except OSError as error:
        raise RowFailure(statuses.UNREADABLE_FILE, f"cannot read {shown}: {error.strerror or error}") from None
    finally:
        os.close(fd)


class ShardBuilder:
    """Callable: PlannedShard -> its stats, after writing `NNNNNN.{tar,parquet}` and the marker last."""

    def __init__(
        self,
        output: str,
        sources: dict[str, SourceSpec],
        shard_size: int,
        image_policy: ImagePolicy,
        fetch_policy: FetchPolicy,
        excluded_hashes: frozenset[str] = frozenset(),
        url_threads: int = 32,
        folder_threads: int = 2,
        decode_threads: int = 2,
    ):
        self.output = output
        self.sources = sources
        self.shard_size = shard_size
        self.image_policy = image_policy
        self.fetch_policy = fetch_policy
        self.excluded_hashes = excluded_hashes
        self.url_threads = url_threads
        self.folder_threads = folder_threads
        self.decode_threads = decode_threads  # bounds decoded-image memory when many fetch threads land at once

    def __call__(self, shard: PlannedShard) -> dict[str, Any]:
        output = Path(self.output)
        if contract.stats_path(output, shard.shard_id).exists():
            return read_stats(output, shard.shard_id)  # marked shards are immutable
        spec = self.sources[shard.source]
        records = read_shard_input(output, shard).to_pylist()
        processor = ImageProcessor(self.image_policy)
        decode_slots = threading.Semaphore(self.decode_threads)
        is_urls = spec.kind == KIND_URLS
        threads = self.url_threads if is_urls else self.folder_threads
        started, cpu_started = time.time(), time.process_time()
        with DeadlineWatchdog() as watchdog:
            fetcher = Fetcher(self.fetch_policy, watchdog) if is_urls else None

            def outcome_of(record: dict) -> RowOutcome:
                sha256 = None
                try:
                    if is_urls:
                        data = fetcher.fetch(record.get("url"))
                    else:
                        data = read_source_file(spec.root, record["path"], self.fetch_policy.max_bytes)
                    sha256 = source_sha256(data) if data else None
                    if sha256 in self.excluded_hashes:
                        raise RowFailure(statuses.EXCLUDED, "the source bytes' sha256 is listed in --exclude-hashes")
                    with decode_slots:
                        image = processor(data)
                    return RowOutcome(statuses.SUCCESS, None, sha256, image)
                except RowFailure as failure:
                    return RowOutcome(failure.status, failure.message, sha256)
                except Exception as error:  # a bug must cost one row, not the shard
                    return RowOutcome(statuses.INTERNAL_ERROR, f"{type(error).__name__}: {error}", sha256)

            writer = ShardWriter(output, shard.shard_id, PARQUET_SCHEMA)
            with writer:
                outcomes = ordered_map(outcome_of, records, threads, window=max(8 * threads, 32))
                for index, (record, outcome) in enumerate(zip(records, outcomes)):
                    key = contract.make_key(shard.shard_id, index, self.shard_size)
                    row = self._row(key, spec, record, outcome)
                    writer.add_row(row)
                    if outcome.image is not None:
                        members = {contract.EXT_IMAGE: outcome.image.jpeg,
                                   contract.EXT_META: json.dumps(row, sort_keys=True).encode()}
                        if row["caption"] is not None:
                            members[contract.EXT_CAPTION] = row["caption"].encode("utf-8")
                        writer.add_sample(key, members)
                seconds = time.time() - started
                return writer.close({
                    "source": spec.name,
                    "kind": spec.kind,
                    "images_per_second": round(writer.sample_count / seconds, 2) if seconds > 0 else None,
                    # this worker process's CPU time (all its threads): throughput per core, whatever the load
                    "cpu_seconds": round(time.process_time() - cpu_started, 3),
                })

    @staticmethod
    def _row(key: str, spec: SourceSpec, record: dict, outcome: RowOutcome) -> dict[str, Any]:
        image = outcome.image
        caption = record.get("caption")
        url = record.get("url")
        return {
            "key": key,
            "source": spec.name,
            "url": None if url is None else str(url),
            "path": display_path(record["path"]) if "path" in record else None,
            "caption": None if caption is None else str(caption),
            "label": record.get("label"),
            "status": outcome.status,
            "error_message": outcome.message,
            "sha256": outcome.sha256,
            "width": image.width if image else None,
            "height": image.height if image else None,
            "original_width": image.original_width if image else None,
            "original_height": image.original_height if image else None,
        }
