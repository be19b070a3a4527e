"""GeoTIFF in, georeferenced answers out: a GIS places the mask, the density map and the building polygons
where the input lies (real server, real HTTP, files read back with rasterio)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import rasterio
import requests
from PIL import Image
from rasterio import features
from rasterio.crs import CRS
from rasterio.io import MemoryFile
from rasterio.transform import from_origin

CRS_UTM = CRS.from_epsg(32631)  # WGS 84 / UTM zone 31N
TRANSFORM = from_origin(500_000.0, 5_700_000.0, 0.3, 0.3)  # 30 cm pixels


def geotiff(image: np.ndarray, compress: str | None = None) -> bytes:
    height, width = image.shape[:2]
    with MemoryFile() as memory:
        with memory.open(
            driver="GTiff",
            height=height,
            width=width,
            count=3,
            dtype="uint8",
            crs=CRS_UTM,
            transform=TRANSFORM,
            photometric="RGB",
            compress=compress,
        ) as dataset:
            dataset.write(np.moveaxis(image, -1, 0))
        return bytes(memory.read())


def read_band(data: bytes) -> tuple[np.ndarray, rasterio.Affine, CRS | None]:
    with MemoryFile(data) as memory, memory.open() as dataset:
        return dataset.read(1), dataset.transform, dataset.crs


@pytest.fixture(scope="module")
def scene(images) -> np.ndarray:
    return images.aerial(21, 192, 256)


@pytest.fixture(scope="module")
def threshold(server, scene) -> float:
    """The median building probability of the scene: about half its pixels are buildings, half not."""
    body = {
        "inputs": [
            {"name": "image", "shape": list(scene.shape), "datatype": "UINT8", "data": scene.ravel().tolist()}
        ],
        "outputs": [{"name": "probability"}],
    }
    answer = requests.post(f"{server.url}/v2/models/segmenter/infer", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return float(np.median(answer.json()["outputs"][0]["data"]))


@pytest.mark.parametrize("compress", [None, "lzw"])  # LZW: how GDAL and QGIS usually write GeoTIFFs
def test_a_geotiff_mask_keeps_the_inputs_transform_and_crs(server, scene, threshold, compress) -> None:
    url = f"{server.url}/v1/segment?threshold={threshold}"
    answer = requests.post(f"{url}&output=geotiff", data=geotiff(scene, compress), timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("image/tiff")
    mask, transform, crs = read_band(answer.content)
    assert crs == CRS_UTM and transform == TRANSFORM
    png = requests.post(f"{url}&output=png", data=geotiff(scene), timeout=60)  # uncompressed: the same mask
    served = np.asarray(Image.open(io.BytesIO(png.content))) // 255
    assert mask.dtype == np.uint8 and mask.shape == (192, 256)
    np.testing.assert_array_equal(mask, served)
    assert 0.2 < mask.mean() < 0.8  # the test means something: buildings and background both there


def test_building_polygons_are_in_the_inputs_crs_and_rasterise_back_to_the_mask(
    server, scene, threshold
) -> None:
    url = f"{server.url}/v1/segment?threshold={threshold}"
    answer = requests.post(f"{url}&output=geojson", data=geotiff(scene), timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/geo+json"
    collection = json.loads(answer.content)
    assert collection["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32631"
    geometries = [feature["geometry"] for feature in collection["features"]]
    assert geometries and all(g["type"] == "Polygon" for g in geometries)
    x, y = geometries[0]["coordinates"][0][0]
    assert 500_000 <= x <= 500_000 + 256 * 0.3 and 5_700_000 - 192 * 0.3 <= y <= 5_700_000  # metres, UTM
    drawn = features.rasterize(
        [(g, 1) for g in geometries], out_shape=(192, 256), transform=TRANSFORM, fill=0, dtype="uint8"
    )
    mask, _, _ = read_band(requests.post(f"{url}&output=geotiff", data=geotiff(scene), timeout=60).content)
    np.testing.assert_array_equal(drawn, mask)


def test_a_geotiff_density_map_sums_to_the_count(server, images) -> None:
    field = images.field(22, 160, 224, 9)
    answer = requests.post(f"{server.url}/v1/count?output=geotiff", data=geotiff(field), timeout=60)
    assert answer.status_code == 200, answer.text
    density, transform, crs = read_band(answer.content)
    assert crs == CRS_UTM and transform == TRANSFORM and density.dtype == np.float32
    assert float(density.sum(dtype=np.float64)) == pytest.approx(float(answer.headers["X-Count"]), abs=1e-3)


def test_an_image_without_georeferencing_gets_its_pixel_grid(server, images, scene) -> None:
    answer = requests.post(f"{server.url}/v1/segment?output=geojson", data=images.png(scene), timeout=60)
    assert answer.status_code == 200, answer.text
    assert json.loads(answer.content)["crs"] is None
    tiff = requests.post(f"{server.url}/v1/segment?output=geotiff", data=images.png(scene), timeout=60)
    _, transform, crs = read_band(tiff.content)
    assert crs is None and transform == rasterio.Affine.identity()
