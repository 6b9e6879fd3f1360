"""Per-slide review page: one self-contained HTML file with every image embedded as base64 PNG.

The page shows the slide's heatmap (suspicion per tile over the thumbnail, from
heatmaps/<slide_id>.png) with the top tiles outlined and numbered, the top tiles with their label
masks over the tile image read again from the slide (the mask alone when the slide file cannot
be opened), and tables of the slide's statistics and of the top tiles.

All text that comes from data (slide ids, paths, errors, model names) is escaped with
html.escape, and the page's Content-Security-Policy allows no scripts and only data: images, so
it loads nothing from anywhere.
"""

import base64
import html
import io
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pandas as pd
from matplotlib import colormaps
from PIL import Image, ImageDraw

from cervi_ray.report.overlays import colourise
from cervi_ray.review.scored import ScoredSlide, select_tiles
from cervi_ray.scoring.slides import Slide, SlideError, SlideStorage, open_slide, read_window

logger = logging.getLogger(__name__)

CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; } h3 { font-size: 15px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #bbb; padding: 3px 8px; text-align: left; }
th { background: #eee; }
img { max-width: 100%; }
.note { color: #555; font-size: 13px; }
.tiles { display: flex; flex-wrap: wrap; gap: 16px; }
.tile { border: 1px solid #ccc; padding: 6px; }
.tile img { width: 200px; height: auto; image-rendering: pixelated; }
.legend { display: inline-block; width: 240px; height: 12px; vertical-align: middle; }
"""
BOX_COLOUR = (230, 20, 20)  # top-tile outlines on the heatmap: red contrasts with every viridis colour
SCREENING_NOTE = (
    "The suspicion score is a screening heuristic for ranking tiles for review, not a validated diagnostic."
)


# --- HTML helpers, shared with run_report -------------------------------------------------------


def escape(value: Any) -> str:
    """Return str(value) escaped for HTML text and attribute values."""
    return html.escape(str(value), quote=True)


def encode_png(image: np.ndarray) -> bytes:
    """Encode an (H, W, 3) or (H, W) uint8 array as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_tag(png: bytes, alt: str, css_class: str = "") -> str:
    extra = f' class="{escape(css_class)}"' if css_class else ""
    return f'<img src="{png_data_uri(png)}" alt="{escape(alt)}"{extra}>'


def format_value(value: Any, digits: int = 3) -> str:
    """Format a table cell: n/a for missing or NaN, `digits` decimals for floats."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}f}"
    return str(value)


def html_table(header: list[str], rows: list[list[Any]]) -> str:
    """Return a table whose cells are formatted with format_value and escaped."""
    head = "".join(f"<th>{escape(title)}</th>" for title in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(format_value(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_page(title: str, body: str) -> str:
    """Wrap `body` (already HTML) in a page titled `title` (plain text, escaped here)."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


# --- Images -------------------------------------------------------------------------------------


def heatmap_with_boxes(slide: ScoredSlide, tiles: pd.DataFrame) -> bytes | None:
    """Outline and number `tiles` (in rank order) on the slide's heatmap; None without a heatmap."""
    if not slide.heatmap_png:
        return None
    with Image.open(io.BytesIO(slide.heatmap_png)) as stored:
        canvas = stored.convert("RGB")
    width0, height0 = slide.summary.get("width"), slide.summary.get("height")
    if not width0 or not height0:
        return slide.heatmap_png
    scale_x, scale_y = canvas.width / width0, canvas.height / height0
    draw = ImageDraw.Draw(canvas)
    for rank, (_, tile) in enumerate(tiles.iterrows(), start=1):
        x0, y0 = tile["x"] * scale_x, tile["y"] * scale_y
        x1, y1 = (tile["x"] + tile["width"]) * scale_x, (tile["y"] + tile["height"]) * scale_y
        draw.rectangle([x0, y0, max(x0 + 1, x1 - 1), max(y0 + 1, y1 - 1)], outline=BOX_COLOUR, width=2)
        label = str(rank)
        left, top, right, bottom = draw.textbbox((x0 + 3, y0 + 2), label)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=(255, 255, 255))
        draw.text((x0 + 3, y0 + 2), label, fill=BOX_COLOUR)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def viridis_gradient() -> str:
    """Return a CSS linear-gradient of matplotlib's viridis from 0 to 1, the heatmap's colours."""
    colormap = colormaps["viridis"]
    stops = []
    for fraction in np.linspace(0.0, 1.0, 6):
        red, green, blue = (round(channel * 255) for channel in colormap(float(fraction))[:3])
        stops.append(f"rgb({red},{green},{blue}) {fraction * 100:.0f}%")
    return "linear-gradient(to right, " + ", ".join(stops) + ")"


def open_source_slide(slide: ScoredSlide, storage: SlideStorage) -> tuple[Slide | None, str]:
    """Open the scored slide's file for tile images; returns (slide or None, reason it failed)."""
    source = slide.summary.get("source")
    if not source:
        return None, "the summary records no source file"
    try:
        return open_slide(str(source), storage), ""
    except (SlideError, OSError, openslide.OpenSlideError) as e:
        logger.warning("slide %s: tile images not shown, %s could not be opened: %s", slide.slide_id, source, e)
        return None, f"{source} could not be opened ({e})"


def read_tile_image(source: Slide, tile: pd.Series, size: tuple[int, int]) -> np.ndarray:
    """Read a tile's level-0 box at its scoring level, resized to size (width, height): (H, W, 3) uint8."""
    level = int(tile["level"])
    downsample = source.levels[level].downsample
    box = tuple(int(round(value / downsample)) for value in (
        tile["x"], tile["y"], tile["x"] + tile["width"], tile["y"] + tile["height"],
    ))
    return read_window(source, level, box, size)


def _decode_mask(tile: pd.Series) -> np.ndarray | None:
    data = tile.get("mask_png")
    if data is None or (isinstance(data, float) and math.isnan(data)):
        return None
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def tile_panels(tile: pd.Series, source: Slide | None) -> tuple[list[tuple[str, bytes]], str]:
    """Return the tile's (caption, PNG) panels and a note on what could not be shown."""
    mask = _decode_mask(tile)
    notes = []
    image = None
    if source is not None:
        size = (mask.shape[1], mask.shape[0]) if mask is not None else (int(tile["width"]), int(tile["height"]))
        try:
            image = read_tile_image(source, tile, size)
        except (SlideError, OSError, openslide.OpenSlideError) as e:
            logger.warning("tile %d: image could not be read: %s", int(tile["tile_index"]), e)
            notes.append(f"image could not be read ({e})")
    panels = []
    if image is not None:
        panels.append(("image", encode_png(image)))
    if mask is None:
        notes.append("no stored mask (scored with scoring.write_masks=false)")
    else:
        # The (H, W) mask over the image, then alone over white, which reads clearly on any stain.
        if image is not None:
            panels.append(("mask over image", encode_png(colourise(image, mask))))
        white = np.full((*mask.shape, 3), 255, dtype=np.uint8)
        panels.append(("mask", encode_png(colourise(white, mask))))
    return panels, "; ".join(notes)


# --- The page -----------------------------------------------------------------------------------


def statistics_rows(summary: dict[str, Any]) -> list[list[Any]]:
    """Return (name, value) rows of a slide summary for the statistics table."""
    def both(first: Any, second: Any, separator: str = " x ") -> str:
        return f"{format_value(first)}{separator}{format_value(second)}"

    return [
        ["status", summary.get("status")],
        ["error", summary.get("error") or ""],
        ["source", summary.get("source")],
        ["size (level-0 pixels)", both(summary.get("width"), summary.get("height"))],
        ["slide microns per pixel", f"{format_value(summary.get('slide_mpp'))} ({summary.get('slide_mpp_source')})"],
        ["model microns per pixel", summary.get("model_mpp")],
        ["level read, downsample", both(summary.get("level"), summary.get("level_downsample"), ", ")],
        ["tiles seen", summary.get("tiles_seen")],
        ["tiles scored", summary.get("tiles_scored")],
        ["tiles skipped as background", summary.get("tiles_skipped_background")],
        ["tiles failed", summary.get("tiles_failed")],
        ["nuclei counted", summary.get("nuclei_counted")],
        ["cells measured (N/C)", summary.get("cells_measured")],
        ["N/C ratio mean", summary.get("nc_ratio_mean")],
        ["N/C ratio median", summary.get("nc_ratio_median")],
        ["N/C ratio 90th percentile", summary.get("nc_ratio_p90")],
        ["N/C ratio max", summary.get("nc_ratio_max")],
        ["slide score (mean suspicion of the top tiles)", summary.get("slide_score")],
        ["model", f"{summary.get('model_name')} {summary.get('model_version')}"],
        ["scored at", summary.get("scored_at")],
    ]


TILE_HEADER = [
    "rank", "tile", "x", "y", "width x height", "suspicion", "nuclei", "nuclei owned", "complete cells",
    "N/C mean", "N/C max", "TTA disagreement",
]


def _tile_row(rank: int, tile: pd.Series) -> list[Any]:
    return [
        rank, int(tile["tile_index"]), int(tile["x"]), int(tile["y"]), f"{int(tile['width'])} x {int(tile['height'])}",
        float(tile["suspicion"]), int(tile["nucleus_count"]), int(tile["nuclei_owned"]), int(tile["cells_complete"]),
        float(tile["nc_ratio_mean"]), float(tile["nc_ratio_max"]), float(tile["tta_disagreement"]),
    ]


def render_slide_html(slide: ScoredSlide, top_k: int | None = None, storage: SlideStorage | None = None) -> str:
    """Render the review page of a scored slide: heatmap, top tiles with masks, statistics."""
    tiles = select_tiles(slide, "top", top_k)
    summary = slide.summary
    parts = [
        f"<h1>Slide review: {escape(slide.slide_id)}</h1>",
        f'<p class="note">Scoring output {escape(slide.output)}. {escape(SCREENING_NOTE)}</p>',
    ]

    # Heatmap with the top tiles outlined.
    parts.append("<h2>Heatmap</h2>")
    heatmap = heatmap_with_boxes(slide, tiles)
    if heatmap is None:
        parts.append('<p class="note">No heatmap: the slide failed before its thumbnail was read.</p>')
    else:
        parts.append(
            f'<p class="note">Suspicion per scored tile, 0 <span class="legend" style="background: {viridis_gradient()}">'
            "</span> 1; grey tiles failed, unmarked areas are background. Red boxes: the top tiles, by rank.</p>"
        )
        parts.append(image_tag(heatmap, f"heatmap of {slide.slide_id}"))

    # Top tiles: table, then image and mask panels.
    parts.append(f"<h2>Top {len(tiles)} tiles</h2>")
    if tiles.empty:
        parts.append('<p class="note">No tile was scored.</p>')
    else:
        parts.append(html_table(TILE_HEADER, [_tile_row(rank, tile) for rank, (_, tile) in enumerate(tiles.iterrows(), 1)]))
        source, reason = open_source_slide(slide, storage or SlideStorage())
        if source is None:
            parts.append(f'<p class="note">Tile images not shown: {escape(reason)}.</p>')
        parts.append('<p class="note">Masks: cytoplasm green, nucleus magenta.</p><div class="tiles">')
        for rank, (_, tile) in enumerate(tiles.iterrows(), start=1):
            panels, note = tile_panels(tile, source)
            images = "".join(image_tag(png, f"tile {int(tile['tile_index'])} {caption}") for caption, png in panels)
            caption = (
                f"#{rank}: tile {int(tile['tile_index'])} at ({int(tile['x'])}, {int(tile['y'])}), "
                f"suspicion {float(tile['suspicion']):.3f}" + (f"; {note}" if note else "")
            )
            parts.append(f'<div class="tile">{images}<div class="note">{escape(caption)}</div></div>')
        parts.append("</div>")
        if source is not None:
            source.close()

    # Slide statistics.
    parts.append("<h2>Slide statistics</h2>")
    parts.append(html_table(["statistic", "value"], statistics_rows(summary)))
    return html_page(f"Slide review: {slide.slide_id}", "\n".join(parts))


def write_slide_html(
    slide: ScoredSlide, path: str | Path, top_k: int | None = None, storage: SlideStorage | None = None
) -> Path:
    """Write the slide's review page to `path`; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_slide_html(slide, top_k, storage), encoding="utf-8")
    logger.debug("wrote %s", path)
    return path
