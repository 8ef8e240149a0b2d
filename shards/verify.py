"""`python -m shards.verify DIR`: check every invariant of the shard contract, name each violation.

Works on image shard directories (stage `images`) and train shard directories (stage `targets`).
Exit status 0 when the directory is sound, 1 with one line per violation otherwise.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

from PIL import Image

from shards import contract
from shards.manifest import file_sha256, manifest_hash
from shards.reader import (
    completed_shards, iter_tar, load_manifest, load_npy, present_tars, read_duplicates, read_rows,
    read_stats,
)


class Verifier:
    def __init__(self, directory: Path, decode: bool = True):
        self.directory = Path(directory)
        self.decode = decode
        self.violations: list[str] = []
        self.samples = 0

    def fail(self, message: str) -> None:
        self.violations.append(message)

    def run(self) -> list[str]:
        try:
            manifest = load_manifest(self.directory)
        except (FileNotFoundError, ValueError, json.JSONDecodeError) as error:
            self.fail(str(error))
            return self.violations
        stage = manifest.get("stage")
        if stage not in contract.STAGES:
            self.fail(f"manifest.json: unknown stage {stage!r}")
            return self.violations
        self.check_files()
        seen_keys: set[str] = set()
        for shard_id in completed_shards(self.directory):
            self.check_shard(shard_id, stage, manifest, seen_keys)
        self.check_manifest(manifest)
        self.check_duplicates(seen_keys)
        if stage == contract.STAGE_TARGETS:
            self.check_against_upstream(manifest)
        return self.violations

    def check_files(self) -> None:
        marked = set(completed_shards(self.directory))
        for shard_id in present_tars(self.directory):
            if shard_id not in marked:
                self.fail(f"{contract.shard_stem(shard_id)}.tar has no stats marker (unfinished shard)")
        for shard_id in marked:
            for path in (contract.tar_path(self.directory, shard_id), contract.parquet_path(self.directory, shard_id)):
                if not path.exists():
                    self.fail(f"{path.name} is missing although shard {shard_id} is marked done")
        for path in self.directory.glob(".*.tmp-*"):
            self.fail(f"leftover temp file {path.name} (a writer was killed; rerun the stage)")

    def check_shard(self, shard_id: int, stage: str, manifest: dict, seen_keys: set[str]) -> None:
        stem = contract.shard_stem(shard_id)
        tar = contract.tar_path(self.directory, shard_id)
        if not tar.exists() or not contract.parquet_path(self.directory, shard_id).exists():
            return
        stats = read_stats(self.directory, shard_id)
        rows = read_rows(self.directory, shard_id)
        required = contract.IMAGE_PARQUET_COLUMNS if stage == contract.STAGE_IMAGES else contract.TARGET_PARQUET_COLUMNS
        if rows:
            missing = [c for c in required if c not in rows[0]]
            if missing:
                self.fail(f"{stem}.parquet lacks columns {missing}")
        if len(rows) != stats.get("rows"):
            self.fail(f"{stem}.parquet has {len(rows)} rows, its stats say {stats.get('rows')}")
        success_keys = [r.get("key") for r in rows if r.get("status") == contract.STATUS_SUCCESS]
        for row in rows:
            if row.get("status") != contract.STATUS_SUCCESS and not row.get("error_message"):
                self.fail(f"{stem}.parquet: row {row.get('key')} has status {row.get('status')!r} but no error_message")
        tar_keys = []
        try:
            for key, members in iter_tar(tar):
                tar_keys.append(key)
                self.check_sample(stem, key, members, stage, manifest)
        except Exception as error:  # a truncated tar must be reported, not crash the verifier
            self.fail(f"{tar.name}: unreadable tar ({error})")
        self.samples += len(tar_keys)
        if tar_keys != success_keys:
            self.fail(f"{tar.name}: tar keys differ from the parquet's success rows "
                      f"({len(tar_keys)} in tar, {len(success_keys)} success rows)")
        if len(tar_keys) != stats.get("count"):
            self.fail(f"{tar.name}: {len(tar_keys)} samples, its stats say {stats.get('count')}")
        for key in tar_keys:
            if key in seen_keys:
                self.fail(f"key {key} occurs more than once in the directory")
            seen_keys.add(key)

    def check_sample(self, stem: str, key: str, members: dict[str, bytes], stage: str, manifest: dict) -> None:
        where = f"{stem}.tar:{key}"
        if not contract.is_valid_key(key):
            self.fail(f"{where}: key is not digit-only")
        for ext in (contract.EXT_IMAGE, contract.EXT_META):
            if ext not in members:
                self.fail(f"{where}: missing .{ext} member")
        try:
            meta = json.loads(members.get(contract.EXT_META, b"{}"))
        except ValueError as error:
            self.fail(f"{where}.json: not valid JSON ({error})")
            meta = {}
        if contract.EXT_CAPTION in members:
            try:
                members[contract.EXT_CAPTION].decode("utf-8")
            except UnicodeDecodeError:
                self.fail(f"{where}.txt: caption is not UTF-8")
        size = None
        if self.decode and contract.EXT_IMAGE in members:
            size = self.check_image(where, members[contract.EXT_IMAGE], manifest)
        if stage == contract.STAGE_TARGETS:
            self.check_targets(where, members, meta, manifest, size)

    def check_image(self, where: str, data: bytes, manifest: dict) -> tuple[int, int] | None:
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                if image.format != "JPEG" or image.mode != "RGB":
                    self.fail(f"{where}.jpg: {image.format} {image.mode}, expected an RGB JPEG")
                limit = manifest.get("config", {}).get("image_size")
                if limit and min(image.size) > limit:
                    self.fail(f"{where}.jpg: shorter side {min(image.size)} exceeds image_size {limit}")
                return image.size
        except Exception as error:
            self.fail(f"{where}.jpg: does not decode ({error})")
            return None

    def check_targets(self, where: str, members: dict, meta: dict, manifest: dict, size) -> None:
        spec = manifest.get("targets", {})
        views = manifest.get("views", {})
        if contract.EXT_TARGETS not in members:
            self.fail(f"{where}: missing .{contract.EXT_TARGETS} member")
            return
        try:
            targets = load_npy(members[contract.EXT_TARGETS])
        except Exception as error:
            self.fail(f"{where}.{contract.EXT_TARGETS}: does not load without pickle ({error})")
            return
        grid = spec.get("grid") or [0, 0]
        expected = (views.get("k"), grid[0] * grid[1], spec.get("dim"))
        if tuple(targets.shape) != expected:
            self.fail(f"{where}: targets shape {tuple(targets.shape)}, manifest says [K, N, D] = {list(expected)}")
        if str(targets.dtype) != spec.get("dtype"):
            self.fail(f"{where}: targets dtype {targets.dtype}, manifest says {spec.get('dtype')}")
        if targets.dtype == "int8":
            if contract.EXT_TARGET_SCALES not in members:
                self.fail(f"{where}: int8 targets without .{contract.EXT_TARGET_SCALES}")
            else:
                scales = load_npy(members[contract.EXT_TARGET_SCALES])
                if tuple(scales.shape) != tuple(targets.shape[:2]):
                    self.fail(f"{where}: scales shape {tuple(scales.shape)}, expected {tuple(targets.shape[:2])}")
        sample_views = meta.get("views")
        if not isinstance(sample_views, list) or len(sample_views) != views.get("k"):
            self.fail(f"{where}.json: expected {views.get('k')} views, found {sample_views!r:.80}")
            return
        for view in sample_views:
            box = view.get("box")
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int) for v in box)
                    and isinstance(view.get("flip"), bool)):
                self.fail(f"{where}.json: malformed view {view!r}")
            elif size is not None:
                left, top, width, height = box
                if left < 0 or top < 0 or width <= 0 or height <= 0 or left + width > size[0] or top + height > size[1]:
                    self.fail(f"{where}.json: view box {box} is outside the {size[0]}x{size[1]} image")

    def check_manifest(self, manifest: dict) -> None:
        by_name = {entry["name"]: entry for entry in manifest.get("shards", [])}
        marked = {contract.tar_path(self.directory, i).name: i for i in completed_shards(self.directory)}
        for name in sorted(set(marked) - set(by_name)):
            self.fail(f"{name} is marked done but missing from manifest.json")
        for name, entry in sorted(by_name.items()):
            path = self.directory / name
            if name not in marked or not path.exists():
                self.fail(f"manifest.json lists {name}, which is not a finished shard here")
                continue
            stats = read_stats(self.directory, marked[name])
            if entry.get("count") != stats.get("count"):
                self.fail(f"manifest.json: {name} count {entry.get('count')}, its stats say {stats.get('count')}")
            if entry.get("sha256") != file_sha256(path):
                self.fail(f"manifest.json: {name} checksum does not match the file")
        total_rows = sum(e.get("rows", 0) for e in by_name.values())
        if "input_rows" in manifest and manifest["input_rows"] != total_rows:
            self.fail(f"manifest.json: {manifest['input_rows']} input rows but the shards hold {total_rows} status rows")
        sizes_path = self.directory / contract.SIZES_FILE
        if not sizes_path.exists():
            self.fail(f"{contract.SIZES_FILE} is missing")
        elif json.loads(sizes_path.read_text()) != {n: e.get("count") for n, e in by_name.items()}:
            self.fail(f"{contract.SIZES_FILE} does not match manifest.json")

    def check_duplicates(self, seen_keys: set[str]) -> None:
        for key, first in read_duplicates(self.directory).items():
            if key not in seen_keys or first not in seen_keys:
                self.fail(f"{contract.DUPLICATES_FILE}: pair ({key}, {first}) names a key not in the shards")

    def check_against_upstream(self, manifest: dict) -> None:
        """A train directory holds the upstream keys, in order, minus duplicates and excluded ones."""
        upstream = manifest.get("upstream") or {}
        path = Path(upstream.get("path", ""))
        if not upstream or not (path / contract.MANIFEST_FILE).exists():
            self.fail("manifest.json: upstream image directory is not recorded or no longer exists")
            return
        if manifest_hash(path) != upstream.get("manifest_sha256"):
            self.fail(f"upstream {path} changed since the targets were cached (manifest hash differs)")
        duplicates = read_duplicates(path)
        for shard_id in completed_shards(self.directory):
            expected = [r["key"] for r in read_rows(path, shard_id)
                        if r["status"] == contract.STATUS_SUCCESS and r["key"] not in duplicates]
            have = [r["key"] for r in read_rows(self.directory, shard_id)]
            if have != expected:
                self.fail(f"{contract.shard_stem(shard_id)}.parquet: rows do not follow the upstream keys "
                          f"({len(have)} rows, {len(expected)} upstream samples to cache)")


def verify(directory: Path, decode: bool = True) -> list[str]:
    """All contract violations of `directory`, empty when it is sound."""
    return Verifier(directory, decode=decode).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shards.verify", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--no-decode", action="store_true", help="skip decoding every image (faster)")
    args = parser.parse_args(argv)
    verifier = Verifier(args.directory, decode=not args.no_decode)
    violations = verifier.run()
    for line in violations:
        print(f"VIOLATION {args.directory}: {line}")
    if violations:
        print(f"{len(violations)} violation(s) in {args.directory}")
        return 1
    print(f"OK {args.directory}: {verifier.samples} samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
