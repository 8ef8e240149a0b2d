"""Pictures of a run: the student's masked predictions beside the teacher's targets, and training curves.

    python -m eva.visualize predictions --checkpoint RUN_DIR --train TRAIN_DIR --out FILE.png [--count 4]
    python -m eva.visualize curves RUN_DIR --out FILE.png

Predictions: one row per image of a train shard directory: the input (view 0 at the student's
size), the mask, a 3-component PCA colouring of the teacher's cached targets, and the same PCA
colouring of the student's predictions on the masked patches (visible patches show the teacher's
colours, faded). One PCA basis, fitted on the teacher's unit-normalised tokens, colours both, so
a patch the student predicts well has the teacher's colour. Masks are those of
`eva.evaluate.masked_feature_cosine` with the same seed.

Figures are drawn on matplotlib's Agg canvas without pyplot, so importing this module never
changes the caller's matplotlib backend.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from eva.checkpoints import load_mim_model
from eva.evaluate import (
    check_model_matches_targets, eval_mask_generator, fixed_mask, iter_target_samples, masked_predictions,
    resolve_device, student_normalisation,
)
from eva.mim import MIMModel
from eva.views import CLIP_MEAN, CLIP_STD

LOG_FILE = "log.jsonl"
THROUGHPUT_KEY = "img_per_s"  # eva.train.monitor's record field
MASK_TINT = np.array([0.1, 0.2, 0.9])
SMOOTH_FROM = 20  # logged points from which the loss panel adds a moving average
VISIBLE_FADE = 0.75  # how far visible patches are blended towards grey in the prediction panel


class TokenPCA:
    """A 3-component PCA of unit-normalised tokens, mapped to RGB in [0, 1].

    Each component is scaled by its 1st..99th percentile over the fitted tokens, so colours use
    the full range and a few outliers do not wash everything else out.
    """

    def __init__(self, tokens: np.ndarray):  # [T, D]
        unit = _unit(tokens)
        self.mean = unit.mean(axis=0)  # [D]
        _, _, vt = np.linalg.svd(unit - self.mean, full_matrices=False)
        self.components = vt[:3]  # [3, D]
        projected = (unit - self.mean) @ self.components.T  # [T, 3]
        self.low, self.high = np.percentile(projected, 1, axis=0), np.percentile(projected, 99, axis=0)

    def rgb(self, tokens: np.ndarray) -> np.ndarray:  # [..., D] -> [..., 3]
        projected = (_unit(tokens) - self.mean) @ self.components.T
        return np.clip((projected - self.low) / np.maximum(self.high - self.low, 1e-8), 0.0, 1.0)


def _unit(tokens: np.ndarray) -> np.ndarray:
    return tokens / np.maximum(np.linalg.norm(tokens, axis=-1, keepdims=True), 1e-8)


def _upsample(grid_values: np.ndarray, patch: int) -> np.ndarray:
    """[H, W, ...] per patch -> [H*patch, W*patch, ...] per pixel."""
    return grid_values.repeat(patch, axis=0).repeat(patch, axis=1)


@dataclass
class PredictionRow:
    """What one row of the predictions figure shows, as arrays (the figure is drawn from these)."""

    key: str
    pixels: np.ndarray  # [S, S, 3] in [0, 1]: view 0 at the student's input size
    overlay: np.ndarray  # [S, S, 3]: the view with masked patches tinted
    mask: np.ndarray  # [H, W] bool
    teacher_rgb: np.ndarray  # [H, W, 3]: PCA colours of the teacher's targets
    student_rgb: np.ndarray  # [H, W, 3]: PCA colours of predictions on masked patches, faded teacher elsewhere
    cosine: float  # mean cosine of this image's predictions and targets on masked patches


@torch.no_grad()
def prediction_rows(
    model: MIMModel, train_dir: Path, count: int = 4, mask_seed: int = 0, device: str | torch.device = "cpu",
    mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
) -> list[PredictionRow]:
    """The first `count` samples of `train_dir` under the masks of `masked_feature_cosine(.., mask_seed)`;
    `mean`/`std`: the student's input normalisation."""
    train_dir = Path(train_dir)
    device = resolve_device(device)
    check_model_matches_targets(model, train_dir)
    backbone = model.backbone
    grid, patch = backbone.grid_size, backbone.patch_size
    samples = list(iter_target_samples(train_dir, backbone.img_size, count))
    if not samples:
        raise ValueError(f"{train_dir}: no samples to draw")
    generator = eval_mask_generator(grid)
    masks = np.stack([fixed_mask(generator, mask_seed, i) for i in range(len(samples))])  # [B, H, W]
    was_training = model.training
    predictions = masked_predictions(model.eval().to(device), samples, masks, device, mean, std).numpy()  # [M, D]
    model.train(was_training)
    targets = np.stack([s.targets for s in samples])  # [B, N, D]
    pca = TokenPCA(targets.reshape(-1, targets.shape[-1]))

    rows, offset = [], 0
    for sample, mask in zip(samples, masks):
        flat_mask = mask.reshape(-1)
        row_predictions = predictions[offset : offset + int(flat_mask.sum())]  # [m, D]
        offset += len(row_predictions)
        cosine = F.cosine_similarity(torch.from_numpy(row_predictions), torch.from_numpy(sample.targets[flat_mask]), dim=-1)
        teacher_rgb = pca.rgb(sample.targets)  # [N, 3]
        student_rgb = teacher_rgb * (1 - VISIBLE_FADE) + 0.5 * VISIBLE_FADE
        student_rgb[flat_mask] = pca.rgb(row_predictions)
        pixels = np.asarray(sample.view, dtype=np.float32) / 255.0  # [S, S, 3]
        overlay = np.where(_upsample(mask, patch)[..., None], 0.35 * pixels + 0.65 * MASK_TINT, pixels)
        rows.append(PredictionRow(sample.key, pixels, overlay, mask, teacher_rgb.reshape(*grid, 3),
                                  student_rgb.reshape(*grid, 3), float(cosine.mean())))
    return rows


