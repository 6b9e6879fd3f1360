"""Review outputs: QuPath GeoJSON of real scored slides, slide and run HTML pages, Chromium renders."""

import json
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from matplotlib.path import Path as PolygonPath
from PIL import Image
from shapely.geometry import shape
from shapely.validation import explain_validity

from cervi_ray.checkpoint import describe_model, save_checkpoint
from cervi_ray.config import load_config
from cervi_ray.models import build_student
from cervi_ray.report.curves import plot_training_curves
from cervi_ray.report.markdown import write_report
from cervi_ray.report.overlays import save_overlay
from cervi_ray.review.command import review_run, review_slides
from cervi_ray.review.geojson import object_polygons, slide_feature_collection, write_geojson
from cervi_ray.review.run_report import render_run_html
from cervi_ray.review.scored import MissingMasksError, load_scored_slide, select_tiles
from cervi_ray.review.slide_report import render_slide_html, write_slide_html
from cervi_ray.scoring.pipeline import score_archive
from cervi_ray.scoring.slides import SlideStorage

BABY = Path(__file__).resolve().parents[1] / "configs" / "baby.yaml"
SVS, EDF = "cmu-1-small-region.svs", "EDF000.png"
SLIDE_IDS = ("cmu-1-small-region", "EDF000")
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_INSTALL = "apt-get update && apt-get install -y chromium"
# Flags that keep headless Chromium from reaching any network service (see .ci/run).
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)
CLASSES = {"Nucleus", "Cell", "Review tile"}


# --- Fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scores(ray_cluster, data_root, tmp_path_factory) -> Path:
    """Score the real SVS and one real EDF image with a baby student, masks stored; return the output.

    Tiles of 192 model pixels overlapping by 32, so objects in overlaps test the ownership rule.
    The EDF image has no resolution metadata, hence slide_mpp 0.25 (40x); the SVS records its own.
    """
    root = tmp_path_factory.mktemp("review")
    slides = root / "slides"
    slides.mkdir()
    shutil.copy(data_root / "wsi" / SVS, slides / SVS)
    shutil.copy(data_root / "isbi2014" / "edf_real" / EDF, slides / EDF)
    config = load_config(BABY, [f"data.root={data_root}", f"run.output_dir={root / 'runs'}"])
    torch.manual_seed(0)
    save_checkpoint(root / "checkpoint", build_student(config.model, 3), describe_model(config, "student"))
    tree = config.model_dump(mode="json")
    tree["scoring"].update(
        input=str(slides), checkpoint=str(root / "checkpoint"), output=str(root / "out"),
        tile_size=192, overlap=32, slide_mpp=0.25, write_masks=True,
    )
    report = score_archive(type(config).model_validate(tree))
    assert report.statuses == {"ok": 2}
    return root / "out"


def features_of(collection: dict, classification: str) -> list[dict]:
    return [f for f in collection["features"] if f["properties"]["classification"]["name"] == classification]


def tile_index_of(feature: dict) -> int:
    return int(feature["properties"]["measurements"]["Tile index"])


def polygons_of(geometry: dict) -> list:
    return [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]


# --- GeoJSON ------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.parametrize("slide_id", SLIDE_IDS)
def test_geojson_follows_qupath_layout(scores, tmp_path, slide_id):
    slide = load_scored_slide(str(scores), slide_id)
    path = write_geojson(slide_feature_collection(slide), tmp_path / f"{slide_id}.geojson")
    collection = json.loads(path.read_text())  # strict JSON: allow_nan=False on writing

    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    ids = [feature["id"] for feature in features]
    assert len(set(ids)) == len(ids)
    for feature in features:
        assert feature["type"] == "Feature"
        assert str(uuid.UUID(feature["id"])) == feature["id"]
        properties = feature["properties"]
        expected_type = "annotation" if properties["classification"]["name"] == "Review tile" else "detection"
        assert properties["objectType"] == expected_type
        assert properties["classification"]["name"] in CLASSES
        colour = properties["classification"]["color"]
        assert len(colour) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in colour)
        assert all(isinstance(value, float) for value in properties["measurements"].values())
        assert properties["metadata"]["slide_id"] == slide_id
        assert feature["geometry"]["type"] in ("Polygon", "MultiPolygon")
    # One locked annotation per top tile, in the summary's order.
    annotations = features_of(collection, "Review tile")
    assert [tile_index_of(f) for f in annotations] == [t["tile_index"] for t in slide.summary["top_tiles"]]
    assert all(f["properties"]["isLocked"] for f in annotations)


