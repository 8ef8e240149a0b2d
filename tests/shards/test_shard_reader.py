"""shards.contract and shards.reader: naming rules, grouping, manifests, no unpickling."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from shards import contract
from shards.reader import (
    completed_shards, dump_npy, iter_tar, load_manifest, load_npy, read_duplicates, read_rows,
)
from support_shards import make_image_shard_dir


def test_key_layout_matches_img2dataset():
    assert contract.make_key(12, 3, 10000) == "0000120003"
    assert contract.make_key(0, 0, 1) == "0000000"
    assert contract.key_index_digits(10000) == 4 and contract.key_index_digits(10001) == 5
    with pytest.raises(ValueError, match="outside shard size"):
        contract.make_key(1, 10, 10)
    with pytest.raises(ValueError, match="outside"):
        contract.shard_stem(10**6)


def test_file_names_and_member_names():
    assert contract.parse_shard_file("000012.tar") == 12
    assert contract.parse_shard_file("000012_stats.json") == 12
    assert contract.parse_shard_file(".000012.tar.tmp-99") is None
    assert contract.parse_shard_file("12.tar") is None
    assert contract.split_member_name("dir/000001000.tgt.npy") == ("000001000", "tgt.npy")
    with pytest.raises(ValueError, match="no extension"):
        contract.split_member_name("000001000")


def test_reader_sees_only_marked_shards_and_groups_members(tmp_path):
    built = make_image_shard_dir(tmp_path, (3, 2), duplicates={(1, 1): (0, 0)})
    assert completed_shards(tmp_path) == [0, 1]
    contract.stats_path(tmp_path, 1).unlink()
    assert completed_shards(tmp_path) == [0]
    samples = list(iter_tar(contract.tar_path(tmp_path, 0)))
    assert [key for key, _ in samples] == built.success_keys[0]
    assert all(set(members) == {"jpg", "json", "txt"} for _, members in samples)
    assert [row["key"] for row in read_rows(tmp_path, 0)] == built.shard_keys[0]
    assert read_duplicates(tmp_path) == built.duplicates


def test_manifest_errors_name_the_problem(tmp_path):
    make_image_shard_dir(tmp_path, (2,))
    assert load_manifest(tmp_path)["stage"] == "images"
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(ValueError, match="schema_version 99"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        load_manifest(tmp_path)
    assert read_duplicates(tmp_path) == {}


def test_npy_round_trip_and_no_pickles():
    array = np.arange(12, dtype=np.float16).reshape(3, 4)
    assert np.array_equal(load_npy(dump_npy(array)), array)
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_npy(buffer.getvalue())
