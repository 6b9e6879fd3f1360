"""The work of each stage of the scoring chain, as plain functions of batches (no Ray here).

scoring/pipeline.py wires these into Ray Data. Rows of one slide travel as one header row
(tile_index -1), which carries the slide's description as JSON and its thumbnail as JPEG, and
one row per kept tile. The header row passes every stage untouched, so the driver learns of
slides that failed to open or have no foreground as well. Errors of a bad slide or tile go
into its row instead of stopping the job: planning and reading catch every exception, inference
catches ValueError and RuntimeError, and the slide's status reports them.

Shapes: N rows in a batch, T the tile side in model pixels, V the TTA views.
"""

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch
from torch import nn

from cervi_ray.checkpoint import load_model
from cervi_ray.data.dataset import to_tensor
from cervi_ray.data.labels import BACKGROUND, NUCLEUS
from cervi_ray.scoring.grid import make_grid, scale_boxes
from cervi_ray.scoring.postprocess import encode_mask_png, tile_statistics
from cervi_ray.scoring.resolution import choose_level, model_pixel_size, slide_resolution
from cervi_ray.scoring.slides import (
    BACKGROUND_VALUE, SlideCache, SlideStorage, read_window, resize,
)
from cervi_ray.scoring.tissue import box_fractions, keep_tiles, read_thumbnail, tissue_mask
from cervi_ray.storage import resolve_storage
from cervi_ray.tta import predict_with_tta, validate_transforms

logger = logging.getLogger(__name__)

HEADER_INDEX = -1
# Largest region one tile may read at its level: 2**26 pixels is 192 MiB as RGB.
MAX_READ_PIXELS = 2**26
MASK_PIXELS_PER_TILE = 16  # foreground fractions in steps of 1/256 of a tile, or finer
MAX_MASK_SIDE = 4096  # longer side of the foreground image: 48 MiB as RGB

