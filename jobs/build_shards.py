"""Build image shards from URL lists and local image folders, one Ray task per shard.

    python jobs/build_shards.py --sources SOURCES.yaml --output DIR
        [--image-size 256] [--shard-size 10000] [--workers N] [--timeout S] [--retries N]
        [--exclude-hashes FILE] [--allow-private-addresses]

Runs the same under `ray job submit --working-dir . -- python jobs/build_shards.py ...`; without
a cluster address (`RAY_ADDRESS` or --ray-address) it starts an embedded local Ray. Rerunning the
same command resumes. Exit status: 0 done, 1 shards failed after retries, 2 bad input or a
directory built with another config. See docs/build_shards.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under ray job submit

from pipeline.local_ray import keep_embedded_ray_on_loopback  # noqa: E402

keep_embedded_ray_on_loopback(sys.argv)  # before anything imports ray

from pipeline.build_images import BuildOptions, run  # noqa: E402
from pipeline.robots import DEFAULT_DISALLOWED_DIRECTIVES  # noqa: E402


def parse_args(argv: list[str] | None) -> BuildOptions:
    defaults = BuildOptions(sources=Path(), output=Path())
    parser = argparse.ArgumentParser(prog="python jobs/build_shards.py", description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=Path, required=True, help="SOURCES.yaml (docs/build_shards.md)")
    parser.add_argument("--output", type=Path, required=True, help="image shard directory to build or resume")
    parser.add_argument("--image-size", type=int, default=defaults.image_size,
                        help="shorter side of stored images at most this many pixels (no upscaling)")
    parser.add_argument("--shard-size", type=int, default=defaults.shard_size, help="input rows per shard")
    parser.add_argument("--workers", type=int, default=None,
                        help="shard tasks at once, one CPU each (default: all CPUs of the cluster)")
    parser.add_argument("--timeout", type=float, default=defaults.timeout,
                        help="total seconds per image: connect, redirects, headers and body")
    parser.add_argument("--retries", type=int, default=defaults.retries, help="extra attempts per failed shard")
    parser.add_argument("--exclude-hashes", type=Path, default=None,
                        help="sha256 digests (text, one per line, or parquet column sha256) to drop as `excluded`")
    parser.add_argument("--allow-private-addresses", action="store_true",
                        help="let URLs reach loopback and private networks (off: URL lists are untrusted)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster (default: $RAY_ADDRESS, else embedded)")
    parser.add_argument("--min-image-size", type=int, default=defaults.min_image_size,
                        help="drop images whose shorter side is below this (status too_small)")
    parser.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                        help="drop images with more pixels, checked before decoding (decompression_bomb)")
    parser.add_argument("--max-bytes", type=int, default=defaults.max_bytes, help="cap on source bytes per image")
    parser.add_argument("--max-redirects", type=int, default=defaults.max_redirects)
    parser.add_argument("--threads-per-worker", type=int, default=defaults.threads_per_worker,
                        help="concurrent fetches in one URL shard task")
    parser.add_argument("--folder-threads", type=int, default=defaults.folder_threads,
                        help="concurrent file reads in one folder shard task")
    parser.add_argument("--user-agent-token", default=None,
                        help="token for the User-Agent and X-Robots-Tag matching (img2dataset's option)")
    parser.add_argument("--disallowed-header-directives", nargs="*", default=list(DEFAULT_DISALLOWED_DIRECTIVES),
                        help="X-Robots-Tag directives that opt an image out (none: honour nothing)")
    parser.add_argument("--shard-timeout", type=float, default=None,
                        help="cancel and retry a shard task running longer than this many seconds")
    args = parser.parse_args(argv)
    return BuildOptions(
        sources=args.sources, output=args.output, image_size=args.image_size, shard_size=args.shard_size,
        workers=args.workers, timeout=args.timeout, retries=args.retries, exclude_hashes=args.exclude_hashes,
        allow_private_addresses=args.allow_private_addresses, ray_address=args.ray_address,
        min_image_size=args.min_image_size, max_pixels=args.max_pixels, max_bytes=args.max_bytes,
        max_redirects=args.max_redirects, threads_per_worker=args.threads_per_worker,
        folder_threads=args.folder_threads, user_agent_token=args.user_agent_token,
        disallowed_header_directives=tuple(args.disallowed_header_directives), shard_timeout=args.shard_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
