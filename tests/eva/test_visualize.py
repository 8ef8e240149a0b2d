"""Pictures: the predictions figure (arrays and PNG) and training curves from log.jsonl."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from testkit import make_image
from eva.evaluate import eval_mask_generator, fixed_mask, masked_feature_cosine
from eva.mim import create_mim_model
from eva.visualize import TokenPCA, main, plot_curves, plot_predictions, prediction_rows, read_log
from test_evaluate import TARGET_DIM, decoded_view0, oracle_targets, sample_views, save_checkpoint, write_train_shards


@pytest.fixture(scope="module")
def oracle_run(tmp_path_factory) -> dict:
    """A run whose student predicts the targets of its train shards exactly under mask seed 0."""
    root = tmp_path_factory.mktemp("visualize")
    torch.manual_seed(0)
    student = create_mim_model("tiny", TARGET_DIM).eval()
    images = [make_image(96, 80, seed=i) for i in range(4)]
    views = sample_views(images)
    train_dir = write_train_shards(root / "train", images, oracle_targets(student, images, views, mask_seed=0), views)
    save_checkpoint(root / "run", student, step=4)
    return {"root": root, "student": student, "images": images, "views": views, "train": train_dir, "run": root / "run"}


def test_token_pca_colours_span_the_range_and_ignore_scale():
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(200, 16)) * np.linspace(3, 0.1, 16)  # a few dominant directions
    pca = TokenPCA(tokens)
    rgb = pca.rgb(tokens)
    assert rgb.shape == (200, 3) and rgb.min() == 0.0 and rgb.max() == 1.0
    assert np.allclose(pca.rgb(tokens * 5.0), rgb)  # cosine targets: only directions matter
    assert np.abs(np.corrcoef(rgb.T) - np.eye(3)).max() < 0.3  # three different components


def test_prediction_rows_show_input_mask_teacher_and_student(oracle_run):
    rows = prediction_rows(oracle_run["student"], oracle_run["train"], count=3, mask_seed=0)
    generator = eval_mask_generator((8, 8))
    assert [r.key for r in rows] == ["0000000", "0000001", "0000002"]
    for index, row in enumerate(rows):
        view = np.asarray(decoded_view0(oracle_run["images"][index], oracle_run["views"][index]), dtype=np.float32) / 255
        assert row.pixels.shape == (64, 64, 3) and np.allclose(row.pixels, view)
        mask = fixed_mask(generator, 0, index)
        assert np.array_equal(row.mask, mask)
        # the overlay changes exactly the pixels of masked patches
        changed = np.any(row.overlay != row.pixels, axis=-1)
        assert np.array_equal(changed, mask.repeat(8, axis=0).repeat(8, axis=1))
        # a perfect student has the teacher's colours on masked patches; visible ones are faded
        assert row.cosine > 0.999
        assert np.abs(row.student_rgb[mask] - row.teacher_rgb[mask]).max() < 0.02
        faded = row.student_rgb[~mask]
        assert np.allclose(faded, 0.25 * row.teacher_rgb[~mask] + 0.375)
    # the figure's masks are the metric's: the same per-image cosine
    assert np.mean([r.cosine for r in rows]) == pytest.approx(
        masked_feature_cosine(oracle_run["student"], oracle_run["train"], 0, max_samples=3)["cosine"], abs=1e-3)

    other = prediction_rows(oracle_run["student"], oracle_run["train"], count=2, mask_seed=1)
    assert other[0].cosine < 0.9 and not np.array_equal(other[0].mask, rows[0].mask)


def test_predictions_png_and_cli(oracle_run):
    out = oracle_run["root"] / "figures" / "predictions.png"
    plot_predictions(oracle_run["student"], oracle_run["train"], out, count=4)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 800 and image.height > 4 * 200
    cli_out = oracle_run["root"] / "cli_predictions.png"
    assert main(["predictions", "--checkpoint", str(oracle_run["run"]), "--train", str(oracle_run["train"]),
                 "--out", str(cli_out), "--count", "2"]) == 0
    with Image.open(cli_out) as image:
        assert image.format == "PNG" and image.height < 0.7 * Image.open(out).height  # 2 rows, not 4
    with pytest.raises(SystemExit) as exit_info:
        main(["predictions", "--checkpoint", str(oracle_run["root"] / "nope"), "--train", str(oracle_run["train"]),
              "--out", str(cli_out)])
    assert exit_info.value.code == 2
    with pytest.raises(ValueError, match="must end in .png"):
        plot_predictions(oracle_run["student"], oracle_run["train"], oracle_run["root"] / "x.jpg")


def write_log(path: Path, records: list[dict], tail: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def test_read_log_keeps_the_last_record_of_each_step(tmp_path):
    records = [{"step": s, "loss": -s / 10, "lr": 1e-3 * s, "img_per_s": 100 + s} for s in range(1, 6)]
    resumed = [{"step": 4, "loss": -0.9, "lr": 4e-3, "img_per_s": 50}, {"step": 6, "loss": -0.95, "lr": 5e-3}]
    log = write_log(tmp_path / "run" / "log.jsonl", records + [{"event": "checkpoint", "step": 3}] + resumed,
                    tail='{"step": 7, "lo')  # a write in progress
    read = read_log(tmp_path / "run")
    assert [r["step"] for r in read] == [1, 2, 3, 4, 5, 6]
    assert read[3]["loss"] == -0.9 and read[2]["loss"] == -0.3
    log.write_text(log.read_text() + "ss\": 1}\nnot json\n")
    with pytest.raises(ValueError, match=r"log.jsonl:10: not JSON"):
        read_log(log)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_log(tmp_path / "elsewhere")
    write_log(tmp_path / "empty" / "log.jsonl", [{"event": "start"}])
    with pytest.raises(ValueError, match="no training records"):
        read_log(tmp_path / "empty")


def test_curves_png_and_cli(tmp_path):
    steps = range(0, 200, 5)
    records = [{"step": s, "loss": -0.2 - 0.6 * (1 - np.exp(-s / 60)), "lr": 1e-3 * min(1, s / 40) * (0.5 + 0.5 * np.cos(np.pi * s / 200)),
                "img_per_s": 250 + 20 * np.sin(s / 10)} for s in steps]
    write_log(tmp_path / "run" / "log.jsonl", records)
    out = plot_curves(tmp_path / "run", tmp_path / "curves.png")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 1000 and image.height > 300
    # throughput missing: the panel says so instead of failing
    write_log(tmp_path / "bare" / "log.jsonl", [{"step": s, "loss": 0.0, "lr": 0.1} for s in range(3)])
    assert main(["curves", str(tmp_path / "bare"), "--out", str(tmp_path / "bare.png")]) == 0
    assert Image.open(tmp_path / "bare.png").format == "PNG"
    with pytest.raises(SystemExit) as exit_info:
        main(["curves", str(tmp_path / "missing"), "--out", str(tmp_path / "m.png")])
    assert exit_info.value.code == 2
