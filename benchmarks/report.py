"""What every benchmark prints with its figures: the machine, the date, and one JSON object."""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine(device: torch.device | str | None = None) -> dict:
    """The hardware a figure belongs to (BENCHMARKS.md names it next to every result)."""
    info = {"cpu": cpu_name(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def emit(result: dict, out: Path | None) -> None:
    """Print the result as JSON, and also write it to `out` when given."""
    text = json.dumps(result, indent=1)
    print(text)
    if out is not None:
        Path(out).write_text(text + "\n")
