"""MATLAB .mat files, one cell entry at a time where the format allows it.

Both formats are read, each file on its own: v5-format files (what MATLAB's save -v6 and -v7
write) with scipy.io, and v7.3 files with h5py. The v7.3 layout below is the one that matio
reads and writes (tbeu/matio src/mat73.c, read at commits 0121a90 and 69417cf), and the shapes
that a probe of the real Cx22 label files reports match it (see cervi_ray.data.readers_cx22):
- The file is HDF5 behind a 512-byte user block that holds the 128-byte MATLAB header.
- Each variable is a root dataset with a MATLAB_class attribute ("cell", "uint8", "logical",
  "double", ...). The HDF5 dimensions are the MATLAB dimensions reversed, because MATLAB
  stores arrays column-major: an H x W x 3 image is a (3, W, H) dataset, so reading it in
  MATLAB orientation is a transpose.
- A cell array is a dataset of object references to its elements, which live in the group
  "#refs#". Logical arrays are stored as uint8 (what scipy.io.loadmat returns for them too).
- An empty array stores its MATLAB size as its data and has the attribute MATLAB_empty.
"""

import contextlib
import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy.io
from scipy.io.matlab import MatReadError, matfile_version

logger = logging.getLogger(__name__)

MATLAB_V73 = (2, 0)  # scipy's matfile_version of HDF5-based MATLAB files


def is_matlab_v73(path: Path) -> bool:
    """Return True for a MATLAB v7.3 (HDF5) file, False for a v5-format file (v6 or v7) for scipy.io.

    Raises FileNotFoundError if `path` is missing and ValueError if it is neither kind of file.
    """
    if not path.is_file():
        raise FileNotFoundError(f"MATLAB file {path} not found. Check the source path and its folder layout.")
    if h5py.is_hdf5(str(path)):
        return True
    try:
        version = matfile_version(str(path))
    except (MatReadError, ValueError, OSError) as e:
        raise ValueError(f"Cannot read MATLAB file {path}: {e}. Replace it with a complete copy.") from e
    if version == MATLAB_V73:
        raise ValueError(
            f"Cannot read MATLAB file {path}: its header marks a v7.3 file, but it contains no valid HDF5 "
            f"data. Replace it with a complete copy."
        )
    return False


def format_entry(path: Path, name: str, index: int) -> str:
    """Format entry `index` of variable `name` for messages, numbered from 1 like MATLAB."""
    return f"{path} ({name}) entry {index + 1}"


def check_index(index: int, count: int, path: Path, sample_id: Any) -> None:
    if not 0 <= index < count:
        raise ValueError(
            f"Mask index {index} of {sample_id} is out of range: {path} contains {count} entries. "
            f"Rebuild the manifest."
        )


def entry_count(path: Path, name: str) -> int:
    """Read the number of entries of variable `name` without reading the entries."""
    if is_matlab_v73(path):
        with open_v73(path) as file:
            return v73_entry_count(v73_variable(file, path, name))
    return v5_entry_count(path, name)


def read_entry(path: Path, name: str, index: int, sample_id: Any) -> Any:
    """Read entry `index` of variable `name` as scipy.io.loadmat returns it, from either kind of file."""
    if is_matlab_v73(path):
        with open_v73(path) as file:
            variable = v73_variable(file, path, name)
            check_index(index, v73_entry_count(variable), path, sample_id)
            where = format_entry(path, name, index)
            return read_v73_value(file, v73_entry(file, variable, index, where), where)
    variable = load_variable(str(path.resolve()), name)
    check_index(index, len(variable), path, sample_id)
    return variable[index]


# MATLAB v5-format files (save -v6 and -v7), read whole with scipy.io.


@functools.lru_cache(maxsize=3)
def load_variable(path: str, name: str) -> np.ndarray:
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


def v5_entry_count(path: Path, name: str) -> int:
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
def open_v73(path: Path) -> Iterator[h5py.File]:
    """Open a v7.3 file for reading. HDF5 errors while it is open become ValueErrors that name it."""
    try:
        with h5py.File(path, "r") as file:
            yield file
    except OSError as e:
        raise ValueError(f"Cannot read MATLAB file {path}: {e}. Replace it with a complete copy.") from e


def matlab_class(node: h5py.HLObject) -> str | None:
    value = node.attrs.get("MATLAB_class")
    if isinstance(value, bytes):  # MATLAB writes a fixed-length ASCII string, which h5py returns as bytes
        return value.decode("ascii", errors="replace")
    return None if value is None else str(value)


