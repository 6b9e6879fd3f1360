"""Tile grids: odd sizes, flush borders, slides smaller than a tile, core boxes, padding."""

import numpy as np
import pytest

from cervi_ray.scoring.grid import core_bounds, make_grid, scale_boxes, tile_starts
from cervi_ray.scoring.slides import BACKGROUND_VALUE, Level, Slide, read_window


class ArraySlide(Slide):
    """A single-level slide over an in-memory array that records every read."""

    def __init__(self, pixels: np.ndarray):
        super().__init__("array", [Level(pixels.shape[1], pixels.shape[0], 1.0)], None, None)
        self.pixels = pixels
        self.reads: list[tuple[int, int, int, int]] = []

    def read(self, level, x, y, width, height):
        self.reads.append((x, y, width, height))
        return self.pixels[y : y + height, x : x + width]


@pytest.mark.parametrize("length", [1, 63, 64, 65, 127, 129, 1000, 1023])
def test_tile_starts_cover_axis_flush(length):
    starts = tile_starts(length, 64, 16)
    ends = starts + 64
    # The last tile ends at the border, unless the axis is shorter than one tile.
    assert ends[-1] == max(length, 64)
    assert starts[0] == 0
    # Neighbours overlap by at least the configured 16 pixels and never leave a gap.
    assert np.all(starts[1:] <= ends[:-1] - 16)
    assert np.all(np.diff(starts) > 0)


def test_tile_starts_exact_fit():
    # 64 + 3 * 48 = 208: four tiles with exactly 16 pixels of overlap.
    assert tile_starts(208, 64, 16).tolist() == [0, 48, 96, 144]


def test_tile_starts_last_moved_back():
    # 210 needs a fifth tile, moved back from 192 to 146 so it ends at 210.
    assert tile_starts(210, 64, 16).tolist() == [0, 48, 96, 144, 146]


@pytest.mark.parametrize("overlap", [-1, 64, 100])
def test_tile_starts_rejects_bad_overlap(overlap):
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 64, overlap)


def test_core_bounds_split_overlaps_in_the_middle():
    starts = np.asarray([0, 48, 96])
    # Overlaps [48, 64) and [96, 112) are split at 56 and 104.
    assert core_bounds(starts, 64, 160).tolist() == [0, 56, 104, 160]


@pytest.mark.parametrize("size", [(1, 1), (50, 30), (64, 64), (65, 200), (333, 129), (1000, 777)])
def test_cores_partition_the_slide(size):
    width, height = size
    grid = make_grid(width, height, 64, 12)
    owners = np.zeros((height, width), dtype=np.int64)
    for x0, y0, x1, y1 in grid.cores:
        owners[y0:y1, x0:x1] += 1
    # Every slide pixel belongs to exactly one core box.
    assert owners.min() == 1
    assert owners.max() == 1
    # Each core lies inside its tile.
    assert np.all(grid.cores[:, :2] >= grid.boxes[:, :2])
    assert np.all(grid.cores[:, 2:] <= grid.boxes[:, 2:])


def test_grid_row_major_and_unique():
    grid = make_grid(300, 200, 64, 16)
    assert len(grid) == len(tile_starts(300, 64, 16)) * len(tile_starts(200, 64, 16))
    assert len({(x, y) for x, y, _, _ in grid.boxes}) == len(grid)
    # Row-major: y never decreases.
    assert np.all(np.diff(grid.boxes[:, 1]) >= 0)


def test_slide_smaller_than_tile():
    grid = make_grid(40, 25, 64, 8)
    assert len(grid) == 1
    assert grid.boxes.tolist() == [[0, 0, 64, 64]]
    assert grid.cores.tolist() == [[0, 0, 40, 25]]
    assert grid.valid_sizes().tolist() == [[40, 25]]


def test_scale_boxes_clips_to_slide():
    boxes = np.asarray([[0, 0, 64, 64], [36, 36, 100, 100]])
    # 2 level-0 pixels per model pixel on a 190 x 150 slide: the second box is clipped.
    assert scale_boxes(boxes, 2.0, 190, 150).tolist() == [[0, 0, 128, 128], [72, 72, 190, 150]]


def test_scale_boxes_keeps_neighbours_contiguous():
    boxes = np.asarray([[0, 0, 64, 64], [64, 0, 128, 64], [128, 0, 192, 64]])
    # A level downsample of 4.003 instead of 4: rounding keeps each box 64 wide and contiguous.
    scaled = scale_boxes(boxes, 4.0 / 4.003, 373, 225)
    assert scaled[:, 0].tolist() == [0, 64, 128]
    assert scaled[:, 2].tolist() == [64, 128, 192]


def test_scale_boxes_keeps_one_pixel():
    assert scale_boxes(np.asarray([[0, 0, 1, 1]]), 0.1, 10, 10).tolist() == [[0, 0, 1, 1]]


def test_border_tile_padded_with_background():
    pixels = np.full((50, 70, 3), 7, dtype=np.uint8)
    slide = ArraySlide(pixels)
    grid = make_grid(70, 50, 64, 0)
    valid = grid.valid_sizes()
    tile_size = 64
    for index, (x0, y0, x1, y1) in enumerate(grid.boxes):
        width, height = valid[index]
        canvas = np.full((tile_size, tile_size, 3), BACKGROUND_VALUE, dtype=np.uint8)
        canvas[:height, :width] = read_window(slide, 0, (x0, y0, x1, y1), (width, height))
        # The slide part contains slide pixels, the rest the background value.
        assert np.all(canvas[:height, :width] == 7)
        assert np.all(canvas[height:] == BACKGROUND_VALUE)
        assert np.all(canvas[:, width:] == BACKGROUND_VALUE)
    # No read ever left the slide.
    for x, y, width, height in slide.reads:
        assert x >= 0
        assert y >= 0
        assert x + width <= 70
        assert y + height <= 50


def test_slide_smaller_than_tile_padded():
    slide = ArraySlide(np.zeros((10, 20, 3), dtype=np.uint8))
    grid = make_grid(20, 10, 32, 4)
    (width, height), = grid.valid_sizes()
    tile = np.full((32, 32, 3), BACKGROUND_VALUE, dtype=np.uint8)
    tile[:height, :width] = read_window(slide, 0, tuple(grid.boxes[0]), (width, height))
    assert np.all(tile[:10, :20] == 0)
    assert (tile == BACKGROUND_VALUE).sum() == (32 * 32 - 200) * 3
    assert slide.reads == [(0, 0, 20, 10)]
