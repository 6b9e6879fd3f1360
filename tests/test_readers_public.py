"""Readers of DTU/Herlev and SIPaKMeD on fixtures in each documented format, and manifests of the new kinds."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from public_datasets import (
    BLUE,
    CLUSTER_SIZE,
    DARK_BLUE,
    RED,
    herlev_labels,
    make_herlev,
    make_sipakmed,
    paint,
    square,
    write_cluster,
    write_contour,
    write_cx22,
    write_herlev_cell,
)

from cervi_ray.config import ConfigError, config_from_dict
from cervi_ray.data import (
    BACKGROUND,
    COLUMNS,
    CYTOPLASM,
    NUCLEUS,
    build_manifest,
    list_source,
    load_sample,
    read_contour,
    read_manifest,
    write_manifest,
)

# DTU/Herlev.


def test_herlev_listing_rows(tmp_path):
    root = make_herlev(tmp_path / "herlev")
    table = list_source("dtu_herlev", root, source="herlev")
    expected_ids = [
        "herlev/carcinoma_in_situ/153958345-153958392-001",
        "herlev/carcinoma_in_situ/153958345-153958392-002",
        "herlev/normal_columnar/157181399-157181419-001",
    ]
    assert table["id"].tolist() == expected_ids
    assert table["group"].tolist() == expected_ids  # each cell is its own group
    assert table["label_class"].tolist() == ["carcinoma_in_situ", "carcinoma_in_situ", "normal_columnar"]
    assert set(table["kind"]) == {"dtu_herlev"}
    assert set(table["annotation"]) == {"full"}
    assert set(table["height"]) == {12}
    assert set(table["width"]) == {16}
    assert all(path.endswith("-d.bmp") for path in table["mask_path"])
    options = json.loads(table["reader_options"].iloc[0])
    assert options == {"colour_map": {"#000080": CYTOPLASM, "#0000ff": NUCLEUS, "#ff0000": BACKGROUND}}


def test_herlev_sample_labels(tmp_path):
    root = make_herlev(tmp_path / "herlev")
    sample = load_sample(list_source("dtu_herlev", root).iloc[0])
    assert np.array_equal(sample.mask, herlev_labels())
    assert sample.image.shape == (12, 16, 3)
    assert sample.annotation == "full"
    # One cell: the instance is every non-background pixel.
    assert sample.cell_instances.shape == (1, 12, 16)
    assert np.array_equal(sample.cell_instances[0], herlev_labels() != BACKGROUND)
    assert sample.nucleus_instances.max() == 1
    assert np.array_equal(sample.nucleus_instances > 0, herlev_labels() == NUCLEUS)
    assert sample.meta["label_class"] == "carcinoma_in_situ"


def test_herlev_palette_mask(tmp_path):
    folder = tmp_path / "herlev" / "light_dysplastic"
    labels = write_herlev_cell(folder, "cell")
    # Rewrite the segmentation as an 8-bit palette BMP whose indices are the labels.
    palette_mask = Image.fromarray(labels, mode="P")
    palette_mask.putpalette([*RED, *DARK_BLUE, *BLUE] + [0] * (256 - 3) * 3)
    palette_mask.save(folder / "cell-d.bmp")
    sample = load_sample(list_source("dtu_herlev", tmp_path / "herlev").iloc[0])
    assert np.array_equal(sample.mask, labels)


def test_herlev_unknown_colours_listed(tmp_path):
    folder = tmp_path / "herlev" / "normal_intermediate"
    write_herlev_cell(folder, "cell", colours=((0, 0, 0), (128, 128, 128), (255, 255, 255)))
    table = list_source("dtu_herlev", tmp_path / "herlev")
    with pytest.raises(ValueError, match="colours not in the colour map") as error:
        load_sample(table.iloc[0])
    message = str(error.value)
    assert str(folder / "cell-d.bmp") in message
    # All three colours are listed with their pixel counts, most frequent first.
    assert "#000000 (112 pixels)" in message
    assert "#808080 (71 pixels)" in message
    assert "#ffffff (9 pixels)" in message


def test_herlev_custom_colour_map(tmp_path):
    folder = tmp_path / "herlev" / "normal_intermediate"
    labels = write_herlev_cell(folder, "cell", colours=((0, 0, 0), (128, 128, 128), (255, 255, 255)))
    # Keys may be written "R,G,B" or "#RRGGBB" in either case.
    colour_map = {"0,0,0": 0, "#808080": 1, "#FFFFFF": 2}
    table = list_source("dtu_herlev", tmp_path / "herlev", colour_map=colour_map)
    assert json.loads(table["reader_options"].iloc[0])["colour_map"] == {"#000000": 0, "#808080": 1, "#ffffff": 2}
    assert np.array_equal(load_sample(table.iloc[0]).mask, labels)


@pytest.mark.parametrize(
    ("colour_map", "message"),
    [
        ({"#12345": 0}, "'#RRGGBB' or 'R,G,B'"),
        ({"256,0,0": 0}, "channels 0..255"),
        ({"#ff0000": 3}, "labels must be in 0..2"),
        ({"#ff0000": 0, "255,0,0": 1}, "two labels"),
        ({}, "non-empty mapping"),
    ],
)
def test_herlev_bad_colour_map(tmp_path, colour_map, message):
    root = make_herlev(tmp_path / "herlev")
    with pytest.raises(ValueError, match=message):
        list_source("dtu_herlev", root, colour_map=colour_map)


def test_herlev_missing_segmentation(tmp_path):
    root = make_herlev(tmp_path / "herlev")
    (root / "normal_columnar" / "157181399-157181419-001-d.bmp").unlink()
    with pytest.raises(FileNotFoundError, match="Segmentation") as error:
        list_source("dtu_herlev", root)
    assert str(root / "normal_columnar" / "157181399-157181419-001-d.bmp") in str(error.value)
    assert str(root / "normal_columnar" / "157181399-157181419-001.BMP") in str(error.value)


def test_herlev_segmentation_size_mismatch(tmp_path):
    folder = tmp_path / "herlev" / "severe_dysplastic"
    write_herlev_cell(folder, "cell")
    Image.fromarray(paint(herlev_labels(10, 16), (RED, DARK_BLUE, BLUE))).save(folder / "cell-d.bmp")
    table = list_source("dtu_herlev", tmp_path / "herlev")
    with pytest.raises(ValueError, match=r"10 x 16 .* 12 x 16") as error:
        load_sample(table.iloc[0])
    assert "cell-d.bmp" in str(error.value)


def test_herlev_skips_archive_folders(tmp_path):
    root = make_herlev(tmp_path / "herlev")
    # macOS zip tools add __MACOSX/ with "._NAME.BMP" metadata files that are not images.
    (root / "__MACOSX" / "normal_columnar").mkdir(parents=True)
    (root / "__MACOSX" / "normal_columnar" / "._157181399-157181419-001.BMP").write_bytes(b"\x00\x05\x16\x07")
    (root / ".thumbnails").mkdir()
    table = list_source("dtu_herlev", root)
    assert len(table) == 3
    assert set(table["label_class"]) == {"carcinoma_in_situ", "normal_columnar"}


def test_herlev_without_class_folders(tmp_path):
    (tmp_path / "herlev").mkdir()
    with pytest.raises(FileNotFoundError, match="contains no class folders"):
        list_source("dtu_herlev", tmp_path / "herlev")


# SIPaKMeD.


def test_sipakmed_listing_rows(tmp_path):
    root = make_sipakmed(tmp_path / "sipakmed")
    table = list_source("sipakmed", root)
    expected_ids = ["sipakmed/im_Koilocytotic/001", "sipakmed/im_Parabasal/001", "sipakmed/im_Parabasal/002"]
    assert table["id"].tolist() == expected_ids
    # The cluster image is the group, so all its cells share one split.
    assert table["group"].tolist() == expected_ids
    assert table["label_class"].tolist() == ["Koilocytotic", "Parabasal", "Parabasal"]
    assert set(table["annotation"]) == {"full"}
    assert set(table["reader_options"]) == {""}
    assert table["mask_path"].iloc[0] == str((root / "im_Koilocytotic" / "im_Koilocytotic").resolve())
    assert set(table["height"]) == {20}
    assert set(table["width"]) == {24}


def test_sipakmed_sample_labels(tmp_path):
    root = make_sipakmed(tmp_path / "sipakmed")
    sample = load_sample(list_source("sipakmed", root).iloc[1])
    assert sample.id == "sipakmed/im_Parabasal/001"
    assert sample.meta["label_class"] == "Parabasal"
    assert sample.cell_instances.shape == (2, 20, 24)
    assert sample.nucleus_instances.max() == 2
    # Pixels (row, col): inside nucleus 1, cytoplasm of cell 1, overlap of both cells, background.
    assert sample.mask[5, 5] == NUCLEUS
    assert sample.nucleus_instances[5, 5] == 1
    assert sample.nucleus_instances[11, 13] == 2
    assert sample.mask[3, 3] == CYTOPLASM
    assert sample.cell_instances[0, 8, 9]
    assert sample.cell_instances[1, 8, 9]
    assert sample.mask[8, 9] == CYTOPLASM
    assert sample.mask[0, 0] == BACKGROUND
    assert sample.mask[19, 23] == BACKGROUND
    # Cytoplasm is the union of the cells minus the nuclei, and each cell contains its nucleus.
    union = sample.cell_instances.any(axis=0)
    nucleus = sample.mask == NUCLEUS
    assert np.array_equal(sample.mask == CYTOPLASM, union & ~nucleus)
    for index, cell in enumerate(sample.cell_instances, start=1):
        assert np.all(cell[sample.nucleus_instances == index])


@pytest.mark.parametrize(
    "contour_format",
    [
        {"separator": " "},
        {"separator": ";"},
        {"separator": "\t"},
        {"separator": ", "},
        {"header": "x,y"},
        {"line_end": "\r\n"},
    ],
    ids=["space", "semicolon", "tab", "comma-space", "header", "crlf"],
)
def test_sipakmed_contour_formats(tmp_path, contour_format):
    write_cluster(tmp_path / "reference" / "im_Metaplastic", "001")
    write_cluster(tmp_path / "variant" / "im_Metaplastic", "001", **contour_format)
    reference = load_sample(list_source("sipakmed", tmp_path / "reference").iloc[0])
    variant = load_sample(list_source("sipakmed", tmp_path / "variant").iloc[0])
    assert np.array_equal(variant.mask, reference.mask)
    assert np.array_equal(variant.nucleus_instances, reference.nucleus_instances)


def test_sipakmed_float_coordinates(tmp_path):
    path = tmp_path / "001_cyt01.dat"
    path.write_text("\n1.5,2.25\n10.75,2.25\n\n10.75,9.5\n1.5,9.5\n")  # blank lines are skipped
    points = read_contour(path)
    assert points.shape == (4, 2)
    assert points[0].tolist() == [1.5, 2.25]  # x, y
    assert points[2].tolist() == [10.75, 9.5]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("2,2\n10,2\n10,abc\n2,10\n", "line 3 is not two numbers"),
        ("2,2\n10,2,7\n10,10\n", "line 2 is not two numbers"),
        ("2,2\n10,nan\n10,10\n", "line 2 has a coordinate that is not finite"),
        ("2,2\n10,2\n", "at least 3 x,y points"),
        ("", "at least 3 x,y points"),
    ],
    ids=["text", "three-values", "nan", "two-points", "empty"],
)
def test_sipakmed_malformed_contour(tmp_path, content, message):
    write_cluster(tmp_path / "sipakmed" / "im_Dyskeratotic", "001")
    bad = tmp_path / "sipakmed" / "im_Dyskeratotic" / "001_nuc02.dat"
    bad.write_text(content)
    table = list_source("sipakmed", tmp_path / "sipakmed")
    with pytest.raises(ValueError, match=message) as error:
        load_sample(table.iloc[0])
    assert str(bad) in str(error.value)


def test_sipakmed_contour_outside_image(tmp_path):
    write_cluster(tmp_path / "sipakmed" / "im_Dyskeratotic", "001")
    outside = tmp_path / "sipakmed" / "im_Dyskeratotic" / "001_cyt01.dat"
    write_contour(outside, square(100, 100, 120, 120))
    table = list_source("sipakmed", tmp_path / "sipakmed")
    with pytest.raises(ValueError, match="covers no pixel") as error:
        load_sample(table.iloc[0])
    assert str(outside) in str(error.value)


def test_sipakmed_missing_nucleus_contour(tmp_path):
    folder = tmp_path / "sipakmed" / "im_Superficial-Intermediate"
    write_cluster(folder, "001")
    (folder / "001_nuc02.dat").unlink()
    with pytest.raises(FileNotFoundError, match="for cell 2 of image") as error:
        list_source("sipakmed", tmp_path / "sipakmed")
    assert str(folder / "001_nuc02.dat") in str(error.value)
    assert "001_cyt02.dat exists" in str(error.value)


def test_sipakmed_image_without_contours(tmp_path):
    folder = tmp_path / "sipakmed" / "im_Superficial-Intermediate"
    write_cluster(folder, "001")
    Image.fromarray(np.zeros((*CLUSTER_SIZE, 3), np.uint8)).save(folder / "002.bmp")
    with pytest.raises(FileNotFoundError, match="Contours for image") as error:
        list_source("sipakmed", tmp_path / "sipakmed")
    assert str(folder / "002.bmp") in str(error.value)
    assert str(folder / "002_cyt01.dat") in str(error.value)


def test_sipakmed_contour_deleted_after_listing(tmp_path):
    folder = tmp_path / "sipakmed" / "im_Parabasal"
    write_cluster(folder, "001")
    table = list_source("sipakmed", tmp_path / "sipakmed")
    (folder / "001_cyt01.dat").unlink()
    with pytest.raises(FileNotFoundError, match="001_cyt01.dat"):
        load_sample(table.iloc[0])


# Manifests and configs with the new kinds.


def make_public_sources(root: Path) -> list[dict]:
    make_herlev(root / "herlev")
    make_sipakmed(root / "sipakmed")
    write_cx22(root / "Cx22-Pair")
    return [
        {"name": "herlev", "kind": "dtu_herlev", "path": "herlev"},
        {"name": "sipakmed", "kind": "sipakmed", "path": "sipakmed"},
        {"name": "cx22_pair", "kind": "cx22", "path": "Cx22-Pair", "split": "test"},
    ]


def test_public_manifest_round_trip(tmp_path):
    manifest = build_manifest(make_public_sources(tmp_path / "data"), tmp_path / "data")
    assert list(manifest.columns) == list(COLUMNS)
    assert manifest.groupby("source").size().to_dict() == {"herlev": 3, "sipakmed": 3, "cx22_pair": 2}
    assert manifest.set_index("id").loc["sipakmed/im_Parabasal/002", "label_class"] == "Parabasal"
    assert set(manifest.loc[manifest["source"] == "cx22_pair", "split"]) == {"test"}

    path = tmp_path / "manifest.parquet"
    write_manifest(manifest, path)
    restored = read_manifest(path)
    pd.testing.assert_frame_equal(restored, manifest)
    # Every row read back loads with the reader of its kind.
    for _, row in restored.iterrows():
        sample = load_sample(row)
        assert sample.id == row["id"]
        assert sample.image.shape == (row["height"], row["width"], 3)
        assert sample.mask.shape == (row["height"], row["width"])
        assert sample.meta["label_class"] == row["label_class"]
        assert sample.meta["group"] == row["group"]


def test_manifest_without_new_columns(tmp_path):
    # A manifest written before label_class and reader_options existed still reads and loads.
    make_herlev(tmp_path / "herlev")
    manifest = build_manifest([{"name": "herlev", "kind": "dtu_herlev", "path": "herlev"}], tmp_path)
    path = tmp_path / "old.parquet"
    manifest.drop(columns=["label_class", "reader_options"]).to_parquet(path, index=False)
    restored = read_manifest(path)
    assert list(restored.columns) == list(COLUMNS)
    assert set(restored["label_class"]) == {""}
    assert set(restored["reader_options"]) == {""}
    # Without stored options the reader uses its default colour map.
    assert np.array_equal(load_sample(restored.iloc[0]).mask, herlev_labels())


def test_config_sources_build_manifest(tmp_path):
    make_public_sources(tmp_path)
    folder = tmp_path / "herlev_grey" / "normal_columnar"
    labels = write_herlev_cell(folder, "cell", colours=((0, 0, 0), (128, 128, 128), (255, 255, 255)))
    config = config_from_dict(
        {
            "data": {
                "root": str(tmp_path),
                "sources": [
                    {"name": "herlev", "kind": "dtu_herlev", "path": "herlev_grey",
                     "colour_map": {"#000000": 0, "128,128,128": 1, "#ffffff": 2}},
                    {"name": "sipakmed", "kind": "sipakmed", "path": "sipakmed"},
                    {"name": "cx22", "kind": "cx22", "path": "Cx22-Pair",
                     "mat_variables": {"images": "ImageDataSet"}},
                ],
            }
        }
    )
    # The pipeline passes each source config as a dict with every field, unset ones as None.
    manifest = build_manifest([source.model_dump() for source in config.data.sources], tmp_path)
    assert manifest.groupby("source").size().to_dict() == {"herlev": 1, "sipakmed": 3, "cx22": 2}
    herlev_row = manifest[manifest["source"] == "herlev"].iloc[0]
    assert np.array_equal(load_sample(herlev_row).mask, labels)
    cx22_options = json.loads(manifest[manifest["source"] == "cx22"].iloc[0]["reader_options"])
    assert cx22_options["mat_variables"]["cells"] == "cyto_ins"  # defaults fill unnamed roles


@pytest.mark.parametrize(
    ("kind", "option", "value"),
    [
        ("sipakmed", "colour_map", {"#ff0000": 0}),
        ("cx22", "colour_map", {"#ff0000": 0}),
        ("dtu_herlev", "mat_variables", {"images": "x"}),
        ("dtu_herlev", "value_map", {0: 0}),
        ("sipakmed", "group_pattern", r"(\d+)"),
    ],
)
def test_options_rejected_for_other_kinds(tmp_path, kind, option, value):
    make_public_sources(tmp_path)
    path = {"dtu_herlev": "herlev", "sipakmed": "sipakmed", "cx22": "Cx22-Pair"}[kind]
    with pytest.raises(ValueError, match=f"{option} applies only to kind"):
        list_source(kind, tmp_path / path, **{option: value})


def test_public_kinds_fixed_annotation(tmp_path):
    make_herlev(tmp_path / "herlev")
    with pytest.raises(ValueError, match="annotated 'full'"):
        list_source("dtu_herlev", tmp_path / "herlev", annotation="nucleus")


def test_config_rejects_unknown_source_option():
    tree = {"data": {"sources": [{"name": "a", "kind": "sipakmed", "path": "a", "colour_maps": {}}]}}
    with pytest.raises(ConfigError, match="colour_maps"):
        config_from_dict(tree)
