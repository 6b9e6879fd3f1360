"""A slide's results read back from a scoring output prefix, for the review exports.

The tiles, the slide summary, the heatmap and the run settings come from the files that
cervi_ray.scoring.outputs writes, locally or under s3://.
"""

import io
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from cervi_ray.scoring.grid import make_grid, scale_boxes
from cervi_ray.scoring.outputs import HEATMAPS_DIR, RUN_FILE, SLIDES_DIR, TILES_DIR, check_slide_id
from cervi_ray.scoring.resolution import model_pixel_size
from cervi_ray.storage import resolve_storage

logger = logging.getLogger(__name__)

TileSelection = Literal["top", "all"]
TILE_SELECTIONS = ("top", "all")
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
