"""Output layout, per-slide summaries, heatmaps and the bookkeeping that makes reruns resume.

Layout under the output prefix (a local folder or s3://bucket/prefix):
  tiles/<slide_id>.parquet     one row per scored or failed tile (TILE_COLUMNS)
  slides/<slide_id>.parquet    one summary row per slide (SUMMARY_SCHEMA)
  heatmaps/<slide_id>.png      suspicion per tile over the slide's thumbnail
  run.json                     the settings and model the results were computed with
  _staging/                    files being written; Parquet readers skip names starting with "_"

A slide is committed by writing its three files under _staging, then moving the heatmap, the
tiles and last the summary into place, so a summary exists only for a complete slide. A rerun
skips slides whose summary has status "ok" and scores every other slide again, replacing its
files, so no slide appears twice. Run one job at a time per output prefix, because a job starts by
clearing _staging.
"""

import io
import json
import logging
import posixpath
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from matplotlib import colormaps
from PIL import Image

from cervi_ray.storage import resolve_storage

logger = logging.getLogger(__name__)

TILES_DIR, SLIDES_DIR, HEATMAPS_DIR, STAGING_DIR = "tiles", "slides", "heatmaps", "_staging"
RUN_FILE = "run.json"
MAX_ERRORS_LISTED = 3

TILE_COLUMNS = (
    "slide_id", "tile_index", "level", "x", "y", "width", "height", "tissue_fraction", "status", "error",
    "cytoplasm_fraction", "nucleus_fraction", "nucleus_count", "nuclei_owned", "cells_complete",
    "nc_ratio_mean", "nc_ratio_max", "nc_ratios", "tta_disagreement", "suspicion",
    "model_name", "model_version", "mask_png",
)
TOP_TILE_TYPE = pa.struct([
    ("tile_index", pa.int64()), ("x", pa.int64()), ("y", pa.int64()),
    ("width", pa.int64()), ("height", pa.int64()), ("suspicion", pa.float32()),
])
SUMMARY_SCHEMA = pa.schema([
    ("slide_id", pa.string()), ("source", pa.string()), ("status", pa.string()), ("error", pa.string()),
    ("width", pa.int64()), ("height", pa.int64()),
    ("slide_mpp", pa.float64()), ("slide_mpp_source", pa.string()), ("model_mpp", pa.float64()),
    ("level", pa.int32()), ("level_downsample", pa.float64()),
    ("tiles_seen", pa.int64()), ("tiles_scored", pa.int64()), ("tiles_skipped_background", pa.int64()),
    ("tiles_failed", pa.int64()), ("nuclei_counted", pa.int64()), ("cells_measured", pa.int64()),
    ("nc_ratio_mean", pa.float64()), ("nc_ratio_median", pa.float64()), ("nc_ratio_p90", pa.float64()),
    ("nc_ratio_max", pa.float64()), ("slide_score", pa.float64()), ("top_tiles", pa.list_(TOP_TILE_TYPE)),
    ("model_name", pa.string()), ("model_version", pa.string()), ("scored_at", pa.string()),
])


def check_slide_id(slide_id: str) -> str:
    """Return `slide_id` if it is a single safe file name, else raise ValueError.

    This guard repeats the checks of sources.safe_slide_id, so no id can put a file outside
    its folder even if it skipped that function.
    """
    if (not slide_id or slide_id != posixpath.basename(slide_id) or "\\" in slide_id
            or slide_id.startswith((".", "_")) or "\x00" in slide_id):
        raise ValueError(f"slide id {slide_id!r} is not a safe file name; build ids with sources.safe_slide_id")
    return slide_id


@dataclass(frozen=True)
class CommittedSlide:
    """The status of a slide's committed summary and the URI it was scored from."""

    status: str
    source: str


