"""pipeline.geo: COG masks written window by window, polygons merged across block edges, and
GeoParquet tables read back by geopandas and DuckDB."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pyproj
import pytest
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import from_origin
from rasterio.windows import Window
from rio_cogeo.cogeo import cog_validate

from pipeline.geo import (
    ClassPolygon,
    GroundArea,
    MaskWriter,
    PolygonCollector,
    PolygonsWriter,
    polygons_table,
)
from pipeline.masks import default_palette

UTM16N = CRS.from_epsg(32616)
TRANSFORM = from_origin(733601.0, 3725139.0, 0.5, 0.5)
NODATA = 255


def blocks(width: int, height: int, size: int) -> list[Window]:
    return [Window(c, r, min(size, width - c), min(size, height - r))
            for r in range(0, height, size) for c in range(0, width, size)]


def synthetic_labels(width: int = 1300, height: int = 1100) -> np.ndarray:
    """Background 0; class 1 a rectangle across the 512-px tile edges; class 2 a disc; class
    3 a stripe through every row of tiles; a nodata corner."""
    rows, cols = np.mgrid[0:height, 0:width]
    labels = np.zeros((height, width), np.uint8)
    labels[400:700, 450:900] = 1
    labels[(rows - 200) ** 2 + (cols - 1100) ** 2 < 150**2] = 2
    labels[:, 100:140] = 3
    labels[900:, :300] = NODATA
    return labels


# --- MaskWriter -------------------------------------------------------------------------


def test_mask_cog_round_trip(tmp_path: Path) -> None:
    labels = synthetic_labels()
    height, width = labels.shape
    palette = default_palette(4)
    path = tmp_path / "mask.tif"
    with MaskWriter(path, width=width, height=height, crs=UTM16N, transform=TRANSFORM,
                    nodata=NODATA, palette=palette, class_names=("road", "building", "tree", "car")) as writer:
        for window in blocks(width, height, 512):
            r, c = int(window.row_off), int(window.col_off)
            # int64, as np.argmax gives: accepted when the values fit uint8
            writer.write(window, labels[r:r + window.height, c:c + window.width].astype(np.int64))

    assert cog_validate(str(path)) == (True, [], [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.tif"]  # the staging file is gone
    with rasterio.open(path) as src:
        assert (src.width, src.height, src.count, src.dtypes) == (width, height, 1, ("uint8",))
        assert src.crs == UTM16N and src.transform == TRANSFORM and src.nodata == NODATA
        assert src.profile["tiled"] and src.block_shapes == [(512, 512)]
        assert src.compression.name == "deflate"
        assert src.overviews(1) == [2, 4]  # until an overview fits one 512 tile
        colormap = src.colormap(1)
        assert [colormap[i][:3] for i in range(4)] == [tuple(c) for c in palette]
        # the classes' names inside the one file, by class id
        assert src.descriptions == ("class",)
        assert {key: value for key, value in src.tags(1).items() if key.startswith("CLASS_")} == {
            "CLASS_0": "road", "CLASS_1": "building", "CLASS_2": "tree", "CLASS_3": "car"}
        np.testing.assert_array_equal(src.read(1), labels)
        # overviews by mode: class ids only, never a blend of two
        overview = src.read(1, out_shape=(height // 4, width // 4))
        assert set(np.unique(overview)) <= {0, 1, 2, 3, NODATA}
        assert (overview[240:, :70] == NODATA).all()


def test_confidence_cog_without_palette_or_nodata(tmp_path: Path) -> None:
    confidence = np.random.default_rng(0).integers(0, 256, (600, 700), dtype=np.uint8)
    path = tmp_path / "confidence.tif"
    with MaskWriter(path, width=700, height=600, crs=UTM16N, transform=TRANSFORM, nodata=None) as writer:
        for window in reversed(blocks(700, 600, 256)):  # any order, windows off the tiles
            r, c = int(window.row_off), int(window.col_off)
            writer.write(window, confidence[r:r + window.height, c:c + window.width])
    assert cog_validate(str(path))[0]
    with rasterio.open(path) as src:
        assert src.nodata is None
        with pytest.raises(ValueError):
            src.colormap(1)
        assert src.tags(1) == {} and src.descriptions == (None,)
        np.testing.assert_array_equal(src.read(1), confidence)


@pytest.mark.parametrize(("width", "height", "overviews"), [(1, 700, []), (700, 1, [2]), (2, 1100, [2, 2]), (1, 1, [])])
def test_masks_one_pixel_across_are_valid_cogs(tmp_path: Path, width: int, height: int, overviews: list[int]) -> None:
    """A column of pixels gets no overviews: GDAL's would keep its width, a decimation of 1
    that rio-cogeo's validator refuses; a row, or two columns, halve as any raster does."""
    path = tmp_path / "mask.tif"
    with MaskWriter(path, width=width, height=height, crs=UTM16N, transform=TRANSFORM, nodata=NODATA) as writer:
        writer.write(Window(0, 0, width, height), np.zeros((height, width), np.uint8))
    assert cog_validate(str(path))[:2] == (True, [])  # valid; for 1 x 700 it warns that overviews are missing
    with rasterio.open(path) as src:
        assert (src.width, src.height, src.overviews(1)) == (width, height, overviews)