@pytest.mark.ray
@pytest.mark.parametrize("slide_id", SLIDE_IDS)
def test_geojson_polygons_valid_inside_slide(scores, slide_id):
    slide = load_scored_slide(str(scores), slide_id)
    width, height = slide.summary["width"], slide.summary["height"]
    collection = slide_feature_collection(slide, "all")
    tiles = slide.tiles.set_index("tile_index")
    assert len(collection["features"]) > len(tiles)
    for feature in collection["features"]:
        tile = tiles.loc[tile_index_of(feature)]
        for polygon in polygons_of(feature["geometry"]):
            for ring in polygon:
                points = np.asarray(ring)
                assert len(points) >= 4
                assert (points[0] == points[-1]).all(), "ring not closed"
                # Inside the slide's level-0 bounds and inside the feature's own tile.
                assert points[:, 0].min() >= 0
                assert points[:, 0].max() <= width
                assert points[:, 1].min() >= 0
                assert points[:, 1].max() <= height
                assert points[:, 0].min() >= tile["x"]
                assert points[:, 0].max() <= tile["x"] + tile["width"]
                assert points[:, 1].min() >= tile["y"]
                assert points[:, 1].max() <= tile["y"] + tile["height"]
        geometry = shape(feature["geometry"])
        assert geometry.is_valid, explain_validity(geometry)
        # RFC 7946 orientation on numeric x, y: exteriors counterclockwise, holes clockwise.
        for part in getattr(geometry, "geoms", [geometry]):
            assert part.exterior.is_ccw
            assert not any(hole.is_ccw for hole in part.interiors)


@pytest.mark.ray
@pytest.mark.parametrize("slide_id", SLIDE_IDS)
def test_geojson_counts_match_tiles(scores, slide_id):
    slide = load_scored_slide(str(scores), slide_id)
    collection = slide_feature_collection(slide, "all")
    nuclei, cells = features_of(collection, "Nucleus"), features_of(collection, "Cell")
    scored = slide.tiles[slide.tiles["status"] == "ok"]
    assert len(features_of(collection, "Review tile")) == len(scored)
    # Each nucleus is exported once, by the tile that owns it, with its cell.
    assert len(nuclei) == slide.summary["nuclei_counted"]
    assert len(cells) == slide.summary["nuclei_counted"]
    for tile in scored.itertuples():
        tile_nuclei = [f for f in nuclei if tile_index_of(f) == tile.tile_index]
        tile_cells = [f for f in cells if tile_index_of(f) == tile.tile_index]
        assert len(tile_nuclei) == tile.nuclei_owned
        assert len(tile_cells) == tile.nuclei_owned
        # The exported N/C ratios are the ones the tile's statistics pooled.
        ratios = sorted(f["properties"]["measurements"]["N/C ratio"] for f in tile_cells
                        if "N/C ratio" in f["properties"]["measurements"])
        assert ratios == pytest.approx(sorted(tile.nc_ratios), abs=1e-6)


@pytest.mark.ray
def test_geojson_without_ownership_counts_all(scores):
    slide = load_scored_slide(str(scores), "EDF000")
    collection = slide_feature_collection(slide, "all", owned_only=False)
    per_tile = pd.Series([tile_index_of(f) for f in features_of(collection, "Nucleus")]).value_counts()
    for tile in slide.tiles.itertuples():
        assert per_tile.get(tile.tile_index, 0) == tile.nucleus_count
    # EDF000's tiles overlap by 128 model pixels, so some nuclei repeat.
    assert per_tile.sum() > slide.summary["nuclei_counted"]


