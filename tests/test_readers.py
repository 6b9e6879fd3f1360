"""Readers on the real ISBI data and on generated folder sources and broken files."""

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.ndimage as ndi
from PIL import Image

from cervi_ray.data import (
    BACKGROUND,
    CYTOPLASM,
    NUCLEUS,
    list_source,
    load_image,
    load_sample,
    nuclei_from_outlines,
)

# Kind and folder of each real source under the data root.
REAL_SOURCES = {
    "isbi2015": "isbi2015/Training",
    "isbi2014_train45": "isbi2014/train45",
    "isbi2014_test90": "isbi2014/test90",
    "isbi2014_edf_real": "isbi2014/edf_real",
}


def load_all(data_root: Path, kind: str) -> list:
    table = list_source(kind, data_root / REAL_SOURCES[kind])
    return [load_sample(row) for _, row in table.iterrows()]


@pytest.fixture(scope="module")
def isbi2015_samples(data_root):
    return load_all(data_root, "isbi2015")


@pytest.fixture(scope="module")
def train45_samples(data_root):
    return load_all(data_root, "isbi2014_train45")


@pytest.fixture(scope="module")
def test90_samples(data_root):
    return load_all(data_root, "isbi2014_test90")


@pytest.fixture(scope="module")
def edf_samples(data_root):
    return load_all(data_root, "isbi2014_edf_real")


def check_full_sample(sample, size: int) -> None:
    """Checks shared by every fully annotated ISBI sample of `size` x `size` pixels."""
    assert sample.image.shape == (size, size, 3)
    assert sample.image.dtype == np.uint8
    # Grey input is repeated, so the three channels are equal.
    assert np.array_equal(sample.image[:, :, 0], sample.image[:, :, 2])
    assert sample.mask.shape == (size, size)
    assert sample.mask.dtype == np.uint8
    assert set(np.unique(sample.mask)) == {BACKGROUND, CYTOPLASM, NUCLEUS}
    assert sample.annotation == "full"
    assert sample.cell_instances.dtype == bool
    assert sample.cell_instances.shape[1:] == (size, size)
    assert sample.nucleus_instances.dtype == np.int32
    # Cytoplasm is the union of the cells minus the nuclei.
    union = sample.cell_instances.any(axis=0)
    nucleus = sample.mask == NUCLEUS
    assert np.array_equal(sample.mask == CYTOPLASM, union & ~nucleus)
    assert np.array_equal(sample.nucleus_instances > 0, nucleus)
    # Every annotated cell contains nucleus pixels.
    for cell in sample.cell_instances:
        assert (cell & nucleus).any(), sample.id


# ISBI 2015.


def test_isbi2015_listing(data_root):
    table = list_source("isbi2015", data_root / REAL_SOURCES["isbi2015"])
    frames = ["frame004", "frame007", "frame010", "frame011", "frame013", "frame014", "frame016", "frame017"]
    assert table["id"].tolist() == [f"isbi2015/{frame}" for frame in frames]
    assert table["group"].tolist() == [f"isbi2015/{frame}" for frame in frames]
    assert set(table["height"]) == {1024}
    assert set(table["width"]) == {1024}
    assert set(table["annotation"]) == {"full"}
    assert set(table["mask_index"]) == {-1}


def test_isbi2015_samples(isbi2015_samples, data_root):
    assert len(isbi2015_samples) == 8
    for sample in isbi2015_samples:
        check_full_sample(sample, 1024)
        assert sample.meta["group"] == sample.id
        # The nucleus label is exactly where NucleusGT is nonzero.
        stem = sample.id.split("/")[1]
        stored = np.asarray(Image.open(data_root / "isbi2015/Training/NucleusGT" / f"{stem}_NUGT.png"))
        assert np.array_equal(sample.mask == NUCLEUS, stored > 0)


def test_isbi2015_counts(isbi2015_samples):
    # 320 annotated cells, and 314 nuclei as 4-connected components of NucleusGT.
    assert sum(s.cell_instances.shape[0] for s in isbi2015_samples) == 320
    assert sum(int(s.nucleus_instances.max()) for s in isbi2015_samples) == 314
    # Cells overlap: in every frame some pixel lies in two or more cells.
    for sample in isbi2015_samples:
        assert (sample.cell_instances.sum(axis=0) > 1).any(), sample.id


# ISBI 2014 training set.


def test_train45_listing(data_root):
    table = list_source("isbi2014_train45", data_root / REAL_SOURCES["isbi2014_train45"])
    # Natural order: 1, 2, ..., 45, each image its own group, entry N - 1 of the .mat file.
    assert table["id"].tolist() == [f"isbi2014_train45/{n}" for n in range(1, 46)]
    assert table["mask_index"].tolist() == list(range(45))
    assert table["group"].nunique() == 45
    assert set(table["height"]) == {512}
    assert all(path.endswith("isbi_train_GT.mat") for path in table["mask_path"])


