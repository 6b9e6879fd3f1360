"""Foreground detection on a synthetic slide and tile selection from the mask."""

import numpy as np
import pytest
from skimage.draw import disk

from cervi_ray.scoring.tissue import box_fractions, keep_tiles, tissue_mask


def synthetic_slide(height=200, width=300, seed=0):
    """A bright, slightly noisy background with three dark cells; returns (image, true mask)."""
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(235, 3, (height, width)), 0, 255)
    truth = np.zeros((height, width), dtype=bool)
    for (row, col), radius in (((50, 60), 20), ((120, 200), 30), ((160, 70), 12)):
        rows, cols = disk((row, col), radius, shape=truth.shape)
        truth[rows, cols] = True
        image[rows, cols] = rng.normal(120, 10, rows.size)
    rgb = np.repeat(np.clip(image, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    return rgb, truth


def test_mask_matches_cells():
    image, truth = synthetic_slide()
    mask = tissue_mask(image)
    intersection = (mask & truth).sum()
    union = (mask | truth).sum()
    # Smoothing moves the borders by a pixel at most, so the overlap is nearly perfect.
    assert intersection / union > 0.95
    # No foreground far from the cells.
    assert not mask[:20, 200:].any()


def test_uniform_bright_image_has_no_foreground():
    image = np.full((64, 64, 3), 240, dtype=np.uint8)
    assert not tissue_mask(image).any()


def test_uniform_dark_image_is_all_foreground():
    image = np.full((64, 64, 3), 90, dtype=np.uint8)
    assert tissue_mask(image).all()


def test_single_pixel_specks_removed():
    image = np.full((64, 64, 3), 240, dtype=np.uint8)
    image[10, 10] = 0
    image[40:50, 40:50] = 60
    mask = tissue_mask(image, smoothing_sigma=0)
    assert not mask[10, 10]
    assert mask[45, 45]


def test_rejects_non_rgb():
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        tissue_mask(np.zeros((8, 8), dtype=np.uint8))


def test_box_fractions_from_half_resolution_mask():
    mask = np.zeros((10, 10), dtype=bool)
    mask[:5, :5] = True  # the top-left quarter
    boxes = np.asarray([[0, 0, 10, 10], [0, 0, 20, 20], [10, 10, 20, 20], [8, 8, 12, 12]])
    # The mask is at half the level-0 resolution: 0.5 mask pixels per level-0 pixel.
    fractions = box_fractions(mask, boxes, 0.5, 0.5)
    assert fractions[0] == 1.0  # level-0 [0, 10) is mask [0, 5): all foreground
    assert fractions[1] == 0.25  # the whole slide: a quarter
    assert fractions[2] == 0.0
    assert fractions[3] == 0.25  # mask pixels [4, 6): one of four is foreground


def test_tiny_box_touching_foreground_counts():
    mask = np.zeros((4, 4), dtype=bool)
    mask[1, 1] = True
    # A 2 x 2 level-0 box inside one mask pixel of 8 level-0 pixels.
    assert box_fractions(mask, np.asarray([[10, 10, 12, 12]]), 1 / 8, 1 / 8)[0] == 1.0


def test_keep_tiles_needs_foreground_even_at_zero_threshold():
    fractions = np.asarray([0.0, 0.01, 0.05, 0.5])
    assert keep_tiles(fractions, 0.05).tolist() == [False, False, True, True]
    assert keep_tiles(fractions, 0.0).tolist() == [False, True, True, True]
