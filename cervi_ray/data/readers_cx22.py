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

Both formats are read, each file on its own: v5-format files (what MATLAB's save -v6 and -v7
write) with scipy.io, and v7.3 files with h5py. The v7.3 layout below is the one that matio
reads and writes (tbeu/matio src/mat73.c, read at commits 0121a90 and 69417cf), and the shapes
in the probe above match it:
- The file is HDF5 behind a 512-byte user block that holds the 128-byte MATLAB header.
- Each variable is a root dataset with a MATLAB_class attribute ("cell", "uint8", "logical",
  "double", ...). The HDF5 dimensions are the MATLAB dimensions reversed, because MATLAB
  stores arrays column-major: an H x W x 3 image is a (3, W, H) dataset, so reading it in
  MATLAB orientation is a transpose.
- A cell array is a dataset of object references to its elements, which live in the group
  "#refs#". Logical arrays are stored as uint8 (what scipy.io.loadmat returns for them too).
- An empty array stores its MATLAB size as its data and has the attribute MATLAB_empty.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy.io
from scipy.io.matlab import MatReadError, matfile_version

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

_MATLAB_V73 = (2, 0)  # scipy's matfile_version of HDF5-based MATLAB files


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


# MATLAB files.


def _is_matlab_v73(path: Path) -> bool:
    """Return True for a MATLAB v7.3 (HDF5) file, False for a v5-format file (v6 or v7) for scipy.io.

    Raises FileNotFoundError if `path` is missing and ValueError if it is neither kind of file.
    """
    if not path.is_file():
        raise FileNotFoundError(f"MATLAB file {path} not found. A {KIND} source must contain {LAYOUT}.")
    if h5py.is_hdf5(str(path)):
        return True
    try:
        version = matfile_version(str(path))
    except (MatReadError, ValueError, OSError) as e:
        raise ValueError(f"Cannot read MATLAB file {path}: {e}. Replace it with a complete copy.") from e
    if version == _MATLAB_V73:
        raise ValueError(
            f"Cannot read MATLAB file {path}: its header marks a v7.3 file, but it contains no valid HDF5 "
            f"data. Replace it with a complete copy."
        )
    return False


def _format_entry(path: Path, name: str, index: int) -> str:
    """Format entry `index` of variable `name` for messages, numbered from 1 like MATLAB."""
    return f"{path} ({name}) entry {index + 1}"


def _check_index(index: int, count: int, path: Path, sample_id: Any) -> None:
    if not 0 <= index < count:
        raise ValueError(
            f"Mask index {index} of {sample_id} is out of range: {path} contains {count} entries. "
            f"Rebuild the manifest."
        )


def _entry_count(path: Path, name: str) -> int:
    """Read the number of entries of variable `name` without reading the entries."""
    if _is_matlab_v73(path):
        with _open_v73(path) as file:
            return _v73_entry_count(_v73_variable(file, path, name))
    return _v5_entry_count(path, name)


def _image_sizes(path: Path, name: str) -> list[tuple[int, int]]:
    """Return the (H, W) of every image entry of variable `name`."""
    if _is_matlab_v73(path):
        return _v73_image_sizes(path, name)
    images = _load_variable(str(path.resolve()), name)
    return [_image_entry(entry, _format_entry(path, name, index)).shape[:2] for index, entry in enumerate(images)]


def _read_entry(path: Path, name: str, index: int, sample_id: Any) -> Any:
    """Read entry `index` of variable `name` as scipy.io.loadmat returns it, from either kind of file."""
    if _is_matlab_v73(path):
        with _open_v73(path) as file:
            variable = _v73_variable(file, path, name)
            _check_index(index, _v73_entry_count(variable), path, sample_id)
            where = _format_entry(path, name, index)
            return _read_v73_value(file, _v73_entry(file, variable, index, where), where)
    variable = _load_variable(str(path.resolve()), name)
    _check_index(index, len(variable), path, sample_id)
    return variable[index]


# MATLAB v5-format files (save -v6 and -v7), read whole with scipy.io.


