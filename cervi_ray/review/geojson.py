"""GeoJSON export of a scored slide's nuclei and cells, in the form QuPath imports.

Input: a scoring output prefix (scoring/outputs.py) whose tiles file stores each tile's label
mask (scoring.write_masks=true). For each exported tile the stored mask is segmented again with
postprocess.segment_cells, the function that produced the tile's statistics, so the exported
nuclei and cells are the ones the nucleus counts and N/C ratios were computed from.

QuPath conventions followed (QuPath 0.4 and later; sources: PathObjectTypeAdapters.java and
GsonTools.java in qupath/qupath qupath-core/src/main/java/qupath/lib/io/, and the page
docs/advanced/exporting_annotations.rst of qupath/qupath-docs):
  - a FeatureCollection of Features, each with "id" (a UUID string), "geometry" and
    "properties";
  - properties.objectType is "detection" for nuclei and cells (QuPath's type for small detected
    objects) and "annotation" for the tile outlines (its type for regions of interest);
  - properties.classification is {"name": ..., "color": [r, g, b]};
  - properties.measurements is an object of name -> number (QuPath's measurement table);
    properties.metadata is an object of name -> string, which QuPath keeps only on object types
    that implement its MetadataStore interface;
  - coordinates are pixels of the full-resolution image (level 0), origin at its top-left
    corner.

Coordinates: a contour point (px, py) in mask pixels, where pixel (row, col) covers
[col, col + 1] x [row, row + 1], maps to level 0 as
    X = x + px * width / mask_width,   Y = y + py * height / mask_height
with x, y, width, height the tile's level-0 box from the tiles file. Masks cover only the part
of a tile inside the slide, so every coordinate lies in [0, slide width] x [0, slide height].

Polygons come from marching squares (skimage.measure.find_contours at level 0.5) on each
object's padded binary mask, with diagonal neighbours connected as the nucleus labelling
connects them. Its rings are closed, never cross or touch one another, and run through the
midpoints of the pixel edges between object and background, cutting corners diagonally. Ring
orientation follows RFC 7946 section 3.1.6 (exterior rings counterclockwise, holes clockwise)
on the numeric (x, y) values: exteriors have positive signed area and holes negative, so on
screen, with y pointing down, exteriors run clockwise. RFC 7946 also says parsers SHOULD NOT
reject polygons of the other orientation.
"""

import io
import json
import logging
import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from matplotlib.path import Path as PolygonPath
from PIL import Image
from scipy import ndimage
from skimage import measure

from cervi_ray.data.labels import NUCLEUS
from cervi_ray.scoring.grid import make_grid, scale_boxes
from cervi_ray.scoring.outputs import HEATMAPS_DIR, RUN_FILE, SLIDES_DIR, TILES_DIR, check_slide_id
from cervi_ray.scoring.postprocess import segment_cells
from cervi_ray.scoring.resolution import model_pixel_size
from cervi_ray.storage import resolve_storage

logger = logging.getLogger(__name__)

TileSelection = Literal["top", "all"]
TILE_SELECTIONS = ("top", "all")

# Class colours match the overlays of cervi_ray.report.overlays (nucleus magenta, cytoplasm green).
NUCLEUS_CLASS = {"name": "Nucleus", "color": [220, 30, 200]}
CELL_CLASS = {"name": "Cell", "color": [40, 200, 80]}
TILE_CLASS = {"name": "Review tile", "color": [255, 200, 0]}
# Decimals of level-0 pixel coordinates. Vertices lie at least half a model pixel apart (0.5 *
# width / mask width level-0 pixels), far more than this rounding moves them.
COORDINATE_DECIMALS = 3
# Namespace of the feature UUIDs: uuid5 of (slide, tile, object) gives the same id on every export.
FEATURE_ID_NAMESPACE = uuid.UUID("6f1c2b1e-4a53-4c1e-9a7e-2f0d8c5b7a10")
LABEL_VALUES = (0, 1, 2)


class MissingMasksError(ValueError):
    """The tiles file stores no label masks, so there are no outlines to export."""


@dataclass
class ScoredSlide:
    """One slide's results read back from a scoring output prefix."""

    output: str  # the output prefix, as given
    slide_id: str
    summary: dict[str, Any]  # the row of slides/<slide_id>.parquet
    tiles: pd.DataFrame  # the rows of tiles/<slide_id>.parquet
    heatmap_png: bytes | None  # heatmaps/<slide_id>.png, None when the slide has none
    run_settings: dict[str, Any] = field(default_factory=dict)  # run.json, empty when missing


