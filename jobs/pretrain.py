"""Pretrain on a Ray cluster: Ray Train's TorchTrainer runs eva.train's `run` on every worker.

    python jobs/pretrain.py --config CONFIG.yaml [dotted.key=value ...] [--workers N] [--gpus-per-worker G]

Same config and same training function as `python -m eva.train`; Ray only places the workers and
sets up the process group (gloo on CPU, nccl on GPU). With RAY_ADDRESS or --ray-address it joins
that cluster (also under `ray job submit --working-dir . -- python jobs/pretrain.py ...`), else it
starts a local Ray on 127.0.0.1. Rerunning the same command resumes from the run's `latest`
checkpoint. On a multi-node cluster, data.train and run_dir must be on storage every node sees.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # plain `python jobs/pretrain.py` from a checkout

from eva.teacher import is_weights_path  # noqa: E402
from eva.train.config import Config, ConfigError, load_config  # noqa: E402
from pipeline.local_ray import keep_embedded_ray_on_loopback  # noqa: E402

START_TIMEOUT_VARIABLE = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
DEFAULT_START_TIMEOUT_S = 600.0


def train_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: the same entry function as `python -m eva.train`."""
    import ray.train

    from eva.train.config import config_from_dict
    from eva.train.loop import run

    run(config_from_dict(loop_config["config"]), report=ray.train.report)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python jobs/pretrain.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="training config YAML")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (one rank each)")
    parser.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs per worker (0: CPU training)")
    parser.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs per worker (loader workers included)")
    parser.add_argument("--max-failures", type=int, default=0, help="worker-group restarts (each resumes from latest)")
    parser.add_argument("--worker-start-timeout", type=float, default=None,
                        help="seconds Ray Train waits for the worker group to start (default: "
                             f"${START_TIMEOUT_VARIABLE} if set, else {DEFAULT_START_TIMEOUT_S:g}; Ray's own 60 s is "
                             "short for workers that import deepspeed on a busy node)")
    parser.add_argument("--ray-address", default=None, help="cluster to join (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    return args


def absolute_paths(cfg: Config) -> Config:
    """Workers may start in another directory: pin relative paths to this one."""
    cfg.data.train = str(Path(cfg.data.train).resolve())
    cfg.run_dir = str(Path(cfg.run_dir).resolve())
    teacher = cfg.data.teacher.model
    if teacher and (teacher.endswith(".json") or os.sep in teacher):
        cfg.data.teacher.model = str(Path(teacher).resolve())
    if is_weights_path(cfg.data.teacher.weights):
        cfg.data.teacher.weights = str(Path(cfg.data.teacher.weights).resolve())
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = absolute_paths(load_config(args.config, args.overrides))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if not address:  # Ray Train's process group rendezvous on loopback too
        keep_embedded_ray_on_loopback([])
    import ray
    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    # Ray Train passes this variable from the driver to its controller; the flag wins over the environment
    if args.worker_start_timeout is not None:
        os.environ[START_TIMEOUT_VARIABLE] = str(args.worker_start_timeout)
    os.environ.setdefault(START_TIMEOUT_VARIABLE, str(DEFAULT_START_TIMEOUT_S))
    use_gpu = args.gpus_per_worker > 0
    resources = {"CPU": args.cpus_per_worker, **({"GPU": args.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict()},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=Path(cfg.run_dir).name, storage_path=str(Path(cfg.run_dir) / "ray"),
                             failure_config=FailureConfig(max_failures=args.max_failures)),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        print(f"error: training failed: {error}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    print(f"done: last metrics {result.metrics}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