# Columns of the summarise stage's output, the rows the driver collects.
STAGE_SCHEMA = pa.schema([
    ("slide_id", pa.string()),
    ("tile_index", pa.int64()),
    ("level", pa.int32()),
    ("x", pa.int64()), ("y", pa.int64()), ("width", pa.int64()), ("height", pa.int64()),
    ("core_x0", pa.int64()), ("core_y0", pa.int64()), ("core_x1", pa.int64()), ("core_y1", pa.int64()),
    ("tissue_fraction", pa.float32()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("cytoplasm_fraction", pa.float32()),
    ("nucleus_fraction", pa.float32()),
    ("nucleus_count", pa.int32()),
    ("nuclei_owned", pa.int32()),
    ("cells_complete", pa.int32()),
    ("nc_ratio_mean", pa.float32()),
    ("nc_ratio_max", pa.float32()),
    ("nc_ratios", pa.list_(pa.float32())),
    ("tta_disagreement", pa.float32()),
    ("suspicion", pa.float32()),
    ("mask_png", pa.binary()),
    ("slide_info", pa.string()),
    ("thumbnail", pa.binary()),
])
STAT_COLUMNS = (
    "cytoplasm_fraction", "nucleus_fraction", "nucleus_count", "nuclei_owned", "cells_complete",
    "nc_ratio_mean", "nc_ratio_max", "tta_disagreement", "suspicion",
)


@dataclass(frozen=True)
class StageSettings:
    """Settings of the plan, read and summarise stages, small and picklable for Ray."""

    tile_size: int
    overlap: int
    min_tissue_fraction: float
    model_mpp: float
    slide_mpp: float | None  # override for slides without resolution metadata
    thumbnail_size: int
    storage: SlideStorage
    views: int  # TTA views, to turn vote counts back into shares
    has_cytoplasm: bool
    write_masks: bool
    worker_log_level: str = "WARNING"


_SLIDES: SlideCache | None = None


def _slides(settings: StageSettings) -> SlideCache:
    """Return this worker process's slide cache, so each process opens a slide once."""
    global _SLIDES
    if _SLIDES is None or _SLIDES.storage != settings.storage:
        _SLIDES = SlideCache(settings.storage)
    logging.getLogger("cervi_ray").setLevel(settings.worker_log_level)
    return _SLIDES


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def _row(slide_id: str, uri: str, index: int, **values: Any) -> dict[str, Any]:
    row = {
        "slide_id": slide_id, "uri": uri, "tile_index": index, "level": 0,
        "x": 0, "y": 0, "width": 0, "height": 0, "core_x0": 0, "core_y0": 0, "core_x1": 0, "core_y1": 0,
        "read_x0": 0, "read_y0": 0, "read_x1": 0, "read_y1": 0, "valid_width": 0, "valid_height": 0,
        "own_x0": 0, "own_y0": 0, "own_x1": 0, "own_y1": 0, "tissue_fraction": 0.0,
        "error": "", "slide_info": "", "thumbnail": b"",
    }
    row.update(values)
    return row


def plan_slide(item: dict[str, Any], settings: StageSettings) -> list[dict[str, Any]]:
    """Open one slide, find its foreground and lay its grid: one header row plus a row per kept tile."""
    slide_id, uri = item["slide_id"], item["uri"]
    try:
        slide = _slides(settings).get(uri)
        resolution = slide_resolution(slide_id, slide.mpp, slide.objective_power, settings.slide_mpp)
        choice = choose_level([level.downsample for level in slide.levels], resolution.mpp, settings.model_mpp)
        width0, height0 = slide.dimensions
        level = slide.levels[choice.level]
        grid = make_grid(*model_pixel_size(width0, height0, choice.level0_per_model_pixel), settings.tile_size, settings.overlap)
        valid = grid.valid_boxes()  # (N, 4) model pixels
        boxes0 = scale_boxes(valid, choice.level0_per_model_pixel, width0, height0)  # level-0 pixels
        cores0 = scale_boxes(grid.cores, choice.level0_per_model_pixel, width0, height0)
        read_boxes = scale_boxes(valid, choice.level_per_model_pixel, level.width, level.height)  # level pixels

        # Keep the tiles that touch enough foreground of a low-resolution image, fine enough to give
        # each tile about MASK_PIXELS_PER_TILE mask pixels per side.
        mask_side = max(settings.thumbnail_size, MASK_PIXELS_PER_TILE * max(grid.width, grid.height) // settings.tile_size)
        overview = read_thumbnail(slide, min(mask_side, MAX_MASK_SIDE))
        mask = tissue_mask(overview)
        fractions = box_fractions(mask, boxes0, mask.shape[1] / width0, mask.shape[0] / height0)
        kept = np.flatnonzero(keep_tiles(fractions, settings.min_tissue_fraction))
        largest = int(((read_boxes[:, 2] - read_boxes[:, 0]) * (read_boxes[:, 3] - read_boxes[:, 1])).max())
        if largest > MAX_READ_PIXELS:
            raise ValueError(
                f"a {settings.tile_size}-pixel tile needs a read of {largest} pixels at level {choice.level}, more "
                f"than {MAX_READ_PIXELS}; lower scoring.tile_size or score a pyramidal copy of the slide"
            )
        if choice.upsamples:
            logger.warning("slide %s (%g MPP) is coarser than the model (%g MPP); tiles are enlarged",
                           slide_id, resolution.mpp, settings.model_mpp)
    except Exception as e:  # a slide that cannot be planned fails alone; the others go on
        info = {"status": "failed", "error": _describe(e)}
        return [_row(slide_id, uri, HEADER_INDEX, slide_info=json.dumps(info))]

    info = {
        "status": "ok", "error": "", "width": width0, "height": height0,
        "slide_mpp": resolution.mpp, "slide_mpp_source": resolution.source, "model_mpp": settings.model_mpp,
        "level": choice.level, "level_downsample": choice.downsample,
        "tiles_seen": len(grid), "tiles_kept": int(kept.size), "foreground_fraction": float(mask.mean()),
    }
    scale = min(1.0, settings.thumbnail_size / max(overview.shape[:2]))
    thumbnail = resize(overview, (max(1, round(overview.shape[1] * scale)), max(1, round(overview.shape[0] * scale))))
    encoded, jpeg = cv2.imencode(".jpg", thumbnail[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])  # RGB -> BGR
    rows = [_row(slide_id, uri, HEADER_INDEX, slide_info=json.dumps(info), thumbnail=jpeg.tobytes() if encoded else b"")]
    valid = grid.valid_sizes()  # (N, 2) width, height inside the slide
    own = grid.cores - np.tile(grid.boxes[:, :2], 2)  # core boxes in tile pixels
    for index in kept:
        x0, y0, x1, y1 = (int(value) for value in boxes0[index])
        c0 = [int(value) for value in cores0[index]]
        r0 = [int(value) for value in read_boxes[index]]
        o0 = [int(value) for value in own[index]]
        rows.append(_row(
            slide_id, uri, int(index), level=choice.level, x=x0, y=y0, width=x1 - x0, height=y1 - y0,
            core_x0=c0[0], core_y0=c0[1], core_x1=c0[2], core_y1=c0[3],
            read_x0=r0[0], read_y0=r0[1], read_x1=r0[2], read_y1=r0[3],
            valid_width=int(valid[index, 0]), valid_height=int(valid[index, 1]),
            own_x0=o0[0], own_y0=o0[1], own_x1=o0[2], own_y1=o0[3], tissue_fraction=float(fractions[index]),
        ))
    return rows


def read_tiles(batch: dict[str, np.ndarray], settings: StageSettings) -> dict[str, np.ndarray]:
    """Read each tile row's region, resample it to model pixels and pad it: adds image (N, T, T, 3)."""
    size = settings.tile_size
    count = len(batch["tile_index"])
    images = np.full((count, size, size, 3), BACKGROUND_VALUE, dtype=np.uint8)
    errors = np.asarray(batch["error"], dtype=object).copy()
    slides = _slides(settings)
    for i in range(count):
        if batch["tile_index"][i] == HEADER_INDEX:
            continue
        width, height = int(batch["valid_width"][i]), int(batch["valid_height"][i])
        box = tuple(int(batch[key][i]) for key in ("read_x0", "read_y0", "read_x1", "read_y1"))
        try:
            slide = slides.get(str(batch["uri"][i]))
            images[i, :height, :width] = read_window(slide, int(batch["level"][i]), box, (width, height))
        except Exception as e:  # a tile that cannot be decoded fails alone
            errors[i] = f"read failed: {_describe(e)}"
    return {**batch, "image": images, "error": errors}


def local_checkpoint(uri: str, endpoint_url: str | None) -> str:
    """Return a local folder with the checkpoint at `uri`, downloading an s3:// one to a temp folder."""
    path, filesystem = resolve_storage(uri, endpoint_url)
    if filesystem is None:
        return path
    folder = tempfile.mkdtemp(prefix="cervi_ray_checkpoint_")
    pafs.copy_files(path, folder, source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem())
    return folder


class TileSegmenter:
    """Callable class for map_batches: loads the model once per actor, then labels tiles with TTA.

    Adds labels (N, T, T) uint8 in {0, 1, 2} and disagreement_votes (N, T, T) uint8, the number
    of TTA views whose label differs, and drops the images. Header rows and tiles that failed to
    read are skipped and get zeros.
    """

    def __init__(
        self,
        checkpoint: str | None,
        endpoint_url: str | None,
        tta: list[str],
        forward_batch: int,
        use_gpu: bool,
        threads: int,
        label_mode: str = "full",
        model: nn.Module | None = None,
        worker_log_level: str = "WARNING",
    ):
        logging.getLogger("cervi_ray").setLevel(worker_log_level)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if use_gpu and self.device.type == "cpu":
            logger.warning("scoring.gpus_per_actor is set but this actor sees no CUDA device; running on CPU")
        torch.set_num_threads(max(1, threads))
        if model is None:
            if checkpoint is None:
                raise ValueError("TileSegmenter needs a checkpoint URI or a model")
            folder = local_checkpoint(checkpoint, endpoint_url)
            model, _ = load_model(folder, self.device)
            if folder != resolve_storage(checkpoint, endpoint_url)[0]:
                shutil.rmtree(folder, ignore_errors=True)
        self.model = model.to(self.device).eval()
        self.transforms = validate_transforms(tta)
        self.forward_batch = forward_batch
        self.label_mode = label_mode

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch["image"]  # (N, T, T, 3) uint8
        count, height, width, _ = images.shape
        labels = np.zeros((count, height, width), dtype=np.uint8)
        votes = np.zeros((count, height, width), dtype=np.uint8)
        errors = np.asarray(batch["error"], dtype=object).copy()
        todo = np.flatnonzero((np.asarray(batch["tile_index"]) != HEADER_INDEX) & (errors == ""))
        if todo.size:
            inputs = torch.stack([to_tensor(np.ascontiguousarray(images[i])) for i in todo]).to(self.device)  # (n, 3, T, T)
            try:
                result = predict_with_tta(self.model, inputs, self.transforms, max_batch=self.forward_batch)
                predicted = result.labels.to(torch.uint8).cpu().numpy()  # (n, T, T)
                if self.label_mode == "nucleus":  # 0 = not nucleus, 1 = nucleus
                    predicted = np.where(predicted == 1, NUCLEUS, BACKGROUND).astype(np.uint8)
                labels[todo] = predicted
                votes[todo] = torch.round(result.disagreement * len(self.transforms)).to(torch.uint8).cpu().numpy()
            except (ValueError, RuntimeError) as e:  # NaN output, out of memory: these tiles fail
                errors[todo] = f"inference failed: {_describe(e)}"
        output = {key: value for key, value in batch.items() if key != "image"}
        return {**output, "labels": labels, "disagreement_votes": votes, "error": errors}


def summarise_tiles(batch: dict[str, np.ndarray], settings: StageSettings) -> pa.Table:
    """Turn each tile's labels into statistics (STAGE_SCHEMA), dropping the masks unless kept as PNG."""
    columns: dict[str, list[Any]] = {field.name: [] for field in STAGE_SCHEMA}
    count = len(batch["tile_index"])
    for i in range(count):
        header = batch["tile_index"][i] == HEADER_INDEX
        error = str(batch["error"][i])
        for key in ("slide_id", "tile_index", "level", "x", "y", "width", "height",
                    "core_x0", "core_y0", "core_x1", "core_y1", "tissue_fraction", "slide_info"):
            value = batch[key][i]
            columns[key].append(value.item() if isinstance(value, np.generic) else value)
        columns["thumbnail"].append(bytes(batch["thumbnail"][i]))
        columns["error"].append(error)
        stats: dict[str, Any] = {name: None for name in STAT_COLUMNS}
        ratios: list[float] = []
        mask_png = None
        if header:
            status = "header"
        elif error:
            status = "failed"
        else:
            status = "ok"
            width, height = int(batch["valid_width"][i]), int(batch["valid_height"][i])
            labels = batch["labels"][i][:height, :width]
            shares = batch["disagreement_votes"][i][:height, :width].astype(np.float32) / settings.views
            own = (int(batch["own_x0"][i]), int(batch["own_y0"][i]), int(batch["own_x1"][i]), int(batch["own_y1"][i]))
            measured = tile_statistics(labels, shares, own, settings.model_mpp, settings.has_cytoplasm)
            stats = {name: getattr(measured, name) for name in STAT_COLUMNS}
            ratios = measured.owned_nc_ratios
            if settings.write_masks:
                mask_png = encode_mask_png(labels)
        columns["status"].append(status)
        for name in STAT_COLUMNS:
            columns[name].append(stats[name])
        columns["nc_ratios"].append(ratios)
        columns["mask_png"].append(mask_png)
    return pa.table(columns, schema=STAGE_SCHEMA)


def worker_threads(cpus: float) -> int:
    """Return the torch threads for an actor with `cpus` CPUs, at least 1 and at most the cores here."""
    return max(1, min(int(cpus), os.cpu_count() or 1))
