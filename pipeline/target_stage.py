"""Driver of the target-cache stage: check inputs, resume, run one teacher actor per device, finish.

Order matters: everything that can be refused (a bad image directory, a teacher that does not
load, an output written by another configuration) is refused before Ray starts and before any
shard is written. Resume is by markers: a train shard whose stats marker exists, recorded with
the same identity, is done.
"""
from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from eva.teacher import build_teacher, resolve_teacher
from eva.views import ViewPolicy
from pipeline.targets import (
    PRECISIONS, CacheConfig, ShardsFailedError, TargetCacheActor, TargetStageError, identity_differences,
    stage_identity,
)
from shards import contract
from shards.manifest import manifest_hash, write_manifest
from shards.reader import completed_shards, load_manifest, present_tars, read_stats
from shards.writer import remove_stale_temp_files

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class StageOptions:
    images: Path
    output: Path
    teacher: str
    weights: str = "none"
    views: int = 2
    dtype: str = "float16"
    batch_size: int = 64
    device: str = "auto"
    precision: str = "auto"       # fp32, bf16, fp16; auto: bf16 on cuda, fp32 on cpu
    seed: int = 0                 # view seed
    teacher_seed: int = 0         # random-init seed, only with weights "none"
    retries: int = 2
    ray_address: str | None = None
    expected_grid: tuple[int, int] | None = None
    expected_dim: int | None = None
    actors: int | None = None     # default: one per GPU, or one CPU actor
    decode_workers: int | None = None
    shard_timeout_s: float | None = None  # a shard running longer restarts its actor and is retried
    allow_missing_shards: bool = False
    policy: ViewPolicy = field(default_factory=ViewPolicy)

    def validate(self) -> None:
        if self.views < 1:
            raise TargetStageError(f"--views must be >= 1, got {self.views}")
        if self.dtype not in contract.TARGET_DTYPES:
            raise TargetStageError(f"--dtype must be one of {contract.TARGET_DTYPES}, got {self.dtype!r}")
        if self.batch_size < 1:
            raise TargetStageError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.shard_timeout_s is not None and self.shard_timeout_s <= 0:
            raise TargetStageError(f"--shard-timeout must be > 0 seconds, got {self.shard_timeout_s:g}")
        if self.device not in DEVICES:
            raise TargetStageError(f"--device must be one of {DEVICES}, got {self.device!r}")
        if self.precision != "auto" and self.precision not in PRECISIONS:
            raise TargetStageError(f"--precision must be auto or one of {tuple(PRECISIONS)}, got {self.precision!r}")
        if Path(self.images).resolve() == Path(self.output).resolve():
            raise TargetStageError(f"--output {self.output} is the image directory itself")


@dataclass
class Upstream:
    manifest: dict
    manifest_sha256: str
    shard_ids: list[int]
    tar_sha256: dict[str, str]
    problems: list[str]


def inspect_upstream(images: Path) -> Upstream:
    """The image directory's finished shards, and every shard it lists that is missing or unmarked."""
    images = Path(images)
    try:
        manifest = load_manifest(images)
    except (FileNotFoundError, ValueError) as error:
        raise TargetStageError(f"--images {images}: {error}") from error
    if manifest.get("stage") != contract.STAGE_IMAGES:
        raise TargetStageError(f"--images {images}: stage {manifest.get('stage')!r}, expected an image "
                               f"shard directory (stage {contract.STAGE_IMAGES!r})")
    marked = set(completed_shards(images))
    listed: dict[int, dict] = {}
    problems = []
    for entry in manifest.get("shards", []):
        shard_id = contract.parse_shard_file(entry["name"])
        if shard_id is None:
            problems.append(f"manifest.json lists {entry['name']!r}, not a shard tar name")
            continue
        listed[shard_id] = entry
        for path in (contract.tar_path(images, shard_id), contract.parquet_path(images, shard_id)):
            if not path.exists():
                problems.append(f"image shard {path.name} is listed in manifest.json but missing")
        if shard_id not in marked:
            problems.append(f"image shard {entry['name']} has no completion marker "
                            f"{contract.stats_path(images, shard_id).name}")
    for shard_id in sorted(marked - set(listed)):
        problems.append(f"image shard {contract.shard_stem(shard_id)} is marked done but not in manifest.json "
                        f"(the manifest is stale: rerun the image stage)")
    for shard_id in present_tars(images):
        if shard_id not in marked and shard_id not in listed:
            problems.append(f"image shard {contract.shard_stem(shard_id)}.tar has no completion marker "
                            f"(unfinished shard)")
    good = sorted(s for s in listed if s in marked and contract.tar_path(images, s).exists()
                  and contract.parquet_path(images, s).exists())
    return Upstream(manifest, manifest_hash(images), good,
                    {entry["name"]: entry.get("sha256") for entry in listed.values()}, problems)