def plot_predictions(
    model: MIMModel,
    train_dir: Path,
    out: Path,
    count: int = 4,
    mask_seed: int = 0,
    device: str | torch.device = "cpu",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> Path:
    """Writes the predictions figure for the first `count` samples of `train_dir` to `out` (PNG)."""
    train_dir = Path(train_dir)
    rows = prediction_rows(model, train_dir, count, mask_seed, device, mean, std)
    patch = model.backbone.patch_size
    columns = ("input (view 0)", "mask", "teacher targets (PCA)", "student on masked (PCA)")
    fig = Figure(figsize=(2.4 * len(columns), 2.5 * len(rows)), dpi=110)
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    size = model.backbone.img_size
    extent = (-0.5, size - 0.5, size - 0.5, -0.5)  # every panel in input-pixel coordinates
    for index, (row, ax_row) in enumerate(zip(rows, axes)):
        panels = (row.pixels, row.overlay, row.teacher_rgb, row.student_rgb)
        mask_pixels = _upsample(row.mask, patch).astype(float)  # [S, S]
        for col, (ax, panel) in enumerate(zip(ax_row, panels)):
            ax.imshow(panel, interpolation="nearest", extent=extent)
            if col > 0:  # outline the masked region: a tint alone can vanish on images of the same hue
                ax.contour(mask_pixels, levels=[0.5], colors="white", linewidths=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if index == 0:
                ax.set_title(columns[col], fontsize=9)
        ax_row[0].set_ylabel(f"key {row.key}", fontsize=8)
        ax_row[1].set_xlabel(f"{int(row.mask.sum())}/{row.mask.size} patches masked", fontsize=8)
        ax_row[3].set_xlabel(f"mean cos {row.cosine:.3f}", fontsize=8)
    fig.suptitle(f"{train_dir.name}: student vs teacher on masked patches (mask seed {mask_seed})", fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(out))


def read_log(path: Path) -> list[dict]:
    """Training records of a run's log.jsonl (or the file itself), one per step, sorted by step.

    A resumed run logs the steps after its checkpoint again: the last record of a step wins. A
    final line without its newline is a write in progress and is skipped; any other bad line is an
    error naming the file and line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / LOG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"training log {path} does not exist")
    text = path.read_text()
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]
    by_step: dict[int, dict] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err})") from None
        if isinstance(record, dict) and "step" in record and "loss" in record:
            by_step[int(record["step"])] = record
    if not by_step:
        raise ValueError(f"{path}: no training records (JSON objects with \"step\" and \"loss\")")
    return [by_step[step] for step in sorted(by_step)]


def plot_curves(run: Path, out: Path) -> Path:
    """Writes loss, learning rate and throughput against step from a run's log.jsonl to `out` (PNG)."""
    run, out = Path(run), Path(out)
    records = read_log(run)
    steps = np.array([r["step"] for r in records])
    panels = [("loss", "loss (negative cosine)"), ("lr", "learning rate"), (THROUGHPUT_KEY, "images / s")]
    fig = Figure(figsize=(12, 3.4), dpi=110)
    axes = fig.subplots(1, len(panels))
    marker = "o" if len(records) <= 50 else None
    for ax, (key, title) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        present = [(s, r[key]) for s, r in zip(steps, records) if r.get(key) is not None]
        if not present:
            ax.text(0.5, 0.5, f"{key} not logged", ha="center", va="center", transform=ax.transAxes, fontsize=9)
            continue
        x, y = np.array([p[0] for p in present]), np.array([p[1] for p in present], dtype=float)
        if key == "loss" and len(y) >= SMOOTH_FROM:
            # step-to-step noise hides the trend: raw values faint, a moving average on top
            window = max(5, len(y) // 20)
            smooth = np.convolve(y, np.ones(window) / window, mode="valid")
            ax.plot(x, y, linewidth=0.8, alpha=0.35)
            ax.plot(x[window - 1 :], smooth, linewidth=1.6, color="C0", label=f"mean of {window}")
            ax.legend(fontsize=8)
        else:
            ax.plot(x, y, marker=marker, markersize=3, linewidth=1.2)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.suptitle(f"{run.name if run.is_dir() else run.parent.name}: {len(records)} logged steps, last step {steps[-1]}", fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def _save(fig: Figure, out: Path) -> Path:
    if out.suffix.lower() != ".png":
        raise ValueError(f"output file must end in .png, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eva.visualize", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    predictions = commands.add_parser("predictions", help="teacher targets vs student predictions on masked patches")
    predictions.add_argument("--checkpoint", type=Path, required=True, help="run directory or checkpoint directory")
    predictions.add_argument("--train", type=Path, required=True, help="train shard directory (cached targets)")
    predictions.add_argument("--out", type=Path, required=True, help="output FILE.png")
    predictions.add_argument("--count", type=int, default=4, help="number of images (rows)")
    predictions.add_argument("--mask-seed", type=int, default=0)
    predictions.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    curves = commands.add_parser("curves", help="loss, lr and throughput against step")
    curves.add_argument("run", type=Path, help="run directory (or its log.jsonl)")
    curves.add_argument("--out", type=Path, required=True, help="output FILE.png")
    args = parser.parse_args(argv)
    try:
        if args.command == "predictions":
            model, meta = load_mim_model(args.checkpoint)
            mean, std = student_normalisation(meta)
            out = plot_predictions(model, args.train, args.out, args.count, args.mask_seed, args.device, mean, std)
        else:
            out = plot_curves(args.run, args.out)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
