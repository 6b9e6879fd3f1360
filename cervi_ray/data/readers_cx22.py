"""Reader for Cx22: cervical cytology images with cytoplasm and nucleus instance labels in MATLAB files.

Sources:
- The dataset repository https://github.com/LGQ330/Cx22 (README at commit 010285c). Each label
  archive Cx22-Pair, Cx22-Multi-Train or Cx22-Multi-Test unpacks to cyto/cyto_clumps.mat,
  cyto/cyto_ins.mat, cyto/cyto_ins_bbox.mat, nuc/nuc_clumps.mat, nuc/nuc_ins.mat,
  nuc/nuc_ins_bbox.mat, generator/ImageDataGenerator.m (with ImageDataNames.mat,
  ROIs_W_H.mat and ROIs_x_y.mat), CellNum.mat and OverlapRatio.mat. The images are not in
  the archives: ImageDataGenerator.m crops them from the separately downloaded CCEDD source
  images and saves generator/ImageDataSet.mat, which "records the images corresponding to
  the labels". Terms: non-commercial research and educational use only.
- The paper's abstract (Liu et al., "Cx22: A new publicly available dataset for deep
  learning-based segmentation of cervical cytology images", Computers in Biology and
  Medicine 150:106194, 2022): 14,946 cell instances in 1,320 images.

Point a source at one unpacked archive that also contains generator/ImageDataSet.mat. This
reader uses the instance files only, because the clump labels are unions of instances.

Assumed where the README is silent, taken from third-party code that reads the real files
(zeeynepkaratas/cervical-morphometry-conformal: src/data_prep/load_cx22.py at commit ebed420,
and results/tables/exp5_cx22_compatibility_summary.json at commit 297d152, the output of its
probe of the three label archives):
- The variable names are ImageDataSet, cyto_ins and nuc_ins (the source option
  mat_variables overrides them).
- Each is an N x 1 cell array whose entry i belongs to image i (N = 820, 400 and 100 in
  Cx22-Pair, Cx22-Multi-Train and Cx22-Multi-Test). An image entry is an H x W x 3 uint8
  array. A label entry is a cell array of H x W masks, one per instance (512 x 512, uint8
  values 0 and 1 in the probe). An H x W label image or an H x W x N stack of masks is read too.
- A cytoplasm instance covers its whole cell, nucleus included.
- The label files are MATLAB v7.3 (HDF5) files. The probe never had an ImageDataSet.mat, so
  its format depends on the save call in ImageDataGenerator.m (not read here).

The MATLAB files are read by cervi_ray.data.matlab, in v5 and v7.3 formats.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cervi_ray.data.matlab import (
    entry_count, format_entry, is_matlab_v73, load_variable, open_v73, read_entry, v73_entry,
    v73_entry_count, v73_size, v73_variable,
)
from cervi_ray.data.readers_isbi import semantic_mask
from cervi_ray.data.readers_public import label_instances, reader_options, sample_meta
from cervi_ray.data.sample import ImageRecord, Sample, check_binary_mask, check_mask_size

logger = logging.getLogger(__name__)

KIND = "cx22"
FILES = {
    "images": "generator/ImageDataSet.mat",
    "cells": "cyto/cyto_ins.mat",
    "nuclei": "nuc/nuc_ins.mat",
}
LAYOUT = (
    f"{FILES['cells']}, {FILES['nuclei']} and {FILES['images']} (written by the dataset's "
    f"generator/ImageDataGenerator.m from the CCEDD source images)"
)
DEFAULT_MAT_VARIABLES = {"images": "ImageDataSet", "cells": "cyto_ins", "nuclei": "nuc_ins"}



# Options.


def resolve_options(mat_variables: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return the reader options stored in the manifest: the variable names, defaults filled in."""
    names = dict(DEFAULT_MAT_VARIABLES)
    if mat_variables is None:
        return {"mat_variables": names}
    if not isinstance(mat_variables, Mapping):
        raise ValueError(f"mat_variables must be a mapping such as {DEFAULT_MAT_VARIABLES}, got {mat_variables!r}")
    unknown = sorted(set(mat_variables) - set(DEFAULT_MAT_VARIABLES))
    if unknown:
        raise ValueError(
            f"mat_variables keys must be among {sorted(DEFAULT_MAT_VARIABLES)}, got {unknown}. "
            f"Each key names the variable of one file: {FILES}."
        )
    for role, name in mat_variables.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"mat_variables[{role!r}] must be a MATLAB variable name, got {name!r}")
        names[role] = name
    return {"mat_variables": names}


def _variable_names(row: Mapping[str, Any]) -> dict[str, str]:
    return resolve_options(reader_options(row).get("mat_variables"))["mat_variables"]


# Image sizes.


def _image_sizes(path: Path, name: str) -> list[tuple[int, int]]:
    """Return the (H, W) of every image entry of variable `name`."""
    if is_matlab_v73(path):
        return _v73_image_sizes(path, name)
    images = load_variable(str(path.resolve()), name)
    return [_image_entry(entry, format_entry(path, name, index)).shape[:2] for index, entry in enumerate(images)]



def _v73_image_sizes(path: Path, name: str) -> list[tuple[int, int]]:
    """Return the (H, W) of every image entry from the dataset shapes, without reading pixels."""
    sizes = []
    with open_v73(path) as file:
        variable = v73_variable(file, path, name)
        for index in range(v73_entry_count(variable)):
            where = format_entry(path, name, index)
            dataset = v73_entry(file, variable, index, where)
            size = v73_size(dataset)
            _check_image_layout(size, dataset.dtype, where)
            sizes.append((size[0], size[1]))
    return sizes



