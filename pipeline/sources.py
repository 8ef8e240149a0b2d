"""SOURCES.yaml: the list of inputs of one image build (DESIGN.md, "SOURCES.yaml").

Everything a source can get wrong is caught here, before any work starts, with an error that
names the file, the source and the field.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

KIND_URLS = "urls"
KIND_FOLDER = "folder"
KINDS = (KIND_URLS, KIND_FOLDER)
LABEL_PARENT_DIR = "parent_dir"

_NAME_RE = re.compile(r"^[a-z0-9_-]+$")
_COMMON_FIELDS = {"name", "kind", "path", "limit", "expected_rows"}
_FIELDS = {
    KIND_URLS: _COMMON_FIELDS | {"url_column", "caption_column", "format"},
    KIND_FOLDER: _COMMON_FIELDS | {"label"},
}


class SourcesError(ValueError):
    """A SOURCES file that cannot be built; the message names the source and the field."""


@dataclass(frozen=True)
class SourceSpec:
    name: str
    kind: str
    path: str                        # as written in the SOURCES file (recorded in the config)
    root: str                        # resolved absolute path (relative paths: to the SOURCES file)
    url_column: str = "url"
    caption_column: str | None = None
    format: str | None = None        # URL list format; None: from the file names
    label: str | None = None         # folder sources: None or "parent_dir"
    limit: int | None = None
    expected_rows: int | None = None  # advisory: a warning when the plan differs

    def config(self) -> dict[str, Any]:
        """The fields that decide the output (the resolved root is left out: it moves with the checkout)."""
        record = asdict(self)
        del record["root"], record["expected_rows"]
        if self.kind == KIND_FOLDER:
            for field in ("url_column", "caption_column", "format"):
                del record[field]
        else:
            del record["label"]
        return record


def load_sources(sources_file: Path) -> list[SourceSpec]:
    """Parse and check a SOURCES file, including the columns of every URL list it names."""
    from pipeline.url_lists import check_url_source  # the list reader depends on SourceSpec

    sources_file = Path(sources_file)
    if not sources_file.is_file():
        raise SourcesError(f"{sources_file}: no such SOURCES file")
    try:
        document = yaml.safe_load(sources_file.read_text())
    except yaml.YAMLError as error:
        raise SourcesError(f"{sources_file}: not valid YAML ({error})") from error
    if not isinstance(document, dict) or not isinstance(document.get("sources"), list) or not document["sources"]:
        raise SourcesError(f"{sources_file}: expected a mapping with a non-empty list under 'sources'")
    unknown_top = set(document) - {"sources"}
    if unknown_top:
        raise SourcesError(f"{sources_file}: unknown top-level field(s) {sorted(unknown_top)}")
    specs: list[SourceSpec] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(document["sources"]):
        spec = _parse_entry(sources_file, index, entry)
        if spec.name in seen:
            raise SourcesError(
                f"{sources_file}: source {spec.name!r}: field 'name': duplicate name "
                f"(sources #{seen[spec.name] + 1} and #{index + 1})"
            )
        seen[spec.name] = index
        if spec.kind == KIND_URLS:
            check_url_source(sources_file, spec)
        specs.append(spec)
    return specs


def _parse_entry(sources_file: Path, index: int, entry: Any) -> SourceSpec:
    where = f"{sources_file}: source #{index + 1}"
    if not isinstance(entry, dict):
        raise SourcesError(f"{where}: expected a mapping, got {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SourcesError(f"{where}: field 'name': {name!r} is missing or not of the form [a-z0-9_-]+")
    where = f"{sources_file}: source {name!r}"

    def fail(field: str, problem: str) -> SourcesError:
        return SourcesError(f"{where}: field {field!r}: {problem}")

    kind = entry.get("kind")
    if kind not in KINDS:
        raise fail("kind", f"{kind!r} is not one of {list(KINDS)}")
    unknown = set(entry) - _FIELDS[kind]
    if unknown:
        field = sorted(unknown)[0]
        raise fail(field, f"unknown field for kind {kind!r} (known: {sorted(_FIELDS[kind])})")
    path = entry.get("path")
    if not isinstance(path, str) or not path:
        raise fail("path", "missing")
    root = Path(path).expanduser()
    if not root.is_absolute():
        root = sources_file.resolve().parent / root
    if not root.exists():
        raise fail("path", f"{root} does not exist")
    if kind == KIND_FOLDER and not root.is_dir():
        raise fail("path", f"{root} is not a directory (a folder source is an image tree)")
    limit = _optional_positive_int(entry, "limit", fail)
    expected = _optional_positive_int(entry, "expected_rows", fail)
    label = entry.get("label")
    if label not in (None, LABEL_PARENT_DIR):
        raise fail("label", f"{label!r}: the only label rule is {LABEL_PARENT_DIR!r}")
    url_column = entry.get("url_column", "url")
    caption_column = entry.get("caption_column")
    list_format = entry.get("format")
    for field, value, required in (("url_column", url_column, True), ("caption_column", caption_column, False),
                                   ("format", list_format, False)):
        if (required or value is not None) and (not isinstance(value, str) or not value):
            raise fail(field, f"{value!r} is not a column name" if field != "format" else f"{value!r} is not a format name")
    return SourceSpec(
        name=name, kind=kind, path=path, root=str(root.resolve()), url_column=url_column,
        caption_column=caption_column, format=list_format, label=label, limit=limit, expected_rows=expected,
    )


def _optional_positive_int(entry: dict, field: str, fail) -> int | None:
    value = entry.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(field, f"{value!r} is not a positive integer")
    return value
