"""Tiling plans: every pixel covered, small images padded, unusable options refused by name."""

from __future__ import annotations

import numpy as np
import pytest

from fieldkube.serving.inference import TilingError, cut_tiles, plan_tiles


def test_plan_covers_the_image_with_in_bounds_boxes() -> None:
    plan = plan_tiles(720, 1280, 224, 32, max_tiles=1000)
    assert {(b.y1 - b.y0, b.x1 - b.x0) for b in plan.boxes} == {(224, 224)}
    covered = np.zeros((720, 1280), dtype=bool)
    for y0, x0, y1, x1 in plan.boxes:
        covered[y0:y1, x0:x1] = True
    assert covered.all()


def test_small_image_is_padded_to_one_tile() -> None:
    plan = plan_tiles(40, 50, 64, 16, max_tiles=10)
    assert (plan.padded_height, plan.padded_width) == (64, 64)
    tiles = cut_tiles(np.zeros((40, 50, 3), dtype=np.uint8), plan)
    assert tiles.shape == (1, 64, 64, 3) and tiles.dtype == np.uint8


@pytest.mark.parametrize(
    ("tile", "overlap", "max_tiles", "message"),
    [
        (16, 0, 100, "tile must be between 32 and 2048"),
        (64, 40, 100, "overlap must be between 0 and tile/2 = 32"),
        (32, 0, 10, "the limit is 10: use a larger tile"),
    ],
)
def test_unusable_options_are_refused(tile: int, overlap: int, max_tiles: int, message: str) -> None:
    with pytest.raises(TilingError, match=message):
        plan_tiles(200, 200, tile, overlap, max_tiles)