# Entries.


def _check_image_layout(shape: tuple[int, ...], dtype: np.dtype, where: str) -> None:
    """Raise ValueError unless an image entry of this shape and dtype is an H x W x 3 or H x W uint8 image."""
    if dtype != np.uint8 or len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] != 3):
        raise ValueError(
            f"{where} must be an H x W x 3 or H x W uint8 image, got shape {tuple(shape)} and dtype "
            f"{dtype}. Check mat_variables['images'] and that the file was written by "
            f"ImageDataGenerator.m."
        )


def _image_entry(entry: Any, where: str) -> np.ndarray:
    """Check one image entry and return it as an (H, W, 3) uint8 array."""
    image = np.asarray(entry)
    _check_image_layout(image.shape, image.dtype, where)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3)
    return np.ascontiguousarray(image)


def _instance_masks(entry: Any, where: str, image: np.ndarray, image_where: str) -> np.ndarray:
    """Return one label entry as (N, H, W) bool instance masks."""
    height, width = image.shape[:2]
    value = np.asarray(entry)

    if value.dtype == object:
        # A cell array of H x W masks. MATLAB's empty [] entries contain no instance.
        masks = []
        for index, element in enumerate(value.reshape(-1)):
            mask = np.asarray(element)
            if mask.size == 0:
                continue
            element_where = f"{where}, instance {index + 1}"
            check_mask_size(image, image_where, mask, element_where)
            masks.append(check_binary_mask(mask, element_where))
        return np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)

    if value.ndim == 2 and value.size > 0:
        check_mask_size(image, image_where, value, where)
        # A label image: each positive value is one instance (a binary mask gives one).
        ids = [v for v in np.unique(value) if v > 0]
        return np.stack([value == v for v in ids]) if ids else np.zeros((0, height, width), dtype=bool)

    if value.ndim == 3:
        check_mask_size(image, image_where, value, where)
        # (H, W, N) -> (N, H, W)
        return np.stack([check_binary_mask(value[:, :, k], where) for k in range(value.shape[2])])

    raise ValueError(
        f"{where} must be a cell array of H x W masks, an H x W label image or an H x W x N stack of "
        f"masks, got shape {value.shape} and dtype {value.dtype}. Check mat_variables."
    )


# Listing and loading.


def _paths(root: Path) -> dict[str, Path]:
    return {role: root / relative for role, relative in FILES.items()}


def list_cx22(path: Path, options: Mapping[str, Any]) -> list[ImageRecord]:
    """List the entries of ImageDataSet.mat, with mask_index the entry index in every file.

    Reads each image's size. A v5-format ImageDataSet.mat is loaded whole for this and kept cached
    for loading, while a v7.3 file gives the sizes from its dataset shapes without reading pixels.
    """
    path = Path(path)
    names = resolve_options(options.get("mat_variables"))["mat_variables"]
    paths = _paths(path)

    counts = {role: entry_count(paths[role], names[role]) for role in FILES}
    if len(set(counts.values())) != 1:
        listed = ", ".join(f"{paths[role]} ({names[role]}): {counts[role]}" for role in FILES)
        raise ValueError(
            f"Cx22 files must hold one entry per image, got different entry counts: {listed}. Use the "
            f"ImageDataSet.mat generated for this label archive."
        )

    records = []
    for index, (height, width) in enumerate(_image_sizes(paths["images"], names["images"])):
        stem = f"{index + 1:04d}"  # 1-based like MATLAB, zero-padded so ids sort in entry order
        records.append(
            ImageRecord(
                stem=stem,
                image_path=paths["images"],
                mask_path=paths["cells"],
                height=height,
                width=width,
                # NOTE: several Cx22 images can be crops of one CCEDD source image (named in
                # ImageDataNames.mat, a MATLAB string array that this reader does not decode), so
                # such crops may land in different splits.
                group=stem,
                mask_index=index,
            )
        )
    return records


def _nuclei_path(cells_path: Path) -> Path:
    # cells_path is <root>/cyto/cyto_ins.mat, so the nuclei file is <root>/nuc/nuc_ins.mat.
    return cells_path.parents[1] / FILES["nuclei"]


def load_cx22(row: Mapping[str, Any]) -> Sample:
    """Load image entry row["mask_index"] with its cytoplasm and nucleus instances."""
    images_path = Path(row["image_path"])
    cells_path = Path(row["mask_path"])
    nuclei_path = _nuclei_path(cells_path)
    index = int(row["mask_index"])
    names = _variable_names(row)

    files = {"images": images_path, "cells": cells_path, "nuclei": nuclei_path}
    entries = {role: read_entry(path, names[role], index, row["id"]) for role, path in files.items()}

    locations = {role: format_entry(path, names[role], index) for role, path in files.items()}
    image = _image_entry(entries["images"], locations["images"])
    cells = _instance_masks(entries["cells"], locations["cells"], image, locations["images"])
    nuclei = _instance_masks(entries["nuclei"], locations["nuclei"], image, locations["images"])

    return Sample(
        id=str(row["id"]),
        image=image,
        mask=semantic_mask(cells, nuclei.any(axis=0)),
        annotation="full",
        cell_instances=cells,
        nucleus_instances=label_instances(nuclei),
        meta=sample_meta(row),
    )