@functools.lru_cache(maxsize=3)
def _load_variable(path: str, name: str) -> np.ndarray:
    # A v5-format .mat file cannot be read one cell entry at a time, so each variable is loaded
    # whole, once per process, and kept for the next samples.
    # NOTE: the cache keeps the three variables of one source in memory. Estimate for all of Cx22:
    # 14,946 cells x 2 masks x 512 x 512 bytes is about 8 GB, split over the three archives.
    # v7.3 files do not use this cache because they are read one entry at a time.
    logger.debug("Loading %s from %s", name, path)
    try:
        contents = scipy.io.loadmat(path, variable_names=[name])
    except (MatReadError, ValueError, OSError) as e:
        raise ValueError(f"Cannot read MATLAB file {path}: {e}. Replace it with a complete copy.") from e
    if name not in contents:
        present = sorted(variable for variable, _, _ in scipy.io.whosmat(path))
        raise ValueError(
            f"MATLAB file {path} has no variable {name!r}, got the variables {present}. Set mat_variables "
            f"in the source config to the right name."
        )
    return contents[name].reshape(-1)  # (N, 1) or (1, N) cell array -> (N,)


def _v5_entry_count(path: Path, name: str) -> int:
    """Read the number of entries of variable `name` from the file header."""
    shapes = {variable: shape for variable, shape, _ in scipy.io.whosmat(str(path))}
    if name not in shapes:
        raise ValueError(
            f"MATLAB file {path} must contain the variable {name!r}, got the variables {sorted(shapes)}. "
            f"Set mat_variables in the source config to the right name."
        )
    return int(np.prod(shapes[name]))


# MATLAB v7.3 files (HDF5), read one entry at a time with h5py. The layout is in the module docstring.

_V73_GROUPS = ("#refs#", "#subsystem#")  # groups MATLAB writes beside the variables
# MATLAB classes of numeric arrays, with the dtype of an empty array of each. Logical arrays are
# stored as uint8, which is also what scipy.io.loadmat returns for them.
_V73_NUMERIC_DTYPES = {
    "double": np.float64,
    "single": np.float32,
    "int8": np.int8,
    "uint8": np.uint8,
    "int16": np.int16,
    "uint16": np.uint16,
    "int32": np.int32,
    "uint32": np.uint32,
    "int64": np.int64,
    "uint64": np.uint64,
    "logical": np.uint8,
}


@contextlib.contextmanager
def _open_v73(path: Path) -> Iterator[h5py.File]:
    """Open a v7.3 file for reading. HDF5 errors while it is open become ValueErrors that name it."""
    try:
        with h5py.File(path, "r") as file:
            yield file
    except OSError as e:
        raise ValueError(f"Cannot read MATLAB file {path}: {e}. Replace it with a complete copy.") from e


def _matlab_class(node: h5py.HLObject) -> str | None:
    value = node.attrs.get("MATLAB_class")
    if isinstance(value, bytes):  # MATLAB writes a fixed-length ASCII string, which h5py returns as bytes
        return value.decode("ascii", errors="replace")
    return None if value is None else str(value)


def _v73_size(dataset: h5py.Dataset) -> tuple[int, ...]:
    """Return the MATLAB size of `dataset`: the HDF5 shape reversed, or the size an empty array stores."""
    if dataset.attrs.get("MATLAB_empty", 0):
        return tuple(int(n) for n in np.asarray(dataset[()]).reshape(-1))
    return tuple(reversed(dataset.shape))


def _describe(node: h5py.HLObject) -> str:
    """Describe a node for messages, in MATLAB terms: class and size."""
    if not isinstance(node, h5py.Dataset):
        return f"an HDF5 group (MATLAB class {_matlab_class(node)!r})"
    size = " x ".join(str(n) for n in _v73_size(node))
    return f"MATLAB class {_matlab_class(node)!r} of size {size}"


def _is_v73_cell(dataset: h5py.Dataset) -> bool:
    return _matlab_class(dataset) == "cell" or h5py.check_dtype(ref=dataset.dtype) is not None


