"""The build plan: which input rows go to which shard, derived only from the inputs and the config.

Sources are numbered in SOURCES order; each is cut into shards of `shard_size` rows (URL lists per
list file, as img2dataset does, so a list's last shard may be shorter); shard ids run on across
sources and a shard never mixes two. Each shard's rows are staged as one Arrow file under
`<output>/_build/inputs/`, which the shard task reads (the output directory is shared storage on
a multi-node cluster). The plan's per-source digests let a rerun prove it cuts the same rows.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from shards import contract
from shards.manifest import file_sha256

from pipeline.folders import list_images, parent_label
from pipeline.sources import KIND_URLS, LABEL_PARENT_DIR, SourceSpec
from pipeline.url_lists import stage_url_source

BUILD_DIR = "_build"
INPUTS_DIR = "inputs"
PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class PlannedShard:
    shard_id: int
    source: str
    kind: str
    rows: int
    input_name: str  # file name under <output>/_build/inputs/


@dataclass
class Plan:
    shards: list[PlannedShard]
    source_rows: dict[str, int] = field(default_factory=dict)
    source_digests: dict[str, str] = field(default_factory=dict)

    @property
    def total_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def to_json(self) -> dict:
        return {"shards": [asdict(s) for s in self.shards], "source_rows": self.source_rows,
                "source_digests": self.source_digests}

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        return cls([PlannedShard(**s) for s in data["shards"]], data["source_rows"], data["source_digests"])


def build_dir(output: Path) -> Path:
    return Path(output) / BUILD_DIR


def input_path(output: Path, shard: PlannedShard) -> Path:
    return build_dir(output) / INPUTS_DIR / shard.input_name


def read_shard_input(output: Path, shard: PlannedShard) -> pa.Table:
    with pa.memory_map(str(input_path(output, shard))) as source:
        return pa.ipc.open_file(source).read_all()


def load_recorded_plan(output: Path) -> Plan | None:
    path = build_dir(output) / PLAN_FILE
    return Plan.from_json(json.loads(path.read_text())) if path.exists() else None


def _write_arrow(table: pa.Table, path: Path) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _stage_folder_source(spec: SourceSpec, first_shard_id: int, shard_size: int, staging: Path) -> list[tuple[int, Path, int]]:
    paths = list_images(Path(spec.root), spec.name)[: spec.limit]
    staged = []
    for offset in range(0, len(paths), shard_size):
        chunk = paths[offset: offset + shard_size]
        labels = [parent_label(p) for p in chunk] if spec.label == LABEL_PARENT_DIR else [None] * len(chunk)
        table = pa.table({"path": pa.array(chunk, pa.binary()), "label": pa.array(labels, pa.string())})
        shard_id = first_shard_id + len(staged)
        path = staging / f"{shard_id}.folder.arrow"
        _write_arrow(table, path)
        staged.append((shard_id, path, len(chunk)))
    return staged


def stage_plan(sources: list[SourceSpec], shard_size: int, output: Path) -> tuple[Plan, Path]:
    """Cut every source into staged shard inputs under a fresh staging folder; returns (plan, staging).

    Nothing in `<output>/_build/inputs` changes until `publish_plan`, so a rerun can compare the
    new plan with the recorded one before touching anything.
    """
    build_dir(output).mkdir(parents=True, exist_ok=True)
    for stale in build_dir(output).glob(".staging-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    staging = build_dir(output) / f".staging-{os.getpid()}"
    staging.mkdir()
    plan = Plan(shards=[])
    next_id = 0
    for spec in sources:
        if spec.kind == KIND_URLS:
            staged = stage_url_source(spec, next_id, shard_size, staging)
        else:
            staged = _stage_folder_source(spec, next_id, shard_size, staging)
        digest = hashlib.sha256()
        for shard_id, path, rows in staged:
            name = f"{contract.shard_stem(shard_id)}.arrow"
            path.rename(staging / name)
            plan.shards.append(PlannedShard(shard_id, spec.name, spec.kind, rows, name))
            digest.update(f"{shard_id} {rows} {file_sha256(staging / name)}\n".encode())
        plan.source_rows[spec.name] = sum(rows for _, _, rows in staged)
        plan.source_digests[spec.name] = digest.hexdigest()
        next_id += len(staged)
    planned = {shard.input_name for shard in plan.shards}
    for leftover in staging.iterdir():  # txt lists converted on the way, slices cut by `limit`
        if leftover.name not in planned:
            leftover.unlink()
    return plan, staging


def discard_staging(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def publish_plan(plan: Plan, staging: Path, output: Path) -> None:
    """Make the staged inputs the shard inputs and record the plan."""
    inputs = build_dir(output) / INPUTS_DIR
    shutil.rmtree(inputs, ignore_errors=True)
    staging.rename(inputs)
    tmp = build_dir(output) / f".{PLAN_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(plan.to_json(), indent=1) + "\n")
    os.replace(tmp, build_dir(output) / PLAN_FILE)


def discard_inputs(output: Path) -> None:
    """Drop the staged inputs once every shard is done (a rerun stages them again)."""
    shutil.rmtree(build_dir(output) / INPUTS_DIR, ignore_errors=True)
