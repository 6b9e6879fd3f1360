"""Foreground detection on a low-resolution image of the slide, read level by level in chunks.

Brightfield cytology shows dark cells on a bright, nearly empty background, so an Otsu
threshold on the luminance separates the two. The mask only decides which tiles are worth the
model's time; it is not a segmentation.
"""

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from cervi_ray.scoring.slides import BACKGROUND_VALUE, Slide, resize

# Luminance spread (max - min, 0-255) below which the image is taken as uniform and Otsu's
# threshold would split noise.
MIN_CONTRAST = 12
# A uniform image at least this bright is empty background; a darker one is all foreground.
BRIGHT_BACKGROUND = 200
THUMBNAIL_CHUNK = 4096  # side of the level regions read one at a time to build a thumbnail


def read_thumbnail(slide: Slide, max_side: int) -> np.ndarray:
    """Return an (h, w, 3) image of the whole slide whose longer side is at most `max_side`.

    Reads the coarsest level at least that large in regions of THUMBNAIL_CHUNK pixels, so the
    memory needed stays bounded even for a single-level slide.
    """
    width0, height0 = slide.dimensions
    scale = min(1.0, max_side / max(width0, height0))
    width, height = max(1, round(width0 * scale)), max(1, round(height0 * scale))
    candidates = [index for index, level in enumerate(slide.levels) if level.width >= width and level.height >= height]
    level = max(candidates, key=lambda index: slide.levels[index].downsample) if candidates else 0
    level_width, level_height = slide.levels[level].width, slide.levels[level].height
    thumbnail = np.full((height, width, 3), BACKGROUND_VALUE, dtype=np.uint8)
    for top in range(0, level_height, THUMBNAIL_CHUNK):
        for left in range(0, level_width, THUMBNAIL_CHUNK):
            bottom, right = min(top + THUMBNAIL_CHUNK, level_height), min(left + THUMBNAIL_CHUNK, level_width)
            ty0, ty1 = round(top * height / level_height), round(bottom * height / level_height)
            tx0, tx1 = round(left * width / level_width), round(right * width / level_width)
            if ty1 > ty0 and tx1 > tx0:
                region = np.ascontiguousarray(slide.read(level, left, top, right - left, bottom - top))
                thumbnail[ty0:ty1, tx0:tx1] = resize(region, (tx1 - tx0, ty1 - ty0))
    return thumbnail


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Return the (H, W) float32 luminance (ITU-R BT.601 weights) of an (H, W, 3) uint8 image."""
    weights = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    return rgb.astype(np.float32) @ weights


def tissue_mask(thumbnail: np.ndarray, smoothing_sigma: float = 1.0) -> np.ndarray:
    """Return the (H, W) bool mask of pixels darker than the bright background.

    The luminance is smoothed with a Gaussian of `smoothing_sigma` pixels before thresholding,
    and isolated single foreground pixels are removed.
    """
    if thumbnail.ndim != 3 or thumbnail.shape[2] != 3 or thumbnail.dtype != np.uint8:
        raise ValueError(
            f"thumbnail must be an (H, W, 3) uint8 image, got shape {thumbnail.shape} and dtype {thumbnail.dtype}"
        )
    gray = luminance(thumbnail)
    if smoothing_sigma > 0:
        gray = ndimage.gaussian_filter(gray, smoothing_sigma)
    if float(gray.max() - gray.min()) < MIN_CONTRAST:
        return np.full(gray.shape, float(gray.mean()) < BRIGHT_BACKGROUND, dtype=bool)

    mask = gray < threshold_otsu(gray)
    # Opening with a 3 x 3 cross removes specks of one pixel (dust, noise) but keeps small cells.
    return ndimage.binary_opening(mask, structure=ndimage.generate_binary_structure(2, 1))


def box_fractions(mask: np.ndarray, boxes: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
    """Return the (N,) fraction of foreground in each box, read from a low-resolution mask.

    `boxes` are (N, 4) level-0 boxes (x0, y0, x1, y1); scale_x and scale_y are mask pixels per
    level-0 pixel. Each box is widened to whole mask pixels and covers at least one, so a box
    that touches foreground never gets a fraction of 0.
    """
    height, width = mask.shape
    x0 = np.clip(np.floor(boxes[:, 0] * scale_x).astype(np.int64), 0, width - 1)
    y0 = np.clip(np.floor(boxes[:, 1] * scale_y).astype(np.int64), 0, height - 1)
    x1 = np.clip(np.ceil(boxes[:, 2] * scale_x).astype(np.int64), x0 + 1, width)
    y1 = np.clip(np.ceil(boxes[:, 3] * scale_y).astype(np.int64), y0 + 1, height)

    # Summed-area table with a zero row and column in front: sums[y, x] = mask[:y, :x].sum().
    sums = np.zeros((height + 1, width + 1), dtype=np.int64)
    sums[1:, 1:] = mask.astype(np.int64).cumsum(axis=0).cumsum(axis=1)
    counts = sums[y1, x1] - sums[y0, x1] - sums[y1, x0] + sums[y0, x0]
    return counts / ((x1 - x0) * (y1 - y0))


def keep_tiles(fractions: np.ndarray, min_fraction: float) -> np.ndarray:
    """Return the (N,) bool selection of tiles with foreground and at least `min_fraction` of it."""
    return (fractions > 0) & (fractions >= min_fraction)
