"""jobs/build_shards.py end to end on a real local Ray cluster, with a hostile loopback server.

One mixed run (URL list + folder) carries every bad-input case; the other tests cover resume
after a SIGKILL, the embedded-Ray path, `ray job submit`, config and input changes, and the
private-address refusal. Every directory built is checked with shards.verify.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

import odd_images
from build_job import build_main, job_command, job_env, run_job
from testkit import REPO_ROOT, VENV_BIN, image_bytes
from hostile_server import HostileServer
from pipeline import statuses
from shards import contract
from shards.reader import completed_shards, iter_tar, read_duplicates, read_rows
from shards.verify import verify

SHARD_SIZE = 8
TIMEOUT_S = 2


def write_sources(path: Path, sources: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"sources": sources}))
    return path


def all_rows(directory: Path) -> list[dict]:
    return [row for shard_id in completed_shards(directory) for row in read_rows(directory, shard_id)]


def shard_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())
            if contract.parse_shard_file(p.name) is not None and not p.name.endswith("_stats.json")}


# ------------------------------------------------------------------------------------------
# The mixed run: every bad-input case next to good rows, URL list and folder in one directory.

DUPLICATE_BYTES = image_bytes(90, 70, seed=31)
EXCLUDED_BYTES = image_bytes(90, 70, seed=32)
OK_BYTES = image_bytes(120, 90, seed=30)


@pytest.fixture(scope="module")
def hostile():
    with HostileServer() as server:
        yield server


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, hostile, ray_cluster):
    """Build the mixed directory once; yields (output, expected rows, captured stdout, exit code)."""
    root = tmp_path_factory.mktemp("mixed")
    web = [  # (url, caption, expected status)
        (hostile.add("ok.jpg", OK_BYTES), "a good photo", statuses.SUCCESS),
        (hostile.add("cmyk.jpg", odd_images.cmyk_jpeg()), "cmyk", statuses.SUCCESS),
        (hostile.add("gray.png", odd_images.grayscale_png(), "image/png"), None, statuses.SUCCESS),
        (hostile.add("palette.gif", odd_images.palette_with_transparency_gif(), "image/gif"), "p", statuses.SUCCESS),
        (hostile.add("rgba.png", odd_images.rgba_png_half_transparent(), "image/png"), "rgba", statuses.SUCCESS),
        (hostile.add("16bit.png", odd_images.sixteen_bit_png(), "image/png"), "16", statuses.SUCCESS),
        (hostile.add("anim.gif", odd_images.animated_gif(), "image/gif"), "anim", statuses.SUCCESS),
        (hostile.add("exif.jpg", odd_images.exif_rotated_jpeg()), "exif", statuses.SUCCESS),
        (hostile.add("big.jpg", odd_images.big_jpeg()), "big", statuses.SUCCESS),
        (hostile.url("/status/404"), "gone", statuses.HTTP_ERROR),
        (hostile.refused_url, "refused", statuses.CONNECTION_ERROR),
        (hostile.url("/redirect/self"), "loop", statuses.REDIRECT_LOOP),
        (hostile.add("page.html", odd_images.HTML_BODY, "text/html"), "html", statuses.NOT_AN_IMAGE),
        (hostile.add("half.jpg", odd_images.truncated_jpeg()), "half", statuses.TRUNCATED),
        (hostile.url("/empty"), "empty", statuses.EMPTY),
        (hostile.add("bomb.png", odd_images.png_header_only(30000, 30000), "image/png"), "bomb",
         statuses.DECOMPRESSION_BOMB),
        (hostile.add("tiny.jpg", image_bytes(10, 10, seed=33)), "tiny", statuses.TOO_SMALL),
        (hostile.url("/robots/noai/ok.jpg"), "robots", statuses.DISALLOWED),
        ("ftp://example.com/a.jpg", "ftp", statuses.UNSUPPORTED_SCHEME),
        ("http://[::1/a.jpg", "malformed", statuses.MALFORMED_URL),
        (hostile.url("/endless-slow"), "slow", statuses.TIMEOUT),
        (hostile.silent_url, "silent", statuses.TIMEOUT),
        (hostile.url("/endless-fast"), "endless", statuses.TOO_LARGE),
        (hostile.add("dup.jpg", DUPLICATE_BYTES), "dup", statuses.SUCCESS),
        (hostile.add("excluded.jpg", EXCLUDED_BYTES), "excluded", statuses.EXCLUDED),
        (hostile.url("/redirect/chain/2"), "same bytes as row 0", statuses.SUCCESS),
        (hostile.url("/short-body"), "short", statuses.TRUNCATED),
    ]
    with open(root / "web.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "caption"])
        writer.writerows([(url, caption or "") for url, caption, _ in web])
    tree = root / "tree"
    folder = [  # (relative path, bytes or None for special files, expected status)
        ("cls_a/img0.jpg", image_bytes(100, 80, seed=40), statuses.SUCCESS),
        ("cls_a/img1.JPEG", image_bytes(100, 80, seed=41), statuses.SUCCESS),
        ("cls_a/img2.webp", odd_images.webp(), statuses.SUCCESS),
        ("cls_b/broken.jpg", None, statuses.UNREADABLE_FILE),      # a dangling link
        ("cls_b/dup_of_web.jpg", DUPLICATE_BYTES, statuses.SUCCESS),
        ("cls_b/excluded.png", EXCLUDED_BYTES, statuses.EXCLUDED),
        ("cls_b/gray.PNG", image_bytes(80, 60, seed=42, fmt="PNG", mode="L"), statuses.SUCCESS),
        ("cls_b/notimage.png", b"just text", statuses.NOT_AN_IMAGE),
        ("cls_c/fifo.jpg", None, statuses.UNREADABLE_FILE),        # a FIFO must not hang the shard
        ("top.bmp", odd_images.bmp(), statuses.SUCCESS),
    ]
    for relative, data, _ in folder:
        path = tree / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is not None:
            path.write_bytes(data)
        elif relative.endswith("broken.jpg"):
            path.symlink_to(tree / "no-such-file.jpg")
        else:
            os.mkfifo(path)
    (tree / "cls_a" / "notes.txt").write_text("not an image extension: not a row")
    exclude = root / "eval_hashes.txt"
    exclude.write_text(f"# evaluation images\n{hashlib.sha256(EXCLUDED_BYTES).hexdigest()}\n")
    sources = write_sources(root / "SOURCES.yaml", [
        {"name": "web", "kind": "urls", "path": "web.csv", "caption_column": "caption"},
        {"name": "tree", "kind": "folder", "path": "tree", "label": "parent_dir"},
    ])
    output = root / "out"
    argv = ["--sources", sources, "--output", output, "--shard-size", SHARD_SIZE, "--workers", 2,
            "--timeout", TIMEOUT_S, "--retries", 1, "--exclude-hashes", exclude, "--allow-private-addresses",
            "--ray-address", ray_cluster["address"], "--min-image-size", 16, "--max-bytes", 2_000_000,
            "--threads-per-worker", 8]
    argv = [str(a) for a in argv]
    started = time.monotonic()
    code = build_main(argv)
    seconds = time.monotonic() - started
    expected = [("web", url, caption, status) for url, caption, status in web]
    expected += [("tree", relative, None, status) for relative, _, status in folder]
    return {"output": output, "expected": expected, "code": code, "argv": argv, "seconds": seconds,
            "web_rows": len(web), "sources": sources, "root": root}


def test_mixed_run_stores_every_good_row_and_names_every_bad_one(mixed):
    assert mixed["code"] == 0
    output = mixed["output"]
    assert verify(output) == []
    rows = all_rows(output)
    assert len(rows) == len(mixed["expected"])
    for row, (source, where, caption, status) in zip(rows, mixed["expected"]):
        assert row["source"] == source
        assert (row["url"] if source == "web" else row["path"]) == where
        assert row["status"] == status, (where, row["error_message"])
        assert (row["error_message"] is None) == (status == statuses.SUCCESS), row
        if status != statuses.SUCCESS:
            assert len(row["error_message"]) > 10  # a readable reason, not just a class
    # Shard ids run on across sources; a shard holds one source; keys follow make_key.
    web_shards = -(-mixed["web_rows"] // SHARD_SIZE)
    for shard_id in completed_shards(output):
        shard_rows = read_rows(output, shard_id)
        assert {r["source"] for r in shard_rows} == {"web" if shard_id < web_shards else "tree"}
        assert [r["key"] for r in shard_rows] == [contract.make_key(shard_id, i, SHARD_SIZE)
                                                  for i in range(len(shard_rows))]
    # The run was bounded by the per-image deadline despite endless bodies and a silent server.
    assert mixed["seconds"] < 120


def test_mixed_run_samples_carry_metadata(mixed):
    output = mixed["output"]
    by_key = {row["key"]: row for row in all_rows(output)}
    seen = 0
    for shard_id in completed_shards(output):
        for key, members in iter_tar(contract.tar_path(output, shard_id)):
            row, meta = by_key[key], json.loads(members["json"])
            assert meta == row
            with Image.open(io.BytesIO(members["jpg"])) as image:
                assert image.mode == "RGB" and image.size == (row["width"], row["height"])
            if row["source"] == "web" and row["caption"]:
                assert members["txt"].decode() == row["caption"]
            if row["source"] == "tree":
                assert row["label"] == (Path(row["path"]).parent.name or None)
            seen += 1
    assert seen == sum(1 for r in by_key.values() if r["status"] == statuses.SUCCESS)
    big = next(r for r in by_key.values() if r["url"] and r["url"].endswith("big.jpg"))
    assert (big["width"], big["height"], big["original_width"], big["original_height"]) == (341, 256, 1200, 900)
    exif = next(r for r in by_key.values() if r["url"] and r["url"].endswith("exif.jpg"))
    assert (exif["width"], exif["height"]) == (64, 96)


def test_mixed_run_duplicates_and_exclusions(mixed):
    output = mixed["output"]
    rows = all_rows(output)
    key_of = {(r["url"] or r["path"]): r["key"] for r in rows}
    ok_url = next(u for u in key_of if u.endswith("/img/ok.jpg"))
    chain_url = next(u for u in key_of if u.endswith("/redirect/chain/2"))
    dup_url = next(u for u in key_of if u.endswith("/img/dup.jpg"))
    assert read_duplicates(output) == {
        key_of[chain_url]: key_of[ok_url],                 # within the URL source
        key_of["cls_b/dup_of_web.jpg"]: key_of[dup_url],   # across sources: the first key wins
    }
    table = pq.read_table(output / contract.DUPLICATES_FILE).to_pylist()
    assert all(set(r) == {"key", "first_key", "sha256"} for r in table)
    excluded = [r for r in rows if r["status"] == statuses.EXCLUDED]
    assert len(excluded) == 2 and all("exclude-hashes" in r["error_message"] for r in excluded)
    manifest = json.loads((output / contract.MANIFEST_FILE).read_text())
    assert manifest["duplicates"] == 2 and manifest["excluded"] == 2
    assert manifest["input_rows"] == len(rows)
    assert manifest["config"]["image_size"] == 256


def test_mixed_run_prints_a_table_per_source(mixed, capsys):
    # Rerunning the finished directory builds nothing and prints the same table.
    output = mixed["output"]
    before = shard_files(output)
    assert build_main(mixed["argv"]) == 0
    printed = capsys.readouterr().out
    assert "0 to build" in printed
    header = next(line for line in printed.splitlines() if line.startswith("source"))
    for column in ("rows in", "stored", "duplicates", statuses.TIMEOUT, statuses.HTTP_ERROR,
                   statuses.UNREADABLE_FILE, statuses.EXCLUDED):
        assert column in header
    web_line = next(line for line in printed.splitlines() if line.startswith("web "))
    stored_web = sum(1 for s, _, _, status in mixed["expected"] if s == "web" and status == statuses.SUCCESS)
    assert web_line.split()[2:4] == [str(mixed["web_rows"]), str(stored_web)]
    assert shard_files(output) == before


def test_changed_config_is_refused_naming_the_field(mixed, capsys):
    output = mixed["output"]
    before = shard_files(output)
    argv = list(mixed["argv"])
    argv[argv.index("--shard-size") + 1] = "4"
    assert build_main(argv + ["--image-size", "128"]) == 2
    error = capsys.readouterr().err
    assert "image_size: 256 there, 128 now" in error and "shard_size: 8 there, 4 now" in error
    assert shard_files(output) == before


def test_changed_inputs_are_refused_naming_the_source(mixed, capsys):
    root = mixed["root"]
    output = root / "out_inputs_changed"
    sources = write_sources(root / "SOURCES_small.yaml", [
        {"name": "tree", "kind": "folder", "path": "tree/cls_a", "label": "parent_dir"},
    ])
    argv = ["--sources", str(sources), "--output", str(output), "--workers", "1", "--ray-address",
            mixed["argv"][mixed["argv"].index("--ray-address") + 1]]
    assert build_main(argv) == 0
    (root / "tree" / "cls_a" / "img9.jpg").write_bytes(image_bytes(50, 50, seed=99))
    try:
        assert build_main(argv) == 2
        assert "inputs of source 'tree' changed" in capsys.readouterr().err
    finally:
        (root / "tree" / "cls_a" / "img9.jpg").unlink()
    assert verify(output) == []


def test_private_addresses_refused_without_the_flag(tmp_path, hostile, ray_cluster):
    url = hostile.add("private.jpg", OK_BYTES)
    (tmp_path / "list.txt").write_text(f"{url}\nhttp://localhost:{hostile.base.rsplit(':', 1)[1]}/img/ok.jpg\n")
    sources = write_sources(tmp_path / "S.yaml", [{"name": "web", "kind": "urls", "path": "list.txt"}])
    hits = len(hostile.hits)
    output = tmp_path / "out"
    assert build_main(["--sources", str(sources), "--output", str(output), "--workers", "1",
                       "--ray-address", ray_cluster["address"]]) == 0
    rows = all_rows(output)
    assert [r["status"] for r in rows] == [statuses.FORBIDDEN_ADDRESS] * 2
    assert all("--allow-private-addresses" in r["error_message"] for r in rows)
    assert len(hostile.hits) == hits
    assert verify(output) == []


# ------------------------------------------------------------------------------------------
# Resume after SIGKILL, embedded Ray, ray job submit.

@pytest.fixture(scope="module")
def photo_tree(tmp_path_factory):
    """A folder source of 48 photo-sized JPEGs (12 shards of 4) with a few exact duplicates."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(48):
        path = root / "tree" / f"class_{i % 4}" / f"{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(900, 700, seed=i % 45))
    write_sources(root / "SOURCES.yaml", [{"name": "photos", "kind": "folder", "path": "tree", "label": "parent_dir"}])
    return root