@pytest.mark.ray
def test_geojson_top_k_limits_tiles(scores):
    slide = load_scored_slide(str(scores), "cmu-1-small-region")
    chosen = select_tiles(slide, "top", top_k=3)
    assert chosen["tile_index"].tolist() == [t["tile_index"] for t in slide.summary["top_tiles"][:3]]
    collection = slide_feature_collection(slide, "top", top_k=3)
    assert {tile_index_of(f) for f in collection["features"]} == set(chosen["tile_index"])


@pytest.mark.parametrize("name, pixels", [
    ("single pixel", [(2, 2)]),
    ("diagonal pair", [(1, 1), (2, 2)]),
    ("L shape", [(1, 1), (2, 1), (3, 1), (3, 2), (3, 3)]),
    ("donut", [(r, c) for r in range(1, 6) for c in range(1, 6) if (r, c) != (3, 3)]),
    ("two blobs", [(1, 1), (1, 2), (5, 5)]),
    ("at the border", [(0, 0), (0, 1), (6, 6)]),
])
def test_outline_encloses_exactly_object_pixels(name, pixels):
    mask = np.zeros((7, 7), dtype=bool)
    for row, col in pixels:
        mask[row, col] = True
    polygons = object_polygons(mask)
    geometry = shape({"type": "MultiPolygon", "coordinates": [[ring.tolist() for ring in p] for p in polygons]})
    assert geometry.is_valid, f"{name}: {explain_validity(geometry)}"
    # Pixel (r, c) covers [c, c + 1] x [r, r + 1]; its centre must fall inside exactly when it is set.
    rows, cols = np.mgrid[0:7, 0:7]
    centres = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], axis=1)
    inside = np.zeros(len(centres), dtype=bool)
    for polygon in polygons:
        in_polygon = PolygonPath(polygon[0]).contains_points(centres)
        for hole in polygon[1:]:
            in_polygon &= ~PolygonPath(hole).contains_points(centres)
        inside |= in_polygon
    assert (inside.reshape(7, 7) == mask).all(), name
    assert all(ring.min() >= 0 and ring.max() <= 7 for polygon in polygons for ring in polygon)


def test_outline_counts_parts_and_holes():
    donut = np.zeros((7, 7), dtype=bool)
    donut[1:6, 1:6] = True
    donut[3, 3] = False
    assert [len(polygon) for polygon in object_polygons(donut)] == [2]  # one exterior, one hole
    blobs = np.zeros((7, 7), dtype=bool)
    blobs[1, 1] = blobs[5, 5] = True
    assert len(object_polygons(blobs)) == 2
    diagonal = np.eye(3, dtype=bool)  # 8-connected, as the nucleus labelling connects pixels
    assert len(object_polygons(diagonal)) == 1


@pytest.mark.ray
def test_missing_masks_fail_with_rescore_hint(scores, tmp_path):
    copy = tmp_path / "no_masks"
    shutil.copytree(scores, copy, ignore=shutil.ignore_patterns("review"))
    tiles_file = copy / "tiles" / "EDF000.parquet"
    table = pq.read_table(tiles_file)  # as scored with scoring.write_masks=false: no mask bytes
    column = table.schema.get_field_index("mask_png")
    pq.write_table(table.set_column(column, "mask_png", pa.nulls(table.num_rows, pa.binary())), tiles_file)
    slide = load_scored_slide(str(copy), "EDF000")
    with pytest.raises(MissingMasksError, match="scoring.write_masks=true"):
        slide_feature_collection(slide)
    # The command still writes the page, then fails naming the slide.
    with pytest.raises(MissingMasksError, match="EDF000"):
        review_slides(str(copy), ["EDF000"], str(tmp_path / "review"), None, False, SlideStorage())
    assert (tmp_path / "review" / "EDF000.html").is_file()
    assert not (tmp_path / "review" / "EDF000.geojson").exists()
    assert "no stored mask" in (tmp_path / "review" / "EDF000.html").read_text()