# --- Reading a scoring output -------------------------------------------------------------------


def _open_output(output: str, endpoint_url: str | None) -> tuple[str, pafs.FileSystem]:
    root, filesystem = resolve_storage(output, endpoint_url)
    return root, filesystem or pafs.LocalFileSystem()


def _read_optional(filesystem: pafs.FileSystem, path: str) -> bytes | None:
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def list_scored_slides(output: str, endpoint_url: str | None = None) -> list[str]:
    """Return the ids of the slides with a summary under `output`, sorted."""
    root, filesystem = _open_output(output, endpoint_url)
    selector = pafs.FileSelector(f"{root}/{SLIDES_DIR}", allow_not_found=True)
    names = [info.base_name for info in filesystem.get_file_info(selector) if info.base_name.endswith(".parquet")]
    return sorted(name[: -len(".parquet")] for name in names if not name.startswith(("_", ".")))


def load_scored_slide(output: str, slide_id: str, endpoint_url: str | None = None) -> ScoredSlide:
    """Read a slide's summary, tiles, heatmap and the run's settings from a scoring output.

    Raises FileNotFoundError, listing some of the ids present, when the slide has no summary.
    """
    check_slide_id(slide_id)
    root, filesystem = _open_output(output, endpoint_url)
    summary_path = f"{root}/{SLIDES_DIR}/{slide_id}.parquet"
    if filesystem.get_file_info(summary_path).type != pafs.FileType.File:
        known = list_scored_slides(output, endpoint_url)
        listed = ", ".join(known[:10]) if known else "none"
        if len(known) > 10:
            listed += " ..."
        raise FileNotFoundError(
            f"slide {slide_id!r} has no summary {summary_path} in the scoring output {output}; "
            f"slides there: {listed}. Check --scores and --slide"
        )
    summary = pq.read_table(summary_path, filesystem=filesystem).to_pylist()[0]
    tiles_path = f"{root}/{TILES_DIR}/{slide_id}.parquet"
    if filesystem.get_file_info(tiles_path).type == pafs.FileType.File:
        tiles = pq.read_table(tiles_path, filesystem=filesystem).to_pandas()
    else:  # a slide that failed to open has a summary only
        tiles = pd.DataFrame(columns=["tile_index", "status", "mask_png"])
    run_json = _read_optional(filesystem, f"{root}/{RUN_FILE}")
    run_settings = json.loads(run_json) if run_json else {}
    heatmap = _read_optional(filesystem, f"{root}/{HEATMAPS_DIR}/{slide_id}.png")
    logger.debug("read slide %s from %s: %d tile rows", slide_id, output, len(tiles))
    return ScoredSlide(output, slide_id, summary, tiles, heatmap, run_settings)


