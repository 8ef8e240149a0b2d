"""Target-cache stage throughput against a bare teacher forward, and bytes per image per view.

    python benchmarks/bench_targets.py [--teacher ViT-L-14] [--batch-size 256] [--device auto]

In one run, on one Ray cluster (embedded unless --ray-address/$RAY_ADDRESS):
- baseline: the teacher alone in an actor set up like the stage's (same device, batch size,
  precision, threads), on a normalised batch already on the device, converted to the storage dtype,
  measured before and after the stage (mean of the two);
- stage: `run_target_stage` end to end on synthetic image shards (decode, views, teacher, write),
  views/s over the shard phase (actor start and teacher load reported apart), float16 then int8;
- storage: target bytes (`.tgt.npy` + `.tgs.npy`, npy headers included) per image per view.
Targets: stage >= 0.9 x bare forward; int8 <= 0.52 x float16 bytes. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

from pipeline.local_ray import keep_embedded_ray_on_loopback  # noqa: E402

keep_embedded_ray_on_loopback(sys.argv)  # before ray is imported

from pipeline.ray_runner import ray_session  # noqa: E402
from pipeline.target_stage import StageOptions, measure_bare_forward, run_target_stage  # noqa: E402
from shards import contract  # noqa: E402
from shards.reader import completed_shards, iter_tar  # noqa: E402
from support_shards import TINY_TEACHER_CONFIG, make_image_shard_dir  # noqa: E402
from report import emit, machine  # noqa: E402  (benchmarks/, this script's directory)


def target_bytes_per_view(directory: Path, views: int) -> dict:
    images = payload = tar_bytes = 0
    for shard_id in completed_shards(directory):
        tar = contract.tar_path(directory, shard_id)
        tar_bytes += tar.stat().st_size
        for _, members in iter_tar(tar):
            images += 1
            payload += len(members[contract.EXT_TARGETS]) + len(members.get(contract.EXT_TARGET_SCALES, b""))
    return {"target_bytes_per_image_per_view": round(payload / (images * views), 1),
            "tar_bytes_per_image": round(tar_bytes / images, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=str(TINY_TEACHER_CONFIG))
    parser.add_argument("--teacher-weights", default="none")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--images-per-shard", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=256, help="stored images' shorter side")
    parser.add_argument("--bare-iterations", type=int, default=20)
    parser.add_argument("--decode-workers", type=int, default=None)
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        started = time.time()
        make_image_shard_dir(work / "images", (args.images_per_shard,) * args.shards, shard_size=args.images_per_shard,
                             image_size=args.image_size, captions=False)
        build_seconds = time.time() - started

        def options(dtype: str) -> StageOptions:
            return StageOptions(images=work / "images", output=work / f"train_{dtype}", teacher=args.teacher,
                                weights=args.teacher_weights, views=args.views, dtype=dtype,
                                batch_size=args.batch_size, device=args.device, precision=args.precision,
                                decode_workers=args.decode_workers, ray_address=args.ray_address)

        with ray_session(args.ray_address):
            # the baseline before and after the stage: a shared machine's speed drifts
            bare = measure_bare_forward(options("float16"), args.bare_iterations)
            stages = {dtype: run_target_stage(options(dtype)) for dtype in contract.TARGET_DTYPES}
            bare_after = measure_bare_forward(options("float16"), args.bare_iterations)
        bare_views_per_s = (bare["views_per_s"] + bare_after["views_per_s"]) / 2
        storage = {dtype: target_bytes_per_view(work / f"train_{dtype}", args.views) for dtype in stages}

    fp16 = stages["float16"]
    ratio = fp16["views_per_s"] / bare_views_per_s
    bytes_ratio = (storage["int8"]["target_bytes_per_image_per_view"]
                   / storage["float16"]["target_bytes_per_image_per_view"])
    result = {
        "benchmark": "bench_targets", "machine": machine(bare["device"]),
        "teacher": args.teacher, "weights": args.teacher_weights, "device": bare["device"],
        "precision": bare["precision"], "teacher_torch_threads": bare["torch_threads"],
        "batch_size": args.batch_size, "views_per_image": args.views,
        "images": args.shards * args.images_per_shard, "stored_image_short_side": args.image_size,
        "bare_teacher_views_per_s": round(bare_views_per_s, 2),
        "bare_teacher_views_per_s_before_after": [bare["views_per_s"], bare_after["views_per_s"]],
        "stage_views_per_s": {d: s["views_per_s"] for d, s in stages.items()},
        "stage_images_per_s": {d: s["images_per_s"] for d, s in stages.items()},
        "stage_vs_bare_forward": round(ratio, 3), "stage_vs_bare_target": 0.9,
        "stage_vs_bare_ok": ratio >= 0.9,
        "stage_job_seconds_incl_startup": {d: s["seconds"] for d, s in stages.items()},
        "storage": storage,
        "int8_vs_float16_bytes": round(bytes_ratio, 3), "int8_bytes_target": 0.52, "int8_bytes_ok": bytes_ratio <= 0.52,
        "synthetic_images_build_seconds": round(build_seconds, 2),
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