class OutputStore:
    """The output prefix on a local or S3 filesystem, with atomic per-slide commits."""

    def __init__(self, uri: str, endpoint_url: str | None = None):
        self.uri = uri
        self.root, filesystem = resolve_storage(uri, endpoint_url)
        self.fs = filesystem or pafs.LocalFileSystem()
        self.run_id = uuid.uuid4().hex[:12]

    def path(self, folder: str, slide_id: str, suffix: str) -> str:
        return f"{self.root}/{folder}/{check_slide_id(slide_id)}{suffix}"

    def _staged(self, name: str) -> str:
        return f"{self.root}/{STAGING_DIR}/{self.run_id}/{name}"

    def completed(self) -> dict[str, CommittedSlide]:
        """Return the status and source of every committed summary, by slide id."""
        selector = pafs.FileSelector(f"{self.root}/{SLIDES_DIR}", allow_not_found=True)
        files = [info.path for info in self.fs.get_file_info(selector) if info.path.endswith(".parquet")]
        committed: dict[str, CommittedSlide] = {}
        for path in files:
            try:
                table = pq.read_table(path, filesystem=self.fs, columns=["slide_id", "status", "source"])
            except (OSError, pa.ArrowInvalid, KeyError) as e:
                logger.warning("summary %s is unreadable (%s); its slide will be scored again", path, e)
                continue
            for row in table.to_pylist():
                committed[row["slide_id"]] = CommittedSlide(row["status"], row["source"])
        return committed

    def check_run(self, settings: dict[str, Any]) -> None:
        """Record `settings` in run.json, or raise ValueError if earlier results used others."""
        path = f"{self.root}/{RUN_FILE}"
        if self.fs.get_file_info(path).type == pafs.FileType.File:
            with self.fs.open_input_stream(path) as stream:
                previous = json.loads(stream.read())
            changed = {key: (previous.get(key), value) for key, value in settings.items() if previous.get(key) != value}
            if changed:
                details = ", ".join(f"{key} {old!r} (now {new!r})" for key, (old, new) in changed.items())
                raise ValueError(
                    f"output {self.uri} contains results computed with other settings: {details}. Choose a new "
                    "--output, or delete the old results to rescore them"
                )
            return
        self.fs.create_dir(self.root, recursive=True)
        self._write_bytes(path, json.dumps(settings, indent=2).encode())

    def clear_staging(self) -> None:
        self.fs.delete_dir_contents(f"{self.root}/{STAGING_DIR}", missing_dir_ok=True)

    def _write_bytes(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as stream:
            stream.write(data)

    def commit_slide(self, slide_id: str, tiles: pa.Table, summary: pa.Table, heatmap_png: bytes | None) -> None:
        """Write a slide's files under _staging, then move them into place, the summary last."""
        moves = []
        for folder in (HEATMAPS_DIR, TILES_DIR, SLIDES_DIR):
            self.fs.create_dir(f"{self.root}/{folder}", recursive=True)
        self.fs.create_dir(self._staged(""), recursive=True)
        if heatmap_png is not None:
            staged = self._staged(f"{check_slide_id(slide_id)}.heatmap.png")
            self._write_bytes(staged, heatmap_png)
            moves.append((staged, self.path(HEATMAPS_DIR, slide_id, ".png")))
        for folder, table in ((TILES_DIR, tiles), (SLIDES_DIR, summary)):
            staged = self._staged(f"{check_slide_id(slide_id)}.{folder}.parquet")
            pq.write_table(table, staged, filesystem=self.fs)
            moves.append((staged, self.path(folder, slide_id, ".parquet")))
        for source, target in moves:
            self.fs.move(source, target)
        logger.debug("committed slide %s to %s", slide_id, self.uri)


def tile_table(stage_rows: pa.Table, model_name: str, model_version: str) -> pa.Table:
    """Turn a slide's collected stage rows into its tiles file: tile rows only, in grid order."""
    tiles = stage_rows.filter(pc.not_equal(stage_rows["status"], "header"))
    tiles = tiles.sort_by("tile_index")
    count = tiles.num_rows
    tiles = tiles.append_column("model_name", pa.array([model_name] * count, pa.string()))
    tiles = tiles.append_column("model_version", pa.array([model_version] * count, pa.string()))
    return tiles.select(list(TILE_COLUMNS))


def _error_summary(info: dict[str, Any], tiles: pa.Table) -> str:
    if info.get("error"):
        return str(info["error"])
    errors = [error for error in tiles["error"].to_pylist() if error]
    if not errors:
        return ""
    distinct = list(dict.fromkeys(errors))[:MAX_ERRORS_LISTED]
    return f"{len(errors)} tiles failed; first errors: " + " | ".join(distinct)


def slide_summary(
    slide_id: str, source: str, info: dict[str, Any], tiles: pa.Table, top_k: int, model_name: str, model_version: str
) -> pa.Table:
    """Build a slide's summary row from its description (`info`) and its tiles file.

    The slide score is the mean suspicion of its top_k most suspicious tiles (fewer when fewer
    were scored), NaN when none was. N/C statistics pool the complete cells whose nucleus each
    tile owns, so cells in overlaps count once.
    """
    scored = tiles.filter(pc.equal(tiles["status"], "ok"))
    failed = tiles.num_rows - scored.num_rows
    ratios = np.asarray(pc.list_flatten(scored["nc_ratios"]).to_numpy(zero_copy_only=False), dtype=np.float64)
    suspicion = np.asarray(scored["suspicion"].to_numpy(zero_copy_only=False), dtype=np.float64)
    order = np.argsort(-suspicion, kind="stable")[:top_k]
    top = [
        {key: scored[key][int(i)].as_py() for key in ("tile_index", "x", "y", "width", "height", "suspicion")}
        for i in order
    ]

    if info.get("status") == "failed" or (tiles.num_rows > 0 and scored.num_rows == 0):
        status = "failed"
    elif failed:
        status = "partial"
    else:
        status = "ok"

    def statistic(function: Any) -> float:
        return float(function(ratios)) if ratios.size else float("nan")

    tiles_seen = int(info.get("tiles_seen", 0))
    row = {
        "slide_id": slide_id, "source": source, "status": status, "error": _error_summary(info, tiles),
        "width": info.get("width"), "height": info.get("height"),
        "slide_mpp": info.get("slide_mpp"), "slide_mpp_source": info.get("slide_mpp_source"),
        "model_mpp": info.get("model_mpp"), "level": info.get("level"), "level_downsample": info.get("level_downsample"),
        "tiles_seen": tiles_seen, "tiles_scored": scored.num_rows,
        "tiles_skipped_background": tiles_seen - int(info.get("tiles_kept", 0)), "tiles_failed": failed,
        "nuclei_counted": int(pc.sum(scored["nuclei_owned"]).as_py() or 0), "cells_measured": int(ratios.size),
        "nc_ratio_mean": statistic(np.mean), "nc_ratio_median": statistic(np.median),
        "nc_ratio_p90": statistic(lambda values: np.percentile(values, 90)), "nc_ratio_max": statistic(np.max),
        "slide_score": float(suspicion[order].mean()) if order.size else float("nan"),
        "top_tiles": top, "model_name": model_name, "model_version": model_version,
        "scored_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return pa.Table.from_pylist([row], schema=SUMMARY_SCHEMA)


def render_heatmap(thumbnail_jpeg: bytes, info: dict[str, Any], stage_rows: pa.Table, alpha: float = 0.5) -> bytes | None:
    """Draw each scored tile's core box over the thumbnail, coloured by suspicion, as PNG bytes.

    Colours follow matplotlib's "viridis" map (dark blue 0, yellow 1) on a fixed 0 to 1 scale, so
    heatmaps of different slides compare. Failed tiles are grey, and background tiles stay as the
    thumbnail shows them.
    Returns None when the slide has no thumbnail (it failed to open).
    """
    if not thumbnail_jpeg:
        return None
    with Image.open(io.BytesIO(thumbnail_jpeg)) as image:
        canvas = np.asarray(image.convert("RGB"), dtype=np.float32)  # (h, w, 3)
    height, width = canvas.shape[:2]
    scale_x, scale_y = width / info["width"], height / info["height"]
    colormap = colormaps["viridis"]
    tiles = stage_rows.filter(pc.not_equal(stage_rows["status"], "header")).to_pydict()
    for i, status in enumerate(tiles["status"]):
        x0, x1 = int(tiles["core_x0"][i] * scale_x), max(int(tiles["core_x0"][i] * scale_x) + 1, int(tiles["core_x1"][i] * scale_x))
        y0, y1 = int(tiles["core_y0"][i] * scale_y), max(int(tiles["core_y0"][i] * scale_y) + 1, int(tiles["core_y1"][i] * scale_y))
        if status == "ok":
            colour = np.asarray(colormap(float(tiles["suspicion"][i]))[:3], dtype=np.float32) * 255
        else:
            colour = np.asarray([128, 128, 128], dtype=np.float32)
        canvas[y0:y1, x0:x1] = (1 - alpha) * canvas[y0:y1, x0:x1] + alpha * colour
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
