"""The shortened demo end to end: corpus -> build_shards -> cache_targets -> eva.train -> report."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from shards.verify import verify

REPO = Path(__file__).resolve().parents[2]


def test_quick_demo_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "jobs/demo.py", "--quick", "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    for directory in ("images", "heldout_images", "train", "heldout_train"):
        assert verify(out / directory) == [], directory
    facts = json.loads((out / "report.json").read_text())
    build = facts["stages"][0]["summary"]
    assert build["rows"] == 150 and build["stored"] == 150  # both source kinds, nothing lost
    assert [s["name"] for s in facts["stages"]][-1] == "eva.train"

    masked = facts["masked_cosine"]
    assert masked[0]["step"] == 0 and masked[-1]["step"] == 30
    # the student learned something about its targets: above its own random init
    assert masked[-1]["cosine"] > masked[0]["cosine"]
    assert {row["name"] for row in facts["evaluation"]} == {
        "pretrained student", "same architecture, random init", "teacher (random init)"}
    for row in facts["evaluation"]:
        assert 0.0 <= row["knn"]["top1"] <= 1.0 and 0.0 <= row["linear"]["top1"] <= 1.0
        assert row["test"]["images"] > 0

    report = (out / "report.md").read_text()
    for heading in ("## Stages", "## Masked-feature cosine", "## Frozen-feature evaluation", "## Pictures", "random init"):
        assert heading in report
    for picture in ("predictions.png", "curves.png"):
        with Image.open(out / picture) as image:
            assert image.format == "PNG" and image.size[0] > 400
