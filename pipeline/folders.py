"""Folder sources: list a local image tree (IN-21K class folders, COCO/ADE20K/Objects365 folders).

Row order is the sorted relative paths (byte order of the file system names, so the plan does not
depend on the locale), which makes keys reproducible on any machine holding the same tree.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from pipeline.sources import SourcesError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def list_images(root: Path, source_name: str = "") -> list[bytes]:
    """Relative paths (file-system bytes, `/`-separated) of the image files under `root`, sorted.

    Every non-directory with an image extension is listed, broken links included: a file that
    cannot be read becomes an `unreadable_file` row instead of silently vanishing. Hidden files and
    folders (a leading dot: `.git`, macOS `._name.jpg` resource forks) are not inputs. Directory
    links are not followed (no cycles); an unreadable directory stops the plan, naming it.
    """
    def refuse(error: OSError) -> None:
        raise SourcesError(f"source {source_name!r}: field 'path': cannot list {error.filename} ({error.strerror})")

    root_bytes = os.fsencode(root)
    found: list[bytes] = []
    extensions = tuple(ext.encode() for ext in IMAGE_EXTENSIONS)
    for directory, subdirectories, files in os.walk(root_bytes, onerror=refuse, followlinks=False):
        subdirectories[:] = [d for d in subdirectories if not d.startswith(b".")]
        relative_dir = os.path.relpath(directory, root_bytes)
        for name in files:
            if not name.startswith(b".") and name.lower().endswith(extensions):
                relative = name if relative_dir == b"." else os.path.join(relative_dir, name)
                found.append(relative.replace(os.sep.encode(), b"/"))
    found.sort()
    return found


def display_path(relative: bytes) -> str:
    """The relative path as text for parquet and json (undecodable bytes shown as escapes)."""
    return relative.decode("utf-8", "backslashreplace")


def parent_label(relative: bytes) -> str | None:
    """The `parent_dir` label: the name of the folder holding the file (None at the top level)."""
    parent = PurePosixPath(display_path(relative)).parent.name
    return parent or None
