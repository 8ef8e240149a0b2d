"""Views: the crop-and-flip that the teacher and the student must both see (DESIGN.md, "Views").

A view is `{"box": [left, top, width, height], "flip": bool}` in integer pixels of the stored
image. The target stage draws K views per image and caches the teacher's output on each; the
trainer renders the very same pixels for the student. Both sides call `render_view`, so there
is one definition of "the pixels of a view".
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

# OpenAI CLIP normalisation, used by EVA-01 for both teacher and student.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ViewPolicy:
    """RandomResizedCrop parameters plus a flip probability (EVA-01: 0.2-1.0, 3/4-4/3, 0.5)."""

    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "ViewPolicy":
        return cls(scale=tuple(values["scale"]), ratio=tuple(values["ratio"]), flip_p=float(values["flip_p"]))


def view_rng(seed: int, key: str, index: int) -> np.random.Generator:
    """Generator for view `index` of sample `key`: a rerun draws the same views."""
    return np.random.default_rng(np.random.SeedSequence([seed, int(key), index]))


def sample_view(rng: np.random.Generator, width: int, height: int, policy: ViewPolicy) -> dict:
    """One RandomResizedCrop box (torchvision's algorithm) and a flip bit."""
    area = width * height
    log_ratio = (math.log(policy.ratio[0]), math.log(policy.ratio[1]))
    box = None
    for _ in range(10):
        target_area = area * rng.uniform(policy.scale[0], policy.scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            box = [left, top, w, h]
            break
    if box is None:  # fall back to a centre crop clamped to the ratio range
        in_ratio = width / height
        if in_ratio < policy.ratio[0]:
            w, h = width, int(round(width / policy.ratio[0]))
        elif in_ratio > policy.ratio[1]:
            w, h = int(round(height * policy.ratio[1])), height
        else:
            w, h = width, height
        box = [(width - w) // 2, (height - h) // 2, w, h]
    flip = bool(rng.random() < policy.flip_p)
    return {"box": box, "flip": flip}


def draw_views(key: str, seed: int, count: int, width: int, height: int, policy: ViewPolicy) -> list[dict]:
    return [sample_view(view_rng(seed, key, i), width, height, policy) for i in range(count)]


def render_view(image: Image.Image, view: dict, size: int) -> Image.Image:
    """Crop the box, resize to `size`x`size` with PIL bicubic, then mirror if `flip`."""
    left, top, width, height = view["box"]
    crop = image.crop((left, top, left + width, top + height)).resize((size, size), Image.BICUBIC)
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if view["flip"] else crop


def to_normalized_tensor(image: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """uint8 RGB image -> float32 [3, H, W], normalised with `mean`/`std`."""
    array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())  # [H, W, 3]
    tensor = array.permute(2, 0, 1).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return tensor.sub_(mean_t).div_(std_t)


def normalize_pixels(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> float32 [B, 3, S, S]: `to_normalized_tensor` batched, op for op (same
    values), on the images' device. The target stage and the trainer both normalise through it."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return images.float().div_(255.0).sub_(mean_t).div_(std_t)
