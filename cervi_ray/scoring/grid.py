"""Tile grids over a slide, laid out in the model's pixels and mapped back to level 0.

A grid covers a slide of width x height model pixels with square tiles of `tile_size` whose
neighbours share `overlap` pixels. The last row and column sit flush with the slide border, so
they may overlap their neighbours by more than `overlap`. A slide smaller than one tile gets a
single tile at (0, 0) that extends past the border; readers pad the part outside the slide.

Each tile also owns a core box: the part of the tile closer to its centre than to any
neighbour's, split at the middle of each overlap. Core boxes tile the slide without gaps or
overlaps, so per-slide counts that assign each object to the tile whose core contains its centroid
count each object once.

Shapes: N tiles; boxes are (x0, y0, x1, y1) with exclusive ends.
"""

from dataclasses import dataclass

import numpy as np


def tile_starts(length: int, tile_size: int, overlap: int) -> np.ndarray:
    """Return the start offsets of tiles along one axis of `length` pixels.

    Consecutive starts are `tile_size - overlap` apart, except the last one, which is moved back
    to `length - tile_size` so the last tile ends at the border. An axis shorter than one tile
    gets the single start 0.
    """
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    if not 0 <= overlap < tile_size:
        raise ValueError(
            f"overlap must be >= 0 and smaller than tile_size ({tile_size}), got {overlap}"
        )
    if length < 1:
        raise ValueError(f"length must be >= 1 pixel, got {length}")
    if length <= tile_size:
        return np.zeros(1, dtype=np.int64)
    stride = tile_size - overlap
    count = -(-(length - tile_size) // stride) + 1  # ceil division: tiles needed to reach the end
    starts = np.arange(count, dtype=np.int64) * stride
    starts[-1] = length - tile_size
    return starts


def core_bounds(starts: np.ndarray, tile_size: int, length: int) -> np.ndarray:
    """Return the (count + 1,) boundaries of the tiles' core intervals along one axis.

    Tile i owns [bounds[i], bounds[i + 1]). Inner boundaries sit at the middle of the overlap
    between neighbours. The outer ones are 0 and the axis end, or tile_size when the axis is
    shorter than one tile.
    """
    end = max(length, tile_size)
    middles = (starts[1:] + starts[:-1] + tile_size) // 2  # middle of [start_i, start_{i-1} + T)
    return np.concatenate([[0], middles, [end]]).astype(np.int64)


@dataclass(frozen=True)
class TileGrid:
    """Tiles of one slide in model pixels, in row-major order."""

    width: int  # slide width in model pixels
    height: int
    tile_size: int
    rows: np.ndarray  # (N,) grid row of each tile
    cols: np.ndarray  # (N,) grid column
    boxes: np.ndarray  # (N, 4) tile boxes (x0, y0, x1, y1), x1 - x0 == tile_size
    cores: np.ndarray  # (N, 4) core boxes, a partition of the slide

    def __len__(self) -> int:
        return len(self.boxes)

    def valid_boxes(self) -> np.ndarray:
        """Return the (N, 4) parts of the tile boxes that lie inside the slide."""
        valid = self.boxes.copy()
        valid[:, 2] = np.minimum(valid[:, 2], self.width)
        valid[:, 3] = np.minimum(valid[:, 3], self.height)
        return valid

    def valid_sizes(self) -> np.ndarray:
        """Return the (N, 2) width and height of each tile's part inside the slide."""
        valid = self.valid_boxes()
        return np.stack([valid[:, 2] - valid[:, 0], valid[:, 3] - valid[:, 1]], axis=1)


def make_grid(width: int, height: int, tile_size: int, overlap: int) -> TileGrid:
    """Lay tiles over a width x height slide (model pixels), flush with the right and bottom."""
    xs = tile_starts(width, tile_size, overlap)
    ys = tile_starts(height, tile_size, overlap)
    x_bounds = core_bounds(xs, tile_size, width)
    y_bounds = core_bounds(ys, tile_size, height)

    rows, cols = np.meshgrid(np.arange(len(ys)), np.arange(len(xs)), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()  # (N,) row-major
    boxes = np.stack([xs[cols], ys[rows], xs[cols] + tile_size, ys[rows] + tile_size], axis=1)
    cores = np.stack([x_bounds[cols], y_bounds[rows], x_bounds[cols + 1], y_bounds[rows + 1]], axis=1)

    # A slide smaller than a tile still owns only its own pixels.
    cores[:, 2] = np.minimum(cores[:, 2], width)
    cores[:, 3] = np.minimum(cores[:, 3], height)
    return TileGrid(width, height, tile_size, rows, cols, boxes, cores)


def scale_boxes(boxes: np.ndarray, factor: float, width: int, height: int) -> np.ndarray:
    """Scale (N, 4) boxes by `factor`, round, and clip them to a width x height image.

    Rounding each coordinate (instead of widening to whole pixels) keeps neighbouring boxes
    contiguous and keeps a box read at a level whose downsample is a hair off its nominal value
    (1493 / 373 = 4.003 for a nominal 4x level) at exactly the nominal size. Every box keeps at
    least one pixel.
    """
    scaled = np.rint(np.asarray(boxes, dtype=np.float64) * factor).astype(np.int64)
    scaled[:, [0, 2]] = np.clip(scaled[:, [0, 2]], 0, width)
    scaled[:, [1, 3]] = np.clip(scaled[:, [1, 3]], 0, height)
    scaled[:, 0] = np.minimum(scaled[:, 0], width - 1)
    scaled[:, 1] = np.minimum(scaled[:, 1], height - 1)
    scaled[:, 2] = np.maximum(scaled[:, 2], scaled[:, 0] + 1)
    scaled[:, 3] = np.maximum(scaled[:, 3], scaled[:, 1] + 1)
    return scaled
