"""Per-tile statistics on hand-made label masks with known results."""

import cv2
import numpy as np
import pytest

from cervi_ray.data.labels import BACKGROUND, CYTOPLASM, NUCLEUS
from cervi_ray.scoring.postprocess import (
    DENSITY_HALF,
    encode_mask_png,
    segment_cells,
    suspicion_score,
    tile_statistics,
)


def two_cells() -> np.ndarray:
    """A 40 x 60 mask with two separate square cells away from the border.

    Cell A: 10 x 10 = 100 pixels with a 4 x 4 = 16-pixel nucleus, N/C 0.16.
    Cell B: 10 x 20 = 200 pixels with a 10 x 5 = 50-pixel nucleus, N/C 0.25.
    """
    labels = np.full((40, 60), BACKGROUND, dtype=np.uint8)
    labels[5:15, 5:15] = CYTOPLASM
    labels[8:12, 8:12] = NUCLEUS
    labels[20:30, 30:50] = CYTOPLASM
    labels[20:30, 35:40] = NUCLEUS
    return labels


WHOLE_TILE = (0, 0, 60, 40)


def test_two_cells_known_ratios():
    stats = tile_statistics(two_cells(), None, WHOLE_TILE, mpp=1.0)
    assert stats.nucleus_count == 2
    assert stats.cells_complete == 2
    assert stats.nc_ratio_mean == pytest.approx((0.16 + 0.25) / 2)
    assert stats.nc_ratio_max == pytest.approx(0.25)
    assert sorted(stats.owned_nc_ratios) == pytest.approx([0.16, 0.25])
    # 66 nucleus and 234 cytoplasm pixels of 2400.
    assert stats.nucleus_fraction == pytest.approx(66 / 2400)
    assert stats.cytoplasm_fraction == pytest.approx(234 / 2400)


def test_touching_cells_split_by_watershed():
    # Two nuclei in one 10 x 30 block of cytoplasm: each cytoplasm pixel joins the nearer nucleus.
    labels = np.full((20, 40), BACKGROUND, dtype=np.uint8)
    labels[5:15, 5:35] = CYTOPLASM
    labels[8:12, 8:12] = NUCLEUS  # nucleus at columns 8-11
    labels[8:12, 28:32] = NUCLEUS  # nucleus at columns 28-31
    _, cells, count = segment_cells(labels)
    assert count == 2
    # The block splits at the middle (columns 5-19 and 20-34): 150 pixels each.
    assert (cells == 1).sum() == 150
    assert (cells == 2).sum() == 150
    stats = tile_statistics(labels, None, (0, 0, 40, 20), mpp=1.0)
    assert stats.nc_ratio_max == pytest.approx(16 / 150)


def test_nucleus_count_connected_components():
    labels = np.zeros((20, 20), dtype=np.uint8)
    labels[2, 2] = NUCLEUS
    labels[3, 3] = NUCLEUS  # touches (2, 2) at a corner: the same nucleus
    labels[10:12, 10:12] = NUCLEUS
    labels[15, 2] = NUCLEUS
    stats = tile_statistics(labels, None, (0, 0, 20, 20), mpp=1.0)
    assert stats.nucleus_count == 3


def test_cells_on_tile_border_not_measured():
    labels = two_cells()
    labels[0:10, 50:60] = CYTOPLASM  # a third cell cut by the top and right border
    labels[2:4, 55:57] = NUCLEUS
    stats = tile_statistics(labels, None, WHOLE_TILE, mpp=1.0)
    assert stats.nucleus_count == 3
    assert stats.cells_complete == 2
    assert stats.nc_ratio_max == pytest.approx(0.25)


def test_ownership_by_core_box():
    # Core box covering the left half (x < 30): only cell A's nucleus (centre x 9.5) is owned.
    stats = tile_statistics(two_cells(), None, (0, 0, 30, 40), mpp=1.0)
    assert stats.nuclei_owned == 1
    assert stats.owned_nc_ratios == pytest.approx([0.16])


def test_nucleus_only_model_has_no_ratios():
    stats = tile_statistics(two_cells(), None, WHOLE_TILE, mpp=1.0, has_cytoplasm=False)
    assert np.isnan(stats.nc_ratio_max)
    assert stats.owned_nc_ratios == []


def test_disagreement_averaged_over_foreground():
    labels = two_cells()
    disagreement = np.zeros(labels.shape, dtype=np.float32)
    disagreement[labels == NUCLEUS] = 1.0  # every view disagrees on nuclei, none elsewhere
    stats = tile_statistics(labels, disagreement, WHOLE_TILE, mpp=1.0)
    # 66 nucleus pixels of 300 foreground pixels.
    assert stats.tta_disagreement == pytest.approx(66 / 300)


def test_disagreement_over_whole_tile_without_foreground():
    labels = np.zeros((10, 10), dtype=np.uint8)
    disagreement = np.full((10, 10), 0.5, dtype=np.float32)
    assert tile_statistics(labels, disagreement, (0, 0, 10, 10), mpp=1.0).tta_disagreement == 0.5


def test_suspicion_formula():
    # Density at DENSITY_HALF gives half the density weight.
    assert suspicion_score(0.5, DENSITY_HALF) == pytest.approx(0.7 * 0.5 + 0.3 * 0.5)
    assert suspicion_score(float("nan"), 0.0) == 0.0
    assert suspicion_score(1.0, 1e12) == pytest.approx(1.0)


def test_suspicion_rises_with_nc_and_density():
    assert suspicion_score(0.6, 100) > suspicion_score(0.3, 100)
    assert suspicion_score(0.3, 2000) > suspicion_score(0.3, 100)


def test_tile_suspicion_uses_density_in_mm2():
    # Two nuclei in a 40 x 60 tile of 10-micron pixels: 0.24 mm^2, 8.33 nuclei per mm^2.
    stats = tile_statistics(two_cells(), None, WHOLE_TILE, mpp=10.0)
    assert stats.suspicion == pytest.approx(suspicion_score(0.25, 2 / 0.24))


def test_mask_png_round_trip():
    labels = two_cells()
    decoded = cv2.imdecode(np.frombuffer(encode_mask_png(labels), dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(decoded, labels)


def test_bare_nucleus_left_out_of_ratios():
    # a 4 x 4 nucleus with no cytoplasm next to a cell whose N/C is 16 / 100
    labels = np.zeros((30, 40), dtype=np.uint8)
    labels[5:9, 5:9] = NUCLEUS
    labels[10:20, 20:30] = CYTOPLASM
    labels[13:17, 23:27] = NUCLEUS
    stats = tile_statistics(labels, None, (0, 0, 40, 30), mpp=1.0)
    assert stats.nucleus_count == 2
    assert stats.nc_ratio_max == pytest.approx(0.16)
    assert stats.nc_ratio_mean == pytest.approx(0.16)
    assert stats.owned_nc_ratios == [pytest.approx(0.16)]
