"""What an output directory was started with, so a rerun either resumes it exactly or is refused.

DESIGN: "Shards are immutable once marked. A changed config writes a new directory." The config
is recorded in `_build/config.json` when a build starts (the manifest only exists at the end), the
plan's per-source digests in `_build/plan.json`; a rerun that differs in either is refused with
the field or source that differs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shards import contract
from shards.reader import completed_shards, present_tars
from shards.writer import write_json_atomic

from pipeline.plan import Plan, build_dir, load_recorded_plan

CONFIG_FILE = "config.json"


class BuildRefused(RuntimeError):
    """The output directory holds a build this run must not mix with."""


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config as dotted fields; lists of sources are keyed by source name."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and all(isinstance(v, dict) and "name" in v for v in value):
        items = ((v["name"], v) for v in value)
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, inner in items:
        flat.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    old, new = flatten(recorded), flatten(wanted)
    return [f"{name}: {old.get(name, '<absent>')!r} there, {new.get(name, '<absent>')!r} now"
            for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]


def claim_output(output: Path, config: dict[str, Any]) -> None:
    """Record `config` for a new directory, or check it against the one the directory was built with."""
    output = Path(output)
    recorded_path = build_dir(output) / CONFIG_FILE
    manifest_path = output / contract.MANIFEST_FILE
    if recorded_path.exists():
        recorded, origin = json.loads(recorded_path.read_text()), recorded_path
    elif manifest_path.exists():
        recorded, origin = json.loads(manifest_path.read_text()).get("config", {}), manifest_path
    else:
        if output.exists() and (completed_shards(output) or present_tars(output)):
            raise BuildRefused(f"{output} holds shard files but no record of the build that wrote them; "
                               "choose an empty or new --output")
        build_dir(output).mkdir(parents=True, exist_ok=True)
        write_json_atomic(recorded_path, config)
        return
    differences = config_differences(recorded, config)
    if differences:
        raise BuildRefused(
            f"{output} was built with a different config ({origin}); a changed config writes a new "
            f"directory (choose another --output). Differing field(s): " + "; ".join(differences)
        )


def check_plan(output: Path, plan: Plan) -> None:
    """Refuse when the inputs no longer cut into the shards recorded by an earlier run."""
    recorded = load_recorded_plan(output)
    if recorded is None:
        return
    for name in sorted(set(recorded.source_digests) | set(plan.source_digests)):
        if recorded.source_digests.get(name) != plan.source_digests.get(name):
            raise BuildRefused(
                f"the inputs of source {name!r} changed since {output} was started "
                f"({recorded.source_rows.get(name)} rows then, {plan.source_rows.get(name)} now, or the same "
                "count with other rows); resuming would mix two plans: choose another --output"
            )