def _dereference(file: h5py.File, reference: Any, where: str) -> h5py.Dataset:
    """Return the array that a cell element's object reference points to."""
    if not isinstance(reference, h5py.Reference) or not reference:
        raise ValueError(f"{where} must be an HDF5 object reference (a MATLAB cell element), got {reference!r}.")
    node = file[reference]
    if not isinstance(node, h5py.Dataset):
        raise ValueError(f"{where} must be a MATLAB array, got {_describe(node)}.")
    return node


def _v73_variable(file: h5py.File, path: Path, name: str) -> h5py.Dataset:
    """Return variable `name`, checked to be a cell array (one entry per image)."""
    node = file.get(name)
    if node is None:
        present = sorted(key for key in file if key not in _V73_GROUPS)
        raise ValueError(
            f"MATLAB file {path} must contain the variable {name!r}, got the variables {present}. "
            f"Set mat_variables in the source config to the right name."
        )
    if not isinstance(node, h5py.Dataset) or not _is_v73_cell(node):
        raise ValueError(
            f"MATLAB file {path} variable {name!r} must be a cell array with one entry per image, got "
            f"{_describe(node)}. Check mat_variables and that the file belongs to this {KIND} source."
        )
    return node


def _v73_entry_count(variable: h5py.Dataset) -> int:
    return int(np.prod(_v73_size(variable)))


def _v73_entry(file: h5py.File, variable: h5py.Dataset, index: int, where: str) -> h5py.Dataset:
    """Return entry `index` of a cell array variable.

    Entries are counted in C order over the MATLAB size, as the v5 path's reshape(-1) counts them.
    """
    position = np.unravel_index(index, _v73_size(variable))
    hdf5_position = tuple(int(i) for i in reversed(position))  # the HDF5 dimensions are reversed
    return _dereference(file, variable[hdf5_position], where)


def _read_v73_array(dataset: h5py.Dataset, where: str) -> np.ndarray:
    """Read a numeric or logical MATLAB array in MATLAB orientation."""
    matlab_class = _matlab_class(dataset)
    if matlab_class is None:
        numeric = dataset.dtype.kind in "biuf"  # a dataset from a writer other than MATLAB
    else:
        numeric = matlab_class in _V73_NUMERIC_DTYPES
    if not numeric:
        raise ValueError(f"{where} must be a numeric or logical MATLAB array, got {_describe(dataset)}.")
    if dataset.attrs.get("MATLAB_empty", 0):
        return np.zeros(_v73_size(dataset), dtype=_V73_NUMERIC_DTYPES.get(matlab_class, np.float64))
    return np.asarray(dataset[()]).T  # HDF5 (d_n, ..., d_1) -> MATLAB (d_1, ..., d_n)


def _read_v73_value(file: h5py.File, dataset: h5py.Dataset, where: str) -> np.ndarray:
    """Read one image or label entry as scipy.io.loadmat returns it.

    A numeric array comes back in MATLAB orientation. A cell array of numeric arrays becomes an
    object array of its MATLAB size. Cells nested deeper raise ValueError.
    """
    if not _is_v73_cell(dataset):
        return _read_v73_array(dataset, where)

    size = _v73_size(dataset)
    cell = np.empty(size, dtype=object)
    if cell.size == 0:
        return cell
    references = np.asarray(dataset[()]).T  # object references, in MATLAB orientation
    for position in np.ndindex(size):
        # Numbered in C order, as _instance_masks numbers the instances.
        element_where = f"{where}, cell element {np.ravel_multi_index(position, size) + 1}"
        element = _dereference(file, references[position], element_where)
        cell[position] = _read_v73_array(element, element_where)
    return cell


def _v73_image_sizes(path: Path, name: str) -> list[tuple[int, int]]:
    """Return the (H, W) of every image entry from the dataset shapes, without reading pixels."""
    sizes = []
    with _open_v73(path) as file:
        variable = _v73_variable(file, path, name)
        for index in range(_v73_entry_count(variable)):
            where = _format_entry(path, name, index)
            dataset = _v73_entry(file, variable, index, where)
            size = _v73_size(dataset)
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

    counts = {role: _entry_count(paths[role], names[role]) for role in FILES}
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
    entries = {role: _read_entry(path, names[role], index, row["id"]) for role, path in files.items()}

    locations = {role: _format_entry(path, names[role], index) for role, path in files.items()}
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
