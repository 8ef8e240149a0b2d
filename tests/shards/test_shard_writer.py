"""shards.writer: the marker is written last, a killed writer leaves nothing that counts as done."""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from testkit import image_bytes
from shards import contract
from shards.reader import completed_shards, iter_tar, present_tars, read_stats
from shards.writer import ShardWriter, remove_stale_temp_files

SCHEMA = pa.schema([("key", pa.string()), ("status", pa.string()), ("error_message", pa.string())])


def fill(writer: ShardWriter, n: int = 3) -> None:
    for index in range(n):
        key = contract.make_key(writer.shard_id, index, 100)
        writer.add_sample(key, {"jpg": image_bytes(32, 24, seed=index), "json": b"{}", "txt": b"caption"})
        writer.add_row({"key": key, "status": "success", "error_message": None})


def test_publish_order_is_tar_parquet_then_marker(tmp_path, monkeypatch):
    published = []
    real_replace = os.replace

    def recording_replace(src, dst):
        published.append(os.path.basename(dst))
        real_replace(src, dst)

    monkeypatch.setattr("shards.writer.os.replace", recording_replace)
    writer = ShardWriter(tmp_path, 7, SCHEMA)
    fill(writer)
    stats = writer.close({"source": "unit"})
    assert published == ["000007.tar", "000007.parquet", "000007_stats.json"]
    assert stats == read_stats(tmp_path, 7)
    assert (stats["count"], stats["rows"], stats["status_counts"], stats["source"]) == (3, 3, {"success": 3}, "unit")


def test_a_killed_writer_leaves_only_temp_files(tmp_path):
    writer = ShardWriter(tmp_path, 3, SCHEMA)
    fill(writer)  # never closed: the process "died" here
    assert completed_shards(tmp_path) == [] and present_tars(tmp_path) == []
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert leftovers and all(name.startswith(".") and ".tmp-" in name for name in leftovers)
    assert remove_stale_temp_files(tmp_path) == len(leftovers)
    assert list(tmp_path.iterdir()) == []


def test_exception_inside_the_with_block_aborts(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, 1, SCHEMA) as writer:
            fill(writer)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_same_samples_same_bytes(tmp_path):
    for name in ("a", "b"):
        writer = ShardWriter(tmp_path / name, 0, SCHEMA)
        fill(writer)
        writer.close()
    assert (tmp_path / "a" / "000000.tar").read_bytes() == (tmp_path / "b" / "000000.tar").read_bytes()
    assert [k for k, _ in iter_tar(tmp_path / "a" / "000000.tar")] == ["00000000", "00000001", "00000002"]


def test_success_rows_must_match_samples(tmp_path):
    writer = ShardWriter(tmp_path, 2, SCHEMA)
    fill(writer)
    writer.add_row({"key": "00000299", "status": "success", "error_message": None})  # a row without a sample
    with pytest.raises(RuntimeError, match="4 success rows but 3 samples"):
        writer.close()
    assert completed_shards(tmp_path) == [] and present_tars(tmp_path) == []


@pytest.mark.parametrize("key,members,message", [
    ("12a", {"jpg": b"x"}, "not digit-only"),
    ("000000001", {"json": b"{}"}, "has no .jpg"),
])
def test_bad_samples_are_refused(tmp_path, key, members, message):
    writer = ShardWriter(tmp_path, 0, SCHEMA)
    with pytest.raises(ValueError, match=message):
        writer.add_sample(key, members)
    writer.add_sample("000000001", {"jpg": b"x"})
    with pytest.raises(ValueError, match="written twice"):
        writer.add_sample("000000001", {"jpg": b"x"})
    writer.abort()


def test_all_failure_shard_keeps_its_columns(tmp_path):
    writer = ShardWriter(tmp_path, 5, SCHEMA)
    writer.add_row({"key": "000005000", "status": "http_error", "error_message": "HTTP 404"})
    stats = writer.close()
    assert stats["count"] == 0 and stats["status_counts"] == {"http_error": 1}
    assert pq.read_schema(contract.parquet_path(tmp_path, 5)).names == SCHEMA.names
    empty = ShardWriter(tmp_path, 6, SCHEMA)
    empty.close()
    assert pq.read_table(contract.parquet_path(tmp_path, 6)).schema.names == SCHEMA.names
