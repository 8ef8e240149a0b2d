"""pipeline.ray_runner.run_shards against a real local Ray cluster."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray

from pipeline.ray_runner import run_shards


@ray.remote(num_cpus=0.1, max_retries=0)
def flaky_shard(shard_id: int, workdir: str, fail_times: int, sleep_s: float) -> dict:
    """Fails `fail_times` times per shard, records when it ran, then marks the shard."""
    work = Path(workdir)
    running = work / f"running-{shard_id}-{time.time_ns()}"
    running.touch()
    attempts = len(list(work.glob(f"attempt-{shard_id}-*")))
    (work / f"attempt-{shard_id}-{attempts}").touch()
    concurrent = len(list(work.glob("running-*")))
    (work / f"concurrency-{shard_id}-{attempts}-{concurrent}").touch()
    time.sleep(sleep_s)
    running.unlink()
    if attempts < fail_times:
        raise RuntimeError(f"planned failure {attempts}")
    (work / f"marker-{shard_id}").touch()
    return {"shard_id": shard_id, "count": 1}


def check_marker(workdir: Path):
    def check(shard_id: int, result: dict) -> None:
        if not (workdir / f"marker-{shard_id}").exists() or result["shard_id"] != shard_id:
            raise RuntimeError(f"shard {shard_id} has no marker")
    return check


def test_retries_until_success_and_bounds_in_flight(ray_connected, tmp_path):
    summary = run_shards(
        range(6), lambda s: flaky_shard.remote(s, str(tmp_path), 1, 0.2),
        check_marker(tmp_path), max_in_flight=2, retries=2,
    )
    assert [o.shard_id for o in summary.outcomes] == list(range(6))
    assert all(o.ok and o.attempts == 2 for o in summary.outcomes)
    peak = max(int(p.name.rsplit("-", 1)[1]) for p in tmp_path.glob("concurrency-*"))
    assert 1 <= peak <= 2


def test_gives_up_after_retries_and_reports(ray_connected, tmp_path):
    summary = run_shards(
        [0, 1], lambda s: flaky_shard.remote(s, str(tmp_path), 5 if s == 1 else 0, 0.0),
        check_marker(tmp_path), max_in_flight=2, retries=1,
    )
    assert [o.shard_id for o in summary.failed] == [1]
    assert summary.failed[0].attempts == 2 and "planned failure" in summary.failed[0].error
    assert summary.outcomes[0].ok


def test_result_check_failure_counts_as_failed_attempt(ray_connected, tmp_path):
    def never_ok(shard_id: int, result: dict) -> None:
        raise RuntimeError("marker missing")

    summary = run_shards([0], lambda s: flaky_shard.remote(s, str(tmp_path), 0, 0.0), never_ok,
                         max_in_flight=1, retries=1)
    assert summary.failed and summary.failed[0].attempts == 2
    assert "marker missing" in summary.failed[0].error


def test_hung_task_is_cancelled_and_retried(ray_connected, tmp_path):
    summary = run_shards([0], lambda s: flaky_shard.remote(s, str(tmp_path), 0, 60.0),
                         check_marker(tmp_path), max_in_flight=1, retries=1, task_timeout_s=2.0)
    assert summary.failed and "timed out" in summary.failed[0].error
    assert summary.seconds < 30
