"""Directory-level files: `manifest.json` (what was built, from what, how) and `sizes.json`."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from shards import contract
from shards.reader import completed_shards, read_stats
from shards.writer import write_json_atomic


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def manifest_hash(directory: Path) -> str:
    """Identity of a finished directory, recorded by the stages downstream of it."""
    return file_sha256(Path(directory) / contract.MANIFEST_FILE)


def write_manifest(
    directory: Path,
    stage: str,
    config: dict[str, Any],
    upstream: Path | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Describe every completed shard of `directory`; call once all shards are marked."""
    if stage not in contract.STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {contract.STAGES}")
    directory = Path(directory)
    shards = []
    for shard_id in completed_shards(directory):
        stats = read_stats(directory, shard_id)
        tar = contract.tar_path(directory, shard_id)
        shards.append({
            "name": tar.name,
            "count": stats["count"],
            "rows": stats["rows"],
            "sha256": file_sha256(tar),
        })
    manifest = {
        "schema_version": contract.SCHEMA_VERSION,
        "stage": stage,
        "config": config,
        "shards": shards,
        "total_count": sum(s["count"] for s in shards),
        "total_rows": sum(s["rows"] for s in shards),
        "upstream": None,
    }
    if upstream is not None:
        manifest["upstream"] = {"path": str(Path(upstream).resolve()), "manifest_sha256": manifest_hash(upstream)}
    manifest.update(extra or {})
    write_json_atomic(directory / contract.SIZES_FILE, {s["name"]: s["count"] for s in shards})
    write_json_atomic(directory / contract.MANIFEST_FILE, manifest)
    return manifest
