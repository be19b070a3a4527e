"""Answers a GIS can place: GeoTIFF maps and GeoJSON building polygons on the input's georeferencing.

A GeoTIFF upload carries where its pixels are on the ground (an affine transform from pixel to map
coordinates and a coordinate reference system). The service reads them with rasterio (GDAL) and writes the
mask or density map as a GeoTIFF with the same transform and CRS, or the mask's polygons as GeoJSON in the
input's CRS, so the answer overlays the input in QGIS or any GIS. An image without georeferencing (a PNG, a
JPEG, a plain TIFF) gets the same outputs on its pixel grid: the identity transform and no CRS.

rasterio is imported only when such an output is asked for: the service starts without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine

GEOTIFF_MEDIA_TYPE = "image/tiff; application=geotiff"
GEOJSON_MEDIA_TYPE = "application/geo+json"


@dataclass(frozen=True)
class Georeference:
    """Pixel-to-map transform and CRS of an image (`crs` None: pixel coordinates, no reference system)."""

    transform: Affine
    crs: Any  # rasterio.crs.CRS | None


PIXEL_GRID = Georeference(Affine.identity(), None)


def read_georeference(path: Path, fmt: str) -> Georeference:
    """The georeferencing of an uploaded image file; the pixel grid when it has none."""
    if fmt != "tiff":
        return PIXEL_GRID
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            with rasterio.open(path) as dataset:
                if dataset.crs is None and dataset.transform.is_identity:
                    return PIXEL_GRID
                return Georeference(dataset.transform, dataset.crs)
        except RasterioIOError:  # the pixels decoded, so the service answers; only the placement is lost
            return PIXEL_GRID


def write_geotiff(band: np.ndarray, where: Georeference, description: str) -> bytes:
    """A single-band, deflate-compressed GeoTIFF of `band` (H, W) on `where`'s transform and CRS."""
    import rasterio

    height, width = band.shape
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "height": height,
        "width": width,
        "count": 1,
        "dtype": band.dtype.name,
        "compress": "deflate",
        "tiled": height >= 256 and width >= 256,
    }
    if where != PIXEL_GRID:  # a pixel grid is written without a geotransform: GDAL reads it as identity
        profile.update(transform=where.transform, crs=where.crs)
    with rasterio.MemoryFile() as memory:
        with memory.open(**profile) as dataset:
            dataset.write(band, 1)
            dataset.set_band_description(1, description)
        return bytes(memory.read())


def mask_polygons(mask: np.ndarray, where: Georeference) -> dict[str, Any]:
    """GeoJSON FeatureCollection of the mask's building regions (8-connected pixels), in `where`'s CRS.

    Each polygon is the exact outline of its pixels (holes included), so rasterising the features on the
    same grid gives the mask back. `crs` names the reference system (GeoJSON's 2008 form, which GIS
    tools read for projected data); null on a pixel grid.
    """
    from rasterio import features

    building = np.ascontiguousarray(mask, dtype=np.uint8)
    shapes = features.shapes(building, mask=building.astype(bool), connectivity=8, transform=where.transform)
    collection: dict[str, Any] = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "properties": {"building": 1}, "geometry": geometry} for geometry, _ in shapes
        ],
    }
    collection["crs"] = (
        None if where.crs is None else {"type": "name", "properties": {"name": crs_name(where.crs)}}
    )
    return collection


def crs_name(crs: Any) -> str:
    """An OGC URN for an EPSG CRS (urn:ogc:def:crs:EPSG::32631), else its WKT."""
    code = crs.to_epsg()
    return f"urn:ogc:def:crs:EPSG::{code}" if code else str(crs.to_wkt())
