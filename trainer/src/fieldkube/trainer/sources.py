"""Where raw training data comes from: synthetic generators or real folders, listed as picklable items.

Each source lists `SourceItem`s deterministically (sorted), so every worker process and every
Kubernetes Job index agrees on the same plan; `load_item` turns one item into arrays:
image uint8 (H, W, 3), points float (N, 2) as (x, y) for counters, mask uint8 (H, W) in {0, 1} for
segmenters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fieldkube.trainer.errors import DataError
from fieldkube.vision.annotations import (
    AnnotationError,
    discover_inria,
    discover_mask_folders,
    points_from_red_crosses,
    read_mask,
    read_points,
)
from fieldkube.vision.imageio import ImageError, read_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
FIELD_HAZARD_CYCLE: tuple[tuple[str, ...], ...] = (
    (),
    ("glare",),
    ("dust",),
    ("shadow",),
    ("glare", "dust", "shadow"),
)


@dataclass(frozen=True)
class SourceItem:
    """One raw image to prepare; `key` is unique and stable (it seeds splits and synthetic content)."""

    key: str
    kind: str  # synthetic-field | synthetic-field-shifted | synthetic-aerial | points | red-cross | mask
    image: str = ""
    mask: str = ""
    points: tuple[tuple[float, float], ...] = ()
    seed: int = 0
    height: int = 0
    width: int = 0
    n_flowers: int = 0
    tags: tuple[str, ...] = field(default_factory=tuple)


@dataclass
class LoadedItem:
    image: np.ndarray
    points: np.ndarray | None
    mask: np.ndarray | None


# --synthetic KIND -> (key prefix, SourceItem kind). Field kinds count flowers; aerial images hold buildings.
SYNTHETIC_KINDS = {
    "field": ("field", "synthetic-field"),
    "field-shifted": ("shifted", "synthetic-field-shifted"),
    "aerial": ("aerial", "synthetic-aerial"),
}


def synthetic_items(kind: str, count: int, height: int, width: int, seed: int, tile: int) -> list[SourceItem]:
    """Synthetic field or shifted field (counter) or aerial (segmenter) images; flower numbers cover all
    seed bins."""
    if kind not in SYNTHETIC_KINDS:
        raise DataError(f"--synthetic {kind!r}: expected 'field', 'field-shifted' or 'aerial'")
    prefix, source_kind = SYNTHETIC_KINDS[kind]
    rng = np.random.default_rng([seed, 7919])
    tiles = max(1, (height // tile) * (width // tile))
    items = []
    for index in range(count):
        n_flowers = 0 if kind == "aerial" else int(rng.integers(0, 11 * tiles + 1))
        # Only the first field draws hazards (glare, dust, shadow) over its images.
        hazards = FIELD_HAZARD_CYCLE[index % len(FIELD_HAZARD_CYCLE)] if kind == "field" else ()
        items.append(
            SourceItem(
                f"{prefix}{index:05d}",
                source_kind,
                seed=seed,
                height=height,
                width=width,
                n_flowers=n_flowers,
                tags=hazards,
            )
        )
    return items


def _images_in(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise DataError(f"{directory}: image directory not found")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{directory}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return files


def point_items(images_dir: Path, annotations: Path) -> list[SourceItem]:
    """Counting images with a CSV (image,x,y) or JSON point file; images without points count zero."""
    try:
        table = read_points(annotations)
    except AnnotationError as exc:
        raise DataError(str(exc)) from None
    images = _images_in(images_dir)
    names = {p.name for p in images} | {p.stem for p in images}
    unknown = sorted(set(table) - names)
    if unknown:
        raise DataError(f"{annotations}: points for images not in {images_dir}: {', '.join(unknown[:5])}")
    items = []
    for path in images:
        pts = table.get(path.name, table.get(path.stem, np.zeros((0, 2))))
        points = tuple((float(x), float(y)) for x, y in np.asarray(pts, dtype=np.float64).reshape(-1, 2))
        items.append(SourceItem(path.stem, "points", image=str(path), points=points))
    return items


def red_cross_items(images_dir: Path) -> list[SourceItem]:
    """Seed-000 style images annotated with pure red crosses; centres are extracted when loaded."""
    return [SourceItem(p.stem, "red-cross", image=str(p)) for p in _images_in(images_dir)]


def mask_items(images_dir: Path, masks_dir: Path) -> list[SourceItem]:
    """Segmentation pairs: images/<name>.* with masks/<name>.* (0/255 or 0/1 masks)."""
    try:
        pairs = discover_mask_folders(images_dir, masks_dir)
    except AnnotationError as exc:
        raise DataError(str(exc)) from None
    return [SourceItem(p.image.stem, "mask", image=str(p.image), mask=str(p.mask)) for p in pairs]


def inria_items(root: Path) -> list[SourceItem]:
    """Inria Aerial Image Labeling layout: images/<city><n>.tif with gt/<city><n>.tif (255 = building)."""
    try:
        pairs = discover_inria(root)
    except AnnotationError as exc:
        raise DataError(str(exc)) from None
    return [
        SourceItem(p.image.stem, "mask", image=str(p.image), mask=str(p.mask), tags=(p.group,)) for p in pairs
    ]


def load_item(item: SourceItem) -> LoadedItem:
    """Decode one item; raises DataError naming the file for unreadable or inconsistent inputs."""
    if item.kind == "synthetic-field":
        from fieldkube.vision.synthetic import make_field_image

        rng = np.random.default_rng([item.seed, int(item.key[5:])])
        sample = make_field_image(rng, item.height, item.width, item.n_flowers, hazards=item.tags)
        return LoadedItem(sample.image, np.asarray(sample.points, dtype=np.float64).reshape(-1, 2), None)
    if item.kind == "synthetic-field-shifted":
        from fieldkube.vision.synthetic import make_shifted_field_image

        rng = np.random.default_rng([item.seed, int(item.key[7:])])
        shifted = make_shifted_field_image(rng, item.height, item.width, item.n_flowers)
        return LoadedItem(shifted.image, np.asarray(shifted.points, dtype=np.float64).reshape(-1, 2), None)
    if item.kind == "synthetic-aerial":
        from fieldkube.vision.synthetic import make_aerial_scene

        rng = np.random.default_rng([item.seed, int(item.key[6:])])
        aerial = make_aerial_scene(rng, item.height, item.width)
        return LoadedItem(aerial.image, None, (aerial.mask > 0).astype(np.uint8))

    try:
        image = read_image(item.image)
        if item.kind == "points":
            return LoadedItem(image, np.asarray(item.points, dtype=np.float64).reshape(-1, 2), None)
        if item.kind == "red-cross":
            try:
                points = points_from_red_crosses(image)
            except AnnotationError as exc:
                raise DataError(f"{item.image}: {exc}") from None
            return LoadedItem(image, np.asarray(points, dtype=np.float64).reshape(-1, 2), None)
        mask = read_mask(item.mask)
    except (ImageError, AnnotationError) as exc:
        raise DataError(str(exc)) from None
    if mask.shape != image.shape[:2]:
        raise DataError(
            f"{item.mask}: mask is {mask.shape[0]}x{mask.shape[1]}, image {item.image} is "
            f"{image.shape[0]}x{image.shape[1]}"
        )
    return LoadedItem(image, None, mask)
