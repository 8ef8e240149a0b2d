"""SOURCES.yaml checks (errors name the source and the field) and the deterministic plan."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from build_job import build_main
from testkit import REPO_ROOT
from pipeline.folders import list_images, parent_label
from pipeline.plan import stage_plan
from pipeline.sources import SourcesError, load_sources


def write_sources(tmp_path: Path, sources: list[dict]) -> Path:
    path = tmp_path / "SOURCES.yaml"
    path.write_text(yaml.safe_dump({"sources": sources}))
    return path


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "a.csv").write_text("url,caption\nhttp://h/1.jpg,one\nhttp://h/2.jpg,two\n")
    (tmp_path / "lists" / "nocaption.tsv").write_text("link\tother\nhttp://h/3.jpg\tx\n")
    tree = tmp_path / "tree"
    for rel in ("b/z.JPG", "b/a.png", "a/x.jpeg", "a/y.WebP", "top.gif", "c/d/deep.bmp", "a/notes.txt",
                "a/._x.jpeg", ".cache/hidden.jpg"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(b"x")
    return tmp_path


@pytest.mark.parametrize("entry,field", [
    ({"name": "s1", "kind": "ftp", "path": "lists/a.csv"}, "kind"),
    ({"name": "s1", "kind": "urls"}, "path"),
    ({"name": "s1", "kind": "urls", "path": "lists/missing.csv"}, "path"),
    ({"name": "s1", "kind": "urls", "path": "lists/nocaption.tsv"}, "url_column"),
    ({"name": "s1", "kind": "urls", "path": "lists/a.csv", "caption_column": "text"}, "caption_column"),
    ({"name": "s1", "kind": "urls", "path": "lists/a.csv", "limit": 0}, "limit"),
    ({"name": "s1", "kind": "urls", "path": "lists/a.csv", "label": "parent_dir"}, "label"),
    ({"name": "s1", "kind": "folder", "path": "tree", "label": "grandparent"}, "label"),
    ({"name": "s1", "kind": "folder", "path": "lists/a.csv"}, "path"),
    ({"name": "s1", "kind": "folder", "path": "tree", "url_column": "url"}, "url_column"),
])
def test_bad_source_names_source_and_field(inputs, entry, field):
    with pytest.raises(SourcesError) as caught:
        load_sources(write_sources(inputs, [entry]))
    assert "source 's1'" in str(caught.value) and f"field '{field}'" in str(caught.value)


def test_bad_name_and_duplicate_name(inputs):
    with pytest.raises(SourcesError, match=r"source #1: field 'name'"):
        load_sources(write_sources(inputs, [{"name": "Bad Name", "kind": "folder", "path": "tree"}]))
    twice = [{"name": "dup", "kind": "folder", "path": "tree"}, {"name": "dup", "kind": "urls", "path": "lists/a.csv"}]
    with pytest.raises(SourcesError, match=r"source 'dup': field 'name': duplicate name"):
        load_sources(write_sources(inputs, twice))


def test_bad_sources_stop_the_job_before_any_work(inputs, capsys):
    sources = write_sources(inputs, [{"name": "s1", "kind": "urls", "path": "lists/nocaption.tsv"}])
    output = inputs / "out"
    assert build_main(["--sources", str(sources), "--output", str(output)]) == 2
    assert "source 's1': field 'url_column'" in capsys.readouterr().err
    assert not output.exists()


def test_folder_listing_is_sorted_recursive_case_insensitive_and_skips_hidden(inputs):
    found = list_images(inputs / "tree")
    assert found == [b"a/x.jpeg", b"a/y.WebP", b"b/a.png", b"b/z.JPG", b"c/d/deep.bmp", b"top.gif"]
    assert [parent_label(p) for p in found] == ["a", "a", "b", "b", "d", None]


def test_plan_is_global_ordered_and_reproducible(inputs):
    lines = "".join(f"http://h/{i}.jpg?w=1,2\n" for i in range(7))  # commas break img2dataset's txt reader
    (inputs / "lists" / "b.txt.gz").write_bytes(gzip.compress(lines.encode()))
    pq.write_table(pa.table({"u": [f"http://p/{i}" for i in range(5)]}), inputs / "p.parquet")
    (inputs / "j.jsonl").write_text("".join(json.dumps({"url": f"http://j/{i}", "t": str(i)}) + "\n" for i in range(3)))
    sources = load_sources(write_sources(inputs, [
        {"name": "txt", "kind": "urls", "path": "lists/b.txt.gz"},
        {"name": "tree", "kind": "folder", "path": "tree", "label": "parent_dir"},
        {"name": "parq", "kind": "urls", "path": "p.parquet", "url_column": "u", "limit": 4},
        {"name": "jsonl", "kind": "urls", "path": "j.jsonl", "caption_column": "t"},
    ]))
    plan, staging = stage_plan(sources, shard_size=3, output=inputs / "out")
    again, staging_again = stage_plan(sources, shard_size=3, output=inputs / "out2")
    assert plan.source_digests == again.source_digests
    assert [(s.shard_id, s.source, s.rows) for s in plan.shards] == [
        (0, "txt", 3), (1, "txt", 3), (2, "txt", 1),
        (3, "tree", 3), (4, "tree", 3),
        (5, "parq", 3), (6, "parq", 1),  # limit 4 of 5 rows
        (7, "jsonl", 3),
    ]
    assert plan.source_rows == {"txt": 7, "tree": 6, "parq": 4, "jsonl": 3}

    def rows(shard_id):
        shard = plan.shards[shard_id]
        table = pa.ipc.open_file(pa.memory_map(str(staging / shard.input_name))).read_all()
        return table.to_pylist()

    assert rows(0)[1] == {"url": "http://h/1.jpg?w=1,2"}
    assert [r["path"] for r in rows(3)] == [b"a/x.jpeg", b"a/y.WebP", b"b/a.png"]
    assert [r["label"] for r in rows(4)] == ["b", "d", None]
    assert rows(7)[2] == {"caption": "2", "url": "http://j/2"}
    for directory in (staging, staging_again):
        assert sorted(os.listdir(directory)) == [f"{i:06d}.arrow" for i in range(8)]


@pytest.mark.parametrize("name,sources", [
    ("eva_mixture.yaml", ["in21k", "cc12m", "cc3m", "coco", "ade20k", "objects365"]),
    ("example.yaml", ["web", "photos"]),
])
def test_shipped_sources_files_are_valid(tmp_path, name, sources):
    """The shipped SOURCES files pass every check once their paths exist (columns included)."""
    entries = yaml.safe_load((REPO_ROOT / "configs" / "sources" / name).read_text())["sources"]
    for entry in entries:
        local = tmp_path / entry["name"] / Path(entry["path"]).name
        if entry["kind"] == "folder":
            local.mkdir(parents=True)
        else:
            local.parent.mkdir(parents=True)
            columns = [entry.get("url_column", "url")] + ([entry["caption_column"]] if "caption_column" in entry else [])
            separator = "\t" if local.suffix == ".tsv" else ","
            local.write_text(separator.join(columns) + "\n" if local.suffix != ".txt" else "http://h/x.jpg\n")
        entry["path"] = str(local)
    specs = load_sources(write_sources(tmp_path, entries))
    assert [spec.name for spec in specs] == sources
