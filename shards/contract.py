"""Names and constants of the shard contract (DESIGN.md, "The shard contract", schema version 1).

Everything that two stages must agree on lives here, so a change to the contract is one diff.
"""
from __future__ import annotations

import re
from pathlib import Path

SCHEMA_VERSION = 1

STAGE_IMAGES = "images"    # output of jobs/build_shards.py
STAGE_TARGETS = "targets"  # output of jobs/cache_targets.py
STAGES = (STAGE_IMAGES, STAGE_TARGETS)

SHARD_ID_DIGITS = 6
MANIFEST_FILE = "manifest.json"
SIZES_FILE = "sizes.json"
DUPLICATES_FILE = "duplicates.parquet"

# Tar member extensions. WebDataset splits a member name at the first dot: key, then extension.
EXT_IMAGE = "jpg"
EXT_META = "json"
EXT_CAPTION = "txt"
EXT_TARGETS = "tgt.npy"        # [K, N, D] float16 or int8
EXT_TARGET_SCALES = "tgs.npy"  # [K, N] float32 per-token scales, only with int8 targets
TARGET_DTYPES = ("float16", "int8")

STATUS_SUCCESS = "success"
STATUS_EXCLUDED = "excluded"
STATUS_DUPLICATE = "duplicate"

# Columns every shard parquet has, one row per input row (failures included).
IMAGE_PARQUET_COLUMNS = (
    "key", "source", "url", "path", "status", "error_message", "sha256",
    "width", "height", "original_width", "original_height",
)
TARGET_PARQUET_COLUMNS = ("key", "status", "error_message")

_KEY_RE = re.compile(r"^[0-9]+$")
_SHARD_FILE_RE = re.compile(r"^([0-9]{%d})(\.tar|\.parquet|_stats\.json)$" % SHARD_ID_DIGITS)


def shard_stem(shard_id: int) -> str:
    if not 0 <= shard_id < 10**SHARD_ID_DIGITS:
        raise ValueError(f"shard id {shard_id} is outside 0..{10**SHARD_ID_DIGITS - 1}")
    return f"{shard_id:0{SHARD_ID_DIGITS}d}"


def tar_path(directory: Path, shard_id: int) -> Path:
    return Path(directory) / f"{shard_stem(shard_id)}.tar"


def parquet_path(directory: Path, shard_id: int) -> Path:
    return Path(directory) / f"{shard_stem(shard_id)}.parquet"


def stats_path(directory: Path, shard_id: int) -> Path:
    """The completion marker: written last, so its presence means the shard is whole."""
    return Path(directory) / f"{shard_stem(shard_id)}_stats.json"


def parse_shard_file(name: str) -> int | None:
    """Shard id of a contract file name (`000012.tar`, `000012_stats.json`, ...), else None."""
    match = _SHARD_FILE_RE.match(name)
    return int(match.group(1)) if match else None


def key_index_digits(shard_size: int) -> int:
    """Digits for the in-shard index; the same rule as img2dataset's oom_sample_per_shard."""
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    return max(1, len(str(shard_size - 1)))


def make_key(shard_id: int, index: int, shard_size: int) -> str:
    """Digit-only key, unique in a directory: shard id then the row's index within the shard.

    Same layout as img2dataset's keys with oom_shard_count=6, so a URL shard written by
    img2dataset's downloader and a folder shard written by us share one key space.
    """
    digits = key_index_digits(shard_size)
    if not 0 <= index < shard_size:
        raise ValueError(f"row index {index} is outside shard size {shard_size}")
    return f"{shard_stem(shard_id)}{index:0{digits}d}"


def is_valid_key(key: str) -> bool:
    return bool(_KEY_RE.match(key))


def split_member_name(name: str) -> tuple[str, str]:
    """`000001000.tgt.npy` -> (`000001000`, `tgt.npy`), WebDataset's rule (split at the first dot)."""
    base = name.rsplit("/", 1)[-1]
    key, dot, ext = base.partition(".")
    if not dot:
        raise ValueError(f"tar member {name!r} has no extension")
    return key, ext
