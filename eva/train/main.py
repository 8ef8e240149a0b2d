"""Command line of the trainer: works as a single process and under torchrun / the deepspeed launcher."""
from __future__ import annotations

import argparse
import sys

from eva.train.config import ConfigError, load_config
from eva.train.data import DataError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eva.train",
        description="EVA-style MIM pretraining with DeepSpeed. Overrides: dotted.key=value (YAML scalars).")
    parser.add_argument("--config", required=True, help="training config YAML (e.g. configs/pretrain/tiny_cpu.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # heavy imports (deepspeed) once the config is known good
    from eva.teacher import TeacherError
    from eva.train.checkpointing import ResumeError
    from eva.train.loop import NonFiniteLossError, run

    try:
        run(cfg)
    except (ConfigError, DataError, ResumeError, TeacherError, NonFiniteLossError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
