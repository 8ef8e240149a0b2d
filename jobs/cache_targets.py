"""Cache per-patch CLIP targets for K views of every image: image shards in, train shards out.

    python jobs/cache_targets.py --images DIR --output DIR --teacher MODEL
        [--teacher-weights TAG|PATH|none] [--views K] [--dtype float16|int8] [--batch-size B]
        [--device auto|cpu|cuda]

Runs the same under `ray job submit --working-dir . -- python jobs/cache_targets.py ...`; without
a cluster address (`RAY_ADDRESS` or --ray-address) it starts an embedded local Ray. Rerunning the
same command resumes. Exit status: 0 done, 1 shards still failing after retries (rerun to resume),
2 refused input. See docs/cache_targets.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under ray job submit

from pipeline.local_ray import keep_embedded_ray_on_loopback  # noqa: E402

keep_embedded_ray_on_loopback(sys.argv)  # before anything imports ray

from eva.teacher import TeacherError  # noqa: E402
from eva.views import ViewPolicy  # noqa: E402
from pipeline.target_stage import StageOptions, run_target_stage  # noqa: E402
from pipeline.targets import ShardsFailedError, TargetStageError  # noqa: E402


def grid_arg(text: str) -> tuple[int, int]:
    try:
        gh, gw = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GHxGW such as 16x16, got {text!r}") from None
    return gh, gw


def pair_arg(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH such as 0.2,1.0, got {text!r}") from None
    return low, high


def parse_args(argv: list[str] | None) -> StageOptions:
    parser = argparse.ArgumentParser(prog="python jobs/cache_targets.py", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="image shard directory (stage images)")
    parser.add_argument("--output", type=Path, required=True, help="train shard directory to write or resume")
    parser.add_argument("--teacher", required=True, help="open_clip model name (ViT-L-14) or model config JSON path")
    parser.add_argument("--teacher-weights", default="none",
                        help="open_clip pretrained tag, local checkpoint path, or none (seeded random init)")
    parser.add_argument("--views", type=int, default=2, help="views per image (K)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "int8"), help="target storage dtype")
    parser.add_argument("--batch-size", type=int, default=64, help="views per teacher forward")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="teacher autocast precision (auto: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--seed", type=int, default=0, help="view seed (views depend on seed, key, view index)")
    parser.add_argument("--teacher-seed", type=int, default=0, help="random-init seed with --teacher-weights none")
    parser.add_argument("--crop-scale", type=pair_arg, default=(0.2, 1.0), help="RandomResizedCrop scale range")
    parser.add_argument("--crop-ratio", type=pair_arg, default=(3 / 4, 4 / 3), help="RandomResizedCrop ratio range")
    parser.add_argument("--flip-p", type=float, default=0.5, help="horizontal flip probability")
    parser.add_argument("--expected-grid", type=grid_arg, default=None,
                        help="the student's patch grid GHxGW; refuse a teacher with another grid")
    parser.add_argument("--expected-dim", type=int, default=None, help="refuse a teacher with another feature dim")
    parser.add_argument("--retries", type=int, default=2, help="retries per shard")
    parser.add_argument("--shard-timeout", type=float, default=None, metavar="S",
                        help="restart the actor of a shard that runs longer than S seconds, and retry the "
                             "shard (default: no limit; set a few times the expected shard time)")
    parser.add_argument("--actors", type=int, default=None, help="teacher actors (default: one per GPU, or 1)")
    parser.add_argument("--decode-workers", type=int, default=None, help="decode/crop threads per actor")
    parser.add_argument("--ray-address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or embedded)")
    parser.add_argument("--allow-missing-shards", action="store_true",
                        help="cache the complete image shards and record the missing/unmarked ones")
    args = parser.parse_args(argv)
    return StageOptions(
        images=args.images, output=args.output, teacher=args.teacher, weights=args.teacher_weights,
        views=args.views, dtype=args.dtype, batch_size=args.batch_size, device=args.device,
        precision=args.precision, seed=args.seed, teacher_seed=args.teacher_seed, retries=args.retries,
        shard_timeout_s=args.shard_timeout,
        ray_address=args.ray_address, expected_grid=args.expected_grid, expected_dim=args.expected_dim,
        actors=args.actors, decode_workers=args.decode_workers, allow_missing_shards=args.allow_missing_shards,
        policy=ViewPolicy(scale=args.crop_scale, ratio=args.crop_ratio, flip_p=args.flip_p),
    )


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        run_target_stage(options)
    except ShardsFailedError as error:
        print(f"cache_targets: error: {error}", file=sys.stderr, flush=True)
        return 1
    except (TargetStageError, TeacherError) as error:
        print(f"cache_targets: error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
