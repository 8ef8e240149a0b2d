"""shards.verify: a sound directory passes; each contract violation is caught and named."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from testkit import image_bytes
from shards import contract
from shards.manifest import file_sha256, write_manifest
from shards.reader import dump_npy, iter_tar
from shards.verify import main as verify_main
from shards.verify import verify
from shards.writer import ShardWriter
from support_shards import make_image_shard_dir

IMAGE_SIZE = 96
K, GRID, DIM = 2, (2, 2), 8


# ---------------------------------------------------------------- building and editing directories

def image_dir(root: Path) -> Path:
    directory = root / "images"
    make_image_shard_dir(directory, (3, 3), image_size=IMAGE_SIZE, duplicates={(1, 2): (0, 0)}, excluded={(0, 1)})
    return directory


def targets_dir(root: Path, dtype: str = "float16") -> Path:
    """A train directory over image_dir(root): K views, [K, N, D] targets, the upstream's keys."""
    upstream = image_dir(root)
    directory = root / "targets"
    duplicates = set(pq.read_table(upstream / contract.DUPLICATES_FILE)["key"].to_pylist())
    schema = pa.schema([("key", pa.string()), ("status", pa.string()), ("error_message", pa.string())])
    for shard_id in (0, 1):
        writer = ShardWriter(directory, shard_id, schema)
        for key, members in iter_tar(contract.tar_path(upstream, shard_id)):
            if key in duplicates:
                continue
            with Image.open(io.BytesIO(members["jpg"])) as image:
                width, height = image.size
            views = [{"box": [0, 0, width, height], "flip": bool(v % 2)} for v in range(K)]
            targets = np.ones((K, GRID[0] * GRID[1], DIM), dtype=np.float16 if dtype == "float16" else np.int8)
            sample = {"jpg": members["jpg"], "json": json.dumps({"key": key, "views": views}).encode(),
                      "tgt.npy": dump_npy(targets)}
            if dtype == "int8":
                sample["tgs.npy"] = dump_npy(np.ones((K, GRID[0] * GRID[1]), dtype=np.float32))
            writer.add_sample(key, sample)
            writer.add_row({"key": key, "status": "success", "error_message": None})
        writer.close()
    write_manifest(directory, contract.STAGE_TARGETS, {"image_size": IMAGE_SIZE}, upstream=upstream,
                   extra={"targets": {"grid": list(GRID), "dim": DIM, "dtype": dtype}, "views": {"k": K}})
    return directory


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def refresh_checksums(directory: Path) -> None:
    """Make manifest checksums follow edited tars, so only the planted violation remains."""
    def update(manifest):
        for entry in manifest["shards"]:
            if (directory / entry["name"]).exists():
                entry["sha256"] = file_sha256(directory / entry["name"])
    edit_json(directory / contract.MANIFEST_FILE, update)


def rewrite_tar(directory: Path, shard_id: int, change: Callable[[str, dict], tuple[str, dict]]) -> None:
    """Rewrite one tar, passing its first sample through `change(key, members)`."""
    path = contract.tar_path(directory, shard_id)
    samples = list(iter_tar(path))
    samples[0] = change(*samples[0])
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    refresh_checksums(directory)


def rewrite_rows(directory: Path, shard_id: int, change: Callable[[list[dict]], list[dict]]) -> None:
    path = contract.parquet_path(directory, shard_id)
    table = pq.read_table(path)
    pq.write_table(pa.Table.from_pylist(change(table.to_pylist())), path)


def with_member(ext: str, data: bytes | None):
    def change(key, members):
        members = dict(members)
        if data is None:
            members.pop(ext)
        else:
            members[ext] = data
        return key, members
    return change


def first_row(change: Callable[[dict], None]):
    def edit(rows):
        change(rows[0])
        return rows
    return edit


def copy_shard_as(directory: Path, shard_id: int, new_id: int) -> None:
    """A second, marked shard with the same keys (and a manifest that lists it)."""
    for path in (contract.tar_path, contract.parquet_path, contract.stats_path):
        shutil.copy(path(directory, shard_id), path(directory, new_id))
    write_manifest(directory, contract.STAGE_IMAGES, {"image_size": IMAGE_SIZE})


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buffer, "PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- image directories

