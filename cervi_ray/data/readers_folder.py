"""Reader for a plain folder pair: images/<stem>.<ext> and masks/<stem>.<ext>.

Mask pixel values are mapped to the project's labels through a value map, so masks saved
as {0, 128, 255} or {0, 1} work without conversion.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage as ndi

from cervi_ray.data.labels import ANNOTATIONS, CLASS_NAMES, CYTOPLASM, NUCLEUS
from cervi_ray.data.sample import ImageRecord, Sample, check_mask_size, load_image, load_label_image, read_image_size

logger = logging.getLogger(__name__)

LAYOUT = "images/<stem>.<ext> and masks/<stem>.<ext> (ext: png, jpg, jpeg, tif, tiff, bmp)"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DEFAULT_VALUE_MAP = {0: 0, 1: 1, 2: 2}


# Value maps.


def parse_value_map(value_map: Mapping[Any, Any] | str | None) -> dict[int, int]:
    """Validate a map from stored mask values to labels, given as a dict, a JSON string or None.

    None and "" give DEFAULT_VALUE_MAP. JSON object keys are strings, so keys are converted
    to int. Labels must be valid label values (0, 1 or 2).
    """
    if value_map is None or (isinstance(value_map, str) and value_map == ""):
        return dict(DEFAULT_VALUE_MAP)
    if isinstance(value_map, str):
        try:
            value_map = json.loads(value_map)
        except json.JSONDecodeError as e:
            raise ValueError(f"value_map must be a JSON object such as '{{\"0\": 0, \"255\": 2}}', got {value_map!r}") from e
    if not isinstance(value_map, Mapping) or not value_map:
        raise ValueError(f"value_map must be a non-empty mapping from mask value to label, got {value_map!r}")

    parsed: dict[int, int] = {}
    for stored, label in value_map.items():
        try:
            stored_int = int(stored)
            label_int = int(label)
        except (TypeError, ValueError) as e:
            raise ValueError(f"value_map keys and values must be integers, got {stored!r}: {label!r}") from e
        if stored_int < 0:
            raise ValueError(f"value_map keys must be mask values >= 0, got {stored_int}")
        if not 0 <= label_int < len(CLASS_NAMES):
            raise ValueError(
                f"value_map labels must be in 0..{len(CLASS_NAMES) - 1} ({', '.join(CLASS_NAMES)}), "
                f"got {stored_int}: {label_int}"
            )
        parsed[stored_int] = label_int
    return parsed


def value_map_to_json(value_map: Mapping[Any, Any] | str | None) -> str:
    """Serialize a value map as a JSON object with sorted keys, for a manifest column."""
    parsed = parse_value_map(value_map)
    return json.dumps({str(stored): parsed[stored] for stored in sorted(parsed)})


def apply_value_map(stored: np.ndarray, value_map: Mapping[int, int], mask_path: str | Path) -> np.ndarray:
    """Map stored mask values to labels, raising ValueError for any value missing from the map."""
    if stored.dtype.kind == "f" and not np.isfinite(stored).all():
        raise ValueError(
            f"Mask {mask_path} contains NaN or infinite values in {int((~np.isfinite(stored)).sum())} "
            f"pixels. Masks hold integer label values: save it as an 8-bit or 16-bit integer image."
        )
    values = np.unique(stored)
    unexpected = [v.item() for v in values if v.item() not in value_map]
    if unexpected:
        listed = ", ".join(str(v) for v in unexpected[:10])
        raise ValueError(
            f"Mask {mask_path} contains values not in the value map: {listed}"
            f"{' ...' if len(unexpected) > 10 else ''} (value map {dict(value_map)}). "
            f"Add them to value_map or fix the mask."
        )
    labels = np.zeros(stored.shape, dtype=np.uint8)
    for value in values:
        labels[stored == value] = value_map[value.item()]
    return labels


# Listing.


def _compile_group_pattern(group_pattern: str | None) -> re.Pattern[str] | None:
    if group_pattern is None:
        return None
    try:
        pattern = re.compile(group_pattern)
    except re.error as e:
        raise ValueError(f"group_pattern {group_pattern!r} is not a valid regular expression: {e}") from e
    if pattern.groups < 1:
        raise ValueError(
            f"group_pattern {group_pattern!r} must contain a capture group whose match is the "
            f"group, for example r'^(patient\\d+)_'."
        )
    return pattern


def group_of(stem: str, pattern: re.Pattern[str] | None) -> str:
    """Return the first capture group of `pattern` searched in `stem`, or the stem itself."""
    if pattern is None:
        return stem
    match = pattern.search(stem)
    if match is None or not match.group(1):
        raise ValueError(
            f"Image stem {stem!r} does not match group_pattern {pattern.pattern!r} (or its first "
            f"group is empty). Fix the pattern so every image name yields a group."
        )
    return match.group(1)


def _files_by_stem(folder: Path, file_role: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    skipped = []
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append(path.name)
            continue
        if path.stem in found:
            raise ValueError(
                f"Two {file_role} files share the stem {path.stem!r}: {found[path.stem]} and {path}. "
                f"Keep one of them."
            )
        found[path.stem] = path
    if skipped:
        logger.warning("Skipped %d files in %s without an image extension, e.g. %s", len(skipped), folder, skipped[:3])
    return found


def list_folder(path: Path, group_pattern: str | None = None) -> list[ImageRecord]:
    """List images/<stem>.<ext> paired with masks/<stem>.<ext>, raising for an image without mask."""
    path = Path(path)
    for sub in ("images", "masks"):
        if not (path / sub).is_dir():
            raise FileNotFoundError(f"Folder {path / sub} not found. A folder source must contain {LAYOUT}.")
    pattern = _compile_group_pattern(group_pattern)

    images = _files_by_stem(path / "images", "image")
    masks = _files_by_stem(path / "masks", "mask")
    records = []
    for stem, image_path in images.items():
        if stem not in masks:
            raise ValueError(
                f"Image {image_path} has no mask: expected {path / 'masks' / stem}.<ext> with ext "
                f"one of {', '.join(e[1:] for e in IMAGE_EXTENSIONS)}. Add the mask or remove the image."
            )
        height, width = read_image_size(image_path)
        records.append(
            ImageRecord(
                stem=stem,
                image_path=image_path,
                mask_path=masks[stem],
                height=height,
                width=width,
                group=group_of(stem, pattern),
            )
        )

    orphans = sorted(set(masks) - set(images))
    if orphans:
        logger.warning("Ignored %d masks in %s without an image, e.g. %s", len(orphans), path / "masks", orphans[:3])
    return records


# Loading.


def load_folder(row: Mapping[str, Any]) -> Sample:
    """Load one image and its mask, mapping mask values through the row's value_map."""
    image_path = Path(row["image_path"])
    mask_path = Path(row["mask_path"])
    annotation = row["annotation"]
    if annotation not in ANNOTATIONS:
        raise ValueError(f"annotation must be one of {ANNOTATIONS}, got {annotation!r} for {row['id']}")

    image = load_image(image_path)
    stored = load_label_image(mask_path)
    check_mask_size(image, image_path, stored, mask_path)
    mask = apply_value_map(stored, parse_value_map(row.get("value_map")), mask_path)
    if annotation == "nucleus" and np.any(mask == CYTOPLASM):
        raise ValueError(
            f"Mask {mask_path} maps pixels to cytoplasm ({CYTOPLASM}) but the source is annotated "
            f"'nucleus'. Map nucleus values to {NUCLEUS} in value_map, e.g. {{0: 0, 255: {NUCLEUS}}}."
        )

    nucleus_instances, _ = ndi.label(mask == NUCLEUS)  # 4-connected components
    return Sample(
        id=str(row["id"]),
        image=image,
        mask=mask,
        annotation=annotation,
        cell_instances=None,  # semantic masks carry no cell instances
        nucleus_instances=nucleus_instances.astype(np.int32),
        meta={
            "source": row["source"],
            "kind": row["kind"],
            "group": row["group"],
            "image_path": str(image_path),
            "mask_path": str(mask_path),
            "mask_index": int(row["mask_index"]),
        },
    )
