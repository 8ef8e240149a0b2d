"""img2dataset's URL-list reader, imported without img2dataset's side effects.

Importing img2dataset imports albumentations (for its resizer), whose import asks PyPI for a newer
version over the network unless NO_ALBUMENTATIONS_UPDATE is set: a build must send no traffic
except its own fetches. The import is heavy (OpenCV, webdataset, torch), so only the driver, which
cuts the lists, imports this module; shard workers never do.
"""
from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from img2dataset.reader import Reader  # noqa: E402

__all__ = ["Reader"]
