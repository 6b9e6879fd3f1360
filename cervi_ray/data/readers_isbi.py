"""Readers for the ISBI 2014 and ISBI 2015 overlapping cervical cytology challenge data.

Each kind has a lister, which finds the images and reads at most their headers, and a loader,
which reads one manifest row into a Sample. Cell masks in these sets cover the whole cell,
nucleus included, and overlap, so the semantic cytoplasm label is their union minus nuclei.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
import scipy.ndimage as ndi

from cervi_ray.data.labels import BACKGROUND, CYTOPLASM, NUCLEUS
from cervi_ray.data.sample import (
    ImageRecord,
    Sample,
    check_binary_mask,
    check_mask_size,
    load_image,
    load_label_image,
    read_image_size,
)

logger = logging.getLogger(__name__)

LAYOUTS = {
    "isbi2015": (
        "EDF/frameNNN.png, seg_frameNNN_png/cellMMM.png (one mask per cell) and "
        "NucleusGT/frameNNN_NUGT.png"
    ),
    "isbi2014_train45": "images/1.tif ... images/N.tif and isbi_train_GT.mat",
    "isbi2014_test90": (
        "orig/isbi_test_imNNN.png, gt/Nucleus/isbi_test_imNNN.png and "
        "gt/Cyto/imN/im_MMM.png (one mask per cell, N without zero padding)"
    ),
    "isbi2014_edf_real": "EDFnnn.png with nucleus outlines in EDFnnn_GT.png",
}

_MAT_CELLS_KEY = "train_Cytoplasm"
_MAT_NUCLEI_KEY = "train_Nuclei"


# Shared steps.


def _require_dir(path: Path, kind: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(
            f"Folder {path} not found. A {kind} source must contain {LAYOUTS[kind]}."
        )


def _require_file(path: Path, kind: str, image_path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(
            f"Ground truth {path} for image {image_path} not found. A {kind} source must "
            f"contain {LAYOUTS[kind]}. Add the file or remove the image."
        )


def _record(stem: str, image_path: Path, mask_path: Path, mask_index: int = -1) -> ImageRecord:
    height, width = read_image_size(image_path)
    return ImageRecord(
        stem=stem,
        image_path=image_path,
        mask_path=mask_path,
        height=height,
        width=width,
        group=stem,  # each image is its own group in these sets
        mask_index=mask_index,
    )


def _load_cell_folder(folder: Path, image: np.ndarray, image_path: Path) -> np.ndarray:
    """Load the sorted per-cell mask files of one image as (N, H, W) bool."""
    cell_paths = sorted(folder.glob("*.png"))
    if not cell_paths:
        raise ValueError(f"Folder {folder} contains no cell masks (*.png) for image {image_path}.")
    cells = []
    for cell_path in cell_paths:
        cell = load_label_image(cell_path)
        check_mask_size(image, image_path, cell, cell_path)
        cells.append(check_binary_mask(cell, cell_path))
    return np.stack(cells)  # N x (H, W) -> (N, H, W)


def semantic_mask(cell_instances: np.ndarray, nucleus: np.ndarray) -> np.ndarray:
    """Combine (N, H, W) whole-cell masks and an (H, W) nucleus mask into labels 0, 1, 2.

    Nucleus wins over cytoplasm, so nucleus pixels outside every annotated cell stay nucleus.
    """
    mask = np.full(nucleus.shape, BACKGROUND, dtype=np.uint8)
    if cell_instances.shape[0] > 0:
        mask[cell_instances.any(axis=0)] = CYTOPLASM
    mask[nucleus] = NUCLEUS
    return mask


def _label_nuclei(nucleus: np.ndarray) -> np.ndarray:
    # 4-connectivity (scipy's default): nuclei that touch only at a corner stay separate.
    labels, _ = ndi.label(nucleus)
    return labels.astype(np.int32)


def _meta(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "source": row["source"],
        "kind": row["kind"],
        "group": row["group"],
        "image_path": str(row["image_path"]),
        "mask_path": str(row["mask_path"]),
        "mask_index": int(row["mask_index"]),
    }


def _full_sample(row: Mapping[str, Any], image: np.ndarray, cells: np.ndarray, nucleus: np.ndarray) -> Sample:
    return Sample(
        id=str(row["id"]),
        image=image,
        mask=semantic_mask(cells, nucleus),
        annotation="full",
        cell_instances=cells,
        nucleus_instances=_label_nuclei(nucleus),
        meta=_meta(row),
    )


# ISBI 2015 training set.


def list_isbi2015(path: Path) -> list[ImageRecord]:
    """List EDF/frameNNN.png with their cell-mask folder seg_frameNNN_png as mask_path."""
    path = Path(path)
    _require_dir(path / "EDF", "isbi2015")
    records = []
    for image_path in sorted((path / "EDF").glob("*.png")):
        stem = image_path.stem
        cell_folder = path / f"seg_{stem}_png"
        _require_file(cell_folder, "isbi2015", image_path)
        _require_file(_isbi2015_nucleus_path(cell_folder, stem), "isbi2015", image_path)
        records.append(_record(stem, image_path, cell_folder))
    return records


def _isbi2015_nucleus_path(cell_folder: Path, stem: str) -> Path:
    return cell_folder.parent / "NucleusGT" / f"{stem}_NUGT.png"


def load_isbi2015(row: Mapping[str, Any]) -> Sample:
    """Load one ISBI 2015 frame. NucleusGT is 16-bit and any nonzero value is nucleus."""
    image_path = Path(row["image_path"])
    cell_folder = Path(row["mask_path"])
    nucleus_path = _isbi2015_nucleus_path(cell_folder, image_path.stem)

    image = load_image(image_path)
    cells = _load_cell_folder(cell_folder, image, image_path)
    nucleus_values = load_label_image(nucleus_path)
    check_mask_size(image, image_path, nucleus_values, nucleus_path)
    nucleus = check_binary_mask(nucleus_values, nucleus_path)
    return _full_sample(row, image, cells, nucleus)


# ISBI 2014 training set: masks in one MATLAB file.


@functools.lru_cache(maxsize=2)
def _load_isbi2014_mat(mat_path: str) -> dict[str, np.ndarray]:
    # Loaded once per process because every sample reads it. The loaded masks of the
    # 45-image set take about 80 MB (315 masks of 512 x 512 bytes).
    logger.debug("Loading %s", mat_path)
    contents = scipy.io.loadmat(mat_path)
    missing = [key for key in (_MAT_CELLS_KEY, _MAT_NUCLEI_KEY) if key not in contents]
    if missing:
        raise ValueError(
            f"MATLAB file {mat_path} has no variable {', '.join(missing)}. Expected the ISBI 2014 "
            f"training ground truth with {_MAT_CELLS_KEY} and {_MAT_NUCLEI_KEY}."
        )
    return {key: contents[key] for key in (_MAT_CELLS_KEY, _MAT_NUCLEI_KEY)}


def _mat_entry_count(mat_path: Path) -> int:
    """Read the number of images in the .mat file from its header, without loading masks."""
    shapes = {name: shape for name, shape, _ in scipy.io.whosmat(str(mat_path))}
    if _MAT_CELLS_KEY not in shapes or _MAT_NUCLEI_KEY not in shapes:
        raise ValueError(
            f"MATLAB file {mat_path} must contain {_MAT_CELLS_KEY} and {_MAT_NUCLEI_KEY}, "
            f"got the variables {sorted(shapes)}."
        )
    return int(np.prod(shapes[_MAT_CELLS_KEY]))


def list_isbi2014_train45(path: Path) -> list[ImageRecord]:
    """List images/N.tif, whose masks are entry N - 1 of isbi_train_GT.mat."""
    path = Path(path)
    _require_dir(path / "images", "isbi2014_train45")
    mat_path = path / "isbi_train_GT.mat"
    if not mat_path.is_file():
        raise FileNotFoundError(
            f"Ground truth {mat_path} not found. An isbi2014_train45 source must contain "
            f"{LAYOUTS['isbi2014_train45']}."
        )
    entry_count = _mat_entry_count(mat_path)

    numbered = []
    for image_path in (path / "images").glob("*.tif"):
        if not image_path.stem.isdigit() or int(image_path.stem) < 1:
            raise ValueError(
                f"Image {image_path} must be named N.tif with N = 1, 2, ... (entry N - 1 of "
                f"{mat_path.name}), got {image_path.name!r}. Rename or remove it."
            )
        number = int(image_path.stem)
        if number > entry_count:
            raise ValueError(
                f"Image {image_path} has no ground truth: {mat_path} contains {entry_count} entries, "
                f"so images must be numbered 1 to {entry_count}."
            )
        numbered.append((number, image_path))

    # Natural order 1, 2, ..., 10 rather than the string order 1, 10, 11.
    return [_record(image_path.stem, image_path, mat_path, number - 1) for number, image_path in sorted(numbered)]


def load_isbi2014_train45(row: Mapping[str, Any]) -> Sample:
    """Load one ISBI 2014 training image and its masks from the cached .mat file."""
    image_path = Path(row["image_path"])
    mat_path = Path(row["mask_path"])
    index = int(row["mask_index"])

    image = load_image(image_path)
    contents = _load_isbi2014_mat(str(mat_path.resolve()))
    cell_entries = contents[_MAT_CELLS_KEY].reshape(-1)
    nuclei_entries = contents[_MAT_NUCLEI_KEY].reshape(-1)
    if not 0 <= index < min(len(cell_entries), len(nuclei_entries)):
        raise ValueError(
            f"Mask index {index} for image {image_path} is out of range: {mat_path} contains "
            f"{len(cell_entries)} entries. Rebuild the manifest."
        )

    where = f"{mat_path} entry {index}"
    cells = []
    for cell in np.asarray(cell_entries[index]).reshape(-1):  # (n_cells, 1) cell array
        check_mask_size(image, image_path, cell, where)
        cells.append(check_binary_mask(cell, where))
    if not cells:
        raise ValueError(f"{where} has no cell masks for image {image_path}.")
    nuclei = nuclei_entries[index]
    check_mask_size(image, image_path, nuclei, where)
    nucleus = check_binary_mask(nuclei, where)
    return _full_sample(row, image, np.stack(cells), nucleus)  # N x (H, W) -> (N, H, W)


# ISBI 2014 test set.

_TEST90_STEM = re.compile(r"isbi_test_im(\d+)")


def _test90_nucleus_path(cell_folder: Path, stem: str) -> Path:
    # cell_folder is <root>/gt/Cyto/imN, so the nucleus mask is <root>/gt/Nucleus/<stem>.png.
    return cell_folder.parents[1] / "Nucleus" / f"{stem}.png"


def list_isbi2014_test90(path: Path) -> list[ImageRecord]:
    """List orig/isbi_test_imNNN.png with their cell-mask folder gt/Cyto/imN as mask_path."""
    path = Path(path)
    _require_dir(path / "orig", "isbi2014_test90")
    records = []
    for image_path in sorted((path / "orig").glob("*.png")):
        match = _TEST90_STEM.fullmatch(image_path.stem)
        if match is None:
            raise ValueError(
                f"Image {image_path} must be named isbi_test_imNNN.png, got {image_path.name!r}. "
                f"Rename or remove it."
            )
        cell_folder = path / "gt" / "Cyto" / f"im{int(match.group(1))}"
        _require_file(cell_folder, "isbi2014_test90", image_path)
        _require_file(_test90_nucleus_path(cell_folder, image_path.stem), "isbi2014_test90", image_path)
        records.append(_record(image_path.stem, image_path, cell_folder))
    return records


def load_isbi2014_test90(row: Mapping[str, Any]) -> Sample:
    """Load one ISBI 2014 test image with its per-cell and nucleus masks."""
    image_path = Path(row["image_path"])
    cell_folder = Path(row["mask_path"])
    nucleus_path = _test90_nucleus_path(cell_folder, image_path.stem)

    image = load_image(image_path)
    cells = _load_cell_folder(cell_folder, image, image_path)
    nucleus_values = load_label_image(nucleus_path)
    check_mask_size(image, image_path, nucleus_values, nucleus_path)
    nucleus = check_binary_mask(nucleus_values, nucleus_path)
    return _full_sample(row, image, cells, nucleus)


# ISBI 2014 real EDF images: nucleus outlines only.


def list_isbi2014_edf_real(path: Path) -> list[ImageRecord]:
    """List EDFnnn.png with their outline file EDFnnn_GT.png as mask_path."""
    path = Path(path)
    _require_dir(path, "isbi2014_edf_real")
    records = []
    for image_path in sorted(path.glob("*.png")):
        if image_path.stem.endswith("_GT"):
            continue
        outline_path = path / f"{image_path.stem}_GT.png"
        _require_file(outline_path, "isbi2014_edf_real", image_path)
        records.append(_record(image_path.stem, image_path, outline_path))
    return records


def nuclei_from_outlines(outlines: np.ndarray) -> np.ndarray:
    """Turn an (H, W) image of closed 1-pixel nucleus outlines into an int32 label image.

    The filled region of each outline, outline pixels included, is one nucleus. Labelling the
    connected components of the filled mask would merge nuclei whose outlines share pixels
    (two such nuclei in EDF003_GT.png of ISBI 2014). So the interiors are labelled instead:
    a 1-pixel 8-connected outline separates 4-connected interiors. Each outline pixel then
    joins the nearest interior. A filled blob with no interior pixel becomes its own nucleus.
    """
    drawn = outlines != 0
    filled = ndi.binary_fill_holes(drawn)
    interiors, interior_count = ndi.label(filled & ~drawn)

    # Filled components that enclose no interior pixel (outlines only one or two pixels wide).
    components, component_count = ndi.label(filled)
    has_interior = np.zeros(component_count + 1, dtype=bool)
    has_interior[components[interiors > 0]] = True
    next_label = interior_count + 1
    for component in np.flatnonzero(~has_interior[1:]) + 1:
        interiors[components == component] = next_label
        next_label += 1

    if next_label == 1:
        return np.zeros(outlines.shape, dtype=np.int32)

    # For every pixel, the (row, col) of the nearest labelled pixel.
    _, (nearest_rows, nearest_cols) = ndi.distance_transform_edt(interiors == 0, return_indices=True)
    labels = np.where(filled, interiors[nearest_rows, nearest_cols], 0)
    return labels.astype(np.int32)


def load_isbi2014_edf_real(row: Mapping[str, Any]) -> Sample:
    """Load one real EDF image whose ground truth draws nucleus outlines with arbitrary grey values."""
    image_path = Path(row["image_path"])
    outline_path = Path(row["mask_path"])

    image = load_image(image_path)
    outlines = load_label_image(outline_path)
    check_mask_size(image, image_path, outlines, outline_path)
    nucleus_instances = nuclei_from_outlines(outlines)

    mask = np.full(outlines.shape, BACKGROUND, dtype=np.uint8)
    mask[nucleus_instances > 0] = NUCLEUS
    return Sample(
        id=str(row["id"]),
        image=image,
        mask=mask,
        annotation="nucleus",
        cell_instances=None,
        nucleus_instances=nucleus_instances,
        meta=_meta(row),
    )
