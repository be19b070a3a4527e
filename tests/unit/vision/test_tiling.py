"""Tiling grids (seed 000 ROI + grid, seed 004 shifted grid) and count-preserving stitching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fieldkube.vision.density import count_from_density, density_map_from_points
from fieldkube.vision.tiling import (
    Box,
    _blend_layout,
    blend_window,
    crop_roi_to_multiple,
    grid_shape,
    stitch,
    tile_boxes,
    tile_name,
)


def coverage(boxes: list[Box], height: int, width: int) -> np.ndarray:
    hits = np.zeros((height, width), dtype=int)
    for y0, x0, y1, x1 in boxes:
        hits[max(y0, 0) : min(y1, height), max(x0, 0) : min(x1, width)] += 1
    return hits


def test_shift_mode_shifts_the_last_row_and_column_inside_like_seed_004() -> None:
    boxes = tile_boxes(300, 500, 128)
    assert grid_shape(300, 500, 128) == (3, 4)
    assert len(boxes) == 12
    assert sorted({b.y0 for b in boxes}) == [0, 128, 172]
    assert sorted({b.x0 for b in boxes}) == [0, 128, 256, 372]
    assert all(b.y1 <= 300 and b.x1 <= 500 and b.y1 - b.y0 == 128 for b in boxes)
    assert (coverage(boxes, 300, 500) >= 1).all()


def test_seed_004_inria_tile_gives_1600_patches() -> None:
    assert len(tile_boxes(5000, 5000, 128)) == 1600


def test_exact_multiple_gives_no_extra_tiles() -> None:
    assert len(tile_boxes(448, 672, 224)) == 6


def test_pad_and_drop_modes() -> None:
    padded = tile_boxes(300, 500, 224, mode="pad")
    assert len(padded) == 2 * 3 and padded[-1] == Box(224, 448, 448, 672)
    assert (coverage(padded, 300, 500) >= 1).all()
    assert tile_boxes(300, 500, 224, mode="drop") == [Box(0, 0, 224, 224), Box(0, 224, 224, 448)]


def test_overlap_sets_the_stride() -> None:
    boxes = tile_boxes(224, 416, 224, overlap=32)
    assert [b.x0 for b in boxes] == [0, 192]


def test_bad_tiling_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="smaller than the tile"):
        tile_boxes(100, 500, 128)
    with pytest.raises(ValueError, match="overlap must be in"):
        tile_boxes(500, 500, 128, overlap=128)
    with pytest.raises(ValueError, match="tile mode"):
        tile_boxes(500, 500, 128, mode="wrap")  # type: ignore[arg-type]


def test_roi_crop_to_multiple_of_224_is_centred() -> None:
    image = np.zeros((720, 1280, 3), dtype=np.uint8)
    image[24:696, 80:1200] = 1
    crop = crop_roi_to_multiple(image, 224)
    assert crop.shape == (672, 1120, 3)
    assert crop.all()
    with pytest.raises(ValueError, match="smaller than one 224x224 tile"):
        crop_roi_to_multiple(np.zeros((100, 300, 3)), 224)


def test_tile_names_carry_row_and_column() -> None:
    assert tile_name("1109-0802_0930", 2, 11) == "1109-0802_0930_r02_c11"


@pytest.mark.parametrize("blend", ["cosine", "mean"])
def test_stitching_exact_crops_reproduces_the_map(blend: str, rng: np.random.Generator) -> None:
    full = rng.random((2, 300, 500)).astype(np.float32)
    boxes = tile_boxes(300, 500, 128, overlap=40)
    tiles = np.stack([full[:, y0:y1, x0:x1] for y0, x0, y1, x1 in boxes])
    np.testing.assert_allclose(stitch(tiles, boxes, 300, 500, blend=blend), full, rtol=1e-5)  # type: ignore[arg-type]


def test_stitched_density_keeps_the_whole_image_count(rng: np.random.Generator) -> None:
    points = rng.uniform([0, 0], [500, 300], size=(200, 2))
    density = density_map_from_points(points, (300, 500), sigma=5.0)
    boxes = tile_boxes(300, 500, 128, overlap=32)
    tiles = np.stack([density[None, y0:y1, x0:x1] for y0, x0, y1, x1 in boxes])
    stitched = stitch(tiles, boxes, 300, 500)
    assert count_from_density(stitched) == pytest.approx(200.0, rel=1e-4)


def test_cosine_window_fades_to_the_edges_but_never_zero() -> None:
    window = blend_window(64)
    assert window.min() > 0
    assert window[32, 32] > 0.99 and window[0, 0] < 0.01


def test_uncovered_pixels_are_an_error() -> None:
    with pytest.raises(ValueError, match="uncovered"):
        stitch(np.zeros((1, 1, 8, 8)), [Box(0, 0, 8, 8)], 8, 16)


def test_stitching_again_with_the_same_layout_reuses_it_without_carrying_anything_over(
    rng: np.random.Generator,
) -> None:
    """The blend layout (windows, weight sum) is cached per boxes, size and device: a second image
    stitched on it gets exactly what a fresh layout gives."""
    boxes = tile_boxes(300, 500, 128, overlap=40)
    first = rng.random((len(boxes), 1, 128, 128)).astype(np.float32)
    second = rng.random((len(boxes), 1, 128, 128)).astype(np.float32)
    _blend_layout.cache_clear()
    expected = stitch(second, boxes, 300, 500)  # on a layout made for it
    stitch(first, boxes, 300, 500)
    again = stitch(second, boxes, 300, 500)
    assert np.array_equal(again, expected)
    cpu = torch.device("cpu")
    assert _blend_layout(tuple(boxes), 300, 500, 128, "cosine", cpu) is _blend_layout(
        tuple(boxes), 300, 500, 128, "cosine", cpu
    )


def test_maps_in_several_batches_stitch_as_the_joined_maps(rng: np.random.Generator) -> None:
    """A service gets one image's maps back in the batches they ran in; stitching those pieces gives
    bit for bit what stitching their concatenation gives, and a miscount of tiles is an error."""
    boxes = tile_boxes(300, 500, 128, overlap=40)
    maps = rng.random((len(boxes), 1, 128, 128)).astype(np.float32)
    pieces = [maps[:5], maps[5:6], maps[6:]]
    assert np.array_equal(stitch(pieces, boxes, 300, 500), stitch(maps, boxes, 300, 500))
    with pytest.raises(ValueError, match=f"got {len(boxes) - 1} tiles"):
        stitch(pieces[:1] + pieces[2:], boxes, 300, 500)
    with pytest.raises(ValueError, match="of one shape"):
        stitch([maps[:5], maps[5:, :, :64, :64]], boxes, 300, 500)


def test_tensors_stitch_to_a_tensor_where_they_are_the_same_map_as_arrays(rng: np.random.Generator) -> None:
    """The service stitches maps where the model ran (a GPU's stay on the GPU): tensor pieces give a
    tensor on their device, bit for bit the map their arrays give."""
    boxes = tile_boxes(300, 500, 128, overlap=40)
    maps = rng.random((len(boxes), 1, 128, 128)).astype(np.float32)
    stitched = stitch([torch.from_numpy(maps[:5]), torch.from_numpy(maps[5:])], boxes, 300, 500)
    assert isinstance(stitched, torch.Tensor) and stitched.device == torch.device("cpu")
    assert stitched.dtype == torch.float32 and stitched.shape == (1, 300, 500)
    assert np.array_equal(stitched.numpy(), stitch(maps, boxes, 300, 500))


def test_read_only_maps_are_stitched_and_left_as_they_were(rng: np.random.Generator) -> None:
    boxes = tile_boxes(300, 500, 128, overlap=40)
    maps = rng.random((len(boxes), 1, 128, 128)).astype(np.float32)
    frozen = maps.copy()
    frozen.flags.writeable = False
    assert np.array_equal(stitch(frozen, boxes, 300, 500), stitch(maps, boxes, 300, 500))
    assert np.array_equal(frozen, maps)
