"""Cx22 reader on small MATLAB v7 (v5-format) and v7.3 (HDF5) fixtures in the documented folder layout."""

import json
import shutil

import h5py
import numpy as np
import pytest
import scipy.io
from public_datasets import CX22_SHAPES, box_mask, cell_array, cx22_instances, write_cx22, write_mat_v73
from scipy.io.matlab import matfile_version

from cervi_ray.data import BACKGROUND, CYTOPLASM, NUCLEUS, list_source, load_sample
from cervi_ray.data import matlab

VERSIONS = ["7", "7.3"]


def write_label_file(path, name, value, version):
    """Write one MATLAB variable in the given file version, as write_cx22 does."""
    if version == "7.3":
        write_mat_v73(path, {name: value})
    else:
        scipy.io.savemat(path, {name: value})


def test_cx22_listing_rows(tmp_path):
    root = write_cx22(tmp_path / "Cx22-Pair")
    table = list_source("cx22", root, source="cx22_pair")
    assert table["id"].tolist() == ["cx22_pair/0001", "cx22_pair/0002"]
    assert table["group"].tolist() == ["cx22_pair/0001", "cx22_pair/0002"]
    assert table["mask_index"].tolist() == [0, 1]
    assert table["height"].tolist() == [10, 8]
    assert table["width"].tolist() == [12, 8]
    assert set(table["label_class"]) == {""}  # Cx22 has no class labels
    assert set(table["annotation"]) == {"full"}
    assert all(path.endswith("ImageDataSet.mat") for path in table["image_path"])
    assert all(path.endswith("cyto_ins.mat") for path in table["mask_path"])
    options = json.loads(table["reader_options"].iloc[0])
    assert options == {"mat_variables": {"cells": "cyto_ins", "images": "ImageDataSet", "nuclei": "nuc_ins"}}


def test_cx22_sample_instances(tmp_path):
    root = write_cx22(tmp_path / "Cx22-Pair")
    table = list_source("cx22", root)
    first, second = (load_sample(row) for _, row in table.iterrows())
    cells, nuclei = cx22_instances()

    assert first.image.shape == (10, 12, 3)
    assert first.cell_instances.shape == (2, 10, 12)
    assert first.cell_instances.dtype == bool
    assert first.nucleus_instances.max() == 2
    assert np.array_equal(first.nucleus_instances == 2, nuclei[0][1] == 1)
    expected = np.zeros((10, 12), np.uint8)
    expected[(cells[0][0] == 1) | (cells[0][1] == 1)] = CYTOPLASM
    expected[(nuclei[0][0] == 1) | (nuclei[0][1] == 1)] = NUCLEUS
    assert np.array_equal(first.mask, expected)

    assert second.image.shape == (8, 8, 3)
    assert second.cell_instances.shape == (1, 8, 8)
    assert set(np.unique(second.mask)) == {BACKGROUND, CYTOPLASM, NUCLEUS}


@pytest.mark.parametrize("version", VERSIONS)
def test_cx22_label_image_entries(tmp_path, version):
    # An entry may be one H x W label image instead of a cell array of masks.
    first, second = CX22_SHAPES
    label_image = np.zeros(first, np.uint8)
    label_image[1:6, 1:7] = 1
    label_image[6:9, 7:11] = 2
    cells = [label_image, box_mask(second, slice(2, 7), slice(2, 7))]
    nuclei = [box_mask(first, slice(2, 4), slice(2, 4)), box_mask(second, slice(4, 6), slice(4, 6))]
    root = tmp_path / "Cx22-Pair"
    write_cx22(root, version=version)
    write_label_file(root / "cyto/cyto_ins.mat", "cyto_ins", cell_array(cells), version)
    write_label_file(root / "nuc/nuc_ins.mat", "nuc_ins", cell_array(nuclei), version)
    sample = load_sample(list_source("cx22", root).iloc[0])
    assert sample.cell_instances.shape == (2, 10, 12)
    assert np.array_equal(sample.cell_instances[1], label_image == 2)
    assert sample.nucleus_instances.max() == 1


@pytest.mark.parametrize("version", VERSIONS)
def test_cx22_custom_variable_names(tmp_path, version):
    root = write_cx22(tmp_path / "Cx22-Pair", names=("images", "cells", "nuclei"), version=version)
    with pytest.raises(ValueError, match=r"variable 'ImageDataSet', got the variables \['images'\]") as error:
        list_source("cx22", root)
    assert "ImageDataSet.mat" in str(error.value)
    names = {"images": "images", "cells": "cells", "nuclei": "nuclei"}
    table = list_source("cx22", root, mat_variables=names)
    assert load_sample(table.iloc[0]).cell_instances.shape == (2, 10, 12)


@pytest.mark.parametrize(
    ("mat_variables", "message"),
    [({"labels": "x"}, r"keys must be among"), ({"cells": "not a name"}, "must be a MATLAB variable name")],
)
def test_cx22_bad_variable_names(tmp_path, mat_variables, message):
    root = write_cx22(tmp_path / "Cx22-Pair")
    with pytest.raises(ValueError, match=message):
        list_source("cx22", root, mat_variables=mat_variables)


