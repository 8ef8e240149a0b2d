"""Run jobs/build_shards.py in-process (`main(argv)`) or as a subprocess, as the tests need."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from testkit import REPO_ROOT

JOB = REPO_ROOT / "jobs" / "build_shards.py"


def _load_job():
    spec = importlib.util.spec_from_file_location("build_shards_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_main = _load_job().main


def job_command(*args: str) -> list[str]:
    return [sys.executable, str(JOB), *map(str, args)]


def job_env(**extra: str) -> dict[str, str]:
    """The subprocess environment: no inherited cluster address unless a test sets one."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", NO_ALBUMENTATIONS_UPDATE="1", **extra)
    return env


def run_job(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(job_command(*args), cwd=REPO_ROOT, env=job_env(**env), capture_output=True,
                          text=True, timeout=timeout)
