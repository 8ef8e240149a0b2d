"""Evaluate representations: frozen-feature k-NN and linear probe, and EVA's masked-feature cosine.

    python -m eva.evaluate --checkpoint RUN_DIR|CKPT_DIR|FILE.safetensors --train DATA --test DATA [--protocol knn linear]
    python -m eva.evaluate --random-init tiny --train DATA --test DATA
    python -m eva.evaluate --teacher configs/teachers/tiny.json --teacher-weights none --train DATA --test DATA
    python -m eva.evaluate --checkpoint RUN_DIR --protocol masked --masked-data TRAIN_SHARD_DIR

DATA is an image folder (label = the image's parent folder name) or an image/train shard directory
built from one (label = "label" in {key}.json). The student, a random-init backbone and the teacher
all go through one feature extractor (`extract_features`), with the same eval preprocessing: resize
the shorter side to the model's input size, centre crop, the model's own mean/std.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from eva.checkpoints import CHECKPOINTS, META_FILE, load_backbone, load_mim_model
from eva.masking import BlockMaskGenerator
from eva.mim import MIMModel
from eva.views import CLIP_MEAN, CLIP_STD, render_view, to_normalized_tensor
from eva.vit import VisionTransformer, create_vit
from shards import contract
from shards.reader import completed_shards, iter_tar, load_manifest, load_npy, read_duplicates

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
PROTOCOLS = ("knn", "linear", "masked")
POOLS = ("mean", "cls")


# ---------------------------------------------------------------- labelled data


class LabelledImages(torch.utils.data.Dataset):
    """Map-style dataset of (RGB PIL image, class index); `classes` are sorted class names.

    Passing the training set's `classes` to the test set puts both in one label space; a test class
    the training set lacks is an error, since neither protocol could ever predict it.
    """

    def __init__(self, source: Path, names: list[str], classes: Sequence[str] | None):
        if not names:
            raise ValueError(f"{source}: no labelled images found")
        self.source = Path(source)
        self.classes = sorted(set(names)) if classes is None else list(classes)
        index = {name: i for i, name in enumerate(self.classes)}
        unknown = sorted(set(names) - index.keys())
        if unknown:
            raise ValueError(f"{source}: classes {unknown[:10]} are not among the training classes ({len(self.classes)})")
        self.labels = np.array([index[name] for name in names], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return self.load_image(i), int(self.labels[i])

    def load_image(self, i: int) -> Image.Image:
        raise NotImplementedError


class ImageFolderData(LabelledImages):
    """ROOT/<class>/.../<image>: every image under ROOT, labelled by its parent folder's name."""

    def __init__(self, root: Path, classes: Sequence[str] | None = None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        paths = sorted(
            p for p in root.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
        )
        loose = [p.name for p in paths if p.parent == root]
        if loose:
            raise ValueError(f"{root}: images {loose[:5]} lie directly in the root; expected ROOT/<class>/<image>")
        self.paths = paths
        super().__init__(root, [p.parent.name for p in paths], classes)

    def load_image(self, i: int) -> Image.Image:
        path = self.paths[i]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except OSError as err:
            raise ValueError(f"cannot decode image {path}: {err}") from None


class ImageShardData(LabelledImages):
    """An image or train shard directory whose {key}.json hold a "label"; duplicates are skipped.

    Indexing reads tar headers and the small json members once; images are read on demand by
    offset, so large evaluation sets never sit in memory and DataLoader workers can share the work.
    """

    def __init__(self, directory: Path, classes: Sequence[str] | None = None):
        directory = Path(directory)
        load_manifest(directory)  # a finished directory of our schema, or a clear error
        duplicates = read_duplicates(directory)
        self.locations: list[tuple[Path, str, int, int]] = []  # (tar, key, offset, size)
        names = []
        for shard_id in completed_shards(directory):
            tar_path = contract.tar_path(directory, shard_id)
            images, labels = {}, {}
            with tarfile.open(tar_path, "r") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    key, ext = contract.split_member_name(info.name)
                    if ext == contract.EXT_IMAGE:
                        images[key] = (info.offset_data, info.size)
                    elif ext == contract.EXT_META:
                        labels[key] = json.loads(tar.extractfile(info).read()).get("label")
            for key, (offset, size) in images.items():
                if key in duplicates:
                    continue
                if labels.get(key) is None:
                    raise ValueError(f"{tar_path}: sample {key} has no \"label\" in {key}.{contract.EXT_META}")
                self.locations.append((tar_path, key, offset, size))
                names.append(str(labels[key]))
        super().__init__(directory, names, classes)

    def load_image(self, i: int) -> Image.Image:
        tar_path, key, offset, size = self.locations[i]
        with open(tar_path, "rb") as handle:
            handle.seek(offset)
            data = handle.read(size)
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")
        except OSError as err:
            raise ValueError(f"{tar_path}: cannot decode {key}.{contract.EXT_IMAGE}: {err}") from None


def load_labelled(path: Path, classes: Sequence[str] | None = None) -> LabelledImages:
    """A shard directory (it has manifest.json) or an image folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"labelled data {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"labelled data {path} is not a directory (expected an image folder or a shard directory)")
    if (path / contract.MANIFEST_FILE).exists():
        return ImageShardData(path, classes)
    return ImageFolderData(path, classes)


# ---------------------------------------------------------------- encoders


def eval_transform(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Resize the shorter side to `size` (bicubic), centre crop `size`x`size`, normalise: [3, S, S]."""
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return to_normalized_tensor(resized.crop((left, top, left + size, top + size)), mean, std)


class FeatureEncoder(nn.Module):
    """One image-level feature per image from normalised [B, 3, S, S] input.

    `input_size`, `mean`, `std` define the eval preprocessing; `description` says what the features
    are (written into the results, so numbers are never separated from what produced them).
    """

    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: dict


class BackboneFeatures(FeatureEncoder):
    """A ViT's cls token ("cls") or the mean of its patch tokens ("mean"), after the final norm."""

    def __init__(self, backbone: VisionTransformer, pool: str, description: dict,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.backbone, self.pool = backbone, pool
        self.input_size, self.mean, self.std = backbone.img_size, tuple(mean), tuple(std)
        features = "cls_token" if pool == "cls" else "mean_patch_tokens"
        self.description = {**description, "features": features, "input_size": self.input_size, "dim": backbone.embed_dim}

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.backbone.forward_features(images)  # [B, 1+N, D]
        return tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1)  # [B, D]


class TeacherFeatures(FeatureEncoder):
    """The mean of the teacher's target tokens: what the student learns to predict, pooled."""

    def __init__(self, teacher, description: dict):
        super().__init__()
        self.teacher = teacher
        self.input_size, self.mean, self.std = teacher.input_size, tuple(teacher.mean), tuple(teacher.std)
        self.description = {**description, "features": "mean_teacher_targets", "input_size": self.input_size, "dim": teacher.dim}

    def forward(self, images: Tensor) -> Tensor:
        return self.teacher.forward(images).float().mean(dim=1)  # [B, N, D] -> [B, D]


def student_normalisation(meta: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the run trained its student with: the resolved config in the checkpoint's meta
    (`data.mean`, `data.std`), else OpenAI CLIP's, the trainer's default."""
    data = (meta.get("config") or {}).get("data") or {}
    return tuple(data.get("mean", CLIP_MEAN)), tuple(data.get("std", CLIP_STD))


def checkpoint_encoder(path: Path, pool: str = "mean") -> BackboneFeatures:
    """The backbone of a run directory (latest checkpoint), a checkpoint directory or an exported .safetensors.

    An exported file records no normalisation: it is evaluated with CLIP mean/std.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return BackboneFeatures(load_backbone(path), pool, {"kind": "checkpoint", "source": str(path)})
    model, meta = load_mim_model(path)
    description = {"kind": "checkpoint", "source": str(path), "variant": meta.get("variant"), "step": meta.get("step")}
    return BackboneFeatures(model.backbone, pool, description, *student_normalisation(meta))


def random_init_encoder(variant: str, pool: str = "mean", seed: int = 0) -> BackboneFeatures:
    """The named variant at EVA's init, drawn from `seed` (the global torch RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = create_vit(variant)
    return BackboneFeatures(backbone, pool, {"kind": "random_init", "variant": variant, "seed": seed})


def teacher_encoder(model: str, weights: str = "none", device: str | torch.device = "cpu", seed: int = 0) -> TeacherFeatures:
    from eva.teacher import load_teacher  # open_clip is only imported when a teacher is asked for

    teacher = load_teacher(model, weights=weights, device=str(resolve_device(device)), seed=seed)
    return TeacherFeatures(teacher, {"kind": "teacher", "model": model, "weights": weights})


# ---------------------------------------------------------------- features and protocols


class _Preprocessed(torch.utils.data.Dataset):
    def __init__(self, dataset: LabelledImages, encoder: FeatureEncoder):
        self.dataset, self.size, self.mean, self.std = dataset, encoder.input_size, encoder.mean, encoder.std

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image, label = self.dataset[i]
        return eval_transform(image, self.size, self.mean, self.std), label


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def extract_features(
    encoder: FeatureEncoder,
    dataset: LabelledImages,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """Frozen features of every image: ([n, F] float32 on CPU, [n] int64 labels), in dataset order."""
    device = resolve_device(device)
    encoder.eval().to(device)
    loader = torch.utils.data.DataLoader(
        _Preprocessed(dataset, encoder), batch_size=batch_size, shuffle=False,
        num_workers=num_workers, pin_memory=device.type == "cuda",
    )
    feats, labels = [], []
    for images, batch_labels in tqdm(loader, desc=f"features {dataset.source.name}", unit="batch", disable=not progress):
        feats.append(encoder(images.to(device, non_blocking=True)).float().cpu())  # [B, F]
        labels.append(batch_labels)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_accuracy(
    train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor,
    k: int = 20, temperature: float = 0.07, chunk: int = 1024,
) -> float:
    """Top-1 of a cosine k-NN whose neighbours vote with weight exp(cos / temperature) (DINO's protocol)."""
    _check_features(train_f, train_y, test_f, test_y)
    k = min(k, len(train_f))
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    device = train_f.device
    train_n, train_y = F.normalize(train_f.float(), dim=1), train_y.to(device)
    correct = 0
    for start in range(0, len(test_f), chunk):
        query = F.normalize(test_f[start : start + chunk].float().to(device), dim=1)  # [b, F]
        sims, idx = (query @ train_n.T).topk(k, dim=1)  # [b, k]
        votes = torch.zeros(len(query), num_classes, device=device)
        votes.scatter_add_(1, train_y[idx], (sims / temperature).exp())  # [b, C]
        correct += int((votes.argmax(dim=1).cpu() == test_y[start : start + chunk].cpu()).sum())
    return correct / len(test_f)


def linear_probe_accuracy(
    train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor,
    steps: int = 300, weight_decay: float = 1e-4,
) -> float:
    """Top-1 of multinomial logistic regression on L2-normalised, then train-standardised features.

    Full-batch L-BFGS from zero weights on a convex loss: no seed, no order, the same result on
    every run on a given device. Standardising keeps the small directions of near-collinear
    features (a random-init ViT's) within reach of the weight decay.
    """
    _check_features(train_f, train_y, test_f, test_y)
    device = train_f.device
    train_x, test_x = F.normalize(train_f.float(), dim=1), F.normalize(test_f.float().to(device), dim=1)
    mean, std = train_x.mean(dim=0), train_x.std(dim=0, correction=0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    train_y = train_y.to(device)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    weight = torch.zeros(train_x.shape[1], num_classes, device=device, requires_grad=True)
    bias = torch.zeros(num_classes, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-9, tolerance_change=1e-12,
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predictions = (test_x @ weight + bias).argmax(dim=1).cpu()
    return float((predictions == test_y.cpu()).float().mean())


def _check_features(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor) -> None:
    if train_f.ndim != 2 or test_f.ndim != 2 or train_f.shape[1] != test_f.shape[1]:
        raise ValueError(f"features must be [n, F] with one F, got {list(train_f.shape)} and {list(test_f.shape)}")
    if len(train_f) != len(train_y) or len(test_f) != len(test_y):
        raise ValueError(f"features and labels differ in length: {len(train_f)}/{len(train_y)}, {len(test_f)}/{len(test_y)}")
    if len(train_f) == 0 or len(test_f) == 0:
        raise ValueError("k-NN and linear probe need at least one train and one test image")


def evaluate(
    encoder: FeatureEncoder,
    train: Path | LabelledImages,
    test: Path | LabelledImages,
    protocols: Sequence[str] = ("knn", "linear"),
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    k: int = 20,
    temperature: float = 0.07,
    linear_steps: int = 300,
    num_workers: int = 0,
    progress: bool = True,
) -> dict:
    """Features of train and test once, then each protocol; returns the results as a JSON-able dict."""
    unknown = sorted(set(protocols) - {"knn", "linear"})
    if unknown:
        raise ValueError(f"evaluate runs knn and linear, not {unknown} (masked: masked_feature_cosine)")
    train_set = train if isinstance(train, LabelledImages) else load_labelled(train)
    test_set = test if isinstance(test, LabelledImages) else load_labelled(test, train_set.classes)
    train_f, train_y = extract_features(encoder, train_set, batch_size, device, num_workers, progress)
    test_f, test_y = extract_features(encoder, test_set, batch_size, device, num_workers, progress)
    results = {
        "model": encoder.description,
        "train": {"path": str(train_set.source), "images": len(train_set), "classes": len(train_set.classes)},
        "test": {"path": str(test_set.source), "images": len(test_set), "classes": len(set(test_set.labels.tolist()))},
    }
    if "knn" in protocols:
        results["knn"] = {"top1": knn_accuracy(train_f, train_y, test_f, test_y, k, temperature),
                          "k": min(k, len(train_f)), "temperature": temperature}
    if "linear" in protocols:
        results["linear"] = {"top1": linear_probe_accuracy(train_f, train_y, test_f, test_y, linear_steps),
                             "steps": linear_steps, "solver": "lbfgs"}
    return results


# ---------------------------------------------------------------- masked-feature cosine


@dataclass
class TargetSample:
    key: str
    view: Image.Image  # view 0 rendered at the student's input size
    targets: np.ndarray  # [N, D] float32, the teacher's cached targets for view 0


def eval_mask_generator(grid: tuple[int, int]) -> BlockMaskGenerator:
    """BEiT block masking scaled to the grid: ~40% of patches, blocks of >= max(4, N/16) patches.

    At 16x16 that is 102 patches in blocks of >= 16, EVA's setting; at the tiny 8x8 grid 26 in >= 4.
    """
    num_patches = grid[0] * grid[1]
    return BlockMaskGenerator(grid=tuple(grid), num_masking_patches=round(0.4 * num_patches),
                              min_num_patches=max(4, num_patches // 16))


def fixed_mask(generator: BlockMaskGenerator, seed: int, index: int) -> np.ndarray:
    """The mask of sample `index`: the same for every checkpoint evaluated with the same seed."""
    return generator(np.random.default_rng(np.random.SeedSequence([seed, index])))


def targets_grid(manifest: dict, directory: Path) -> tuple[tuple[int, int], int]:
    """(patch grid, feature dim) a train shard directory's manifest records."""
    targets = manifest.get("targets")
    if manifest.get("stage") != contract.STAGE_TARGETS or not isinstance(targets, dict):
        raise ValueError(f"{directory} is not a train shard directory: stage {manifest.get('stage')!r}, expected {contract.STAGE_TARGETS!r} with a \"targets\" entry")
    grid = targets["grid"]
    grid = (int(grid), int(grid)) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    return grid, int(targets["dim"])


def check_model_matches_targets(model: MIMModel, directory: Path) -> dict:
    """The directory's manifest, once its patch grid and feature dim match the model's."""
    manifest = load_manifest(directory)
    grid, dim = targets_grid(manifest, directory)
    if tuple(model.backbone.grid_size) != grid:
        raise ValueError(f"{directory}: targets have patch grid {list(grid)}, the model has {list(model.backbone.grid_size)}")
    if model.target_dim != dim:
        raise ValueError(f"{directory}: targets have dim {dim}, the model's head predicts {model.target_dim}")
    return manifest


def iter_target_samples(directory: Path, size: int, max_samples: int | None = None) -> Iterator[TargetSample]:
    """View 0 and its cached targets of each sample of a train shard directory, in shard order."""
    count = 0
    for shard_id in completed_shards(directory):
        tar_path = contract.tar_path(directory, shard_id)
        for key, members in iter_tar(tar_path):
            if max_samples is not None and count >= max_samples:
                return
            missing = [ext for ext in (contract.EXT_IMAGE, contract.EXT_META, contract.EXT_TARGETS) if ext not in members]
            if missing:
                raise ValueError(f"{tar_path}: sample {key} lacks {missing}")
            views = json.loads(members[contract.EXT_META]).get("views")
            if not views:
                raise ValueError(f"{tar_path}: sample {key} has no \"views\" in {key}.{contract.EXT_META}")
            with Image.open(io.BytesIO(members[contract.EXT_IMAGE])) as image:
                view = render_view(image.convert("RGB"), views[0], size)
            yield TargetSample(key, view, _view0_targets(tar_path, key, members))
            count += 1


def _view0_targets(tar_path: Path, key: str, members: dict[str, bytes]) -> np.ndarray:
    targets = load_npy(members[contract.EXT_TARGETS])  # [K, N, D]
    if targets.ndim != 3:
        raise ValueError(f"{tar_path}: {key}.{contract.EXT_TARGETS} has shape {list(targets.shape)}, expected [K, N, D]")
    view0 = targets[0].astype(np.float32)  # [N, D]
    if targets.dtype == np.int8:
        if contract.EXT_TARGET_SCALES not in members:
            raise ValueError(f"{tar_path}: int8 targets of {key} come without {key}.{contract.EXT_TARGET_SCALES}")
        view0 *= load_npy(members[contract.EXT_TARGET_SCALES])[0].astype(np.float32)[:, None]  # [N, 1]
    return view0


@torch.no_grad()
def masked_predictions(
    model: MIMModel, samples: Sequence[TargetSample], masks: np.ndarray, device: torch.device,
    mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
) -> Tensor:
    """The model's predictions on the masked patches of `samples`: [M, D] float32 on CPU, tensor[mask] order."""
    images = torch.stack([to_normalized_tensor(s.view, mean, std) for s in samples]).to(device)
    mask = torch.from_numpy(masks.reshape(len(samples), -1)).to(device)  # [B, N]
    return model(images, mask).rows().float().cpu()


@torch.no_grad()
def masked_feature_cosine(
    model: MIMModel,
    train_dir: Path,
    mask_seed: int = 0,
    max_samples: int = 256,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = False,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> dict:
    """Mean cosine between the model's predictions and the cached targets on masked patches.

    View 0 of the first `max_samples` samples, each under the fixed mask `fixed_mask(.., mask_seed,
    index)`, normalised with the student's `mean`/`std`. The baseline predicts one vector for every
    patch: the mean of the evaluated samples' view-0 target tokens. Both means run over masked
    tokens, as EVA's loss does. The model is left on `device`, in the train/eval mode it came in.
    """
    train_dir = Path(train_dir)
    device = resolve_device(device)
    check_model_matches_targets(model, train_dir)
    was_training = model.training
    model.eval().to(device)
    generator = eval_mask_generator(model.backbone.grid_size)
    cos_sum, masked, samples_seen = 0.0, 0, 0
    target_sum = torch.zeros(model.target_dim, dtype=torch.float64)  # over all tokens: the mean target
    unit_masked_sum = torch.zeros(model.target_dim, dtype=torch.float64)  # sum of unit masked targets

    def run(batch: list[TargetSample], first_index: int) -> None:
        nonlocal cos_sum, masked
        masks = np.stack([fixed_mask(generator, mask_seed, first_index + i) for i in range(len(batch))])
        targets = torch.from_numpy(np.stack([s.targets for s in batch]))  # [B, N, D]
        target_masked = targets[torch.from_numpy(masks.reshape(len(batch), -1))]  # [M, D]
        predictions = masked_predictions(model, batch, masks, device, mean, std)  # [M, D]
        cos_sum += float(F.cosine_similarity(predictions, target_masked, dim=-1).double().sum())
        masked += len(target_masked)
        target_sum.add_(targets.double().sum(dim=(0, 1)))
        unit_masked_sum.add_(F.normalize(target_masked.double(), dim=-1).sum(dim=0))

    batch: list[TargetSample] = []
    bar = tqdm(total=max_samples, desc=f"masked cosine {train_dir.name}", unit="img", disable=not progress)
    for sample in iter_target_samples(train_dir, model.backbone.img_size, max_samples):
        batch.append(sample)
        if len(batch) == batch_size:
            run(batch, samples_seen)
            samples_seen += len(batch)
            bar.update(len(batch))
            batch = []
    if batch:
        run(batch, samples_seen)
        samples_seen += len(batch)
        bar.update(len(batch))
    bar.close()
    model.train(was_training)
    if masked == 0:
        raise ValueError(f"{train_dir}: no samples to evaluate")
    # mean over masked tokens of cos(mean, t) = unit(mean) . (sum of unit(t)) / M
    baseline = float(F.normalize(target_sum, dim=0) @ unit_masked_sum) / masked
    return {
        "cosine": cos_sum / masked,
        "mean_target_baseline": baseline,
        "samples": samples_seen,
        "masked_patches": masked,
        "mask_seed": mask_seed,
        "mask": repr(generator),
    }


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Every complete checkpoint of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {root} does not exist")
    return sorted(p for p in root.glob("step_*") if (p / META_FILE).is_file())


def masked_cosine_over_training(
    run_dir: Path, train_dir: Path, mask_seed: int = 0, max_samples: int = 256,
    batch_size: int = 32, device: str | torch.device = "cpu",
) -> list[dict]:
    """`masked_feature_cosine` of every checkpoint of a run, each with its "step", oldest first."""
    results = []
    for ckpt in checkpoint_dirs(run_dir):
        model, meta = load_mim_model(ckpt)
        mean, std = student_normalisation(meta)
        result = masked_feature_cosine(model, train_dir, mask_seed, max_samples, batch_size, device, mean=mean, std=std)
        results.append({"step": meta["step"], "checkpoint": str(ckpt), **result})
    return results


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eva.evaluate", description=__doc__.split("\n\n")[0])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", type=Path, help="run directory, checkpoint directory or exported .safetensors")
    model.add_argument("--random-init", metavar="VARIANT", help="a named ViT variant at random init (a baseline)")
    model.add_argument("--teacher", metavar="MODEL", help="open_clip model name or config JSON; features = mean of its target tokens")
    parser.add_argument("--teacher-weights", default="none", help="open_clip pretrained tag, checkpoint path, or none")
    parser.add_argument("--train", type=Path, help="labelled training data: image folder or shard directory")
    parser.add_argument("--test", type=Path, help="labelled test data: image folder or shard directory")
    parser.add_argument("--protocol", nargs="+", choices=PROTOCOLS, default=["knn", "linear"])
    parser.add_argument("--features", choices=POOLS, default="mean", help="backbone features: mean of patch tokens or cls token")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--linear-steps", type=int, default=300)
    parser.add_argument("--masked-data", type=Path, help="held-out train shard directory for --protocol masked")
    parser.add_argument("--mask-seed", type=int, default=0)
    parser.add_argument("--max-samples", type=int, default=256, help="samples for --protocol masked")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="init seed of --random-init and of a weightless teacher")
    parser.add_argument("--out", type=Path, default=Path("eval.json"), help="results JSON (default ./eval.json)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    probes = [p for p in args.protocol if p != "masked"]
    if probes and (args.train is None or args.test is None):
        parser.error(f"--protocol {' '.join(probes)} needs --train and --test")
    if "masked" in args.protocol and (args.checkpoint is None or args.masked_data is None):
        parser.error("--protocol masked needs --checkpoint (a run or checkpoint directory) and --masked-data")
    if "masked" in args.protocol and args.checkpoint.suffix == ".safetensors":  # before any probe runs
        parser.error(f"--protocol masked needs the MIM head: {args.checkpoint} holds only the backbone "
                     "(give a run or checkpoint directory)")
    device = resolve_device(args.device)
    try:
        results: dict = {}
        if probes:
            if args.checkpoint is not None:
                encoder = checkpoint_encoder(args.checkpoint, args.features)
            elif args.random_init is not None:
                encoder = random_init_encoder(args.random_init, args.features, args.seed)
            else:
                encoder = teacher_encoder(args.teacher, args.teacher_weights, device, args.seed)
            results = evaluate(encoder, args.train, args.test, probes, args.batch_size, device, args.k,
                               args.temperature, args.linear_steps, args.workers, not args.no_progress)
        if "masked" in args.protocol:
            model, meta = load_mim_model(args.checkpoint)
            results["masked"] = {"step": meta.get("step"), **masked_feature_cosine(
                model, args.masked_data, args.mask_seed, args.max_samples, args.batch_size, device,
                not args.no_progress, *student_normalisation(meta))}
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