def test_train45_samples(train45_samples, data_root):
    contents = scipy.io.loadmat(data_root / "isbi2014/train45/isbi_train_GT.mat")
    cells_per_image = contents["CellNum"].reshape(-1)
    assert len(train45_samples) == 45
    for index, sample in enumerate(train45_samples):
        check_full_sample(sample, 512)
        # The cell count matches the file's own CellNum statistic.
        assert sample.cell_instances.shape[0] == cells_per_image[index]
        assert np.array_equal(sample.mask == NUCLEUS, contents["train_Nuclei"][index, 0] > 0)
    # CellNum of the 45 images sums to 270.
    assert sum(s.cell_instances.shape[0] for s in train45_samples) == 270


# ISBI 2014 test set.


def test_test90_samples(test90_samples):
    assert len(test90_samples) == 90
    assert [s.id for s in test90_samples][:2] == ["isbi2014_test90/isbi_test_im001", "isbi2014_test90/isbi_test_im002"]
    for sample in test90_samples:
        check_full_sample(sample, 512)
    counts = [s.cell_instances.shape[0] for s in test90_samples]
    # 540 cells, 2 to 10 per image.
    assert sum(counts) == 540
    assert min(counts) == 2
    assert max(counts) == 10


# ISBI 2014 real EDF images with nucleus outlines.


def test_edf_real_samples(edf_samples, data_root):
    assert [s.id for s in edf_samples] == [f"isbi2014_edf_real/EDF00{i}" for i in range(4)]
    for sample in edf_samples:
        assert sample.image.shape == (1024, 1024, 3)
        assert sample.annotation == "nucleus"
        assert sample.cell_instances is None
        assert set(np.unique(sample.mask)) == {BACKGROUND, NUCLEUS}
        # Outline pixels count as nucleus.
        outlines = np.asarray(Image.open(Path(sample.meta["mask_path"])))
        assert np.all(sample.mask[outlines > 0] == NUCLEUS)
        assert np.array_equal(sample.mask == NUCLEUS, ndi.binary_fill_holes(outlines > 0))
        assert np.array_equal(sample.nucleus_instances > 0, sample.mask == NUCLEUS)


def test_edf_real_nucleus_counts(edf_samples):
    # Two nuclei of EDF003 share part of their outline. Connected components of the filled
    # mask merge them (29), but labelling the interiors counts all 30 drawn outlines.
    counts = [int(s.nucleus_instances.max()) for s in edf_samples]
    assert counts == [37, 33, 37, 30]
    components = [ndi.label(s.mask == NUCLEUS)[1] for s in edf_samples]
    assert components == [37, 33, 37, 29]
    for sample in edf_samples:
        labels = sample.nucleus_instances
        # Labels are 1..count with no gap.
        assert set(np.unique(labels)) == set(range(int(labels.max()) + 1))


def test_outlines_touching_squares():
    outlines = np.zeros((12, 20), np.uint8)
    # Two 5 x 5 interiors whose outlines share the column x = 7.
    outlines[2:9, 1:8] = 50
    outlines[3:8, 2:7] = 0
    outlines[2:9, 7:14] = 90
    outlines[3:8, 8:13] = 0
    labels = nuclei_from_outlines(outlines)
    assert labels.max() == 2
    assert labels[5, 4] != labels[5, 10]
    # Every drawn pixel belongs to a nucleus, and the shared column joins one of the two.
    assert np.all(labels[outlines > 0] > 0)
    assert labels[0, 0] == 0


def test_outlines_without_interior():
    outlines = np.zeros((8, 8), np.uint8)
    outlines[2:4, 2:4] = 1  # a 2 x 2 blob encloses no pixel
    labels = nuclei_from_outlines(outlines)
    assert labels.max() == 1
    assert labels[2:4, 2:4].min() == 1
    assert nuclei_from_outlines(np.zeros((4, 4), np.uint8)).max() == 0


# load_image on generated files.


@pytest.mark.parametrize(
    ("mode", "stored", "expected"),
    [
        ("L", np.full((4, 5), 77, np.uint8), 77),
        ("I;16", np.full((4, 5), 32896, np.uint16), 128),  # 32896 / 257 = 128
        ("I;16", np.full((4, 5), 65535, np.uint16), 255),
        ("1", np.ones((4, 5), bool), 255),
    ],
)
def test_load_image_grey_modes(tmp_path, mode, stored, expected):
    path = tmp_path / "image.png"
    Image.fromarray(stored).save(path)
    assert Image.open(path).mode == mode
    image = load_image(path)
    assert image.shape == (4, 5, 3)
    assert image.dtype == np.uint8
    assert np.all(image == expected)


