"""The image stage end to end: SOURCES -> plan -> one Ray task per shard -> dedupe -> manifest.

`jobs/build_shards.py` is the command line; this module is what it runs. The same code runs as a
plain script (embedded local Ray) and under `ray job submit` (RAY_ADDRESS is set by Ray).
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from shards import contract
from shards.manifest import write_manifest
from shards.reader import completed_shards, read_stats
from shards.writer import remove_stale_temp_files

from pipeline.build_report import format_table, progress_postfix, tally_sources
from pipeline.build_state import BuildRefused, check_plan, claim_output
from pipeline.dedupe import ExcludeHashesError, find_duplicates, load_excluded_hashes, write_duplicates
from pipeline.fetch import FetchPolicy
from pipeline.images import ImagePolicy
from pipeline.plan import PlannedShard, discard_inputs, discard_staging, publish_plan, stage_plan
from pipeline.ray_runner import RunSummary, ray_session, run_shards
from pipeline.robots import DEFAULT_DISALLOWED_DIRECTIVES
from pipeline.shard_builder import ShardBuilder
from pipeline.sources import SourcesError, SourceSpec, load_sources

EXIT_OK, EXIT_FAILED_SHARDS, EXIT_REFUSED = 0, 1, 2


@dataclass
class BuildOptions:
    sources: Path
    output: Path
    image_size: int = 256
    shard_size: int = 10000
    workers: int | None = None          # shard tasks at once; default: every CPU of the cluster
    timeout: float = 10.0               # total seconds per image, redirects and body included
    retries: int = 2                    # extra attempts per failed shard
    exclude_hashes: Path | None = None
    allow_private_addresses: bool = False
    ray_address: str | None = None
    min_image_size: int = 0
    max_pixels: int = ImagePolicy.max_pixels
    max_bytes: int = FetchPolicy.max_bytes
    max_redirects: int = FetchPolicy.max_redirects
    threads_per_worker: int = 32        # concurrent fetches per URL shard
    folder_threads: int = 2             # concurrent file reads per folder shard
    user_agent_token: str | None = None
    disallowed_header_directives: tuple[str, ...] = DEFAULT_DISALLOWED_DIRECTIVES
    shard_timeout: float | None = None  # cancel and retry a shard task running longer than this


@ray.remote(max_retries=0)  # run_shards counts and schedules the retries
def _build_shard(builder: ShardBuilder, shard: PlannedShard) -> dict[str, Any]:
    return builder(shard)


def resolved_config(options: BuildOptions, sources: list[SourceSpec], excluded: frozenset[str]) -> dict[str, Any]:
    """Every setting that decides the directory's bytes; a rerun must match it field by field."""
    image, fetch = image_policy(options), fetch_policy(options)
    return {
        "image_size": image.image_size,
        "shard_size": options.shard_size,
        "min_image_size": image.min_image_size,
        "max_pixels": image.max_pixels,
        "jpeg_quality": image.jpeg_quality,
        "max_bytes": fetch.max_bytes,
        "timeout_s": fetch.timeout_s,
        "max_redirects": fetch.max_redirects,
        "allow_private_addresses": fetch.allow_private_addresses,
        "user_agent_token": fetch.user_agent_token,
        "disallowed_header_directives": list(fetch.disallowed_header_directives),
        "exclude_hashes": {
            "count": len(excluded),
            "sha256": hashlib.sha256("\n".join(sorted(excluded)).encode()).hexdigest(),
        } if excluded else None,
        "sources": [spec.config() for spec in sources],
    }


def image_policy(options: BuildOptions) -> ImagePolicy:
    return ImagePolicy(image_size=options.image_size, min_image_size=options.min_image_size,
                       max_pixels=options.max_pixels)


def fetch_policy(options: BuildOptions) -> FetchPolicy:
    return FetchPolicy(timeout_s=options.timeout, max_bytes=options.max_bytes,
                       allow_private_addresses=options.allow_private_addresses, max_redirects=options.max_redirects,
                       user_agent_token=options.user_agent_token,
                       disallowed_header_directives=tuple(options.disallowed_header_directives))


def say(message: str) -> None:
    print(message, flush=True)


def run(options: BuildOptions) -> int:
    """Build, resume or confirm `options.output`; bad input is reported, not raised."""
    try:
        return build(options)
    except (SourcesError, ExcludeHashesError, BuildRefused) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_REFUSED


