"""Pieces shared by the readers of the DTU/Herlev, SIPaKMeD and Cx22 datasets.

These datasets carry a class label per image (Herlev, SIPaKMeD) and store images in class
folders, so their records and sample metadata add the class label to what the ISBI readers keep.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage as ndi

from cervi_ray.data.sample import ImageRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledRecord(ImageRecord):
    """An ImageRecord with the dataset's class label of the image."""

    label_class: str = ""  # for example "carcinoma_in_situ", or "" for datasets without classes


# Folders that archive tools add next to the data: hidden folders and macOS zip metadata.
def _is_archive_artefact(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def class_folders(path: Path, kind: str, layout: str) -> list[Path]:
    """Return the sorted subfolders of `path`, one per class, skipping hidden and __MACOSX folders."""
    folders = sorted(child for child in path.iterdir() if child.is_dir() and not _is_archive_artefact(child.name))
    if not folders:
        raise FileNotFoundError(
            f"Folder {path} contains no class folders. A {kind} source must contain {layout}."
        )
    return folders


def files_by_lower_name(folder: Path) -> dict[str, Path]:
    """Map the lower-case name of every file in `folder` to its path.

    The public datasets mix the case of extensions (Herlev ships NAME.BMP with NAME-d.bmp),
    so readers look files up by lower-case name.
    """
    return {child.name.lower(): child for child in folder.iterdir() if child.is_file()}


def reader_options(row: Mapping[str, Any]) -> dict[str, Any]:
    """Parse the row's reader_options JSON. Rows of older manifests have none and give {}."""
    text = row.get("reader_options", "")
    if text is None or text == "":
        return {}
    invalid = f"reader_options of {row.get('id')} must be a JSON object, got {text!r}. Rebuild the manifest."
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(invalid) from e
    if not isinstance(options, dict):
        raise ValueError(invalid)
    return options


def sample_meta(row: Mapping[str, Any]) -> dict[str, Any]:
    """Collect the Sample.meta of one manifest row, class label included."""
    return {
        "source": row["source"],
        "kind": row["kind"],
        "group": row["group"],
        "image_path": str(row["image_path"]),
        "mask_path": str(row["mask_path"]),
        "mask_index": int(row["mask_index"]),
        "label_class": str(row.get("label_class", "")),
    }


def label_instances(masks: np.ndarray) -> np.ndarray:
    """Turn (N, H, W) bool masks into an (H, W) int32 label image, where later masks win overlaps."""
    _, height, width = masks.shape
    labels = np.zeros((height, width), dtype=np.int32)
    for index, mask in enumerate(masks, start=1):
        labels[mask] = index
    return labels


def label_components(foreground: np.ndarray) -> np.ndarray:
    """Label the 4-connected components of an (H, W) bool mask as int32 instances."""
    labels, _ = ndi.label(foreground)
    return labels.astype(np.int32)
