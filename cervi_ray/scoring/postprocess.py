"""Per-tile statistics from a predicted label mask: areas, nuclei, cells, N/C ratios, suspicion.

Cells are found by a watershed of the cell area (cytoplasm or nucleus) seeded by the nuclei,
flooding the distance to the nearest nucleus, so each cytoplasm pixel joins the nearest
nucleus it is connected to. Cytoplasm with no nucleus in its connected area belongs to no cell.

The N/C ratio of a cell is its nucleus area divided by its whole area (nucleus plus
cytoplasm), a value in (0, 1). A bare nucleus, whose watershed cell holds no cytoplasm (a naked
nucleus, debris, or a cell whose cytoplasm the model missed), has no measurable ratio: it counts
as a nucleus but is left out of the N/C statistics, where a ratio of 1 would dominate the max.

The suspicion score is a screening heuristic to rank tiles for review, not a validated
diagnostic:

    suspicion = 0.7 * max N/C ratio of the tile's complete cells (0 when it has none)
              + 0.3 * density / (density + DENSITY_HALF)

where density is the number of nuclei per square millimetre of tile. Both terms lie in [0, 1],
so the score does too. It rises with enlarged nuclei and with crowding, the two signs it
measures. The weights and DENSITY_HALF are chosen by hand, not fitted to any data.
"""

from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

from cervi_ray.data.labels import BACKGROUND, CYTOPLASM, NUCLEUS

NC_WEIGHT = 0.7
DENSITY_WEIGHT = 0.3
# Nuclei per mm^2 at which the density term reaches 0.5: one nucleus per 1000 square microns,
# about 32 microns apart, which only crowded cell groups reach.
DENSITY_HALF = 1000.0
# 8-connectivity: nucleus pixels that touch at a corner belong to one nucleus.
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass
class TileStatistics:
    """Statistics of one tile's label mask. Ratios are NaN where no cell qualifies."""

    cytoplasm_fraction: float
    nucleus_fraction: float
    nucleus_count: int  # connected components of the nucleus label in the tile
    nuclei_owned: int  # nuclei whose centroid lies in the tile's core box
    cells_complete: int  # cells that do not touch the tile border
    nc_ratio_mean: float  # over the complete cells
    nc_ratio_max: float
    tta_disagreement: float  # mean share of TTA views voting against the label, over foreground
    suspicion: float
    owned_nc_ratios: list[float] = field(default_factory=list)  # complete cells with owned nuclei