def test_mask_writer_refuses_bad_blocks_and_cleans_up(tmp_path: Path) -> None:
    path = tmp_path / "mask.tif"
    pixels = from_origin(0, 64, 1, 1)  # no CRS: a plain pixel grid
    with (pytest.raises(ValueError, match="outside"),
          MaskWriter(path, width=64, height=64, crs=None, transform=pixels, nodata=0) as writer):
        writer.write(Window(0, 0, 32, 32), np.zeros((32, 32), np.uint8))
        writer.write(Window(48, 48, 32, 32), np.zeros((32, 32), np.uint8))
    assert list(tmp_path.iterdir()) == []  # neither the staging file nor a COG is left
    with MaskWriter(path, width=64, height=64, crs=None, transform=pixels, nodata=0) as writer:
        with pytest.raises(ValueError, match="shape"):
            writer.write(Window(0, 0, 32, 32), np.zeros((16, 32), np.uint8))
        with pytest.raises(ValueError, match=r"\[0, 255\]"):
            writer.write(Window(0, 0, 32, 32), np.full((32, 32), 300))
        with pytest.raises(ValueError, match="integers"):
            writer.write(Window(0, 0, 32, 32), np.zeros((32, 32), np.float32))
    with pytest.raises(ValueError, match="nodata"):
        MaskWriter(path, width=64, height=64, crs=None, transform=pixels, nodata=256)
    with pytest.raises(ValueError, match="class ids must lie below the nodata value"):
        MaskWriter(path, width=64, height=64, crs=None, transform=pixels, nodata=2, class_names=("a", "b", "c"))


# writes a noisy 1024 x 1024 mask with MaskWriter in a process whose files may not grow past
# argv[2] bytes (RLIMIT_FSIZE: a full disk without privileges, as a write then fails with EFBIG)
_WRITE_UNDER_LIMIT = """
import json, resource, signal, sys
import numpy as np
from rasterio.transform import from_origin
from rasterio.windows import Window
from pipeline.geo import MaskWriter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the process is killed at the limit
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]),) * 2)
labels = np.random.default_rng(0).integers(0, 7, (1024, 1024), dtype=np.uint8)
try:
    with MaskWriter(sys.argv[1], width=1024, height=1024, crs="EPSG:32633", transform=from_origin(0, 0, 1, 1),
                    nodata=255, palette=[(i, i, i) for i in range(7)]) as writer:
        writer.write(Window(0, 0, 1024, 1024), labels)
    print(json.dumps(None))
except OSError as err:
    print(json.dumps(str(err)))
"""


