"""Annotation readers and dataset layouts, with errors naming the file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from fieldkube.vision.annotations import (
    AnnotationError,
    discover_inria,
    discover_mask_folders,
    discover_point_dataset,
    points_from_red_crosses,
    read_mask,
    read_points,
)


def test_csv_points_group_by_image_and_allow_empty_images(tmp_path: Path) -> None:
    path = tmp_path / "points.csv"
    path.write_text("image,x,y\na.jpg,10,20.5\na.jpg,3,4\nb.jpg,,\n")
    table = read_points(path)
    np.testing.assert_array_equal(table["a.jpg"], [[10, 20.5], [3, 4]])
    assert table["b.jpg"].shape == (0, 2)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("name,x,y\na.jpg,1,2\n", r"line 1: header .* lacks column\(s\) image"),
        ("image,x,y\na.jpg,1,2\na.jpg,abc,2\n", r"line 3: field 'x' is 'abc', expected a number"),
        ("image,x,y\na.jpg,1,-2\n", r"line 2: field 'y' is '-2'"),
        ("image,x,y\na.jpg,1\n", r"line 2: 2 fields, expected 3"),
        ("", "empty file"),
    ],
)
def test_malformed_csv_names_file_line_and_field(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "points.csv"
    path.write_text(content)
    with pytest.raises(AnnotationError, match=message) as info:
        read_points(path)
    assert str(path) in str(info.value)


def test_json_points_in_both_shapes(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"a.jpg": [[1, 2], {"x": 3, "y": 4}], "b.jpg": []}))
    (tmp_path / "b.json").write_text(json.dumps([{"image": "a.jpg", "points": [[5, 6]]}]))
    np.testing.assert_array_equal(read_points(tmp_path / "a.json")["a.jpg"], [[1, 2], [3, 4]])
    np.testing.assert_array_equal(read_points(tmp_path / "b.json")["a.jpg"], [[5, 6]])


def test_malformed_json_names_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"a.jpg": [[1, 2], [3, "y"]]}))
    with pytest.raises(AnnotationError, match=r"a\.json: 'a\.jpg'\[1\]: field 'y' is 'y'"):
        read_points(path)
    path.write_text('[{"image": "a.jpg"}]')
    with pytest.raises(AnnotationError, match=r"\[0\]: missing field 'points'"):
        read_points(path)
    path.write_text("{oops")
    with pytest.raises(AnnotationError, match="not valid JSON"):
        read_points(path)
    with pytest.raises(AnnotationError, match=r"expected \.csv or \.json"):
        read_points(tmp_path / "points.txt")


def test_red_cross_centres_are_recovered() -> None:
    image = np.full((60, 80, 3), 40, np.uint8)
    for x, y in [(10, 12), (50, 40), (75, 5)]:
        image[y, x - 3 : x + 4] = (255, 0, 0)
        image[y - 3 : y + 4, x] = (255, 0, 0)
    image[30, 30] = (255, 0, 0)  # a stray pixel is not a mark
    centres = points_from_red_crosses(image)
    expected = np.array([[75.5, 5.5], [10.5, 12.5], [50.5, 40.5]])
    order = np.argsort(centres[:, 1])
    np.testing.assert_allclose(centres[order], expected, atol=1e-4)


def test_point_dataset_pairs_images_and_reports_missing_files(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / name)
    (tmp_path / "p.csv").write_text("image,x,y\na.jpg,1,1\n")
    with pytest.raises(AnnotationError, match=r"b\.jpg: image has no entry"):
        discover_point_dataset(images, tmp_path / "p.csv")
    samples = discover_point_dataset(images, tmp_path / "p.csv", unannotated="empty")
    assert [(s.image.name, len(s.points)) for s in samples] == [("a.jpg", 1), ("b.jpg", 0)]
    (tmp_path / "q.csv").write_text("image,x,y\nz.jpg,1,1\n")
    with pytest.raises(AnnotationError, match=r"1 annotated image\(s\) not found .*z\.jpg"):
        discover_point_dataset(images, tmp_path / "q.csv", unannotated="skip")


def test_inria_layout_is_discovered_with_cities(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "gt").mkdir()
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:12] = 255
    for name in ("austin1.tif", "tyrol-w12.tif"):
        tifffile.imwrite(tmp_path / "images" / name, np.zeros((16, 16, 3), np.uint8))
        tifffile.imwrite(tmp_path / "gt" / name, mask)
    pairs = discover_inria(tmp_path)
    assert [(p.image.name, p.group) for p in pairs] == [
        ("austin1.tif", "austin"),
        ("tyrol-w12.tif", "tyrol-w"),
    ]
    loaded = read_mask(pairs[0].mask)
    assert loaded.dtype == np.uint8 and loaded.sum() == 32
    assert read_mask(pairs[0].mask, window=(4, 4, 6, 6)).tolist() == [[1, 1], [1, 1]]
    tifffile.imwrite(tmp_path / "images" / "vienna3.tif", np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(AnnotationError, match=r"vienna3\.tif: no ground-truth mask"):
        discover_inria(tmp_path)
    assert len(discover_inria(tmp_path, require_masks=False)) == 2


def test_generic_mask_folders_match_by_stem(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "msk" / "a_mask.png")
    pairs = discover_mask_folders(tmp_path / "img", tmp_path / "msk", mask_suffix="_mask")
    assert [p.mask.name for p in pairs] == ["a_mask.png"]
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img" / "b.png")
    with pytest.raises(AnnotationError, match=r"no mask for 1 image\(s\) .*b\.png"):
        discover_mask_folders(tmp_path / "img", tmp_path / "msk", mask_suffix="_mask")


def test_masks_with_unexpected_values_are_rejected(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 128], [255, 0]], np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(AnnotationError, match=r"m\.png: mask values must be 0/255 .*128"):
        read_mask(tmp_path / "m.png")
    with pytest.raises(AnnotationError, match=r"none\.png: no such mask file"):
        read_mask(tmp_path / "none.png")
