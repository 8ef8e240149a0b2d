"""Run one Ray task per shard with a bounded number in flight, checking and retrying each.

img2dataset's Ray distributor submits every shard at once, never retries and never looks at the
results; a 29.6M-image build needs all three. Both pipeline stages use `run_shards`.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import ray
from tqdm import tqdm


@dataclass
class ShardOutcome:
    shard_id: int
    ok: bool
    attempts: int
    result: Any = None  # what the task returned (its stats) when ok
    error: str = ""


@dataclass
class RunSummary:
    outcomes: list[ShardOutcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[ShardOutcome]:
        return [o for o in self.outcomes if not o.ok]


def run_shards(
    shard_ids: Sequence[int],
    submit: Callable[[int], "ray.ObjectRef"],
    check: Callable[[int, Any], None],
    max_in_flight: int,
    retries: int,
    describe: Callable[[list[ShardOutcome], float], dict] | None = None,
    task_timeout_s: float | None = None,
    progress_label: str = "shards",
    on_timeout: Callable[["ray.ObjectRef"], None] | None = None,
) -> RunSummary:
    """Submit `submit(shard_id)` for every shard, at most `max_in_flight` at a time.

    `check(shard_id, result)` raises when a returned result is not a finished shard (for
    example the marker is missing); that counts as a failed attempt like a task exception. A
    task running longer than `task_timeout_s` (from submission) is stopped by `on_timeout(ref)`,
    by default a forced cancel (actor tasks cannot be force-cancelled: the target stage restarts
    the actor), and retried. `describe(outcomes, elapsed)` feeds the progress bar's postfix
    (images/s, success rate, ...).
    """
    stop = on_timeout or (lambda ref: ray.cancel(ref, force=True))
    started = time.time()
    pending = list(shard_ids)[::-1]  # pop() from the end keeps shard order
    attempts = {shard_id: 0 for shard_id in shard_ids}
    in_flight: dict[ray.ObjectRef, tuple[int, float]] = {}
    summary = RunSummary()
    bar = tqdm(total=len(pending), desc=progress_label, unit="shard", dynamic_ncols=True, mininterval=1.0)

    def finish_attempt(shard_id: int, error: str) -> None:
        if attempts[shard_id] <= retries:
            tqdm.write(f"shard {shard_id}: attempt {attempts[shard_id]} failed ({error}); retrying")
            pending.append(shard_id)
        else:
            summary.outcomes.append(ShardOutcome(shard_id, False, attempts[shard_id], error=error))
            tqdm.write(f"shard {shard_id}: giving up after {attempts[shard_id]} attempts ({error})")
            bar.update(1)

    try:
        while pending or in_flight:
            while pending and len(in_flight) < max_in_flight:
                shard_id = pending.pop()
                attempts[shard_id] += 1
                in_flight[submit(shard_id)] = (shard_id, time.time())
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            for ref in done:
                shard_id, _ = in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                    check(shard_id, result)
                except Exception as error:  # task crash, worker death or a bad result: retry
                    cause = getattr(error, "cause", None) or error  # a RayTaskError wraps the task's own error
                    finish_attempt(shard_id, f"{type(cause).__name__}: {str(cause)[:300]}")
                    continue
                summary.outcomes.append(ShardOutcome(shard_id, True, attempts[shard_id], result=result))
                bar.update(1)
                if describe is not None:
                    bar.set_postfix(describe(summary.outcomes, time.time() - started), refresh=False)
            if task_timeout_s is not None:
                now = time.time()
                for ref, (shard_id, since) in list(in_flight.items()):
                    if now - since > task_timeout_s:
                        stop(ref)
                        in_flight.pop(ref)
                        finish_attempt(shard_id, f"timed out after {task_timeout_s:.0f} s")
    finally:
        for ref in in_flight:
            with contextlib.suppress(ValueError):  # actor tasks refuse force=True; their actors are killed
                ray.cancel(ref, force=True)
        bar.close()
    summary.outcomes.sort(key=lambda o: o.shard_id)
    summary.seconds = time.time() - started
    return summary


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[str]:
    """Connect to the cluster at `address` (or $RAY_ADDRESS), else start an embedded local Ray.

    Under `ray job submit` RAY_ADDRESS is set, so the same script runs on a cluster unchanged.
    The embedded Ray binds to 127.0.0.1 and is shut down on exit.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        yield "existing"
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        description = f"cluster at {address}"
    else:
        # address="local": always a fresh instance, never a cluster that `ray start` left on this machine
        ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=num_cpus, include_dashboard=False,
                 log_to_driver=True)
        description = "embedded local Ray"
    try:
        yield description
    finally:
        ray.shutdown()