def select_tiles(slide: ScoredSlide, selection: TileSelection = "top", top_k: int | None = None) -> pd.DataFrame:
    """Return the scored tiles to review: the summary's top tiles in rank order, or all scored ones.

    `top_k` keeps the first k of them (all when None). "all" orders tiles by suspicion, highest first.
    """
    if selection not in TILE_SELECTIONS:
        raise ValueError(f"tile selection must be one of {TILE_SELECTIONS}, got {selection!r}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    scored = slide.tiles[slide.tiles["status"] == "ok"]
    if selection == "top":
        ranks = {int(entry["tile_index"]): rank for rank, entry in enumerate(slide.summary.get("top_tiles") or [])}
        chosen = scored[scored["tile_index"].isin(ranks)]
        chosen = chosen.iloc[np.argsort([ranks[int(index)] for index in chosen["tile_index"]], kind="stable")]
    else:
        chosen = scored.sort_values(["suspicion", "tile_index"], ascending=[False, True], kind="stable")
    if top_k is not None:
        chosen = chosen.iloc[:top_k]
    return chosen.reset_index(drop=True)


def decode_mask(slide: ScoredSlide, tile: pd.Series) -> np.ndarray:
    """Return a tile's stored (H, W) uint8 label mask, in model pixels.

    Raises MissingMasksError when the tiles file stores no mask for the tile.
    """
    data = tile.get("mask_png")
    if data is None or (isinstance(data, float) and math.isnan(data)):
        raise MissingMasksError(
            f"tile {int(tile['tile_index'])} of slide {slide.slide_id!r} in {slide.output} has no stored label "
            "mask, because the slide was scored with scoring.write_masks=false. Score it again with "
            "--set scoring.write_masks=true into a new --output (a rerun into the same output skips complete "
            f"slides unless slides/{slide.slide_id}.parquet is deleted first)"
        )
    with Image.open(io.BytesIO(data)) as image:
        mask = np.asarray(image)
    if mask.ndim != 2 or not np.isin(mask, LABEL_VALUES).all():
        raise ValueError(
            f"tile {int(tile['tile_index'])} of slide {slide.slide_id!r}: the stored mask must be a grayscale PNG "
            f"with labels {LABEL_VALUES}, got shape {mask.shape} and values {np.unique(mask)[:8].tolist()}"
        )
    return mask.astype(np.uint8)


def owned_boxes(slide: ScoredSlide) -> dict[int, tuple[int, int, int, int]] | None:
    """Rebuild each tile's core box (x0, y0, x1, y1), in mask pixels relative to the tile.

    The scoring grid is laid again from run.json's tile_size and overlap and the summary's sizes
    and pixel sizes, as scoring/stages.plan_slide lays it. Returns None, with a warning, when
    the settings are missing or the rebuilt boxes do not match the stored tiles.
    """
    settings, summary = slide.run_settings, slide.summary
    needed = [settings.get("tile_size"), settings.get("overlap"), summary.get("width"), summary.get("height"),
              summary.get("slide_mpp"), summary.get("model_mpp")]
    if any(value is None for value in needed):
        logger.warning("slide %s: run.json or the summary lacks the grid settings; objects in tile overlaps "
                       "are exported once per tile", slide.slide_id)
        return None
    tile_size, overlap, width0, height0, slide_mpp, model_mpp = needed
    factor = float(model_mpp) / float(slide_mpp)  # level-0 pixels per model pixel
    grid = make_grid(*model_pixel_size(int(width0), int(height0), factor), int(tile_size), int(overlap))
    boxes0 = scale_boxes(grid.valid_boxes(), factor, int(width0), int(height0))
    cores = grid.cores - np.tile(grid.boxes[:, :2], 2)  # (N, 4) core boxes in tile pixels
    scored = slide.tiles[slide.tiles["status"] == "ok"]
    for tile in scored.itertuples():
        stored = (tile.x, tile.y, tile.x + tile.width, tile.y + tile.height)
        if tile.tile_index >= len(grid) or tuple(int(v) for v in boxes0[tile.tile_index]) != stored:
            logger.warning("slide %s: tile %d does not match the rebuilt scoring grid; objects in tile overlaps "
                           "are exported once per tile", slide.slide_id, tile.tile_index)
            return None
    return {int(index): tuple(int(v) for v in cores[index]) for index in scored["tile_index"]}


# --- Outlines -----------------------------------------------------------------------------------


def _signed_area(ring: np.ndarray) -> float:
    """Return the shoelace area of a closed (n, 2) x, y ring: positive when counterclockwise in x, y."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """Remove repeated and collinear vertices of a closed ring; the shape stays the same.

    Marching squares on a binary mask puts vertices at multiples of 0.5, so the cross products
    are exact in floating point.
    """
    points = ring[:-1]
    previous = points - np.roll(points, 1, axis=0)
    following = np.roll(points, -1, axis=0) - points
    cross = previous[:, 0] * following[:, 1] - previous[:, 1] * following[:, 0]
    kept = points[cross != 0]
    return np.vstack([kept, kept[:1]])


def object_polygons(binary: np.ndarray) -> list[list[np.ndarray]]:
    """Outline the True pixels of an (H, W) mask as polygons in pixel-edge coordinates.

    Returns a list of polygons, each [exterior, *holes] of closed (n, 2) x, y rings, exteriors
    with positive signed area and holes negative. One 8-connected region gives one polygon.
    """
    padded = np.pad(binary, 1).astype(np.float32)  # closes the contours at the mask border
    contours = measure.find_contours(padded, 0.5, fully_connected="high", positive_orientation="high")
    exteriors: list[np.ndarray] = []
    holes: list[np.ndarray] = []
    for contour in contours:
        # (row, col) of the padded array -> x, y with pixel (r, c) covering [c, c + 1] x [r, r + 1].
        ring = _drop_collinear(contour[:, ::-1] - 0.5)
        area = _signed_area(ring)
        # positive_orientation="high" winds exteriors one way and holes the other; flip both to RFC 7946.
        (exteriors if area < 0 else holes).append(ring[::-1])
    polygons = [[exterior] for exterior in exteriors]
    if len(polygons) == 1:
        polygons[0].extend(holes)
        return polygons
    areas = [_signed_area(exterior) for exterior in exteriors]
    for hole in holes:
        # Rings never touch, so any vertex of a hole shows which exteriors enclose it; the smallest owns it.
        inside = [i for i, exterior in enumerate(exteriors) if PolygonPath(exterior).contains_point(hole[0])]
        if inside:
            polygons[min(inside, key=lambda i: areas[i])].append(hole)
    return polygons


def _geometry(polygons: list[list[np.ndarray]], origin: tuple[float, float], scale: tuple[float, float]) -> dict[str, Any]:
    """Map pixel-edge polygons to level 0 (X = x + px * scale_x) as a GeoJSON Polygon or MultiPolygon."""
    offset = np.asarray(origin, dtype=np.float64)
    factor = np.asarray(scale, dtype=np.float64)
    mapped = [
        [np.round(offset + ring * factor, COORDINATE_DECIMALS).tolist() for ring in polygon] for polygon in polygons
    ]
    if len(mapped) == 1:
        return {"type": "Polygon", "coordinates": mapped[0]}
    return {"type": "MultiPolygon", "coordinates": mapped}


def _label_polygons(label_map: np.ndarray, ids: list[int]) -> dict[int, list[list[np.ndarray]]]:
    """Outline objects `ids` of an (H, W) map of ids 1..count, each in tile pixel-edge coordinates."""
    slices = ndimage.find_objects(label_map)
    outlines: dict[int, list[list[np.ndarray]]] = {}
    for object_id in ids:
        rows, cols = slices[object_id - 1]
        polygons = object_polygons(label_map[rows, cols] == object_id)
        shift = np.asarray([cols.start, rows.start], dtype=np.float64)
        outlines[object_id] = [[ring + shift for ring in polygon] for polygon in polygons]
    return outlines


# --- Features -----------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    """Return value as a float, or None for missing and NaN values (JSON has no NaN)."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _measurements(values: dict[str, Any]) -> dict[str, float]:
    return {name: number for name, value in values.items() if (number := _number(value)) is not None}


def _feature_id(slide_id: str, tile_index: int, kind: str, object_id: int = 0) -> str:
    return str(uuid.uuid5(FEATURE_ID_NAMESPACE, f"{slide_id}/{tile_index}/{kind}/{object_id}"))


def tile_annotation(slide: ScoredSlide, tile: pd.Series, rank: int) -> dict[str, Any]:
    """Return the tile's level-0 box as a locked QuPath annotation carrying the tile's statistics."""
    x0, y0 = int(tile["x"]), int(tile["y"])
    x1, y1 = x0 + int(tile["width"]), y0 + int(tile["height"])
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]  # positive signed area in x, y
    index = int(tile["tile_index"])
    return {
        "type": "Feature",
        "id": _feature_id(slide.slide_id, index, "tile"),
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {
            "objectType": "annotation",
            "name": f"review tile {rank}: tile {index}, suspicion {float(tile['suspicion']):.3f}",
            "classification": TILE_CLASS,
            "isLocked": True,
            "measurements": _measurements({
                "Review rank": rank, "Tile index": index, "Suspicion": tile["suspicion"],
                "TTA disagreement": tile["tta_disagreement"], "Nucleus count": tile["nucleus_count"],
                "N/C ratio mean": tile["nc_ratio_mean"], "N/C ratio max": tile["nc_ratio_max"],
            }),
            "metadata": {"slide_id": slide.slide_id, "tile_index": str(index), "model": str(tile["model_name"])},
        },
    }


