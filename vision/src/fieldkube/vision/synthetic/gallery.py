"""Write sample pictures of the synthetic data for the README (``python -m ...synthetic.gallery DIR``).

synthetic-field.png: a clean field, one with glare/dust/shadow, each beside its ground-truth density
overlay. synthetic-field-shifted.png: the first field and the shifted one (the domain-shift benchmark's
target) side by side, with their points. synthetic-aerial.png: two aerial scenes beside their
building-mask overlays.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fieldkube.vision.density import density_map_from_points
from fieldkube.vision.imageio import write_png
from fieldkube.vision.overlay import density_overlay, mask_overlay, points_overlay
from fieldkube.vision.synthetic.aerial import make_aerial_scene
from fieldkube.vision.synthetic.field import make_field_image
from fieldkube.vision.synthetic.field_shifted import make_shifted_field_image

GAP = 4


def _row(panels: list[np.ndarray]) -> np.ndarray:
    gap = np.full((panels[0].shape[0], GAP, 3), 255, np.uint8)
    parts: list[np.ndarray] = []
    for panel in panels:
        parts.extend([panel, gap])
    return np.concatenate(parts[:-1], axis=1)


def _column(rows: list[np.ndarray]) -> np.ndarray:
    gap = np.full((GAP, rows[0].shape[1], 3), 255, np.uint8)
    parts: list[np.ndarray] = []
    for row in rows:
        parts.extend([row, gap])
    return np.concatenate(parts[:-1], axis=0)


def field_gallery(seed: int = 0, size: int = 224) -> np.ndarray:
    """uint8 picture: rows of (image, points, density overlay) for a clean and a hazardous field."""
    rng = np.random.default_rng(seed)
    rows = []
    for hazards in ((), ("glare", "dust", "shadow")):
        sample = make_field_image(rng, size, size, 30, hazards=hazards)
        density = density_map_from_points(sample.points, (size, size), sigma=3.0)
        rows.append(
            _row(
                [
                    sample.image,
                    points_overlay(sample.image, sample.points),
                    density_overlay(sample.image, density),
                ]
            )
        )
    return _column(rows)


def shifted_gallery(seed: int = 0, size: int = 224) -> np.ndarray:
    """uint8 picture: (image, points) of the first field, then of the shifted field, same flower count."""
    rng = np.random.default_rng(seed)
    first = make_field_image(rng, size, size, 30, hazards=())
    shifted = make_shifted_field_image(rng, size, size, 30)
    return _row([s for f in (first, shifted) for s in (f.image, points_overlay(f.image, f.points))])


def aerial_gallery(seed: int = 0, size: int = 256) -> np.ndarray:
    """uint8 picture: rows of (image, mask overlay) for two aerial scenes."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(2):
        sample = make_aerial_scene(rng, size, size)
        rows.append(_row([sample.image, mask_overlay(sample.image, sample.mask)]))
    return _column(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("directory", type=Path, help="where to write the PNG files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_png(args.directory / "synthetic-field.png", field_gallery(args.seed))
    write_png(args.directory / "synthetic-field-shifted.png", shifted_gallery(args.seed))
    write_png(args.directory / "synthetic-aerial.png", aerial_gallery(args.seed))
    print(
        f"wrote synthetic-field.png, synthetic-field-shifted.png and synthetic-aerial.png to {args.directory}"
    )


if __name__ == "__main__":
    main()
