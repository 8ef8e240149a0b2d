"""benchmarks/trace_gaps.py: idle gaps of the device in a profiler trace, blamed on host code."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys

from testkit import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import trace_gaps  # noqa: E402


def x(cat: str, name: str, ts: float, dur: float, tid: int = 1, **args) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "pid": 7, "tid": tid, "ts": ts, "dur": dur, "args": args}


TRACE = {"traceEvents": [
    {"ph": "M", "name": "process_name", "pid": 7, "tid": 0, "args": {"name": "python"}},
    x("python_function", "loop.py(58): train_one_step", 0, 1100),
    x("python_function", "deepspeed/runtime/zero/stage_1_and_2.py(3013): step", 500, 400),
    x("python_function", "torch/optim/adamw.py(100): step", 600, 100),  # torch's own: not the culprit
    x("cuda_runtime", "cudaLaunchKernel", 10, 5, correlation=1),
    x("cuda_runtime", "cudaMemcpyAsync", 20, 5, correlation=2),
    x("cuda_runtime", "cudaLaunchKernel", 650, 5, correlation=3),
    x("cuda_runtime", "cudaLaunchKernel", 950, 5, correlation=4),
    x("cuda_runtime", "cudaLaunchKernel", 990, 5, correlation=5),
    x("kernel", "gemm_a", 100, 300, tid=20, correlation=1),
    x("gpu_memcpy", "Memcpy HtoD", 350, 100, tid=21, correlation=2),   # overlaps: busy 100-450
    x("kernel", "multi_tensor_apply_adam", 700, 100, tid=20, correlation=3),  # after 250 us idle
    x("kernel", "copy_kernel", 1000, 50, tid=20, correlation=4),       # after 200 us idle
    x("kernel", "small_kernel", 1060, 10, tid=20, correlation=5),      # 10 us: launch jitter, ignored
]}


def test_gaps_are_measured_between_merged_device_activity_and_blamed_on_the_launching_frame(tmp_path):
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as handle:
        json.dump(TRACE, handle)
    result = trace_gaps.idle_gaps(trace_gaps.load_events(path), min_gap_us=20)
    assert result["gaps"] == 2 and result["idle_ms_in_gaps"] == 0.45 and result["device_span_ms"] == 0.97
    assert result["idle_ms_by_culprit"] == {"deepspeed/runtime/zero/stage_1_and_2.py(3013): step": 0.25,
                                            "loop.py(58): train_one_step": 0.2}
    first = result["largest_gaps"][0]
    assert first["us"] == 250 and first["next"] == "multi_tensor_apply_adam"
    assert first["stack"][-1] == "torch/optim/adamw.py(100): step"  # the whole open stack is kept
    printed = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "trace_gaps.py"), str(path), "--top", "1"],
                             capture_output=True, text=True, check=True).stdout
    assert list(json.loads(printed)["idle_ms_by_culprit"]) == ["deepspeed/runtime/zero/stage_1_and_2.py(3013): step"]
