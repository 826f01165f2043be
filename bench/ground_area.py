"""How close `geo.GroundArea`'s row areas are to each pixel's own area on the ground, per CRS,
and what measuring them costs.

The reference is each pixel's geodesic area on its CRS's ellipsoid (pyproj's
`Geod.polygon_area_perimeter` of the pixel's outline, densified, in longitude and latitude),
the way a GIS measures with an ellipsoid. Prints, per raster: the whole raster's area against
the sum of its pixels' (`total`), the worst single pixel (`worst_pixel`), and how far the map's
own area (the transform's, for a projected CRS) is from the ground's. Then the seconds to
measure the rows of a 32,768-row raster, once per raster in a run.

    .venv/bin/python bench/ground_area.py
"""

from __future__ import annotations

import time

import numpy as np
import pyproj
from affine import Affine
from rasterio.crs import CRS

from pipeline.geo import GroundArea

# name, CRS, transform, width and height in pixels (large pixels: each is measured alone)
RASTERS = [
    ("longitude and latitude, 1° global", "EPSG:4326", Affine(1, 0, -180, 0, -1, 90), 360, 180),
    ("Web Mercator at 60° N", "EPSG:3857", Affine(10_000, 0, 1e6, 0, -10_000, 8.4e6), 20, 20),
    ("UTM 32N, 100 km, 400 km east of its meridian", "EPSG:32632", Affine(5000, 0, 850_000, 0, -5000, 5.6e6), 20, 20),
    ("British National Grid, Great Britain", "EPSG:27700", Affine(35_000, 0, 0, 0, -35_000, 1.3e6), 20, 37),
    ("polar stereographic (EPSG:3031), 4,000 km", "EPSG:3031", Affine(200_000, 0, -2e6, 0, -200_000, 2e6), 20, 20),
    ("longitude and latitude rotated 30°, 5° wide", "EPSG:4326",
     Affine.translation(10, 65) * Affine.rotation(30) * Affine.scale(0.5, -0.5), 10, 10),
]


def pixel_areas(crs: CRS, transform: Affine, width: int, height: int, points: int = 16) -> np.ndarray:
    """Each pixel's geodesic area, its outline densified to `points` per side."""
    source = pyproj.CRS.from_wkt(crs.to_wkt())
    geod = source.geodetic_crs.get_geod()
    to_lonlat = pyproj.Transformer.from_crs(source, source.geodetic_crs, always_xy=True)
    t = np.linspace(0, 1, points, endpoint=False)
    out = np.empty((height, width))
    for row in range(height):
        for col in range(width):
            xs = np.concatenate([col + t, np.full(points, col + 1), col + 1 - t, np.full(points, col)])
            ys = np.concatenate([np.full(points, row), row + t, np.full(points, row + 1), row + 1 - t])
            lon, lat = to_lonlat.transform(*(transform @ (xs, ys)))
            out[row, col] = abs(geod.polygon_area_perimeter(lon, lat)[0])
    return out


def main() -> None:
    for name, epsg, transform, width, height in RASTERS:
        crs = CRS.from_user_input(epsg)
        ground = GroundArea(crs, transform, width=width, height=height)
        reference = pixel_areas(crs, transform, width, height)
        rows = np.repeat(ground.row_area[:, None], width, axis=1)
        line = (f"{name:48s} total {rows.sum() / reference.sum() - 1:+.1e}  "
                f"worst_pixel {np.max(np.abs(rows / reference - 1)):.1e}")
        if crs.is_projected:
            _, metres = crs.linear_units_factor
            on_the_map = abs(transform.determinant) * metres**2 * width * height
            line += f"  map's own area {on_the_map / reference.sum() - 1:+.1e}"
        print(line)
    for epsg, transform in (("EPSG:32633", Affine(0.3, 0, 5e5, 0, -0.3, 5e6)),
                            ("EPSG:4326", Affine(3e-6, 0, 10, 0, -3e-6, 60))):
        started = time.perf_counter()
        GroundArea(CRS.from_user_input(epsg), transform, width=32_768, height=32_768)
        print(f"rows of a 32,768-row raster in {epsg}: {time.perf_counter() - started:.3f} s")


if __name__ == "__main__":
    main()
