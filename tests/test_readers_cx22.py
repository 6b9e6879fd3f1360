"""Cx22 reader on small MATLAB v5 fixtures in the documented folder layout."""

import json

import numpy as np
import pytest
import scipy.io
from public_datasets import CX22_SHAPES, box_mask, cell_array, cx22_instances, write_cx22

from cervi_ray.data import BACKGROUND, CYTOPLASM, NUCLEUS, list_source, load_sample


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


def test_cx22_label_image_entries(tmp_path):
    # An entry may be one H x W label image instead of a cell array of masks.
    first, second = CX22_SHAPES
    label_image = np.zeros(first, np.uint8)
    label_image[1:6, 1:7] = 1
    label_image[6:9, 7:11] = 2
    cells = [label_image, box_mask(second, slice(2, 7), slice(2, 7))]
    nuclei = [box_mask(first, slice(2, 4), slice(2, 4)), box_mask(second, slice(4, 6), slice(4, 6))]
    root = tmp_path / "Cx22-Pair"
    write_cx22(root)
    scipy.io.savemat(root / "cyto/cyto_ins.mat", {"cyto_ins": cell_array(cells)})
    scipy.io.savemat(root / "nuc/nuc_ins.mat", {"nuc_ins": cell_array(nuclei)})
    sample = load_sample(list_source("cx22", root).iloc[0])
    assert sample.cell_instances.shape == (2, 10, 12)
    assert np.array_equal(sample.cell_instances[1], label_image == 2)
    assert sample.nucleus_instances.max() == 1


def test_cx22_custom_variable_names(tmp_path):
    root = write_cx22(tmp_path / "Cx22-Pair", names=("images", "cells", "nuclei"))
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


def test_cx22_matlab_v73_file(tmp_path):
    root = write_cx22(tmp_path / "Cx22-Pair")
    # A v7.3 file is HDF5 behind a 128-byte MATLAB header with version 0x0200.
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    v73 = root / "nuc" / "nuc_ins.mat"
    v73.write_bytes(header.ljust(116) + bytes(8) + b"\x00\x02IM" + bytes(512))
    with pytest.raises(ValueError, match="v7.3") as error:
        list_source("cx22", root)
    assert str(v73) in str(error.value)
    assert "h5py" in str(error.value)
    assert "-v7" in str(error.value)


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


def test_cx22_entry_count_mismatch(tmp_path):
    cells, nuclei = cx22_instances()
    root = write_cx22(tmp_path / "Cx22-Pair", nuclei=nuclei[:1], cells=cells)
    with pytest.raises(ValueError, match="different entry counts") as error:
        list_source("cx22", root)
    assert "nuc_ins.mat (nuc_ins): 1" in str(error.value)


def test_cx22_mask_size_mismatch(tmp_path):
    cells, nuclei = cx22_instances()
    cells[1] = [box_mask((9, 8), slice(2, 7), slice(2, 7))]
    root = write_cx22(tmp_path / "Cx22-Pair", cells=cells)
    table = list_source("cx22", root)
    with pytest.raises(ValueError, match=r"9 x 8 .* 8 x 8") as error:
        load_sample(table.iloc[1])
    assert "cyto_ins.mat entry 2, instance 1" in str(error.value)
