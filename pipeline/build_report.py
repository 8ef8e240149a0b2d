"""What a build tells its operator: a progress postfix while it runs, a per-source table at the end."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pipeline import statuses
from pipeline.ray_runner import ShardOutcome


def progress_postfix(outcomes: list[ShardOutcome], elapsed: float) -> dict[str, str]:
    """run_shards' `describe`: stored images per second and the share of rows stored so far."""
    done = [o.result for o in outcomes if o.ok and o.result]
    stored = sum(r["count"] for r in done)
    rows = sum(r["rows"] for r in done)
    return {
        "img/s": f"{stored / elapsed:.0f}" if elapsed > 0 else "-",
        "ok": f"{100 * stored / rows:.1f}%" if rows else "-",
    }


@dataclass
class SourceTally:
    name: str
    kind: str
    planned_rows: int
    rows: int = 0            # rows of finished shards
    stored: int = 0
    duplicates: int = 0
    statuses: Counter = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "rows": self.planned_rows, "stored": self.stored,
                "duplicates": self.duplicates, "failures": dict(sorted(self.failures().items()))}

    def failures(self) -> Counter:
        return Counter({s: n for s, n in self.statuses.items() if s != statuses.SUCCESS})


def tally_sources(sources: list[tuple[str, str, int]], shard_stats: list[dict[str, Any]],
                  duplicates_by_source: dict[str, int]) -> list[SourceTally]:
    """Per-source counts from the stats of finished shards; `sources` is (name, kind, planned rows)."""
    tallies = {name: SourceTally(name, kind, rows) for name, kind, rows in sources}
    for stats in shard_stats:
        tally = tallies[stats["source"]]
        tally.rows += stats["rows"]
        tally.stored += stats["count"]
        tally.statuses.update(stats["status_counts"])
    for name, count in duplicates_by_source.items():
        tallies[name].duplicates = count
    return list(tallies.values())


def format_table(tallies: list[SourceTally]) -> str:
    """Rows in, stored, duplicates, then one column per failure reason that occurred."""
    reasons = Counter()
    for tally in tallies:
        reasons.update(tally.failures())
    reason_names = [name for name, _ in reasons.most_common()]
    header = ["source", "kind", "rows in", "stored", "duplicates", *reason_names]
    body = [[t.name, t.kind, t.planned_rows, t.stored, t.duplicates, *(t.statuses.get(r, 0) for r in reason_names)]
            for t in tallies]
    body.append(["total", "", sum(t.planned_rows for t in tallies), sum(t.stored for t in tallies),
                 sum(t.duplicates for t in tallies), *(reasons[r] for r in reason_names)])
    cells = [header] + [[str(value) for value in line] for line in body]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = ["  ".join(value.ljust(w) if i < 2 else value.rjust(w) for i, (value, w) in enumerate(zip(line, widths)))
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, lines[1])
    return "\n".join(lines)