def test_load_image_colour_modes(tmp_path):
    rgb = np.zeros((3, 4, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[..., 2] = 10
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    rgba = np.dstack([rgb, np.full((3, 4), 5, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert np.array_equal(load_image(tmp_path / "rgb.png"), rgb)
    # Alpha is dropped, colour kept.
    assert np.array_equal(load_image(tmp_path / "rgba.png"), rgb)


def write_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def broken_files(tmp_path: Path) -> dict[str, Path]:
    """Write a zero-byte file, a truncated PNG and a text file named .png."""
    good = write_png(tmp_path / "good.png", np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    data = good.read_bytes()
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("this is not an image\n")
    return {name: tmp_path / f"{name}.png" for name in ("zero", "truncated", "text")}


@pytest.mark.parametrize("name", ["zero", "truncated", "text"])
def test_load_image_broken_file(tmp_path, name):
    path = broken_files(tmp_path)[name]
    with pytest.raises(ValueError, match="Cannot read image") as error:
        load_image(path)
    assert str(path) in str(error.value)
    assert "Replace it" in str(error.value)
    assert error.value.__cause__ is not None


def test_load_image_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_load_image_decompression_bomb(tmp_path, monkeypatch):
    path = write_png(tmp_path / "large.png", np.zeros((64, 64), np.uint8))
    # PIL raises above twice MAX_IMAGE_PIXELS: 4096 pixels > 2 * 1000.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="decompression bombs") as error:
        load_image(path)
    assert str(path) in str(error.value)


def test_load_image_float_mode(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.zeros((4, 4), np.float32)).save(path)
    with pytest.raises(ValueError, match="floating-point"):
        load_image(path)


# Folder sources.


def make_folder_source(root: Path, stems=("p1_a", "p1_b", "p2_a"), values=(0, 128, 255), size=(20, 30)) -> Path:
    """Write images/<stem>.png and masks/<stem>.png with three horizontal bands of `values`."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    height, width = size
    for index, stem in enumerate(stems):
        image = np.full((height, width), 40 * index, np.uint8)
        mask = np.zeros((height, width), np.uint8)
        mask[height // 3 : 2 * height // 3] = values[1]
        mask[2 * height // 3 :] = values[2]
        write_png(root / "images" / f"{stem}.png", image)
        write_png(root / "masks" / f"{stem}.png", mask)
    return root


def test_folder_value_map_and_groups(tmp_path):
    root = make_folder_source(tmp_path / "src")
    table = list_source("folder", root, source="mine", group_pattern=r"^(p\d+)_", value_map={0: 0, 128: 1, 255: 2})
    assert table["id"].tolist() == ["mine/p1_a", "mine/p1_b", "mine/p2_a"]
    assert table["group"].tolist() == ["mine/p1", "mine/p1", "mine/p2"]
    assert set(table["height"]) == {20}
    assert set(table["width"]) == {30}
    sample = load_sample(table.iloc[0])
    # Bands: rows 0-5 value 0, rows 6-12 value 128, rows 13-19 value 255.
    assert sample.mask[0, 0] == BACKGROUND
    assert sample.mask[10, 0] == CYTOPLASM
    assert sample.mask[19, 29] == NUCLEUS
    assert sample.cell_instances is None
    assert sample.nucleus_instances.max() == 1
    assert sample.image.shape == (20, 30, 3)


def test_folder_other_extensions(tmp_path):
    root = tmp_path / "src"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    image = np.full((8, 8, 3), 90, np.uint8)
    mask = np.ones((8, 8), np.uint8)
    Image.fromarray(image).save(root / "images" / "a.jpg")
    Image.fromarray(image).save(root / "images" / "b.TIF")
    Image.fromarray(image).save(root / "images" / "c.bmp")
    for stem in "abc":
        Image.fromarray(mask).save(root / "masks" / f"{stem}.tif")
    table = list_source("folder", root)
    assert table["id"].tolist() == ["folder/a", "folder/b", "folder/c"]
    for _, row in table.iterrows():
        assert set(np.unique(load_sample(row).mask)) == {CYTOPLASM}


def test_folder_unknown_mask_values(tmp_path):
    root = make_folder_source(tmp_path / "src")
    table = list_source("folder", root)  # default map {0: 0, 1: 1, 2: 2}
    with pytest.raises(ValueError, match="128, 255") as error:
        load_sample(table.iloc[0])
    assert str(root / "masks" / "p1_a.png") in str(error.value)
    assert "value map {0: 0, 1: 1, 2: 2}" in str(error.value)


def test_folder_mask_size_mismatch(tmp_path):
    root = make_folder_source(tmp_path / "src", values=(0, 1, 2))
    write_png(root / "masks" / "p1_b.png", np.zeros((21, 30), np.uint8))
    table = list_source("folder", root)
    with pytest.raises(ValueError, match=r"21 x 30 .* 20 x 30") as error:
        load_sample(table.iloc[1])
    assert "p1_b.png" in str(error.value)
    assert str(root / "images" / "p1_b.png") in str(error.value)


def test_folder_image_without_mask(tmp_path):
    root = make_folder_source(tmp_path / "src", values=(0, 1, 2))
    (root / "masks" / "p2_a.png").unlink()
    with pytest.raises(ValueError, match="has no mask") as error:
        list_source("folder", root)
    assert str(root / "images" / "p2_a.png") in str(error.value)
    assert str(root / "masks" / "p2_a") in str(error.value)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (r"^(q\d+)_", "does not match group_pattern"),  # no stem starts with q
        (r"^p\d+_", "must contain a capture group"),
        (r"^(p\d+", "not a valid regular expression"),
    ],
)
def test_folder_bad_group_pattern(tmp_path, pattern, message):
    root = make_folder_source(tmp_path / "src", values=(0, 1, 2))
    with pytest.raises(ValueError, match=message) as error:
        list_source("folder", root, group_pattern=pattern)
    assert repr(pattern) in str(error.value)


@pytest.mark.parametrize("name", ["zero", "text"])
def test_folder_broken_image_header(tmp_path, name):
    root = make_folder_source(tmp_path / "src", values=(0, 1, 2))
    target = root / "images" / "p1_a.png"
    target.write_bytes(broken_files(tmp_path)[name].read_bytes())
    # Listing reads the header, so a file without a valid header fails there.
    with pytest.raises(ValueError, match="Cannot read image") as error:
        list_source("folder", root)
    assert str(target) in str(error.value)


def test_folder_truncated_image(tmp_path):
    root = make_folder_source(tmp_path / "src", values=(0, 1, 2))
    target = root / "images" / "p1_a.png"
    target.write_bytes(broken_files(tmp_path)["truncated"].read_bytes())
    # The header is intact, so listing succeeds and loading the pixels fails.
    table = list_source("folder", root)
    with pytest.raises(ValueError, match="Cannot read image") as error:
        load_sample(table.iloc[0])
    assert str(target) in str(error.value)


def test_folder_broken_mask(tmp_path):
    root = make_folder_source(tmp_path / "src", values=(0, 1, 2))
    mask_path = root / "masks" / "p1_a.png"
    data = mask_path.read_bytes()
    mask_path.write_bytes(data[: len(data) // 2])
    table = list_source("folder", root)
    with pytest.raises(ValueError, match="Cannot read mask") as error:
        load_sample(table.iloc[0])
    assert str(mask_path) in str(error.value)


def test_folder_nucleus_annotation(tmp_path):
    root = make_folder_source(tmp_path / "src", values=(0, 0, 255))
    table = list_source("folder", root, value_map={0: 0, 255: 2}, annotation="nucleus")
    sample = load_sample(table.iloc[0])
    assert sample.annotation == "nucleus"
    assert set(np.unique(sample.mask)) == {BACKGROUND, NUCLEUS}
    # A nucleus-only source must not map any value to cytoplasm.
    table = list_source("folder", root, value_map={0: 0, 255: 1}, annotation="nucleus")
    with pytest.raises(ValueError, match="annotated 'nucleus'"):
        load_sample(table.iloc[0])


def test_folder_colour_mask(tmp_path):
    root = make_folder_source(tmp_path / "src", values=(0, 1, 2))
    colour = np.zeros((20, 30, 3), np.uint8)
    colour[..., 1] = 1
    write_png(root / "masks" / "p1_a.png", colour)
    table = list_source("folder", root)
    with pytest.raises(ValueError, match="different values per channel"):
        load_sample(table.iloc[0])


def test_folder_duplicate_stems(tmp_path):
    root = make_folder_source(tmp_path / "src", values=(0, 1, 2))
    write_png(root / "images" / "p1_a.bmp", np.zeros((20, 30), np.uint8))
    with pytest.raises(ValueError, match="share the stem 'p1_a'"):
        list_source("folder", root)


def test_folder_bad_value_map(tmp_path):
    root = make_folder_source(tmp_path / "src", values=(0, 1, 2))
    with pytest.raises(ValueError, match="labels must be in 0..2"):
        list_source("folder", root, value_map={0: 0, 255: 3})
    with pytest.raises(ValueError, match="JSON object"):
        list_source("folder", root, value_map="{not json")
