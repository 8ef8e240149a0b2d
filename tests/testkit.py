"""Helpers shared by tests, benchmarks-in-tests and fixtures: free ports, generated images, paths.

A plain module (not conftest.py), so `from testkit import ...` means the same file from every
test folder, whatever conftest.py files pytest has loaded.
"""
from __future__ import annotations

import io
import os
import socket
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# img2dataset imports albumentations, which otherwise asks PyPI for a newer version on import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_image(width: int = 96, height: int = 72, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A smooth random colour field: compresses like a photo, differs per seed."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(coarse, "RGB").resize((width, height), Image.BICUBIC)
    return image.convert(mode) if mode != "RGB" else image


def image_bytes(width: int = 96, height: int = 72, seed: int = 0, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    make_image(width, height, seed, mode).save(buffer, format=fmt)
    return buffer.getvalue()
