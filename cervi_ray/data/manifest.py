"""Manifests: one table row per image, enough on its own to load the sample.

A manifest is built from a list of sources (name, reader kind, path), saved as Parquet and
read back by training and evaluation jobs. Paths in it are absolute.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from cervi_ray.data import readers_cx22, readers_folder, readers_herlev, readers_isbi, readers_sipakmed
from cervi_ray.data.labels import ANNOTATIONS
from cervi_ray.data.sample import ImageRecord, Sample

logger = logging.getLogger(__name__)

COLUMNS = (
    "id",
    "source",
    "kind",
    "image_path",
    "mask_path",
    "mask_index",
    "group",
    "split",
    "annotation",
    "height",
    "width",
    "value_map",
    "label_class",
    "reader_options",
)
# Columns added after the first manifests were written, with the value that older manifests
# get on reading.
COLUMN_DEFAULTS = {
    "label_class": "",  # the dataset's class of the image (Herlev, SIPaKMeD), or "" for other kinds
    "reader_options": "",  # JSON of the kind's options (colour_map, mat_variables), or "" for kinds without any
}
SPLITS = ("train", "val", "test")
SOURCE_KEYS = (
    "name", "kind", "path", "split", "group_pattern", "value_map", "annotation", "colour_map", "mat_variables"
)

# Listers take the source folder, and those of _KINDS_WITH_READER_OPTIONS the options too.
_LISTERS: dict[str, Callable[..., list[ImageRecord]]] = {
    "isbi2015": readers_isbi.list_isbi2015,
    "isbi2014_train45": readers_isbi.list_isbi2014_train45,
    "isbi2014_test90": readers_isbi.list_isbi2014_test90,
    "isbi2014_edf_real": readers_isbi.list_isbi2014_edf_real,
    "dtu_herlev": readers_herlev.list_herlev,
    "sipakmed": readers_sipakmed.list_sipakmed,
    "cx22": readers_cx22.list_cx22,
}
_LOADERS: dict[str, Callable[[Mapping[str, Any]], Sample]] = {
    "isbi2015": readers_isbi.load_isbi2015,
    "isbi2014_train45": readers_isbi.load_isbi2014_train45,
    "isbi2014_test90": readers_isbi.load_isbi2014_test90,
    "isbi2014_edf_real": readers_isbi.load_isbi2014_edf_real,
    "folder": readers_folder.load_folder,
    "dtu_herlev": readers_herlev.load_herlev,
    "sipakmed": readers_sipakmed.load_sipakmed,
    "cx22": readers_cx22.load_cx22,
}
# Annotation of the fixed-layout kinds. Folder sources choose theirs.
_KIND_ANNOTATIONS = {
    "isbi2015": "full",
    "isbi2014_train45": "full",
    "isbi2014_test90": "full",
    "isbi2014_edf_real": "nucleus",
    "dtu_herlev": "full",
    "sipakmed": "full",
    "cx22": "full",
}
# Kind-specific source options: the kinds each applies to.
_OPTION_KINDS = {
    "group_pattern": ("folder",),
    "value_map": ("folder",),
    "colour_map": ("dtu_herlev",),
    "mat_variables": ("cx22",),
}
_KINDS_WITH_READER_OPTIONS = ("cx22",)
KINDS = tuple(_LOADERS)
_LAYOUTS = {
    **readers_isbi.LAYOUTS,
    "folder": readers_folder.LAYOUT,
    "dtu_herlev": readers_herlev.LAYOUT,
    "sipakmed": readers_sipakmed.LAYOUT,
    "cx22": readers_cx22.LAYOUT,
}
_SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _check_kind(kind: str) -> None:
    if kind not in _LOADERS:
        raise ValueError(f"Unknown source kind {kind!r}. Supported kinds: {', '.join(KINDS)}")


def _check_option_kinds(kind: str, options: Mapping[str, Any]) -> None:
    for option, value in options.items():
        allowed = _OPTION_KINDS[option]
        if value is not None and kind not in allowed:
            kinds = " or ".join(repr(k) for k in allowed)
            raise ValueError(f"{option} applies only to kind {kinds}, got {option}={value!r} for kind {kind!r}")


def _reader_options(kind: str, colour_map: Any, mat_variables: Any) -> dict[str, Any]:
    """Validate the reader options of the kind and fill in defaults. Kinds without options give {}."""
    if kind == "dtu_herlev":
        return readers_herlev.resolve_options(colour_map)
    if kind == "cx22":
        return readers_cx22.resolve_options(mat_variables)
    return {}


def _resolve_options(
    kind: str, group_pattern: str | None, value_map: Any, annotation: str | None
) -> tuple[str, str]:
    """Check the annotation and folder options and return (annotation, value_map JSON or "")."""
    if kind != "folder":
        fixed = _KIND_ANNOTATIONS[kind]
        if annotation is not None and annotation != fixed:
            raise ValueError(f"Kind {kind!r} is annotated {fixed!r}, got annotation={annotation!r}. Omit annotation.")
        return fixed, ""

    annotation = "full" if annotation is None else annotation
    if annotation not in ANNOTATIONS:
        raise ValueError(f"annotation must be one of {ANNOTATIONS}, got {annotation!r}")
    return annotation, readers_folder.value_map_to_json(value_map)


def list_source(
    kind: str,
    path: str | Path,
    source: str | None = None,
    group_pattern: str | None = None,
    value_map: Mapping[int, int] | str | None = None,
    annotation: str | None = None,
    colour_map: Mapping[Any, int] | None = None,
    mat_variables: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """List the images of one source as manifest rows with split "" (not yet assigned).

    Reads no pixels, only image headers, except for kind "cx22", whose images sit in a
    MATLAB file. `source` (default: the kind) prefixes ids and groups, so groups of different
    sources never collide. group_pattern, value_map and annotation apply to kind "folder",
    because the other kinds have a fixed layout and annotation. colour_map (the segmentation
    colours) applies to kind "dtu_herlev" and mat_variables (the MATLAB variable names) to
    kind "cx22". The manifest stores them, defaults filled in, as JSON in reader_options.
    """
    _check_kind(kind)
    source = kind if source is None else source
    if not _SOURCE_NAME.fullmatch(source):
        raise ValueError(f"Source name must contain only letters, digits, '_', '.' and '-', got {source!r}")
    _check_option_kinds(
        kind,
        {
            "group_pattern": group_pattern,
            "value_map": value_map,
            "colour_map": colour_map,
            "mat_variables": mat_variables,
        },
    )
    annotation, value_map_json = _resolve_options(kind, group_pattern, value_map, annotation)
    reader_options = _reader_options(kind, colour_map, mat_variables)

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Source folder {path} not found. A {kind} source must contain {_LAYOUTS[kind]}.")
    if kind == "folder":
        records = readers_folder.list_folder(path, group_pattern)
    elif kind in _KINDS_WITH_READER_OPTIONS:
        records = _LISTERS[kind](path, reader_options)
    else:
        records = _LISTERS[kind](path)
    if not records:
        raise ValueError(f"Source folder {path} contains no images. A {kind} source must contain {_LAYOUTS[kind]}.")

    rows = [
        {
            "id": f"{source}/{record.stem}",
            "source": source,
            "kind": kind,
            "image_path": str(record.image_path.resolve()),
            "mask_path": str(record.mask_path.resolve()),
            "mask_index": record.mask_index,
            "group": f"{source}/{record.group}",
            "split": "",
            "annotation": annotation,
            "height": record.height,
            "width": record.width,
            "value_map": value_map_json,
            "label_class": getattr(record, "label_class", ""),
            "reader_options": json.dumps(reader_options, sort_keys=True) if reader_options else "",
        }
        for record in records
    ]
    logger.info("Listed %d images of source %s (%s) in %s", len(rows), source, kind, path)
    return _typed(pd.DataFrame(rows, columns=list(COLUMNS)))


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    for column in ("mask_index", "height", "width"):
        df[column] = df[column].astype("int64")
    for column in set(COLUMNS) - {"mask_index", "height", "width"}:
        df[column] = df[column].astype(str)
    return df


def _check_duplicate_ids(df: pd.DataFrame, where: str) -> None:
    duplicated = df.loc[df["id"].duplicated(), "id"].unique().tolist()
    if duplicated:
        raise ValueError(
            f"{where} has {len(duplicated)} duplicate ids, e.g. {duplicated[:5]}. Give each source a "
            f"distinct name and each image within a source a distinct stem."
        )


def build_manifest(sources: Sequence[Mapping[str, Any]], root: str | Path) -> pd.DataFrame:
    """List every source and concatenate the rows.

    Each source is a dict with the keys name, kind and path (relative to `root` or absolute).
    Optional keys are group_pattern, value_map, annotation, colour_map, mat_variables and
    split. Split "auto" (the default) leaves the rows to splits.py, and "train", "val" or
    "test" pins every row of the source.
    """
    if not sources:
        raise ValueError("sources must list at least one source")
    root = Path(root)
    names: set[str] = set()
    tables = []
    for position, spec in enumerate(sources):
        unknown = sorted(set(spec) - set(SOURCE_KEYS))
        missing = [key for key in ("name", "kind", "path") if key not in spec]
        if unknown or missing:
            raise ValueError(
                f"Source {position} ({spec.get('name', 'unnamed')}) has unknown keys {unknown} or lacks "
                f"required keys {missing}. Allowed keys: {', '.join(SOURCE_KEYS)}"
            )
        name = spec["name"]
        if name in names:
            raise ValueError(f"Source name {name!r} appears twice. Give each source a distinct name.")
        names.add(name)

        split = spec.get("split", "auto")
        if split != "auto" and split not in SPLITS:
            raise ValueError(f"Source {name!r}: split must be 'auto' or one of {SPLITS}, got {split!r}")

        table = list_source(
            spec["kind"],
            root / spec["path"],  # an absolute path replaces root
            source=name,
            group_pattern=spec.get("group_pattern"),
            value_map=spec.get("value_map"),
            annotation=spec.get("annotation"),
            colour_map=spec.get("colour_map"),
            mat_variables=spec.get("mat_variables"),
        )
        table["split"] = "" if split == "auto" else split
        tables.append(table)

    manifest = pd.concat(tables, ignore_index=True)
    _check_duplicate_ids(manifest, "The manifest")
    return manifest


def write_manifest(df: pd.DataFrame, path: str | Path) -> None:
    """Write a manifest as Parquet, creating parent folders."""
    df = _with_default_columns(df)
    _check_columns(df, "The manifest to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(path, index=False)
    logger.debug("Wrote manifest of %d rows to %s", len(df), path)


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest written by write_manifest and check its columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Manifest {path} not found. Build one with build_manifest and write_manifest.")
    df = _with_default_columns(pd.read_parquet(path))
    _check_columns(df, f"Manifest {path}")
    _check_duplicate_ids(df, f"Manifest {path}")
    return _typed(df.reset_index(drop=True))


def _with_default_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Add the columns of COLUMN_DEFAULTS that `df` lacks (manifests written before they existed)."""
    missing = {column: value for column, value in COLUMN_DEFAULTS.items() if column not in df.columns}
    return df.assign(**missing) if missing else df


def _check_columns(df: pd.DataFrame, table_name: str) -> None:
    missing = [column for column in COLUMNS if column not in df.columns]
    if missing:
        raise ValueError(f"{table_name} lacks the columns {missing}. Rebuild it with build_manifest.")


def load_sample(row: Mapping[str, Any]) -> Sample:
    """Load the sample described by one manifest row, with the reader of row["kind"]."""
    kind = row["kind"]
    _check_kind(kind)
    return _LOADERS[kind](row)
