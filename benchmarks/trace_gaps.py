"""Where a GPU step's device sits idle, and which host code it waits on: read offline from a
Chrome trace that `gpu_train_step.py --trace-dir` wrote (torch.profiler, Python stacks on).

    python benchmarks/trace_gaps.py TRACE.json[.gz] [--min-gap-us 20] [--top 15]

The device is busy while a kernel, memcpy or memset runs. Each idle gap ends when the next one
starts, and that one was launched by the host (the CUDA runtime call with the same correlation id).
The Python frames open on that host thread at the launch are what the device waited on. Gaps are
totalled by the innermost frame outside torch itself. Prints JSON.
"""
from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict
from pathlib import Path

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
TORCH_FRAMES = ("torch/", "torch\\", "<built-in", "contextlib.py", "nn/modules/module.py")


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        trace = json.load(handle)
    return [e for e in (trace["traceEvents"] if isinstance(trace, dict) else trace) if e.get("ph") == "X"]


def busy_intervals(events: list[dict]) -> list[tuple[float, float, dict]]:
    """Device activity as (start, end, the event that opened it), overlapping activity merged."""
    merged: list[tuple[float, float, dict]] = []
    for event in sorted((e for e in events if e.get("cat") in DEVICE_CATEGORIES), key=lambda e: e["ts"]):
        start, end = event["ts"], event["ts"] + event.get("dur", 0)
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end), merged[-1][2])
        else:
            merged.append((start, end, event))
    return merged


def host_frames(events: list[dict]) -> dict[object, list[dict]]:
    """Python function events per host thread, sorted by start."""
    frames: dict[object, list[dict]] = defaultdict(list)
    for event in events:
        if event.get("cat") == "python_function":
            frames[event.get("tid")].append(event)
    for thread in frames.values():
        thread.sort(key=lambda e: e["ts"])
    return frames


def open_frames(thread: list[dict], starts: list[float], when: float) -> list[str]:
    """Names of the Python frames open at `when`, outermost first."""
    upto = bisect.bisect_right(starts, when)
    return [e["name"] for e in thread[:upto] if e["ts"] + e.get("dur", 0) >= when]


def culprit(frames: list[str]) -> str:
    """The innermost frame outside torch itself (the code that made the launch late)."""
    for name in reversed(frames):
        if not any(marker in name for marker in TORCH_FRAMES):
            return name
    return frames[-1] if frames else "(no Python frame: launched outside Python)"


def idle_gaps(events: list[dict], min_gap_us: float) -> dict:
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})}
    frames = host_frames(events)
    starts = {tid: [e["ts"] for e in thread] for tid, thread in frames.items()}
    busy = busy_intervals(events)
    gaps, by_culprit = [], defaultdict(float)
    for (_, idle_from, _), (idle_to, _, waiting) in zip(busy, busy[1:]):
        length = idle_to - idle_from
        if length < min_gap_us:
            continue
        launch = launches.get(waiting.get("args", {}).get("correlation"))
        stack = open_frames(frames.get(launch.get("tid"), []), starts.get(launch.get("tid"), []), launch["ts"]) if launch else []
        blamed = culprit(stack)
        by_culprit[blamed] += length
        gaps.append({"us": round(length, 1), "next": waiting["name"][:80], "culprit": blamed, "stack": stack[-6:]})
    span = busy[-1][1] - busy[0][0] if busy else 0.0
    idle = sum(g["us"] for g in gaps)
    return {
        "device_span_ms": round(span / 1e3, 2),
        "idle_ms_in_gaps": round(idle / 1e3, 2),
        "gaps": len(gaps),
        "idle_ms_by_culprit": {k: round(v / 1e3, 3) for k, v in sorted(by_culprit.items(), key=lambda kv: -kv[1])},
        "largest_gaps": sorted(gaps, key=lambda g: -g["us"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--min-gap-us", type=float, default=20.0, help="shorter gaps are launch jitter")
    parser.add_argument("--top", type=int, default=15, help="largest gaps and culprits shown")
    args = parser.parse_args()
    result = idle_gaps(load_events(args.trace), args.min_gap_us)
    result["idle_ms_by_culprit"] = dict(list(result["idle_ms_by_culprit"].items())[:args.top])
    result["largest_gaps"] = result["largest_gaps"][:args.top]
    print(json.dumps({"trace": str(args.trace), **result}, indent=1))


if __name__ == "__main__":
    main()