@pytest.mark.ray
def test_unknown_slide_lists_known_ids(scores):
    with pytest.raises(FileNotFoundError, match="cmu-1-small-region"):
        load_scored_slide(str(scores), "no-such-slide")


# --- Slide page ---------------------------------------------------------------------------------


@pytest.mark.ray
def test_slide_page_embeds_images(scores, tmp_path):
    slide = load_scored_slide(str(scores), "cmu-1-small-region")
    page = render_slide_html(slide)
    top = len(slide.summary["top_tiles"])
    # Heatmap, then image, mask over image and mask for each top tile.
    assert page.count('src="data:image/png;base64,') == 1 + 3 * top
    assert "http://" not in page
    assert "https://" not in page
    assert "Slide statistics" in page
    assert str(slide.summary["nuclei_counted"]) in page


@pytest.mark.ray
def test_slide_page_escapes_hostile_text(scores, tmp_path):
    slide = load_scored_slide(str(scores), "EDF000")
    hostile = "<script>alert(1)</script>"
    summary = dict(slide.summary, slide_id=hostile, error='<img src=x onerror="alert(2)">',
                   source=str(tmp_path / "gone<b>.svs"), model_name="<i>model</i>")
    tiles = slide.tiles.assign(model_name="<i>model</i>")
    page = render_slide_html(replace(slide, slide_id=hostile, summary=summary, tiles=tiles))
    assert "<script" not in page
    assert "<img src=x" not in page
    assert "<i>" not in page
    assert "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # The slide file is gone, so the page explains why the tile images are missing and shows the masks.
    assert "Tile images not shown" in page
    assert "gone&lt;b&gt;.svs" in page


# --- Run report ---------------------------------------------------------------------------------


def write_demo_run(run_dir: Path) -> Path:
    """Write a tiny run folder with the demo's layout: report.md, curves, overlays, summary, ablation."""
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_dice": 0.2 * e, "val_dice_nucleus": 0.15 * e} for e in (1, 2, 3)]
    curves = {task: plot_training_curves(history, run_dir / f"curves_{task}.png", f"{task} training")
              for task in ("teacher", "student")}

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (48, 64)).astype(np.uint8)
    overlays = {model: {"isbi2015": [save_overlay(run_dir / "eval" / model / "overlays" / "isbi2015" / "frame1.png",
                                                  image, labels, labels, "frame1")]}
                for model in ("teacher", "student")}

    pixel = {name: {"dice": 0.5, "sensitivity": 0.6, "specificity": 0.7, "accuracy": 0.8}
             for name in ("cytoplasm", "nucleus", "cell")}
    result = {"pixel": pixel, "per_image": {"nucleus": {"dice": {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6}}},
              "images": ["frame1", "frame2"]}
    training = {task: {"epochs_run": 3, "best_epoch": 3, "best_val_dice": 0.6, "stopped_by": "epoch limit", "seconds": 12.0}
                for task in curves}
    models = {task: {"parameters": 1e6, "macs": 2e9, "input_size": 64, "seconds_per_image_at_input_size": 0.01,
                     "seconds_per_eval_image": 0.02} for task in curves}
    context = {
        "title": "cervi_ray run report: tiny", "facts": {"code version": "test"},
        "split_counts": {"isbi2015": {"train": 4, "val": 2, "test": 2}}, "training": training, "models": models,
        "results": {"teacher": {"isbi2015": result}, "student": {"isbi2015": result}},
        "curves": curves, "overlays": overlays, "citation": "Data: ISBI 2015.",
    }
    report = write_report(run_dir / "report.md", context)

    (run_dir / "summary.json").write_text(json.dumps({"training": training, "models": models}))
    (run_dir / "ablation").mkdir()
    (run_dir / "ablation" / "ablation.md").write_text(
        "# Ablation: tiny\n\nHeld-out images: 2.\n\n| model | Dice (cell) |\n| --- | --- |\n"
        "| student | 0.5000 |\n| student + <b>TTA</b> | 0.5500 |\n"
    )
    return report


