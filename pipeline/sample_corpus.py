"""A small offline corpus for the demo and tests, made from images that ship inside installed packages.

Pretraining images: the sample photos of scikit-image and scikit-learn, varied by random crops
and rescales. Labelled evaluation images: scikit-learn's handwritten digits rendered as RGB
images in class folders (label = parent folder, as `eva.evaluate` reads them). Nothing is
downloaded.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

_SKIMAGE_SKIP = {"lbpcascade_frontalface_opencv.xml", "lfw_subset.npy", "motorcycle_disp.npz"}


def package_photos() -> list[Path]:
    """Paths of the photos shipped with scikit-image and scikit-learn (sorted, deterministic)."""
    import skimage.data
    import sklearn.datasets

    folders = [Path(skimage.data.__file__).parent, Path(sklearn.datasets.__file__).parent / "images"]
    photos = []
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in {".png", ".jpg", ".gif", ".tif"} and path.name not in _SKIMAGE_SKIP:
                photos.append(path)
    if not photos:
        raise RuntimeError("no sample photos found in scikit-image / scikit-learn")
    return photos


def _load_rgb(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as image:
            image.seek(0)
            array = np.asarray(image)
            if array.dtype != np.uint8:  # 16-bit or float sample images: stretch to 8 bit
                array = array.astype(np.float64)
                array = (255 * (array - array.min()) / max(float(np.ptp(array)), 1e-9)).astype(np.uint8)
                return Image.fromarray(array).convert("RGB")
            return image.convert("RGB")
    except OSError:
        return None


def write_pretraining_images(out_dir: Path, count: int, seed: int = 0, min_side: int = 72,
                             max_side: int = 200) -> list[Path]:
    """`count` JPEGs, each a random crop of a random package photo, rescaled; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = [image for image in map(_load_rgb, package_photos()) if image is not None]
    written = []
    for index in range(count):
        photo = photos[index % len(photos)]
        width, height = photo.size
        crop_w = int(width * rng.uniform(0.35, 1.0))
        crop_h = int(height * rng.uniform(0.35, 1.0))
        left = int(rng.integers(0, width - crop_w + 1))
        top = int(rng.integers(0, height - crop_h + 1))
        crop = photo.crop((left, top, left + crop_w, top + crop_h))
        scale = rng.uniform(min_side, max_side) / min(crop.size)
        crop = crop.resize((max(8, round(crop_w * scale)), max(8, round(crop_h * scale))), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = ImageOps.mirror(crop)
        path = out_dir / f"img_{index:05d}.jpg"
        crop.save(path, quality=92)
        written.append(path)
    return written


def write_digit_folders(out_dir: Path, size: int = 64, seed: int = 0, test_fraction: float = 0.4) -> tuple[Path, Path]:
    """scikit-learn's 1,797 8x8 digits as `size`px RGB PNGs in `train/<digit>/` and `test/<digit>/`."""
    import sklearn.datasets

    csv = Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
    with gzip.open(csv, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",")
    pixels, labels = table[:, :64].reshape(-1, 8, 8), table[:, 64].astype(int)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(len(labels) * test_fraction)
    splits = {"test": order[:n_test], "train": order[n_test:]}
    out_dir = Path(out_dir)
    for split, indices in splits.items():
        for index in indices:
            folder = out_dir / split / str(labels[index])
            folder.mkdir(parents=True, exist_ok=True)
            gray = (255 - pixels[index] * 255 / 16).astype(np.uint8)  # dark ink on white
            image = Image.fromarray(gray).resize((size, size), Image.BICUBIC).convert("RGB")
            image.save(folder / f"{index:04d}.png")
    return out_dir / "train", out_dir / "test"
