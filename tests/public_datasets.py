"""Writers of small DTU/Herlev, SIPaKMeD and Cx22 sources in each dataset's documented format.

The real datasets are not available on the test machines, so the tests build these fixtures.
"""

from pathlib import Path

import h5py
import numpy as np
import scipy.io
from PIL import Image

from cervi_ray.data import BACKGROUND, CYTOPLASM, NUCLEUS

# DTU/Herlev: class folders of NAME.BMP images with colour-coded NAME-d.bmp segmentations.

# The reader's default colours: background red, cytoplasm dark blue, nucleus blue.
RED, DARK_BLUE, BLUE = (255, 0, 0), (0, 0, 128), (0, 0, 255)


def herlev_labels(height: int = 12, width: int = 16) -> np.ndarray:
    """A cell in rows 2-9, columns 3-12, with its nucleus in rows 4-6, columns 6-8."""
    labels = np.full((height, width), BACKGROUND, np.uint8)
    labels[2:10, 3:13] = CYTOPLASM
    labels[4:7, 6:9] = NUCLEUS
    return labels


def paint(labels: np.ndarray, colours: tuple) -> np.ndarray:
    """Colour an (H, W) label image with colours[label]."""
    return np.asarray(colours, np.uint8)[labels]


def write_herlev_cell(folder: Path, name: str, colours=(RED, DARK_BLUE, BLUE), labels=None) -> np.ndarray:
    """Write NAME.BMP and its segmentation NAME-d.bmp into a class folder and return the labels."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = herlev_labels() if labels is None else labels
    image = np.random.default_rng(len(name)).integers(0, 255, (*labels.shape, 3), dtype=np.uint8)
    Image.fromarray(image).save(folder / f"{name}.BMP")
    Image.fromarray(paint(labels, colours)).save(folder / f"{name}-d.bmp")
    return labels


def make_herlev(root: Path) -> Path:
    write_herlev_cell(root / "carcinoma_in_situ", "153958345-153958392-001")
    write_herlev_cell(root / "carcinoma_in_situ", "153958345-153958392-002")
    write_herlev_cell(root / "normal_columnar", "157181399-157181419-001")
    return root


# SIPaKMeD: class folders of cluster images NNN.bmp with NNN_cytKK.dat and NNN_nucKK.dat contours.

CLUSTER_SIZE = (20, 24)  # H, W
# Two overlapping square cells, (x0, y0, x1, y1) corners of the cell and of its nucleus.
CELLS = [((2, 2, 10, 10), (4, 4, 7, 7)), ((8, 6, 18, 16), (12, 10, 15, 13))]


def square(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def write_contour(path: Path, points, separator: str = ",", header: str = "", line_end: str = "\n") -> None:
    lines = ([header] if header else []) + [f"{x}{separator}{y}" for x, y in points]
    path.write_bytes((line_end.join(lines) + line_end).encode())


def write_cluster(folder: Path, stem: str, cells=CELLS, **contour_format) -> None:
    """Write STEM.bmp and STEM_cytKK.dat / STEM_nucKK.dat for each (cell, nucleus) square pair."""
    folder.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(0).integers(0, 255, (*CLUSTER_SIZE, 3), dtype=np.uint8)
    Image.fromarray(image).save(folder / f"{stem}.bmp")
    for index, (cell, nucleus) in enumerate(cells, start=1):
        write_contour(folder / f"{stem}_cyt{index:02d}.dat", square(*cell), **contour_format)
        write_contour(folder / f"{stem}_nuc{index:02d}.dat", square(*nucleus), **contour_format)


def make_sipakmed(root: Path) -> Path:
    write_cluster(root / "im_Parabasal", "001")
    write_cluster(root / "im_Parabasal", "002", cells=CELLS[:1])
    # A copy unpacked one folder deeper, with single-cell crops that the reader ignores.
    nested = root / "im_Koilocytotic" / "im_Koilocytotic"
    write_cluster(nested, "001")
    write_cluster(nested / "CROPPED", "001_01", cells=CELLS[:1])
    return root


# Cx22: MATLAB cell arrays of images and of per-image instance masks.

CX22_SHAPES = [(10, 12), (8, 8)]  # H, W of the two fixture images


def cell_array(items: list) -> np.ndarray:
    """An N x 1 MATLAB cell array (numpy object array) containing `items`."""
    array = np.empty((len(items), 1), dtype=object)
    for index, item in enumerate(items):
        array[index, 0] = item
    return array


def box_mask(shape: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)  # scipy.io reads MATLAB logical arrays back as uint8
    mask[rows, cols] = 1
    return mask


def cx22_instances() -> tuple[list, list]:
    """Per image: cytoplasm instance masks (whole cells) and nucleus instance masks."""
    first, second = CX22_SHAPES
    cells = [
        [box_mask(first, slice(1, 6), slice(1, 7)), box_mask(first, slice(4, 9), slice(5, 11))],
        [box_mask(second, slice(2, 7), slice(2, 7))],
    ]
    nuclei = [
        [box_mask(first, slice(2, 4), slice(2, 4)), box_mask(first, slice(6, 8), slice(8, 10))],
        [box_mask(second, slice(4, 6), slice(4, 6))],
    ]
    return cells, nuclei


def write_cx22(
    root: Path, names=("ImageDataSet", "cyto_ins", "nuc_ins"), cells=None, nuclei=None, version: str = "7"
) -> Path:
    """Write generator/ImageDataSet.mat, cyto/cyto_ins.mat and nuc/nuc_ins.mat.

    version "7" writes MATLAB v5-format files with scipy.io (what save -v7 writes), and "7.3" writes
    HDF5-based files in MATLAB's v7.3 layout with write_mat_v73.
    """
    if version not in ("7", "7.3"):
        raise ValueError(f"version must be '7' or '7.3', got {version!r}")
    default_cells, default_nuclei = cx22_instances()
    cells = default_cells if cells is None else cells
    nuclei = default_nuclei if nuclei is None else nuclei
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (*shape, 3), dtype=np.uint8) for shape in CX22_SHAPES]
    contents = {
        "generator/ImageDataSet.mat": (names[0], cell_array(images)),
        "cyto/cyto_ins.mat": (names[1], cell_array([cell_array(masks) for masks in cells])),
        "nuc/nuc_ins.mat": (names[2], cell_array([cell_array(masks) for masks in nuclei])),
    }
    for relative, (name, value) in contents.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        if version == "7.3":
            write_mat_v73(root / relative, {name: value})
        else:
            scipy.io.savemat(root / relative, {name: value}, do_compression=True)
    return root


# MATLAB v7.3 files, as tbeu/matio src/mat73.c reads and writes them: HDF5 with a 512-byte user
# block that starts with the MATLAB header. Each variable is a dataset with a MATLAB_class attribute
# and its dimensions reversed, because MATLAB stores arrays column-major: an H x W x 3 image is an
# HDF5 dataset of shape (3, W, H). A cell array is a dataset of object references to its elements,
# which live in the group "#refs#". Logical arrays are stored as uint8 with MATLAB_class "logical".
# An empty array stores its MATLAB size as its data and has the attribute MATLAB_empty = 1.

MATLAB_V73_HEADER = (
    b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
).ljust(116) + bytes(8) + b"\x00\x02IM"  # text, subsystem offset, version 0x0200, endian indicator

MATLAB_CLASSES = {
    np.dtype(np.float64): "double",
    np.dtype(np.float32): "single",
    np.dtype(np.uint8): "uint8",
    np.dtype(np.uint16): "uint16",
    np.dtype(np.int32): "int32",
    np.dtype(bool): "logical",
}


def write_mat_v73(path: Path, variables: dict) -> None:
    """Write `variables` (numeric arrays and object arrays as cell arrays) as a MATLAB v7.3 file."""
    with h5py.File(path, "w", userblock_size=512) as file:
        refs = file.create_group("#refs#")
        for name, value in variables.items():
            _write_v73_value(file, refs, value, name)
    with open(path, "r+b") as handle:
        handle.write(MATLAB_V73_HEADER)


def _write_v73_value(group: h5py.Group, refs: h5py.Group, value: np.ndarray, name: str | None = None) -> h5py.Dataset:
    """Write `value` as dataset `name` of `group`, or under the next free name in "#refs#" if name is None."""
    value = np.asarray(value)
    if value.size == 0:
        # MATLAB stores an empty array as its size, marked by MATLAB_empty.
        matlab_class = "cell" if value.dtype == object else MATLAB_CLASSES[value.dtype]
        dataset = group.create_dataset(name or str(len(refs)), data=np.array(value.shape, dtype=np.uint64))
        dataset.attrs["MATLAB_class"] = np.bytes_(matlab_class)
        dataset.attrs["MATLAB_empty"] = np.uint8(1)
        return dataset

    if value.dtype == object:
        references = np.empty(value.shape, dtype=h5py.ref_dtype)
        for position in np.ndindex(value.shape):
            references[position] = _write_v73_value(refs, refs, value[position]).ref
        dataset = group.create_dataset(name or str(len(refs)), data=references.T)  # MATLAB (d1, d2) -> HDF5 (d2, d1)
        dataset.attrs["MATLAB_class"] = np.bytes_("cell")
        return dataset

    matlab_class = MATLAB_CLASSES[value.dtype]
    stored = value.astype(np.uint8) if value.dtype == bool else value
    dataset = group.create_dataset(name or str(len(refs)), data=stored.T, compression="gzip")  # (H, W, 3) -> (3, W, H)
    dataset.attrs["MATLAB_class"] = np.bytes_(matlab_class)
    if matlab_class == "logical":
        dataset.attrs["MATLAB_int_decode"] = np.int32(1)
    return dataset
