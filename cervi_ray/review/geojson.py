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

import json
import logging
import math
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.path import Path as PolygonPath
from scipy import ndimage
from skimage import measure

from cervi_ray.data.labels import NUCLEUS
from cervi_ray.review.scored import ScoredSlide, TileSelection, decode_mask, owned_boxes, select_tiles
from cervi_ray.scoring.postprocess import segment_cells

logger = logging.getLogger(__name__)


# Class colours match the overlays of cervi_ray.report.overlays (nucleus magenta, cytoplasm green).
NUCLEUS_CLASS = {"name": "Nucleus", "color": [220, 30, 200]}
CELL_CLASS = {"name": "Cell", "color": [40, 200, 80]}
TILE_CLASS = {"name": "Review tile", "color": [255, 200, 0]}
# Decimals of level-0 pixel coordinates. Vertices lie at least half a model pixel apart (0.5 *
# width / mask width level-0 pixels), far more than this rounding moves them.
COORDINATE_DECIMALS = 3
# Namespace of the feature UUIDs: uuid5 of (slide, tile, object) gives the same id on every export.
FEATURE_ID_NAMESPACE = uuid.UUID("6f1c2b1e-4a53-4c1e-9a7e-2f0d8c5b7a10")


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