def test_run_page_renders_report(tmp_path):
    write_demo_run(tmp_path)
    page = render_run_html(tmp_path)
    assert "<title>cervi_ray run report: tiny</title>" in page
    # Two curves and two overlays, all embedded.
    assert page.count('src="data:image/png;base64,') == 4
    # Data, training, model size, one metrics set and the ablation table.
    assert page.count("<table>") == 5
    assert "<h2>Ablation: tiny</h2>" in page
    assert "student + &lt;b&gt;TTA&lt;/b&gt;" in page
    assert "<b>" not in page


def test_run_page_skips_ablation_already_in_report(tmp_path):
    report = write_demo_run(tmp_path)
    report.write_text(report.read_text() + "\n## Ablation\n\n| model | Dice (cell) |\n| --- | --- |\n| x | 0.1 |\n")
    page = render_run_html(tmp_path)
    assert page.count("Ablation") == 1


def test_run_page_embeds_only_run_folder_images(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    report = write_demo_run(run_dir)
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    report.write_text(report.read_text() + "\n![escape](../outside.png)\n\n![gone](nothing.png)\n")
    page = render_run_html(run_dir)
    assert page.count('src="data:image/png;base64,') == 4
    assert "outside the run folder: ../outside.png" in page
    assert "not found or not a PNG: nothing.png" in page


def test_run_page_needs_report(tmp_path):
    with pytest.raises(FileNotFoundError, match="report.md"):
        render_run_html(tmp_path)


# --- Command ------------------------------------------------------------------------------------


@pytest.mark.ray
def test_review_command_writes_files(scores, tmp_path):
    out = tmp_path / "review"
    written = review_slides(str(scores), None, str(out), 2, False, SlideStorage())
    assert sorted(path.name for path in written) == sorted(
        f"{slide_id}{suffix}" for slide_id in SLIDE_IDS for suffix in (".html", ".geojson")
    )
    collection = json.loads((out / "EDF000.geojson").read_text())
    assert len(features_of(collection, "Review tile")) == 2
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_demo_run(run_dir)
    assert review_run(str(run_dir), None) == run_dir / "report.html"
    with pytest.raises(ValueError, match="--top-k"):
        review_slides(str(scores), None, str(out), 0, False, SlideStorage())


# --- Rendering in a browser ---------------------------------------------------------------------


def screenshot(page: Path, png: Path, width: int, height: int) -> np.ndarray:
    """Render a local page in headless Chromium and return the screenshot as (H, W, 3) uint8."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: the page rendering test needs Debian's Chromium; install it with "
                    f"`{CHROMIUM_INSTALL}` (.ci/run does this)")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
                   f"--window-size={width},{height}", page.resolve().as_uri()]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert png.is_file(), f"Chromium wrote no screenshot (exit {result.returncode}): {result.stderr[-2000:]}"
    with Image.open(png) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.ray
def test_pages_render_in_chromium(scores, tmp_path):
    slide = load_scored_slide(str(scores), "cmu-1-small-region")
    slide_page = write_slide_html(slide, tmp_path / "slide.html")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_demo_run(run_dir)
    run_page = review_run(str(run_dir), None)
    for page in (slide_page, run_page):
        pixels = screenshot(page, tmp_path / f"{page.stem}.png", 1200, 1600)
        assert pixels.shape == (1600, 1200, 3)
        # A blank page has one colour; text, tables and embedded images give many.
        colours = np.unique(pixels.reshape(-1, 3), axis=0)
        assert len(colours) > 100, f"{page.name} rendered with only {len(colours)} colours"
        assert (pixels < 128).any(), f"{page.name} has no dark pixels (no text)"