def segment_cells(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Return (nuclei, cells, count): (H, W) int32 maps of ids 1..count, 0 elsewhere.

    Nucleus i is the i-th 8-connected component of the nucleus label, and cell i contains it.
    """
    nucleus = labels == NUCLEUS
    nuclei, count = ndimage.label(nucleus, structure=EIGHT_CONNECTED)
    nuclei = nuclei.astype(np.int32)
    if count == 0:
        return nuclei, nuclei.copy(), 0
    distance = ndimage.distance_transform_edt(~nucleus)  # 0 on nuclei, rising into the cytoplasm
    cells = watershed(distance, markers=nuclei, mask=labels != BACKGROUND)
    return nuclei, cells.astype(np.int32), int(count)


def _touches_border(cells: np.ndarray, count: int) -> np.ndarray:
    """Return the (count + 1,) bool flags of cell ids present on the outer rows or columns."""
    edges = np.concatenate([cells[0], cells[-1], cells[:, 0], cells[:, -1]])
    flags = np.zeros(count + 1, dtype=bool)
    flags[np.unique(edges)] = True
    return flags


def suspicion_score(nc_ratio_max: float, nuclei_per_mm2: float) -> float:
    """Combine the largest N/C ratio and the nucleus density into a score in [0, 1]."""
    nc_term = 0.0 if not np.isfinite(nc_ratio_max) else float(np.clip(nc_ratio_max, 0.0, 1.0))
    density = max(0.0, float(nuclei_per_mm2))
    return NC_WEIGHT * nc_term + DENSITY_WEIGHT * density / (density + DENSITY_HALF)


def tile_statistics(
    labels: np.ndarray,
    disagreement: np.ndarray | None,
    core: tuple[int, int, int, int],
    mpp: float,
    has_cytoplasm: bool = True,
) -> TileStatistics:
    """Measure one tile's (H, W) label mask in {0, 1, 2}.

    `disagreement` is the (H, W) share of TTA views that disagree with `labels`, or None without
    TTA. `core` is the tile's core box (x0, y0, x1, y1) in tile pixels, and `mpp` the pixel size
    of `labels` in microns. A model trained on nuclei only (has_cytoplasm=False) has no N/C
    ratios, so they are NaN and the suspicion score rests on density alone.
    """
    if labels.ndim != 2 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty (H, W) mask, got shape {labels.shape}")
    height, width = labels.shape
    total = float(labels.size)
    cytoplasm_fraction = float((labels == CYTOPLASM).sum()) / total
    nucleus_fraction = float((labels == NUCLEUS).sum()) / total

    # Cells, their areas and which of them the tile owns.
    nuclei, cells, count = segment_cells(labels)
    ids = cells.ravel()
    nucleus_area = np.bincount(ids, weights=(labels == NUCLEUS).ravel(), minlength=count + 1)
    cell_area = np.bincount(ids, minlength=count + 1).astype(np.float64)
    complete = ~_touches_border(cells, count)
    complete[0] = False
    owned = np.zeros(count + 1, dtype=bool)
    if count:
        centroids = np.asarray(ndimage.center_of_mass(nuclei > 0, nuclei, np.arange(1, count + 1)))  # (count, 2) y, x
        x0, y0, x1, y1 = core
        inside = (centroids[:, 1] >= x0) & (centroids[:, 1] < x1) & (centroids[:, 0] >= y0) & (centroids[:, 0] < y1)
        owned[1:] = inside

    # N/C ratios of complete cells that have cytoplasm (bare nuclei stay NaN).
    ratios = np.full(count + 1, np.nan)
    if has_cytoplasm and count:
        with_cytoplasm = cell_area[1:] > nucleus_area[1:]
        ratios[1:][with_cytoplasm] = nucleus_area[1:][with_cytoplasm] / cell_area[1:][with_cytoplasm]
    measured = ratios[complete]
    measured = measured[np.isfinite(measured)]
    if has_cytoplasm and measured.size:
        nc_mean, nc_max = float(measured.mean()), float(measured.max())
    else:
        nc_mean = nc_max = float("nan")
    owned_ratios = ratios[complete & owned] if has_cytoplasm else np.empty(0)
    owned_ratios = owned_ratios[np.isfinite(owned_ratios)]

    # TTA disagreement over the foreground, or over the whole tile when it has none.
    if disagreement is None:
        tta = 0.0
    else:
        foreground = labels != BACKGROUND
        tta = float(disagreement[foreground].mean()) if foreground.any() else float(disagreement.mean())

    area_mm2 = height * width * (mpp * 1e-3) ** 2
    return TileStatistics(
        cytoplasm_fraction=cytoplasm_fraction,
        nucleus_fraction=nucleus_fraction,
        nucleus_count=count,
        nuclei_owned=int(owned.sum()),
        cells_complete=int(complete.sum()),
        nc_ratio_mean=nc_mean,
        nc_ratio_max=nc_max,
        tta_disagreement=tta,
        suspicion=suspicion_score(nc_max, count / area_mm2),
        owned_nc_ratios=[float(value) for value in owned_ratios],
    )


def encode_mask_png(labels: np.ndarray) -> bytes:
    """Encode an (H, W) label mask as an 8-bit grayscale PNG whose pixel values are the labels."""
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(labels, dtype=np.uint8))
    if not ok:
        raise ValueError(f"PNG encoding failed for a label mask of shape {labels.shape}")
    return encoded.tobytes()
