"""Resolution: slide and model pixel sizes, fallbacks, level choice, and tiles sized to match."""

import json

import numpy as np
import pytest
from PIL import Image

from cervi_ray.scoring.resolution import (
    ResolutionError,
    choose_level,
    model_pixel_size,
    model_resolution,
    slide_resolution,
)
from cervi_ray.scoring.slides import SlideStorage
from cervi_ray.scoring.stages import HEADER_INDEX, StageSettings, plan_slide


def _settings(model_mpp, slide_mpp=None, tile_size=64, overlap=0, min_tissue_fraction=0.0):
    return StageSettings(
        tile_size=tile_size, overlap=overlap, min_tissue_fraction=min_tissue_fraction, model_mpp=model_mpp,
        slide_mpp=slide_mpp, thumbnail_size=256, storage=SlideStorage(), views=1, has_cytoplasm=True,
        write_masks=False,
    )


def test_slide_mpp_prefers_metadata():
    resolution = slide_resolution("s", 0.25, 20.0, 0.9)
    assert (resolution.mpp, resolution.source) == (0.25, "metadata")


def test_slide_mpp_from_objective_power():
    # The usual convention: 10 / magnification, so 40x is 0.25 microns per pixel.
    resolution = slide_resolution("s", None, 40.0, None)
    assert resolution.mpp == pytest.approx(0.25)
    assert resolution.source == "objective_power"


def test_slide_mpp_implausible_metadata_ignored():
    # 72 dpi is 352.8 microns per pixel: a screen resolution, not a microscope's.
    resolution = slide_resolution("s", 25400 / 72, None, 0.5)
    assert (resolution.mpp, resolution.source) == (0.5, "override")


def test_slide_mpp_missing_names_slide_and_option():
    with pytest.raises(ResolutionError, match=r"slide scan7 .*scoring\.slide_mpp"):
        slide_resolution("scan7", None, None, None)


def test_model_mpp_from_checkpoint_magnification():
    # Demo checkpoints: 40x images at scale 0.5 record magnification 20 and no MPP: 0.5 microns.
    meta = {"training_resolution": {"scale": 0.5, "mpp": None, "magnification": 20.0}}
    resolution = model_resolution(meta, None)
    assert resolution.mpp == pytest.approx(0.5)
    assert resolution.source == "checkpoint_magnification"


def test_model_mpp_recorded_wins_over_override():
    meta = {"training_resolution": {"mpp": 0.8, "magnification": 20.0}}
    assert model_resolution(meta, 2.0).mpp == 0.8


def test_model_mpp_override_and_error():
    assert model_resolution({"training_resolution": {}}, 1.5).mpp == 1.5
    with pytest.raises(ResolutionError, match=r"scoring\.model_mpp"):
        model_resolution({}, None)


@pytest.mark.parametrize(
    ("model_mpp", "level", "factor"),
    [
        (0.25, 0, 1.0),  # same resolution: level 0 as is
        (0.5, 1, 1.0),  # 2x coarser: the 2x level
        (0.75, 1, 1.5),  # between levels: the finer one, shrunk by 1.5
        (1.0, 2, 1.0),
        (4.0, 3, 2.0),  # coarser than the last level: the last level, shrunk
        (0.125, 0, 0.5),  # finer than level 0: level 0, enlarged
    ],
)
def test_choose_level(model_mpp, level, factor):
    choice = choose_level([1.0, 2.0, 4.0, 8.0], 0.25, model_mpp)
    assert choice.level == level
    assert choice.level_per_model_pixel == pytest.approx(factor)


def test_choose_level_tolerates_rounded_downsamples():
    # A nominal 4x level stored as 4.002x still counts for a 4x target.
    assert choose_level([1.0, 4.002], 0.25, 1.0).level == 1


def test_model_pixel_size_rounds_down():
    assert model_pixel_size(1001, 999, 2.0) == (500, 499)
    assert model_pixel_size(1, 1, 4.0) == (1, 1)


@pytest.fixture
def dark_slide(tmp_path):
    """A 256 x 192 PNG, dark everywhere, so every tile is foreground."""
    path = tmp_path / "dark.png"
    Image.fromarray(np.full((192, 256, 3), 60, dtype=np.uint8)).save(path)
    return str(path)


def test_twice_model_resolution_doubles_footprint(dark_slide):
    # Slide pixels are half the model's (0.25 vs 0.5 microns), so a 64-pixel tile covers 128
    # level-0 pixels per side: four times the area.
    rows = plan_slide({"slide_id": "dark", "uri": dark_slide}, _settings(model_mpp=0.5, slide_mpp=0.25))
    tiles = [row for row in rows if row["tile_index"] != HEADER_INDEX]
    assert {(row["width"], row["height"]) for row in tiles} == {(128, 128)}
    assert sorted((row["x"], row["y"]) for row in tiles) == [(0, 0), (0, 64), (128, 0), (128, 64)]
    # The same slide at the model's resolution: tiles of 64 level-0 pixels.
    same = plan_slide({"slide_id": "dark", "uri": dark_slide}, _settings(model_mpp=0.5, slide_mpp=0.5))
    assert {(row["width"], row["height"]) for row in same if row["tile_index"] != HEADER_INDEX} == {(64, 64)}


def test_plan_records_resolution(dark_slide):
    rows = plan_slide({"slide_id": "dark", "uri": dark_slide}, _settings(model_mpp=0.5, slide_mpp=0.25))
    info = json.loads(rows[0]["slide_info"])
    assert rows[0]["tile_index"] == HEADER_INDEX
    assert info["slide_mpp"] == 0.25
    assert info["slide_mpp_source"] == "override"
    assert info["tiles_seen"] == 4
    assert info["tiles_kept"] == 4


def test_plan_without_resolution_fails_slide(dark_slide):
    rows = plan_slide({"slide_id": "dark", "uri": dark_slide}, _settings(model_mpp=0.5))
    assert len(rows) == 1
    info = json.loads(rows[0]["slide_info"])
    assert info["status"] == "failed"
    assert "scoring.slide_mpp" in info["error"]