IMAGE_VIOLATIONS = {
    "unfinished tar": (lambda d: shutil.copy(d / "000000.tar", d / "000007.tar"), "000007.tar has no stats marker"),
    "missing parquet": (lambda d: (d / "000001.parquet").unlink(), "000001.parquet is missing although shard 1"),
    "leftover temp": (lambda d: (d / ".000002.tar.tmp-123").write_bytes(b"x"), "leftover temp file"),
    "missing column": (lambda d: pq.write_table(pq.read_table(d / "000000.parquet").drop_columns(["sha256"]),
                                               d / "000000.parquet"), "lacks columns ['sha256']"),
    "row count": (lambda d: edit_json(d / "000000_stats.json", lambda s: s.update(rows=s["rows"] + 1)),
                  "000000.parquet has 3 rows, its stats say 4"),
    "failure without reason": (lambda d: rewrite_rows(d, 0, lambda rows: [
        {**r, "error_message": None} if r["status"] != "success" else r for r in rows]), "but no error_message"),
    "tar vs success rows": (lambda d: rewrite_rows(d, 0, first_row(
        lambda r: r.update(status="http_error", error_message="HTTP 404"))), "tar keys differ"),
    "sample count": (lambda d: edit_json(d / "000001_stats.json", lambda s: s.update(count=s["count"] + 1)),
                     "samples, its stats say"),
    "key twice": (lambda d: copy_shard_as(d, 0, 2), "key 00000000 occurs more than once"),
    "non-digit key": (lambda d: rewrite_tar(d, 0, lambda k, m: ("00000x0", m)), "key is not digit-only"),
    "missing json": (lambda d: rewrite_tar(d, 0, with_member("json", None)), "missing .json member"),
    "invalid json": (lambda d: rewrite_tar(d, 0, with_member("json", b"{not json")), "not valid JSON"),
    "caption not utf-8": (lambda d: rewrite_tar(d, 0, with_member("txt", b"\xff\xfe\xfa")), "caption is not UTF-8"),
    "png stored": (lambda d: rewrite_tar(d, 0, with_member("jpg", png_bytes())), "PNG RGB, expected an RGB JPEG"),
    "grayscale jpeg": (lambda d: rewrite_tar(d, 0, with_member("jpg", image_bytes(40, 30, mode="L"))),
                       "JPEG L, expected an RGB JPEG"),
    "too big": (lambda d: rewrite_tar(d, 0, with_member("jpg", image_bytes(200, 150))), "exceeds image_size 96"),
    "undecodable": (lambda d: rewrite_tar(d, 0, with_member("jpg", b"\xff\xd8 garbage")), "does not decode"),
    "truncated tar": (lambda d: (d / "000001.tar").write_bytes((d / "000001.tar").read_bytes()[:700]),
                      "unreadable tar"),
    "not in manifest": (lambda d: edit_json(d / "manifest.json", lambda m: m["shards"].pop()),
                        "000001.tar is marked done but missing from manifest.json"),
    "manifest lists more": (lambda d: edit_json(d / "manifest.json", lambda m: m["shards"].append(
        {"name": "000009.tar", "count": 1, "rows": 1, "sha256": "0"})), "lists 000009.tar, which is not a finished"),
    "manifest count": (lambda d: edit_json(d / "manifest.json", lambda m: m["shards"][0].update(count=99)),
                       "count 99, its stats say"),
    "checksum": (lambda d: edit_json(d / "manifest.json", lambda m: m["shards"][0].update(sha256="0" * 64)),
                 "checksum does not match"),
    "input rows": (lambda d: edit_json(d / "manifest.json", lambda m: m.update(input_rows=999)),
                   "999 input rows but the shards hold 6"),
    "sizes missing": (lambda d: (d / "sizes.json").unlink(), "sizes.json is missing"),
    "sizes differ": (lambda d: (d / "sizes.json").write_text("{}"), "sizes.json does not match"),
    "duplicate of nothing": (lambda d: pq.write_table(pa.table({"key": ["0009999"], "first_key": ["0000000"],
                                                                "sha256": ["0" * 64]}), d / "duplicates.parquet"),
                             "names a key not in the shards"),
    "no manifest": (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
    "unknown stage": (lambda d: edit_json(d / "manifest.json", lambda m: m.update(stage="weird")), "unknown stage"),
    "schema version": (lambda d: edit_json(d / "manifest.json", lambda m: m.update(schema_version=2)),
                       "schema_version 2"),
}


def test_sound_image_directory_passes(tmp_path, capsys):
    directory = image_dir(tmp_path)
    assert verify(directory) == []
    assert verify_main([str(directory)]) == 0
    assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize("name", list(IMAGE_VIOLATIONS))
def test_image_violation_is_named(tmp_path, capsys, name):
    directory = image_dir(tmp_path)
    corrupt, expected = IMAGE_VIOLATIONS[name]
    corrupt(directory)
    violations = verify(directory)
    assert any(expected in line for line in violations), violations
    assert verify_main([str(directory)]) == 1
    assert f"VIOLATION {directory}: " in capsys.readouterr().out


# ---------------------------------------------------------------- train (targets) directories

def set_view(views):
    def change(key, members):
        meta = json.loads(members["json"])
        meta["views"] = views(meta["views"])
        return key, {**members, "json": json.dumps(meta).encode()}
    return change


TARGET_VIOLATIONS = {
    "missing targets": (lambda d: rewrite_tar(d, 0, with_member("tgt.npy", None)), "missing .tgt.npy member"),
    "pickled targets": (lambda d: rewrite_tar(d, 0, with_member("tgt.npy", _pickled_npy())),
                        "does not load without pickle"),
    "targets shape": (lambda d: rewrite_tar(d, 0, with_member("tgt.npy", dump_npy(np.ones((K + 1, 4, DIM), np.float16)))),
                      "targets shape (3, 4, 8), manifest says [K, N, D] = [2, 4, 8]"),
    "targets dtype": (lambda d: rewrite_tar(d, 0, with_member("tgt.npy", dump_npy(np.ones((K, 4, DIM), np.float32)))),
                      "targets dtype float32"),
    "view count": (lambda d: rewrite_tar(d, 0, set_view(lambda v: v[:1])), "expected 2 views"),
    "malformed view": (lambda d: rewrite_tar(d, 0, set_view(lambda v: [{"box": [0.5, 0, 1, 1], "flip": False}] * K)),
                       "malformed view"),
    "box outside": (lambda d: rewrite_tar(d, 0, set_view(lambda v: [{"box": [0, 0, 5000, 10], "flip": True}] * K)),
                    "is outside the"),
    "no upstream": (lambda d: edit_json(d / "manifest.json", lambda m: m.update(upstream=None)),
                    "upstream image directory is not recorded"),
    "upstream changed": (lambda d: edit_json(d.parent / "images" / "manifest.json", lambda m: m.update(note="edited")),
                         "changed since the targets were cached"),
    "rows off upstream": (lambda d: rewrite_rows(d, 1, lambda rows: rows[:-1]), "rows do not follow the upstream keys"),
}


def _pickled_npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"payload": 1}], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def test_sound_targets_directory_passes(tmp_path):
    assert verify(targets_dir(tmp_path)) == []
    assert verify(targets_dir(tmp_path / "int8", dtype="int8")) == []


@pytest.mark.parametrize("name", list(TARGET_VIOLATIONS))
def test_targets_violation_is_named(tmp_path, name):
    directory = targets_dir(tmp_path)
    corrupt, expected = TARGET_VIOLATIONS[name]
    corrupt(directory)
    violations = verify(directory)
    assert any(expected in line for line in violations), violations


@pytest.mark.parametrize("scales,expected", [
    (None, "int8 targets without .tgs.npy"),
    (dump_npy(np.ones((K, 3), np.float32)), "scales shape (2, 3), expected (2, 4)"),
])
def test_int8_scales_are_checked(tmp_path, scales, expected):
    directory = targets_dir(tmp_path, dtype="int8")
    rewrite_tar(directory, 0, with_member("tgs.npy", scales))
    assert any(expected in line for line in verify(directory))