def finished_output_shards(output: Path, identity: dict) -> list[int]:
    """Marked train shards; refuse an output whose recorded identity differs from this run's."""
    output = Path(output)
    if not output.exists():
        return []
    manifest_file = output / contract.MANIFEST_FILE
    recorded: list[tuple[str, dict]] = []
    if manifest_file.exists():
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("stage") != contract.STAGE_TARGETS:
            raise TargetStageError(f"--output {output} holds a {manifest.get('stage')!r} directory, "
                                   f"not a train (targets) directory: choose another --output")
        recorded.append(("manifest.json", {"targets": manifest.get("targets"), "views": manifest.get("views"),
                                           "upstream_manifest_sha256": (manifest.get("upstream") or {})
                                           .get("manifest_sha256")}))
    done = completed_shards(output)
    for shard_id in done:
        recorded.append((contract.stats_path(output, shard_id).name, read_stats(output, shard_id).get("identity")))
    for where, identity_there in recorded:
        if not isinstance(identity_there, dict) or identity_there.get("targets") is None:
            raise TargetStageError(f"--output {output}: {where} was not written by the target stage; "
                                   f"choose another --output")
        differences = identity_differences(identity_there, identity)
        if differences:
            raise TargetStageError(
                f"--output {output} was written with another configuration ({where}): "
                + "; ".join(differences[:6])
                + ". Use a new --output for a different teacher, weights, view policy or dtype.")
    return done