def tile_features(
    slide: ScoredSlide, tile: pd.Series, core: tuple[int, int, int, int] | None = None
) -> list[dict[str, Any]]:
    """Return a Nucleus and a Cell detection for each nucleus of the tile's mask.

    With a `core` box (x0, y0, x1, y1 in mask pixels), only the nuclei whose centroid lies in it
    are exported, with their cells, so neighbouring tiles never export an object twice. The
    tiles' nuclei_owned and nc_ratios columns follow the same ownership rule. Cells get an N/C
    ratio when they do not touch the tile border and contain cytoplasm, as in the tile statistics.
    """
    mask = decode_mask(slide, tile)
    height, width = mask.shape
    nuclei, cells, count = segment_cells(mask)
    if count == 0:
        return []

    # Areas, completeness and ownership per object id, as postprocess.tile_statistics measures them.
    nucleus_area = np.bincount(cells.ravel(), weights=(mask == NUCLEUS).ravel(), minlength=count + 1)
    cell_area = np.bincount(cells.ravel(), minlength=count + 1).astype(np.float64)
    on_border = np.zeros(count + 1, dtype=bool)
    on_border[np.unique(np.concatenate([cells[0], cells[-1], cells[:, 0], cells[:, -1]]))] = True
    owned = np.ones(count + 1, dtype=bool)
    if core is not None:
        centroids = np.asarray(ndimage.center_of_mass(nuclei > 0, nuclei, np.arange(1, count + 1)))  # (count, 2) y, x
        x0, y0, x1, y1 = core
        owned[1:] = (centroids[:, 1] >= x0) & (centroids[:, 1] < x1) & (centroids[:, 0] >= y0) & (centroids[:, 0] < y1)
    ids = [int(i) for i in np.flatnonzero(owned[1:]) + 1]

    # Outlines in level-0 pixels.
    origin = (float(tile["x"]), float(tile["y"]))
    scale = (float(tile["width"]) / width, float(tile["height"]) / height)
    nucleus_outlines = _label_polygons(nuclei, ids)
    cell_outlines = _label_polygons(cells, ids)

    pixel_area = float(slide.summary.get("model_mpp") or float("nan")) ** 2  # square microns per mask pixel
    index = int(tile["tile_index"])
    shared = {
        "Tile index": index, "Tile suspicion": tile["suspicion"], "Tile TTA disagreement": tile["tta_disagreement"],
    }
    metadata = {"slide_id": slide.slide_id, "tile_index": str(index), "model": str(tile["model_name"])}
    features = []
    for object_id in ids:
        measurable = not on_border[object_id] and cell_area[object_id] > nucleus_area[object_id]
        ratio = nucleus_area[object_id] / cell_area[object_id] if measurable else None
        nucleus = {"Area µm^2": nucleus_area[object_id] * pixel_area, **shared}
        cell = {"Area µm^2": cell_area[object_id] * pixel_area, "N/C ratio": ratio,
                "Touches tile border": float(on_border[object_id]), **shared}
        for kind, outlines, classification, values in (
            ("nucleus", nucleus_outlines, NUCLEUS_CLASS, nucleus), ("cell", cell_outlines, CELL_CLASS, cell),
        ):
            features.append({
                "type": "Feature",
                "id": _feature_id(slide.slide_id, index, kind, object_id),
                "geometry": _geometry(outlines[object_id], origin, scale),
                "properties": {
                    "objectType": "detection",
                    "classification": classification,
                    "measurements": _measurements(values),
                    "metadata": metadata,
                },
            })
    return features


