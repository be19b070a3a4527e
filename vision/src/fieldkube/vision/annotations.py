"""Read the real dataset layouts: point annotations for counting and image/mask pairs for segmentation.

Counting: CSV with header ``image,x,y`` (one row per point; a row with empty x and y marks an image with
no flowers), JSON (``{"img.jpg": [[x, y], ...]}`` or ``[{"image": "img.jpg", "points": [[x, y], ...]}]``)
and the seed's red-cross annotated images (pure RGB(255, 0, 0) crosses; centres by connected components).
Segmentation: the Inria layout (``images/<city><n>.tif`` + ``gt/<city><n>.tif``, 255 = building) and
generic image/mask folders matched by file stem. Every problem is an `AnnotationError` naming the file,
line or field and what was expected.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from skimage.measure import label, regionprops

from fieldkube.vision.imageio import ImageError, image_size, read_tiff_window
from fieldkube.vision.tiling import Box

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
INRIA_NAME = re.compile(r"^(?P<city>[a-z][a-z_-]*?)(?P<index>\d+)\.tiff?$")


class AnnotationError(ValueError):
    """An annotation file or dataset layout that cannot be used as it is."""


def _number(text: str, where: str, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise AnnotationError(f"{where}: field {column!r} is {text!r}, expected a number") from None
    if not math.isfinite(value) or value < 0:
        raise AnnotationError(f"{where}: field {column!r} is {text!r}, expected a finite number >= 0")
    return value


def read_points_csv(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """{image name: (N, 2) float32 (x, y)} from a CSV with columns image, x, y (any order and case)."""
    source = Path(path)
    points: dict[str, list[tuple[float, float]]] = {}
    try:
        with source.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise AnnotationError(f"{source}: empty file, expected a header line 'image,x,y'")
            columns = [h.strip().lower() for h in header]
            missing = [c for c in ("image", "x", "y") if c not in columns]
            if missing:
                raise AnnotationError(
                    f"{source}: line 1: header {header} lacks column(s) {', '.join(missing)}; "
                    "expected image,x,y"
                )
            image_col, x_col, y_col = (columns.index(c) for c in ("image", "x", "y"))
            for row in reader:
                where = f"{source}: line {reader.line_num}"
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) < len(columns):
                    raise AnnotationError(
                        f"{where}: {len(row)} fields, expected {len(columns)} ({','.join(columns)})"
                    )
                name = row[image_col].strip()
                if not name:
                    raise AnnotationError(f"{where}: field 'image' is empty")
                entries = points.setdefault(name, [])
                x_text, y_text = row[x_col].strip(), row[y_col].strip()
                if not x_text and not y_text:
                    continue  # an image annotated with no points
                entries.append((_number(x_text, where, "x"), _number(y_text, where, "y")))
    except FileNotFoundError:
        raise AnnotationError(f"{source}: no such annotation file") from None
    except UnicodeDecodeError:
        raise AnnotationError(
            f"{source}: not a UTF-8 text file, expected CSV with columns image,x,y"
        ) from None
    except csv.Error as error:
        raise AnnotationError(f"{source}: malformed CSV ({error})") from None
    return {name: np.asarray(p, dtype=np.float32).reshape(-1, 2) for name, p in points.items()}


def _json_points(value: Any, where: str) -> np.ndarray:
    if not isinstance(value, list):
        raise AnnotationError(f"{where}: expected a list of [x, y] points, got {type(value).__name__}")
    out = []
    for index, item in enumerate(value):
        here = f"{where}[{index}]"
        point = [item["x"], item["y"]] if isinstance(item, dict) and {"x", "y"} <= set(item) else item
        if not (isinstance(point, list) and len(point) == 2):
            raise AnnotationError(f"{here}: expected [x, y] or {{'x': .., 'y': ..}}, got {point!r}")
        for axis, coordinate in zip("xy", point, strict=True):
            ok = isinstance(coordinate, int | float) and not isinstance(coordinate, bool)
            if not ok or not math.isfinite(coordinate) or coordinate < 0:
                raise AnnotationError(f"{here}: field {axis!r} is {coordinate!r}, expected a number >= 0")
        out.append((float(point[0]), float(point[1])))
    return np.asarray(out, dtype=np.float32).reshape(-1, 2)


def read_points_json(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """{image name: (N, 2) float32 (x, y)} from a JSON mapping or list of {"image", "points"} records."""
    source = Path(path)
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AnnotationError(f"{source}: no such annotation file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AnnotationError(f"{source}: not valid JSON ({error})") from None
    if isinstance(data, dict):
        return {str(name): _json_points(value, f"{source}: {name!r}") for name, value in data.items()}
    if isinstance(data, list):
        result: dict[str, np.ndarray] = {}
        for index, record in enumerate(data):
            where = f"{source}: [{index}]"
            if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                raise AnnotationError(f"{where}: expected an object with a string field 'image' and 'points'")
            if "points" not in record:
                raise AnnotationError(f"{where}: missing field 'points'")
            result[record["image"]] = _json_points(record["points"], f"{where}.points")
        return result
    raise AnnotationError(f"{source}: expected a JSON object or list at the top level")


def read_points(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Point annotations from a .csv or .json file (chosen by suffix)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return read_points_csv(path)
    if suffix == ".json":
        return read_points_json(path)
    raise AnnotationError(f"{path}: unsupported annotation file type {suffix!r}, expected .csv or .json")


def points_from_red_crosses(image: np.ndarray, tolerance: int = 0, min_pixels: int = 3) -> np.ndarray:
    """(N, 2) float32 (x, y) centres of the RGB(255, 0, 0) marks in an annotated uint8 (H, W, 3) image.

    A pixel is a mark if R >= 255 - tolerance and G, B <= tolerance (raise `tolerance` for JPEG copies);
    8-connected components of at least `min_pixels` pixels are marks, their centroid is the point.
    """
    if image.ndim != 3 or image.shape[2] < 3:
        raise AnnotationError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
    rgb = image[..., :3].astype(np.int16)
    red = (rgb[..., 0] >= 255 - tolerance) & (rgb[..., 1] <= tolerance) & (rgb[..., 2] <= tolerance)
    labelled = label(red, connectivity=2)
    centres = [
        (region.centroid[1] + 0.5, region.centroid[0] + 0.5)
        for region in regionprops(labelled)
        if region.area >= min_pixels
    ]
    return np.asarray(centres, dtype=np.float32).reshape(-1, 2)


@dataclass(frozen=True)
class PointSample:
    """A counting image and its (N, 2) float32 (x, y) points."""

    image: Path
    points: np.ndarray


def discover_point_dataset(
    images_dir: str | os.PathLike[str], annotations: str | os.PathLike[str], unannotated: str = "error"
) -> list[PointSample]:
    """Pair every image in `images_dir` with its points from `annotations` (CSV or JSON).

    Annotated names that have no image file are errors. Images without annotations are an error
    (`unannotated="error"`), counted as zero flowers ("empty") or skipped ("skip").
    """
    folder = Path(images_dir)
    if not folder.is_dir():
        raise AnnotationError(f"{folder}: not a directory of images")
    table = read_points(annotations)
    images = {p.name: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    missing = sorted(set(table) - set(images))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise AnnotationError(
            f"{annotations}: {len(missing)} annotated image(s) not found in {folder}: {shown}"
        )
    samples = []
    for name, path in images.items():
        if name in table:
            samples.append(PointSample(path, table[name]))
        elif unannotated == "empty":
            samples.append(PointSample(path, np.zeros((0, 2), dtype=np.float32)))
        elif unannotated == "error":
            raise AnnotationError(
                f"{path}: image has no entry in {annotations} (use unannotated='empty' or 'skip')"
            )
        elif unannotated != "skip":
            raise ValueError(f"unannotated must be 'error', 'empty' or 'skip', got {unannotated!r}")
    return samples


@dataclass(frozen=True)
class MaskPair:
    """A segmentation image, its mask file and a grouping key (the Inria city, or '' for generic folders)."""

    image: Path
    mask: Path
    group: str = ""


def discover_inria(root: str | os.PathLike[str], require_masks: bool = True) -> list[MaskPair]:
    """Pairs of the Inria Aerial layout: ``root/images/<city><n>.tif`` with ``root/gt/<city><n>.tif``."""
    base = Path(root)
    images_dir, gt_dir = base / "images", base / "gt"
    if not images_dir.is_dir():
        raise AnnotationError(f"{base}: expected the Inria layout with an images/ folder (and gt/)")
    pairs = []
    for path in sorted(images_dir.iterdir()):
        if path.suffix.lower() not in (".tif", ".tiff"):
            continue
        match = INRIA_NAME.match(path.name)
        if match is None:
            raise AnnotationError(f"{path}: name does not follow <city><n>.tif (e.g. austin1.tif)")
        mask = gt_dir / path.name
        if not mask.is_file():
            if require_masks:
                raise AnnotationError(f"{path}: no ground-truth mask {mask}")
            continue
        pairs.append(MaskPair(path, mask, match.group("city")))
    if not pairs:
        raise AnnotationError(f"{images_dir}: no <city><n>.tif images with masks in gt/")
    return pairs


def discover_mask_folders(
    images_dir: str | os.PathLike[str], masks_dir: str | os.PathLike[str], mask_suffix: str = ""
) -> list[MaskPair]:
    """Pairs of images and masks matched by stem (mask stem = image stem + `mask_suffix`, any image type)."""
    images, masks = Path(images_dir), Path(masks_dir)
    for folder in (images, masks):
        if not folder.is_dir():
            raise AnnotationError(f"{folder}: not a directory")
    by_stem = {p.stem: p for p in sorted(masks.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    pairs, unmatched = [], []
    for path in sorted(images.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        mask = by_stem.get(path.stem + mask_suffix)
        if mask is None:
            unmatched.append(path.name)
        else:
            pairs.append(MaskPair(path, mask))
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
        raise AnnotationError(f"{masks}: no mask for {len(unmatched)} image(s) of {images}: {shown}")
    if not pairs:
        raise AnnotationError(f"{images}: no images found (expected {', '.join(IMAGE_SUFFIXES)})")
    return pairs


def mask_from_array(values: np.ndarray, name: str = "mask") -> np.ndarray:
    """uint8 (H, W) in {0, 1} from a stored mask with values {0, 255} or {0, 1} (first channel if RGB)."""
    plane = values[..., 0] if values.ndim == 3 else values
    found = np.unique(plane)
    if not set(found.tolist()) <= {0, 1, 255}:
        shown = ", ".join(str(v) for v in found[:8])
        raise AnnotationError(f"{name}: mask values must be 0/255 (or 0/1), found {shown}")
    return (plane > 0).astype(np.uint8)


def read_mask(path: str | os.PathLike[str], window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Read a mask file (or a window (y0, x0, y1, x1) of a TIFF mask) as uint8 {0, 1} (H, W)."""
    source = Path(path)
    try:
        if source.suffix.lower() in (".tif", ".tiff"):
            box = Box(*window) if window is not None else Box(0, 0, *image_size(source))
            return mask_from_array(read_tiff_window(source, box, raw=True), str(source))
        with Image.open(source) as image:
            array = np.asarray(image)
    except ImageError as error:
        raise AnnotationError(str(error)) from None
    except FileNotFoundError:
        raise AnnotationError(f"{source}: no such mask file") from None
    except OSError as error:
        raise AnnotationError(f"{source}: not a readable mask image ({error})") from None
    if window is not None:
        y0, x0, y1, x1 = window
        array = array[y0:y1, x0:x1]
    return mask_from_array(array, str(source))