def photo_args(root: Path, output: Path) -> list[str]:
    return ["--sources", str(root / "SOURCES.yaml"), "--output", str(output), "--shard-size", "4", "--workers", "1"]


@pytest.fixture(scope="module")
def reference_build(photo_tree):
    """The uninterrupted build, as a plain `python jobs/build_shards.py` with an embedded local Ray."""
    output = photo_tree / "reference"
    result = run_job(*photo_args(photo_tree, output), timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "embedded local Ray" in result.stdout
    return output


def test_embedded_ray_build_is_sound(reference_build):
    assert verify(reference_build) == []
    rows = all_rows(reference_build)
    assert len(rows) == 48 and all(r["status"] == statuses.SUCCESS for r in rows)
    assert len(read_duplicates(reference_build)) == 3  # seeds 45..47 repeat 0..2


def test_resume_after_sigkill_loses_and_duplicates_nothing(photo_tree, reference_build, ray_cluster):
    output = photo_tree / "killed"
    args = photo_args(photo_tree, output) + ["--ray-address", ray_cluster["address"]]
    process = subprocess.Popen(job_command(*args), cwd=REPO_ROOT, env=job_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not completed_shards(output):
            assert process.poll() is None, "the build ended before it could be killed"
            assert time.monotonic() < deadline, "no shard finished in time"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    time.sleep(2)  # the cluster notices the dead driver and stops its tasks
    done_at_kill = completed_shards(output)
    assert 0 < len(done_at_kill) < 12
    assert build_main(args) == 0
    assert verify(output) == []
    assert shard_files(output) == shard_files(reference_build)  # same keys and bytes, tar and parquet
    rows = all_rows(output)
    assert [r["key"] for r in rows] == [r["key"] for r in all_rows(reference_build)]
    assert len({r["key"] for r in rows}) == 48
    assert read_duplicates(output) == read_duplicates(reference_build)


def test_ray_job_submit_against_a_running_cluster(photo_tree, reference_build, ray_cluster):
    output = photo_tree / "submitted"
    command = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_cluster["dashboard"],
               "--working-dir", str(REPO_ROOT), "--", "python", "jobs/build_shards.py",
               *photo_args(photo_tree, output)]
    deadline = time.monotonic() + 120
    while True:
        result = subprocess.run(command, cwd=REPO_ROOT, env=job_env(), capture_output=True, text=True, timeout=400)
        log = result.stdout[-4000:] + result.stderr[-4000:]
        # The head answers before the node's job agent is up; Ray says to try again (nothing was submitted).
        if "No available agent to submit job" not in log or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert result.returncode == 0, log
    assert "succeeded" in log and "cluster at" in log
    assert verify(output) == []
    assert shard_files(output) == shard_files(reference_build)
