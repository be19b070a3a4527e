"""Seeded synthetic field and aerial images with exact ground truth, for tests, the demo and benchmarks.

``make_field_image`` draws a canola-like field (soil, crop rows, leaves, yellow four-petal flowers) with
the flower centres as exact point labels, plus the seed-000 failure cases as options: sun glare on
leaves, roadside dust and shadows. ``make_aerial_scene`` draws an aerial tile (ground, roads, trees,
buildings with roof colours and cast shadows) with an exact building mask. ``make_shifted_field_image``
draws another field on purpose unlike the first (flower shape, size and colour, ground texture, light),
the target of the domain-shift benchmark.
"""

from fieldkube.vision.synthetic.aerial import AerialSample, make_aerial_scene
from fieldkube.vision.synthetic.field import HAZARDS, FieldSample, make_field_image
from fieldkube.vision.synthetic.field_shifted import make_shifted_field_image

__all__ = [
    "HAZARDS",
    "AerialSample",
    "FieldSample",
    "make_aerial_scene",
    "make_field_image",
    "make_shifted_field_image",
]