def v73_size(dataset: h5py.Dataset) -> tuple[int, ...]:
    """Return the MATLAB size of `dataset`: the HDF5 shape reversed, or the size an empty array stores."""
    if dataset.attrs.get("MATLAB_empty", 0):
        return tuple(int(n) for n in np.asarray(dataset[()]).reshape(-1))
    return tuple(reversed(dataset.shape))


def describe(node: h5py.HLObject) -> str:
    """Describe a node for messages, in MATLAB terms: class and size."""
    if not isinstance(node, h5py.Dataset):
        return f"an HDF5 group (MATLAB class {matlab_class(node)!r})"
    size = " x ".join(str(n) for n in v73_size(node))
    return f"MATLAB class {matlab_class(node)!r} of size {size}"


def is_v73_cell(dataset: h5py.Dataset) -> bool:
    return matlab_class(dataset) == "cell" or h5py.check_dtype(ref=dataset.dtype) is not None


def dereference(file: h5py.File, reference: Any, where: str) -> h5py.Dataset:
    """Return the array that a cell element's object reference points to."""
    if not isinstance(reference, h5py.Reference) or not reference:
        raise ValueError(f"{where} must be an HDF5 object reference (a MATLAB cell element), got {reference!r}.")
    node = file[reference]
    if not isinstance(node, h5py.Dataset):
        raise ValueError(f"{where} must be a MATLAB array, got {describe(node)}.")
    return node


def v73_variable(file: h5py.File, path: Path, name: str) -> h5py.Dataset:
    """Return variable `name`, checked to be a cell array (one entry per image)."""
    node = file.get(name)
    if node is None:
        present = sorted(key for key in file if key not in _V73_GROUPS)
        raise ValueError(
            f"MATLAB file {path} must contain the variable {name!r}, got the variables {present}. "
            f"Set mat_variables in the source config to the right name."
        )
    if not isinstance(node, h5py.Dataset) or not is_v73_cell(node):
        raise ValueError(
            f"MATLAB file {path} variable {name!r} must be a cell array with one entry per image, got "
            f"{describe(node)}. Check mat_variables and that the file belongs to this source."
        )
    return node


def v73_entry_count(variable: h5py.Dataset) -> int:
    return int(np.prod(v73_size(variable)))


def v73_entry(file: h5py.File, variable: h5py.Dataset, index: int, where: str) -> h5py.Dataset:
    """Return entry `index` of a cell array variable.

    Entries are counted in C order over the MATLAB size, as the v5 path's reshape(-1) counts them.
    """
    position = np.unravel_index(index, v73_size(variable))
    hdf5_position = tuple(int(i) for i in reversed(position))  # the HDF5 dimensions are reversed
    return dereference(file, variable[hdf5_position], where)


def read_v73_array(dataset: h5py.Dataset, where: str) -> np.ndarray:
    """Read a numeric or logical MATLAB array in MATLAB orientation."""
    class_name = matlab_class(dataset)
    if class_name is None:
        numeric = dataset.dtype.kind in "biuf"  # a dataset from a writer other than MATLAB
    else:
        numeric = class_name in _V73_NUMERIC_DTYPES
    if not numeric:
        raise ValueError(f"{where} must be a numeric or logical MATLAB array, got {describe(dataset)}.")
    if dataset.attrs.get("MATLAB_empty", 0):
        return np.zeros(v73_size(dataset), dtype=_V73_NUMERIC_DTYPES.get(class_name, np.float64))
    return np.asarray(dataset[()]).T  # HDF5 (d_n, ..., d_1) -> MATLAB (d_1, ..., d_n)


def read_v73_value(file: h5py.File, dataset: h5py.Dataset, where: str) -> np.ndarray:
    """Read one image or label entry as scipy.io.loadmat returns it.

    A numeric array comes back in MATLAB orientation. A cell array of numeric arrays becomes an
    object array of its MATLAB size. Cells nested deeper raise ValueError.
    """
    if not is_v73_cell(dataset):
        return read_v73_array(dataset, where)

    size = v73_size(dataset)
    cell = np.empty(size, dtype=object)
    if cell.size == 0:
        return cell
    references = np.asarray(dataset[()]).T  # object references, in MATLAB orientation
    for position in np.ndindex(size):
        # Numbered in C order, as _instance_masks numbers the instances.
        element_where = f"{where}, cell element {np.ravel_multi_index(position, size) + 1}"
        element = dereference(file, references[position], element_where)
        cell[position] = read_v73_array(element, element_where)
    return cell