def test_a_mask_that_cannot_be_written_whole_raises_and_leaves_nothing(tmp_path: Path) -> None:
    """A full disk, as the writing process's file size limit: while the windows are written,
    and while GDAL's COG driver copies them, which reports its failed writes only in its log
    and returned a COG cut short (read back, it failed; rio-cogeo passed it). Either way an
    OSError names the file, and neither file is left."""
    import subprocess
    import sys

    def write(limit: int) -> str | None:
        (tmp_path / "out").mkdir(exist_ok=True)
        done = subprocess.run([sys.executable, "-c", _WRITE_UNDER_LIMIT, str(tmp_path / "out" / "mask.tif"), str(limit)],
                              capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    assert write(1 << 30) is None
    whole = (tmp_path / "out" / "mask.tif").stat().st_size
    (tmp_path / "out" / "mask.tif").unlink()
    # the COG's last tile cut off: the staging file, smaller (no overviews), was written whole
    error = write(whole - 4096)
    assert error is not None and error.startswith(f"cannot write {tmp_path / 'out' / 'mask.tif'}: the COG was cut short")
    assert list((tmp_path / "out").iterdir()) == []
    # the windows' own file cannot be written
    error = write(4096)
    assert error is not None and error.startswith(f"cannot write {tmp_path / 'out'}/.mask.tif."), error
    assert list((tmp_path / "out").iterdir()) == []


def test_levels_are_averaged_for_overviews_and_class_ids_never(tmp_path: Path) -> None:
    """A confidence map's overviews average its levels (its nodata left out); a palette's class
    ids are never blended."""
    side = 1024
    levels = np.where((np.arange(side)[:, None] + np.arange(side)[None]) % 2, 200, 100).astype(np.uint8)
    edge = side // 2 + 1  # odd: the overview's cells at the edge hold nodata and levels both
    levels[:, :edge] = 0  # nodata: the left half and a column
    path = tmp_path / "confidence.tif"
    with MaskWriter(path, width=side, height=side, crs=UTM16N, transform=TRANSFORM, nodata=0,
                    overview_resampling=Resampling.average) as writer:
        writer.write(Window(0, 0, side, side), levels)
    with rasterio.open(path) as cog:
        assert cog.overviews(1)
        overview = cog.read(1, out_shape=(side // 2, side // 2))
    assert set(np.unique(overview[:, edge // 2 + 1 :])) == {150}  # 100 and 200, averaged
    assert set(np.unique(overview[:, : edge // 2])) == {0}
    # a cell of one nodata and one level column: the average of the levels alone (100 and 200
    # over two rows), not pulled towards 0
    assert set(np.unique(overview[:, edge // 2])) == {150}
    with pytest.raises(ValueError, match="class ids must not be blended"):
        MaskWriter(tmp_path / "mask.tif", width=side, height=side, crs=UTM16N, transform=TRANSFORM, nodata=255,
                   palette=default_palette(3), overview_resampling=Resampling.average)


def collect(labels: np.ndarray, valid: np.ndarray | None, size: int, **kwargs) -> list[ClassPolygon]:
    height, width = labels.shape
    collector = PolygonCollector(kwargs.pop("transform", TRANSFORM), kwargs.pop("crs", UTM16N),
                                 width=width, height=height, **kwargs)
    rows = []
    for window in blocks(width, height, size):
        r, c = int(window.row_off), int(window.col_off)
        part = np.s_[r:r + window.height, c:c + window.width]
        rows += collector.add(window, labels[part], None if valid is None else valid[part])
    rows += collector.finish()
    assert collector.held == 0
    return rows


def test_region_cut_by_block_edges_is_one_polygon() -> None:
    # 6x6 pixels of 1 m, blocks of 3: class 1 is a plus sign over all four blocks, class 2 a
    # pixel inside one block, and the nodata pixel (valid False) is in no polygon
    labels = np.zeros((6, 6), np.uint8)
    labels[1:5, 2:4] = 1
    labels[2:4, 1:5] = 1
    labels[0, 0] = 2
    valid = np.ones((6, 6), bool)
    valid[5, 5] = False
    rows = collect(labels, valid, 3, transform=from_origin(100, 10, 1, 1), crs=None)
    by_class = {k: [r for r in rows if r.class_id == k] for k in (0, 1, 2)}
    assert len(by_class[1]) == 1 and by_class[1][0].area == 12  # pixels: no CRS
    assert by_class[1][0].geometry.equals(shapely.union_all([shapely.box(102, 5, 104, 9), shapely.box(101, 6, 105, 8)]))
    assert [r.area for r in by_class[2]] == [1]
    assert len(by_class[0]) == 1 and by_class[0][0].area == 36 - 12 - 1 - 1


def geodesic_area(polygon: shapely.Polygon, crs: CRS) -> float:
    """m² of a polygon in `crs` on WGS84, as GIS tools measure with an ellipsoid: its outline,
    densified, in longitude and latitude, by pyproj's geodesic area (another way than
    GroundArea's)."""
    to_lonlat = pyproj.Transformer.from_crs(pyproj.CRS.from_wkt(crs.to_wkt()), "EPSG:4326", always_xy=True)
    dense = shapely.segmentize(polygon, max_segment_length=max(shapely.length(polygon) / 4000, 1e-9))
    area = 0.0
    for ring, sign in [(dense.exterior, 1)] + [(hole, -1) for hole in dense.interiors]:
        lon, lat = to_lonlat.transform(*np.asarray(ring.coords).T)
        area += sign * abs(pyproj.Geod(ellps="WGS84").polygon_area_perimeter(lon, lat)[0])
    return area


def class_areas(ground: GroundArea, labels: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Each class's area counted pixel by pixel, each taking its row's area."""
    valid = np.ones(labels.shape, bool) if valid is None else valid
    areas = np.broadcast_to(ground.row_area[:, None], labels.shape)
    return np.bincount(labels[valid], weights=areas[valid], minlength=int(labels.max()) + 1)


@pytest.mark.parametrize("crs, transform", [
    (UTM16N, TRANSFORM),                                             # metres
    (CRS.from_epsg(2263), from_origin(980000, 200000, 2, 2)),        # NY Long Island, US survey feet
    (CRS.from_epsg(3857), from_origin(1_100_000, 8_400_000, 0.3, 0.3)),  # Web Mercator at 60° N
    (CRS.from_epsg(4326), from_origin(10.0, 60.0, 3e-6, 3e-6)),     # degrees
    (CRS.from_epsg(4326), Affine(2e-6, 1e-6, 10.0, 1e-6, -2e-6, -33.0)),  # rotated, south of the equator
])
def test_ground_area_is_the_ellipsoids(crs: CRS, transform: Affine) -> None:
    """A raster's area on the ground, in m², whatever its CRS's unit: the geodesic area of its
    outline, to 1e-6 (where the map's own area is 0.2% off in UTM, 4x in Web Mercator at
    60°, and in square degrees in a geographic CRS)."""
    width, height = 3000, 2000
    ground = GroundArea(crs, transform, width=width, height=height)
    outline = shapely.transform(shapely.box(0, 0, width, height), lambda xy: np.column_stack(transform @ xy.T))
    assert ground.unit == "m²"
    assert ground.row_area.sum() * width == pytest.approx(geodesic_area(outline, crs), rel=1e-6)


def test_a_wide_polar_raster_takes_each_rows_mean_pixel() -> None:
    """Antarctica in its polar stereographic (EPSG:3031), 4,000 km a side: a row's pixels
    differ in area by percents, so a row measured at one column is off by as much (3.3% at its
    first, about 1.7% at its middle); the mean of the row's pixels keeps the raster within
    0.5%, and each half of it too."""
    crs, transform, side = CRS.from_epsg(3031), from_origin(-2_000_000, 2_500_000, 2000, 2000), 2000
    ground = GroundArea(crs, transform, width=side, height=side)
    for columns in (side, side // 2):
        outline = shapely.transform(shapely.box(0, 0, columns, side), lambda xy: np.column_stack(transform @ xy.T))
        assert ground.row_area.sum() * columns == pytest.approx(geodesic_area(outline, crs), rel=5e-3)


def test_a_global_grid_past_the_poles_is_the_whole_ellipsoid_and_an_unplaceable_row_is_refused() -> None:
    """A global 1° grid whose pixels are centred on ±90° reaches half a pixel past each pole:
    those rows are taken at the pole, so the grid is the whole ellipsoid (WGS84's 510,065,622
    km²). A row its CRS cannot place on the earth is refused, where its NaN would have spread
    to every region below it."""
    ground = GroundArea(CRS.from_epsg(4326), from_origin(-180, 90.5, 1, 1), width=360, height=181)
    assert np.isfinite(ground.row_area).all()
    assert ground.row_area.sum() * 360 == pytest.approx(510_065_621_724_088, rel=1e-9)
    with pytest.raises(ValueError, match=r"rows 0 to 9 of the raster lie outside what WGS 84 / UTM zone 16N places"):
        GroundArea(UTM16N, from_origin(1e9, 1e9, 1, 1), width=10, height=10)


def test_ground_area_in_pixels_without_an_ellipsoid() -> None:
    local = CRS.from_wkt('LOCAL_CS["site grid",UNIT["metre",1]]')  # an engineering CRS: on no ellipsoid
    for crs in (local, None):
        ground = GroundArea(crs, from_origin(0, 0, 0.5, 0.5), width=4, height=3)
        assert ground.unit == "pixels" and ground.row_area.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("crs, transform", [
    (CRS.from_epsg(3857), from_origin(1_100_000, 8_400_000, 30, 30)),
    (CRS.from_epsg(4326), from_origin(10.0, 60.0, 3e-4, 3e-4)),
])
def test_region_areas_add_up_to_their_pixels_on_the_ground(crs: CRS, transform: Affine) -> None:
    """Each region's area is that of its pixels on the ground, holes left out (its outline by
    Green's theorem against the pixels counted row by row), and its polygon's geodesic area
    (pixels 30 m high, whose area changes from row to row by 0.1%)."""
    rng = np.random.default_rng(3)
    labels = (rng.random((60, 80)) < 0.45).astype(np.uint8)
    labels[10:50, 10:70] = 2
    labels[20:40, 30:50] = 0  # a hole in class 2's region
    ground = GroundArea(crs, transform, width=80, height=60)
    regions = collect(labels, None, 32, transform=transform, crs=crs)
    assert any(len(r.geometry.interiors) for r in regions)
    counted = class_areas(ground, labels)
    for class_id in range(3):
        mine = [r for r in regions if r.class_id == class_id]
        assert sum(r.area for r in mine) == pytest.approx(counted[class_id], rel=1e-12)
    for region in regions:
        assert region.area == pytest.approx(geodesic_area(region.geometry, crs), rel=1e-5)


@pytest.fixture
def footprints(shared_data: Path) -> tuple[np.ndarray, CRS, Affine]:
    """SpaceNet building footprints (0/255) as class ids 0/1. The mask file carries no
    georeferencing: it shares the grid of the image it was drawn on."""
    folder = shared_data / "aerial" / "geotiff"
    if not (folder / "sample_fp_mask.tif").is_file() or not (folder / "sample_geotiff.tif").is_file():
        pytest.skip(f"SpaceNet sample not found in {folder}")
    with rasterio.open(folder / "sample_geotiff.tif") as image:
        crs, transform = image.crs, image.transform
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(folder / "sample_fp_mask.tif") as mask:
            labels = (mask.read(1) == 255).astype(np.uint8)
    return labels, crs, transform


def test_footprints_in_blocks_match_whole_raster(footprints) -> None:
    labels, crs, transform = footprints
    height, width = labels.shape
    valid = np.ones_like(labels, bool)
    valid[600:700, 200:560] = False  # a nodata band across block edges
    ground = GroundArea(crs, transform, width=width, height=height)

    whole = collect(labels, valid, max(width, height), transform=transform, crs=crs)
    blocked = collect(labels, valid, 256, transform=transform, crs=crs)

    assert len(blocked) == len(whole)
    key = lambda r: (r.class_id, r.geometry.bounds)  # noqa: E731
    for a, b in zip(sorted(blocked, key=key), sorted(whole, key=key), strict=True):
        assert a.class_id == b.class_id and a.geometry.equals(b.geometry) and a.area == b.area
    assert all(r.geometry.geom_type == "Polygon" and r.geometry.is_valid for r in blocked)
    left, top = transform @ (0, 0)
    right, bottom = transform @ (width, height)
    bounds = shapely.box(left, bottom, right, top)
    assert all(bounds.covers(r.geometry) for r in blocked)
    class_area = class_areas(ground, labels, valid)
    for class_id in (0, 1):
        assert sum(r.area for r in blocked if r.class_id == class_id) == pytest.approx(class_area[class_id], rel=1e-12)
        # in UTM, the ground's area is the map's to 0.2%
        pixels = int(((labels == class_id) & valid).sum())
        assert class_area[class_id] == pytest.approx(pixels * abs(transform.determinant), rel=2e-3)
    # buildings really were cut by block edges (every 256 px) and joined again
    inverse = ~transform

    def spans_an_edge(polygon: shapely.Polygon) -> bool:
        col0, row0 = inverse @ polygon.bounds[:2]
        col1, row1 = inverse @ polygon.bounds[2:]
        return any(min(a, b) < edge < max(a, b) for edge in (256, 512, 768) for a, b in ((col0, col1), (row0, row1)))

    assert sum(spans_an_edge(r.geometry) for r in blocked if r.class_id == 1) >= 5


def test_footprints_simplified_and_filtered(footprints) -> None:
    """`min_area` takes the area of a region's pixels, and `area` stays that area whatever
    `simplify` does to the outline."""
    labels, crs, transform = footprints
    exact = collect(labels, None, 256, transform=transform, crs=crs)
    tolerance = 1.0  # metres, two pixels
    simplified = collect(labels, None, 256, transform=transform, crs=crs, simplify=tolerance, min_area=20.0)
    buildings = [r for r in exact if r.class_id == 1]
    kept = [r for r in simplified if r.class_id == 1]
    assert 0 < len(kept) < len(buildings)  # the small ones are gone
    assert sorted(r.area for r in simplified) == sorted(r.area for r in exact if r.area >= 20.0)
    # each outline moved, by at most `tolerance`: its area by at most perimeter x tolerance
    def exact_of(r: ClassPolygon) -> ClassPolygon:  # the same building unsimplified: the one it overlaps most
        return max(buildings, key=lambda b: b.geometry.intersection(r.geometry).area)

    pairs = [(r, exact_of(r)) for r in kept]
    assert all(r.area == b.area for r, b in pairs)
    assert any(r.geometry.area != r.area for r in kept)
    assert all(abs(r.geometry.area - r.area) <= tolerance * b.geometry.length for r, b in pairs)
    assert sum(len(r.geometry.exterior.coords) for r in kept) < sum(len(b.geometry.exterior.coords) for _, b in pairs)


def test_simplified_polygons_do_not_depend_on_the_blocks(footprints) -> None:
    """A building cut by block edges, merged from its pieces, simplifies as the same building
    found whole: the outline is simplified from its normal form, not from wherever the merge
    happened to start its ring."""
    labels, crs, transform = footprints
    height, width = labels.shape

    def outlines(size: int) -> set[bytes]:
        rows = collect(labels, None, size, transform=transform, crs=crs, simplify=1.0)
        return {shapely.normalize(r.geometry).wkb for r in rows if r.class_id == 1}

    whole, blocked = outlines(max(width, height)), outlines(128)
    assert len(blocked) == len(whole) > 0
    assert blocked == whole


def test_regions_are_returned_once_no_later_block_can_reach_them() -> None:
    """Held pieces are let go row of blocks by row: what the collector holds is about one
    row's edges, whatever the raster's height; a region as large as the raster (the
    background here) is held until it ends. The regions are those of the raster found whole."""
    def squares(height: int) -> np.ndarray:  # 20-pixel squares every 64 pixels, each across a seam of 128-pixel blocks
        labels = np.zeros((height, 512), np.uint8)
        for r in range(118, height - 20, 64):
            for c in range(118, 512 - 20, 64):
                labels[r:r + 20, c:c + 20] = 1 + (r // 64 + c // 64) % 2
        return labels

    def collected(labels: np.ndarray, valid: np.ndarray | None) -> tuple[int, list[ClassPolygon]]:
        collector = PolygonCollector(TRANSFORM, UTM16N, width=labels.shape[1], height=labels.shape[0])
        rows, most = [], 0
        for window in blocks(labels.shape[1], labels.shape[0], 128):
            part = np.s_[int(window.row_off):int(window.row_off + window.height),
                         int(window.col_off):int(window.col_off + window.width)]
            rows += collector.add(window, labels[part], None if valid is None else valid[part])
            most = max(most, collector.held)
        return most, rows + collector.finish()

    short, tall = squares(1024), squares(4096)
    # the squares alone (the background nodata): four times the rows of blocks, the same pieces held at once
    assert collected(tall, tall > 0)[0] == collected(short, short > 0)[0]
    _, regions = collected(tall, None)
    whole = collect(tall, None, 4096)
    key = lambda r: (r.class_id, r.geometry.bounds)  # noqa: E731
    assert len(regions) == len(whole) > 100
    assert [(r.class_id, shapely.normalize(r.geometry).wkb, r.area) for r in sorted(regions, key=key)] == \
           [(r.class_id, shapely.normalize(r.geometry).wkb, r.area) for r in sorted(whole, key=key)]


def test_blocks_must_come_in_rows() -> None:
    collector = PolygonCollector(TRANSFORM, UTM16N, width=8, height=8)
    collector.add(Window(0, 4, 4, 4), np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="rows, top to bottom"):
        collector.add(Window(4, 0, 4, 4), np.zeros((4, 4), np.uint8))


def test_simplify_takes_metres_in_any_projected_unit_and_pixels_otherwise(footprints) -> None:
    """`simplify` is in the units of the area: metres in a projected CRS whatever its own unit
    (here US feet), pixels in a geographic one, whose degrees would take a tolerance meant for
    metres as some 100 km and leave nothing of a building. The same footprints in the three CRSs
    simplify alike (the feet grid is the metre grid times four, a power of two, so that floating
    point decides alike where a simplified edge touches another)."""
    labels, _, _ = footprints
    us_foot = 1200 / 3937  # metres
    pixels = 1.3  # no distance between points of the pixel grid is exactly 1.3 pixels

    def vertices(transform: Affine, crs: CRS, simplify: float) -> list[int]:
        rows = collect(labels, None, 256, transform=transform, crs=crs, simplify=simplify)
        return sorted(len(r.geometry.exterior.coords) for r in rows)

    exact = vertices(TRANSFORM, UTM16N, 0.0)
    in_metres = vertices(TRANSFORM, UTM16N, pixels * 0.5)
    in_feet = vertices(Affine.scale(4) * TRANSFORM, CRS.from_epsg(2263), pixels * 2 * us_foot)
    in_degrees = vertices(from_origin(-87.0, 33.7, 4.5e-6, 4.5e-6), CRS.from_epsg(4326), pixels)
    assert sum(in_metres) < sum(exact)  # simplified
    assert in_feet == in_metres and in_degrees == in_metres


# --- GeoParquet -------------------------------------------------------------------------


def test_polygons_geoparquet_read_by_geopandas_and_duckdb(footprints, tmp_path: Path) -> None:
    gpd = pytest.importorskip("geopandas")
    duckdb = pytest.importorskip("duckdb")
    labels, crs, transform = footprints
    rows = collect(labels, None, 256, transform=transform, crs=crs)
    path = tmp_path / "polygons.parquet"
    # written as a raster's blocks find them: in batches, gathered into row groups of 16
    writer = PolygonsWriter(str(path), run_id="run-1", image_id="tiles/a.tif",
                            class_names=("background", "building"), crs=crs, row_group_rows=16)
    for start in range(0, len(rows), 5):
        writer.write(rows[start : start + 5])
    assert writer.close() == len(rows) > 32
    assert pq.ParquetFile(path).num_row_groups == -(-len(rows) // 20)  # 4 batches of 5 per group
    assert sorted(p.name for p in tmp_path.iterdir()) == ["polygons.parquet"]  # no scratch left

    geo = json.loads(pq.read_schema(path).metadata[b"geo"])
    column = geo["columns"]["geometry"]
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    assert column["encoding"] == "WKB" and column["geometry_types"] == ["Polygon"]
    assert CRS.from_user_input(json.dumps(column["crs"])) == crs
    assert column["bbox"] == list(shapely.total_bounds([r.geometry for r in rows]))
    # GeoParquet 1.1's covering: each row's box, with row-group statistics a reader filters on
    assert column["covering"] == {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}}
    metadata = pq.ParquetFile(path).metadata
    ymin = [metadata.schema.column(i).path for i in range(metadata.num_columns)].index("bbox.ymin")
    group = metadata.row_group(0).column(ymin).statistics
    assert group.has_min_max and group.min == min(r.geometry.bounds[1] for r in rows[:20])
    probe = shapely.box(733700, 3724900, 733750, 3724950)
    inside = [r for r in rows if shapely.intersects(shapely.box(*r.geometry.bounds), probe)]
    assert 0 < len(inside) < len(rows)
    assert len(gpd.read_parquet(path, bbox=probe.bounds)) == len(inside)  # geopandas filters on the covering
    assert duckdb.sql(f"""select count(*) from read_parquet('{path}') where bbox.xmin <= {probe.bounds[2]}
        and bbox.xmax >= {probe.bounds[0]} and bbox.ymin <= {probe.bounds[3]} and bbox.ymax >= {probe.bounds[1]}"""
                      ).fetchall()[0][0] == len(inside)

    frame = gpd.read_parquet(path)
    assert frame.crs.to_epsg() == 32616
    assert len(frame) == len(rows)
    assert all(g.equals(r.geometry) for g, r in zip(frame.geometry, rows, strict=True))
    assert frame["class_name"].tolist() == [("background", "building")[r.class_id] for r in rows]

    counts = duckdb.sql(
        f"select class_name, count(*), sum(area) from read_parquet('{path}') group by 1 order by 1"
    ).fetchall()
    buildings = [r for r in rows if r.class_id == 1]
    assert counts[1][:2] == ("building", len(buildings))
    assert counts[1][2] == pytest.approx(sum(r.area for r in buildings), rel=1e-12)
    assert counts[1][2] == pytest.approx(int(labels.sum()) * abs(transform.determinant), rel=2e-3)  # UTM
    geometry_type = duckdb.sql(f"select geometry from read_parquet('{path}') limit 0").types[0]
    if str(geometry_type).startswith("GEOMETRY"):  # DuckDB reads GeoParquet as GEOMETRY
        # a bounding-box predicate, built into DuckDB without the spatial extension
        probe = shapely.box(733700, 3724900, 733750, 3724950)
        hits = duckdb.sql(
            f"select count(*) from read_parquet('{path}') where geometry && '{probe.wkt}'::GEOMETRY"
        ).fetchall()[0][0]
        assert hits == sum(shapely.intersects(shapely.box(*r.geometry.bounds), probe) for r in rows)


def test_geo_metadata_without_crs_and_the_bounding_box_of_all_batches(tmp_path: Path) -> None:
    names = ("background", "building")
    square = ClassPolygon(1, shapely.box(0, 0, 2, 2), 4.0)
    unknown = polygons_table([square], run_id="r", image_id="a.png", class_names=names, crs=None)
    assert json.loads(unknown.schema.metadata[b"geo"])["columns"]["geometry"]["crs"] is None  # null: unknown
    empty = polygons_table([], run_id="r", image_id="b.tif", class_names=names, crs=UTM16N)
    assert empty.num_rows == 0 and "bbox" not in json.loads(empty.schema.metadata[b"geo"])["columns"]["geometry"]
    with pytest.raises(ValueError, match="class_id 2"):
        polygons_table([ClassPolygon(2, shapely.box(0, 0, 1, 1), 1.0)], run_id="r", image_id="a",
                       class_names=names, crs=None)

    far = ClassPolygon(1, shapely.box(10, 10, 12, 13), 6.0)
    writer = PolygonsWriter(str(tmp_path / "two.parquet"), run_id="r", image_id="a.tif", class_names=names, crs=UTM16N)
    writer.write([square])
    writer.write([])
    writer.write([far])
    assert writer.close() == 2
    written = pq.read_table(tmp_path / "two.parquet")
    assert json.loads(written.schema.metadata[b"geo"])["columns"]["geometry"]["bbox"] == [0, 0, 12, 13]
    nothing = PolygonsWriter(str(tmp_path / "none.parquet"), run_id="r", image_id="b.tif", class_names=names, crs=UTM16N)
    nothing.write([])
    assert nothing.close() == 0 and not (tmp_path / "none.parquet").exists()