def resolve_device(requested: str) -> str:
    """auto: cuda when the Ray cluster has GPUs, else cpu (needs a Ray connection)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if requested == "cuda" and gpus < 1:
        raise TargetStageError("--device cuda, but the Ray cluster has no GPUs")
    if requested == "auto":
        return "cuda" if gpus >= 1 else "cpu"
    return requested


ACTOR_RESTART_TIMEOUT_S = 600


class _LeastLoaded:
    """Sends each shard to the actor with the fewest unfinished shards."""

    def __init__(self, actors: list):
        self.actors = actors
        self.refs: list[list] = [[] for _ in actors]

    def submit(self, shard_id: int):
        import ray

        for i, refs in enumerate(self.refs):
            if refs:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                self.refs[i] = [r for r in refs if r not in ready]
        index = min(range(len(self.actors)), key=lambda i: len(self.refs[i]))
        ref = self.actors[index].cache_shard.remote(shard_id)
        self.refs[index].append(ref)
        return ref

    def restart_actor_of(self, ref) -> None:
        """A shard hung (a stuck read, a wedged device): Ray cannot cancel a running actor task,
        so the actor is killed, Ray restarts it, and this waits until its teacher is loaded again
        (a task sent to a restarting actor fails). Rare, so the driver simply waits."""
        import ray

        for actor, refs in zip(self.actors, self.refs):
            if ref in refs:
                refs.clear()  # with a timeout an actor runs one shard at a time: this one
                ray.kill(actor, no_restart=False)
                deadline = time.time() + ACTOR_RESTART_TIMEOUT_S
                while True:
                    try:
                        ray.get(actor.ready.remote())
                        return
                    except ray.exceptions.ActorUnavailableError:
                        if time.time() > deadline:
                            raise TargetStageError(f"a teacher actor did not come back within "
                                                   f"{ACTOR_RESTART_TIMEOUT_S} s of its restart") from None
                        time.sleep(0.5)
                    except ray.exceptions.RayError as error:
                        raise TargetStageError(f"a teacher actor failed to restart: {error}") from error


def log(message: str) -> None:
    print(f"[cache_targets] {message}", flush=True)


def run_target_stage(options: StageOptions) -> dict[str, Any]:
    """Cache targets for every image shard; returns a summary. Raises TargetStageError on refusal/failure."""
    options.validate()
    images, output = Path(options.images), Path(options.output)
    upstream = inspect_upstream(images)
    if upstream.problems and not options.allow_missing_shards:
        raise TargetStageError(
            f"--images {images} is not complete ({len(upstream.problems)} problem(s)):\n  "
            + "\n  ".join(upstream.problems)
            + "\nRerun the image stage, or pass --allow-missing-shards to cache the others and record the rest.")
    for problem in upstream.problems:
        log(f"skipping: {problem}")

    spec = resolve_teacher(options.teacher, options.weights)
    teacher = build_teacher(spec, device="cpu", seed=options.teacher_seed)  # fail before any shard
    description = teacher.describe()
    del teacher
    gc.collect()
    check_teacher_fits(description, options)
    log(f"teacher {options.teacher}: input {description['input_size']}px, grid "
        f"{description['grid'][0]}x{description['grid'][1]}, D={description['dim']}, weights {options.weights}"
        + (" (RANDOM INIT)" if description["random_init"] else f" sha256 {description['weights_sha256'][:12]}..."))

    plan = None
    if options.device != "auto":
        plan = _plan(options, description, upstream)
    if plan is not None and not plan["todo"]:
        return _finish(options, plan, upstream, started=time.time(), ran=[])

    from pipeline.ray_runner import ray_session, run_shards
    import ray

    started = time.time()
    with ray_session(options.ray_address) as where:
        device = resolve_device(options.device)
        if plan is None:
            plan = _plan(options, description, upstream, device)
            if not plan["todo"]:
                return _finish(options, plan, upstream, started, ran=[])
        elif device != plan["device"]:
            raise TargetStageError(f"--device {options.device} resolved to {device} on the cluster")
        config, actor_options, actor_count = _actor_setup(options, spec, plan, upstream)
        log(f"ray: {where}; {actor_count} {plan['device']} actor(s) x {actor_options['num_cpus']} CPUs, "
            f"{config.decode_workers} decode threads each; {len(plan['todo'])} shard(s) to cache, "
            f"{len(plan['done'])} already done")
        remote_actor = ray.remote(TargetCacheActor).options(**actor_options)
        actors = [remote_actor.remote(config) for _ in range(actor_count)]
        try:
            try:
                for info in ray.get([actor.ready.remote() for actor in actors]):
                    log(f"actor ready on {info['device']} ({info['torch_threads']} torch threads)")
            except ray.exceptions.RayError as error:
                raise TargetStageError(f"a teacher actor failed to start: {error}") from error
            stage_started = time.time()
            scheduler = _LeastLoaded(actors)
            # With a timeout, one shard per actor at a time: its clock then measures its own run,
            # and restarting a hung actor takes no healthy shard down with it.
            per_actor = 2 if options.shard_timeout_s is None else 1
            summary = run_shards(
                plan["todo"], scheduler.submit, _result_check(output, plan["identity"]),
                max_in_flight=per_actor * actor_count, retries=options.retries, describe=_progress(options.views),
                progress_label="target shards", task_timeout_s=options.shard_timeout_s,
                on_timeout=scheduler.restart_actor_of,
            )
            stage_seconds = time.time() - stage_started
        finally:
            for actor in actors:
                ray.kill(actor)
    if summary.failed:
        raise ShardsFailedError(
            f"{len(summary.failed)} shard(s) failed after {options.retries + 1} attempt(s): "
            + "; ".join(f"{contract.shard_stem(o.shard_id)}: {o.error}" for o in summary.failed[:5])
            + ". Finished shards are kept; rerun the same command to resume.")
    return _finish(options, plan, upstream, started, ran=[o.result for o in summary.outcomes],
                   stage_seconds=stage_seconds)


def check_teacher_fits(description: dict, options: StageOptions) -> None:
    grid = tuple(description["grid"])
    if options.expected_grid is not None and grid != tuple(options.expected_grid):
        raise TargetStageError(
            f"teacher {options.teacher} has a {grid[0]}x{grid[1]} patch grid ({description['input_size']} px input), "
            f"but --expected-grid is {options.expected_grid[0]}x{options.expected_grid[1]}: the student's patch "
            f"grid must equal the teacher's (one target per student patch)")
    if options.expected_dim is not None and description["dim"] != options.expected_dim:
        raise TargetStageError(f"teacher {options.teacher} has feature dim {description['dim']}, "
                               f"but --expected-dim is {options.expected_dim}")


def _plan(options: StageOptions, description: dict, upstream: Upstream, device: str | None = None) -> dict:
    device = device or options.device
    precision = options.precision if options.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    identity = stage_identity(description, options.views, options.policy, options.seed, options.dtype,
                              precision, upstream.manifest_sha256)
    done = set(finished_output_shards(options.output, identity))
    Path(options.output).mkdir(parents=True, exist_ok=True)
    removed = remove_stale_temp_files(Path(options.output))
    if removed:
        log(f"removed {removed} temp file(s) of an interrupted run")
    todo = [s for s in upstream.shard_ids if s not in done]
    return {"device": device, "precision": precision, "identity": identity, "todo": todo,
            "done": sorted(done & set(upstream.shard_ids))}


def _actor_setup(options: StageOptions, spec, plan: dict, upstream: Upstream) -> tuple[CacheConfig, dict, int]:
    import ray

    resources = ray.cluster_resources()
    cpus = max(1, int(resources.get("CPU", 1)))
    if plan["device"] == "cuda":
        count = options.actors or int(resources.get("GPU", 1))
    else:
        count = options.actors or 1
    count = max(1, min(count, len(plan["todo"])))
    cpus_per_actor = max(1, cpus // count)
    # On a GPU node the CPUs decode. On a CPU node the teacher gets every core and a few decode
    # threads share them: a real teacher (ViT-B and up) spends ~99% of a view's time in its
    # forward, so reserving cores for decoding would idle them (BENCHMARKS.md, target cache).
    if plan["device"] == "cuda":
        decode_workers = options.decode_workers or max(1, cpus_per_actor - 1)
        torch_threads = None
    else:
        decode_workers = options.decode_workers or max(1, cpus_per_actor // 4)
        torch_threads = cpus_per_actor
    config = CacheConfig(
        images=str(Path(options.images).resolve()), output=str(Path(options.output).resolve()),
        teacher=spec, identity=plan["identity"], upstream_tar_sha256=upstream.tar_sha256,
        views=options.views, dtype=options.dtype, batch_size=options.batch_size, device=plan["device"],
        precision=plan["precision"], seed=options.seed, teacher_seed=options.teacher_seed, policy=options.policy,
        decode_workers=decode_workers, torch_threads=torch_threads,
    )
    # Restarts are unbounded: every failed or timed-out task still costs its shard an attempt.
    actor_options = {"num_cpus": cpus_per_actor, "num_gpus": 1 if plan["device"] == "cuda" else 0,
                     "max_restarts": -1, "max_task_retries": 0}
    return config, actor_options, count


def _result_check(output: Path, identity: dict):
    def check(shard_id: int, result: dict) -> None:
        marker = contract.stats_path(output, shard_id)
        if not marker.exists():
            raise RuntimeError(f"shard {shard_id} returned but {marker.name} is missing")
        stats = read_stats(output, shard_id)
        if stats.get("identity") != identity or stats.get("count") != result.get("count"):
            raise RuntimeError(f"{marker.name} does not describe the shard just written")
    return check


def _progress(views: int):
    def describe(outcomes, elapsed: float) -> dict:
        images = sum(o.result.get("images", 0) for o in outcomes if o.ok)
        failed = sum(sum(o.result.get("failed_samples", {}).values()) for o in outcomes if o.ok)
        return {"img/s": f"{images / max(elapsed, 1e-9):.1f}",
                "views/s": f"{images * views / max(elapsed, 1e-9):.1f}", "failed": failed}
    return describe


def _finish(options: StageOptions, plan: dict, upstream: Upstream, started: float, ran: list[dict],
            stage_seconds: float | None = None) -> dict:
    """Write the manifest once every upstream shard is cached; summarise the run."""
    output = Path(options.output)
    missing = [s for s in upstream.shard_ids if not contract.stats_path(output, s).exists()]
    if missing:
        raise TargetStageError(f"shards {missing[:10]} are not cached; rerun to resume")
    failed: dict[str, int] = {}
    for shard_id in upstream.shard_ids:
        for status, count in read_stats(output, shard_id).get("failed_samples", {}).items():
            failed[status] = failed.get(status, 0) + count
    identity = plan["identity"]
    config = {
        "images": str(Path(options.images).resolve()), "teacher": options.teacher, "weights": options.weights,
        "views": options.views, "dtype": options.dtype, "batch_size": options.batch_size,
        "device": plan["device"], "precision": plan["precision"], "seed": options.seed,
        "teacher_seed": options.teacher_seed,
    }
    manifest = write_manifest(output, contract.STAGE_TARGETS, config, upstream=Path(options.images), extra={
        "targets": identity["targets"], "views": identity["views"], "failed_samples": failed,
        "skipped_upstream_shards": upstream.problems,
    })
    images = sum(r.get("images", 0) for r in ran)
    summary = {
        "output": str(output), "shards": len(upstream.shard_ids), "shards_cached_now": len(ran),
        "shards_resumed": len(plan["done"]), "images_cached_now": images,
        "images_total": manifest["total_count"], "failed_samples": failed,
        "seconds": round(time.time() - started, 2),
    }
    if stage_seconds:
        summary["images_per_s"] = round(images / stage_seconds, 2)
        summary["views_per_s"] = round(images * options.views / stage_seconds, 2)
        summary["stage_seconds"] = round(stage_seconds, 2)
    log("done: " + json.dumps(summary))
    return summary


def measure_bare_forward(options: StageOptions, iterations: int) -> dict:
    """views/s of the teacher alone, in one actor set up exactly like the stage's (same device,
    resources, threads, batch size, precision and storage dtype): the stage's throughput baseline.
    Call inside a Ray session."""
    import ray

    upstream = inspect_upstream(Path(options.images))
    spec = resolve_teacher(options.teacher, options.weights)
    device = resolve_device(options.device)
    precision = options.precision if options.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    plan = {"device": device, "precision": precision, "todo": upstream.shard_ids or [0],
            "identity": {"targets": {}, "views": {}, "upstream_manifest_sha256": upstream.manifest_sha256}}
    config, actor_options, _ = _actor_setup(options, spec, plan, upstream)
    actor = ray.remote(TargetCacheActor).options(**actor_options).remote(replace(config, identity=None))
    try:
        return {**ray.get(actor.time_bare_forward.remote(iterations)), "device": device, "precision": precision}
    finally:
        ray.kill(actor)