def test_cx22_v73_header_without_hdf5(tmp_path):
    root = write_cx22(tmp_path / "Cx22-Pair")
    # A v7.3 file is HDF5 behind a 128-byte MATLAB header with version 0x0200. Here no HDF5 follows.
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    v73 = root / "nuc" / "nuc_ins.mat"
    v73.write_bytes(header.ljust(116) + bytes(8) + b"\x00\x02IM" + bytes(512))
    with pytest.raises(ValueError, match="v7.3 file, but it contains no valid HDF5 data") as error:
        list_source("cx22", root)
    assert str(v73) in str(error.value)


def test_cx22_v73_truncated_file(tmp_path):
    root = write_cx22(tmp_path / "Cx22-Pair", version="7.3")
    v73 = root / "cyto" / "cyto_ins.mat"
    v73.write_bytes(v73.read_bytes()[:1024])  # keeps the HDF5 signature but cuts off the data
    with pytest.raises(ValueError, match="Cannot read MATLAB file") as error:
        list_source("cx22", root)
    assert str(v73) in str(error.value)


def test_cx22_missing_file(tmp_path):
    root = write_cx22(tmp_path / "Cx22-Pair")
    (root / "nuc" / "nuc_ins.mat").unlink()
    with pytest.raises(FileNotFoundError, match="not found") as error:
        list_source("cx22", root)
    assert str(root / "nuc" / "nuc_ins.mat") in str(error.value)


def test_cx22_broken_file(tmp_path):
    root = write_cx22(tmp_path / "Cx22-Pair")
    (root / "cyto" / "cyto_ins.mat").write_bytes(b"not a MATLAB file")
    with pytest.raises(ValueError, match="Cannot read MATLAB file") as error:
        list_source("cx22", root)
    assert str(root / "cyto" / "cyto_ins.mat") in str(error.value)


@pytest.mark.parametrize("version", VERSIONS)
def test_cx22_entry_count_mismatch(tmp_path, version):
    cells, nuclei = cx22_instances()
    root = write_cx22(tmp_path / "Cx22-Pair", nuclei=nuclei[:1], cells=cells, version=version)
    with pytest.raises(ValueError, match="different entry counts") as error:
        list_source("cx22", root)
    assert "nuc_ins.mat (nuc_ins): 1" in str(error.value)


@pytest.mark.parametrize("version", VERSIONS)
def test_cx22_mask_size_mismatch(tmp_path, version):
    cells, nuclei = cx22_instances()
    cells[1] = [box_mask((9, 8), slice(2, 7), slice(2, 7))]
    root = write_cx22(tmp_path / "Cx22-Pair", cells=cells, version=version)
    table = list_source("cx22", root)
    with pytest.raises(ValueError, match=r"9 x 8 .* 8 x 8") as error:
        load_sample(table.iloc[1])
    assert "cyto_ins.mat (cyto_ins) entry 2, instance 1" in str(error.value)


# MATLAB v7.3 (HDF5) files.


def test_cx22_v73_fixture_layout(tmp_path):
    # The fixture must store what MATLAB stores, or the equality tests below prove nothing.
    root = write_cx22(tmp_path / "Cx22-Pair", version="7.3")
    images_path = root / "generator/ImageDataSet.mat"
    assert matfile_version(str(images_path)) == (2, 0)
    with h5py.File(images_path, "r") as file:
        images = file["ImageDataSet"]
        assert images.attrs["MATLAB_class"] == b"cell"
        assert images.shape == (1, 2)  # a 2 x 1 cell array, dimensions reversed
        first_image = file[images[0, 0]]
        assert first_image.name.startswith("/#refs#/")
        assert first_image.shape == (3, 12, 10)  # a 10 x 12 x 3 image, dimensions reversed
    with h5py.File(root / "cyto/cyto_ins.mat", "r") as file:
        first_entry = file[file["cyto_ins"][0, 0]]
        assert first_entry.attrs["MATLAB_class"] == b"cell"
        assert first_entry.shape == (1, 2)  # two instances
        assert file[first_entry[0, 0]].shape == (12, 10)  # a 10 x 12 mask