def build(options: BuildOptions) -> int:
    if options.image_size < 1 or options.shard_size < 1 or options.timeout <= 0 or options.retries < 0:
        raise BuildRefused("--image-size and --shard-size must be >= 1, --timeout > 0, --retries >= 0")
    sources = load_sources(options.sources)  # every source checked before any work
    excluded = load_excluded_hashes(options.exclude_hashes) if options.exclude_hashes else frozenset()
    config = resolved_config(options, sources, excluded)
    output = Path(options.output).resolve()
    claim_output(output, config)
    remove_stale_temp_files(output)

    plan, staging = stage_plan(sources, options.shard_size, output)
    try:
        check_plan(output, plan)
    except BuildRefused:
        discard_staging(staging)
        raise
    publish_plan(plan, staging, output)
    for spec in sources:
        planned = plan.source_rows[spec.name]
        if spec.expected_rows and spec.limit is None and planned != spec.expected_rows:
            say(f"warning: source {spec.name!r} has {planned} rows, its expected_rows says {spec.expected_rows}")

    done = set(completed_shards(output))
    todo = [shard for shard in plan.shards if shard.shard_id not in done]
    say(f"plan: {plan.total_rows} rows in {len(plan.shards)} shards from {len(sources)} sources"
        + (f"; {len(plan.shards) - len(todo)} shards already done, {len(todo)} to build" if done else ""))
    summary = RunSummary()
    if todo:
        summary = _run_tasks(options, sources, excluded, output, todo)

    finished = [s for s in plan.shards if contract.stats_path(output, s.shard_id).exists()]
    shard_stats = [read_stats(output, s.shard_id) for s in finished]
    source_rows = [(spec.name, spec.kind, plan.source_rows[spec.name]) for spec in sources]
    if summary.failed or len(finished) != len(plan.shards):
        by_id = {s.shard_id: s for s in plan.shards}
        say(format_table(tally_sources(source_rows, shard_stats, {})))
        say(f"FAILED: {len(summary.failed)} shard(s) did not finish after {options.retries + 1} attempt(s):")
        for outcome in summary.failed:
            say(f"  shard {outcome.shard_id} (source {by_id[outcome.shard_id].source}): {outcome.error}")
        say("Rerun the same command to retry them; finished shards are kept.")
        return EXIT_FAILED_SHARDS

    remove_stale_temp_files(output)  # left by attempts that were cancelled or crashed and then retried
    duplicates = find_duplicates(output, [s.shard_id for s in plan.shards])
    write_duplicates(output, duplicates)
    source_of = {s.shard_id: s.source for s in plan.shards}
    duplicates_by_source: dict[str, int] = {}
    for key in duplicates.column("key").to_pylist():
        source = source_of[int(key[: contract.SHARD_ID_DIGITS])]
        duplicates_by_source[source] = duplicates_by_source.get(source, 0) + 1
    tallies = tally_sources(source_rows, shard_stats, duplicates_by_source)
    manifest = write_manifest(output, contract.STAGE_IMAGES, config, extra={
        "input_rows": plan.total_rows,
        "sources": [t.to_json() for t in tallies],
        "duplicates": duplicates.num_rows,
        "excluded": sum(t.statuses.get(contract.STATUS_EXCLUDED, 0) for t in tallies),
    })
    discard_inputs(output)
    say(format_table(tallies))
    say(f"done: {manifest['total_count']} images stored of {plan.total_rows} rows in {len(plan.shards)} shards "
        f"({duplicates.num_rows} exact duplicates listed in {contract.DUPLICATES_FILE}) -> {output}")
    return EXIT_OK


def _run_tasks(options: BuildOptions, sources: list[SourceSpec], excluded: frozenset[str], output: Path,
               todo: list[PlannedShard]) -> RunSummary:
    by_id = {shard.shard_id: shard for shard in todo}
    builder = ShardBuilder(
        output=str(output), sources={s.name: s for s in sources}, shard_size=options.shard_size,
        image_policy=image_policy(options), fetch_policy=fetch_policy(options), excluded_hashes=excluded,
        url_threads=options.threads_per_worker, folder_threads=options.folder_threads,
    )

    def check(shard_id: int, result: Any) -> None:
        if not contract.stats_path(output, shard_id).exists():
            raise RuntimeError(f"task returned but {contract.stats_path(output, shard_id).name} is missing")
        if not isinstance(result, dict) or result.get("shard_id") != shard_id or result.get("rows") != by_id[shard_id].rows:
            raise RuntimeError(f"stats do not describe shard {shard_id} with {by_id[shard_id].rows} rows")

    with ray_session(options.ray_address, num_cpus=options.workers) as where:
        workers = options.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        say(f"ray: {where}; {workers} shard tasks at once")
        builder_ref = ray.put(builder)  # one copy of the config and the exclusion set for all tasks
        return run_shards(
            [shard.shard_id for shard in todo],
            submit=lambda shard_id: _build_shard.remote(builder_ref, by_id[shard_id]),
            check=check,
            max_in_flight=workers,
            retries=options.retries,
            describe=progress_postfix,
            task_timeout_s=options.shard_timeout,
        )