def slide_feature_collection(
    slide: ScoredSlide, selection: TileSelection = "top", top_k: int | None = None, owned_only: bool = True
) -> dict[str, Any]:
    """Build the FeatureCollection of a slide's review tiles: tile annotations, nuclei and cells.

    `selection` and `top_k` choose the tiles as select_tiles does. With `owned_only`, each object
    comes from the tile that owns its nucleus (see tile_features). Without it, every object of
    every chosen tile is exported, so objects in tile overlaps repeat. Raises MissingMasksError
    when the masks were not stored.
    """
    chosen = select_tiles(slide, selection, top_k)
    cores = owned_boxes(slide) if owned_only and len(chosen) else None
    features: list[dict[str, Any]] = []
    for rank, (_, tile) in enumerate(chosen.iterrows(), start=1):
        features.append(tile_annotation(slide, tile, rank))
        core = cores.get(int(tile["tile_index"])) if cores is not None else None
        features.extend(tile_features(slide, tile, core))
    logger.info("slide %s: %d tiles, %d features", slide.slide_id, len(chosen), len(features))
    return {"type": "FeatureCollection", "features": features}


def write_geojson(collection: dict[str, Any], path: str | Path) -> Path:
    """Write a FeatureCollection as strict JSON (no NaN) to `path`; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(collection, allow_nan=False, ensure_ascii=False, separators=(",", ":")))
    logger.debug("wrote %s", path)
    return path