@pytest.mark.parametrize("mask_dtype", [np.uint8, bool], ids=["uint8", "logical"])
def test_cx22_v73_matches_v7(tmp_path, mask_dtype):
    cells, nuclei = cx22_instances()
    cells = [[mask.astype(mask_dtype) for mask in masks] for masks in cells]
    nuclei = [[mask.astype(mask_dtype) for mask in masks] for masks in nuclei]
    v7_root = write_cx22(tmp_path / "v7" / "Cx22-Pair", cells=cells, nuclei=nuclei, version="7")
    v73_root = write_cx22(tmp_path / "v73" / "Cx22-Pair", cells=cells, nuclei=nuclei, version="7.3")
    v7_table = list_source("cx22", v7_root)
    v73_table = list_source("cx22", v73_root)

    columns = ["id", "height", "width", "mask_index", "group", "reader_options"]
    assert v73_table[columns].equals(v7_table[columns])
    for (_, v7_row), (_, v73_row) in zip(v7_table.iterrows(), v73_table.iterrows()):
        v7_sample, v73_sample = load_sample(v7_row), load_sample(v73_row)
        assert np.array_equal(v73_sample.image, v7_sample.image)
        assert np.array_equal(v73_sample.mask, v7_sample.mask)
        assert np.array_equal(v73_sample.cell_instances, v7_sample.cell_instances)
        assert np.array_equal(v73_sample.nucleus_instances, v7_sample.nucleus_instances)
        assert set(np.unique(v73_sample.mask)) == {BACKGROUND, CYTOPLASM, NUCLEUS}

    # The masks are not symmetric, so a missing transpose would change them.
    first = load_sample(v73_table.iloc[0])
    assert first.image.shape == (10, 12, 3)
    assert np.array_equal(first.cell_instances[0], cells[0][0] != 0)


def test_cx22_v73_labels_with_v7_images(tmp_path):
    # ImageDataSet.mat comes from the user's MATLAB, so it may be v7 while the labels are v7.3.
    v7_root = write_cx22(tmp_path / "v7" / "Cx22-Pair")
    mixed_root = write_cx22(tmp_path / "mixed" / "Cx22-Pair", version="7.3")
    shutil.copyfile(v7_root / "generator/ImageDataSet.mat", mixed_root / "generator/ImageDataSet.mat")
    v7_table = list_source("cx22", v7_root)
    mixed_table = list_source("cx22", mixed_root)
    assert matfile_version(str(mixed_root / "generator/ImageDataSet.mat")) == (1, 0)  # v5 format
    for (_, v7_row), (_, mixed_row) in zip(v7_table.iterrows(), mixed_table.iterrows()):
        v7_sample, mixed_sample = load_sample(v7_row), load_sample(mixed_row)
        assert np.array_equal(mixed_sample.image, v7_sample.image)
        assert np.array_equal(mixed_sample.cell_instances, v7_sample.cell_instances)
        assert np.array_equal(mixed_sample.nucleus_instances, v7_sample.nucleus_instances)


def test_cx22_v73_empty_cell_elements(tmp_path):
    # MATLAB stores [] as its size, marked by MATLAB_empty. As in the v7 path, such elements add no instance.
    cells, nuclei = cx22_instances()
    cells[1] = [np.zeros((0, 0)), cells[1][0]]
    root = write_cx22(tmp_path / "Cx22-Pair", cells=cells, nuclei=nuclei, version="7.3")
    sample = load_sample(list_source("cx22", root).iloc[1])
    assert sample.cell_instances.shape == (1, 8, 8)


def test_cx22_v73_reads_entries_lazily(tmp_path):
    # v7.3 files are read one entry at a time and never loaded whole into the per-process cache.
    matlab.load_variable.cache_clear()
    root = write_cx22(tmp_path / "Cx22-Pair", version="7.3")
    for _, row in list_source("cx22", root).iterrows():
        load_sample(row)
    assert matlab.load_variable.cache_info().currsize == 0


def v73_wrong_content(root):
    """Return, per case, a fixture file to overwrite, its wrong content and the expected error."""
    cells, _ = cx22_instances()
    first, second = CX22_SHAPES
    return {
        "variable is not a cell": (
            root / "nuc/nuc_ins.mat",
            {"nuc_ins": np.zeros((2, 1))},
            r"variable 'nuc_ins' must be a cell array with one entry per image, "
            r"got MATLAB class 'double' of size 2 x 1",
        ),
        "image with 4 channels": (
            root / "generator/ImageDataSet.mat",
            {"ImageDataSet": cell_array([np.zeros((*first, 4), np.uint8), np.zeros((*second, 3), np.uint8)])},
            r"ImageDataSet.mat \(ImageDataSet\) entry 1 must be an H x W x 3 or H x W uint8 image, "
            r"got shape \(10, 12, 4\)",
        ),
        "nested cell": (
            root / "cyto/cyto_ins.mat",
            {"cyto_ins": cell_array([cell_array([cell_array(masks)]) for masks in cells])},
            r"cyto_ins.mat \(cyto_ins\) entry 1, cell element 1 must be a numeric or logical MATLAB array, "
            r"got MATLAB class 'cell' of size 2 x 1",
        ),
    }


@pytest.mark.parametrize("case", ["variable is not a cell", "image with 4 channels", "nested cell"])
def test_cx22_v73_wrong_content(tmp_path, case):
    root = write_cx22(tmp_path / "Cx22-Pair", version="7.3")
    path, variables, message = v73_wrong_content(root)[case]
    write_mat_v73(path, variables)
    with pytest.raises(ValueError, match=message) as error:
        for _, row in list_source("cx22", root).iterrows():
            load_sample(row)
    assert str(path) in str(error.value)
