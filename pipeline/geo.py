"""Outputs of a georeferenced raster, produced block by block so memory stays flat whatever
the raster's size: the label mask (and the confidence map) as a Cloud-Optimized GeoTIFF, and
the class regions as polygons in a GeoParquet 1.1 table.

    MaskWriter          windows of uint8 -> local tiled GeoTIFF -> local COG (overviews, palette)
    put_file_atomic     the finished local file -> its key in a storage Location
    PolygonCollector    windows of labels -> polygons, regions cut by block edges merged again
    polygons_table      polygons -> one Arrow table with GeoParquet 1.1 metadata
    PolygonsWriter      batches of polygons -> one local GeoParquet file, a row group at a time

A file's `geo` metadata names one CRS, and that CRS holds for every row of the file: rasters
of an archive may lie in different CRSs, so each raster's polygons are a file of their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, Self

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyproj
import rasterio
import rasterio.features
import rasterio.shutil
import shapely
from affine import Affine
from pyproj.crs import ProjectedCRS
from pyproj.crs.coordinate_operation import LambertAzimuthalEqualAreaConversion

# GDAL's error classes, which rasterio raises from writes and exposes nowhere else
from rasterio._err import (
    CPLE_AppDefinedError,
    CPLE_BaseError,
    CPLE_FileIOError,
    CPLE_NoWriteAccessError,
    CPLE_OpenFailedError,
)
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioError, RasterioIOError
from rasterio.windows import Window

from .rasters import gdal_env

# side of the tiles of the GeoTIFFs written here: GDAL's COG default, and what rio-cogeo's
# validator expects of a raster with overviews
BLOCK_SIZE = 512
_GEO_METADATA_VERSION = "1.1.0"
# dtypes rasterio.features.shapes accepts for the values it polygonises
_SHAPES_DTYPES = frozenset({np.dtype(t) for t in ("uint8", "int16", "uint16", "int32", "float32")})

POLYGONS_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("class_id", pa.int32(), nullable=False),
    pa.field("class_name", pa.string(), nullable=False),
    # the region's area on the ground, in m² (pixels for a local CRS): see GroundArea
    pa.field("area", pa.float64(), nullable=False),
    pa.field("geometry", pa.binary(), nullable=False),  # WKB, in the raster's CRS
    # GeoParquet 1.1's covering: each row's bounding box, whose row-group statistics let a
    # reader skip the row groups outside an area of interest (rows come block row by block row)
    pa.field("bbox", pa.struct([pa.field(name, pa.float64(), nullable=False)
                                for name in ("xmin", "ymin", "xmax", "ymax")]), nullable=False),
])


def _integer_window(window: Window, width: int, height: int) -> tuple[int, int, int, int]:
    """(col_off, row_off, width, height) of a window of whole pixels inside the raster."""
    values = (window.col_off, window.row_off, window.width, window.height)
    if any(v != int(v) for v in values):
        raise ValueError(f"window {window} has fractional offsets or size; use whole pixels")
    col, row, w, h = (int(v) for v in values)
    if w < 1 or h < 1 or col < 0 or row < 0 or col + w > width or row + h > height:
        raise ValueError(
            f"window {window} is empty or outside the {width}x{height} raster; "
            f"windows must lie within cols [0, {width}) and rows [0, {height})"
        )
    return col, row, w, h


class MaskWriter:
    """A single-band uint8 COG on local disk, written one window at a time.

    Use as a context manager:

        with MaskWriter(tmp / "mask.tif", width=w, height=h, crs=crs, transform=t,
                        nodata=255, palette=palette) as writer:
            for window, labels in blocks:
                writer.write(window, labels)
        put_file_atomic(output, key, writer.path)

    Windows go into a tiled, deflate-compressed GeoTIFF beside `path` (windows aligned on the
    512-pixel tiles are cheapest: a tile written twice is compressed twice). On leaving the
    block without error, GDAL's COG driver copies it to `path`, building the overviews by
    `overview_resampling` (mode by default: a class id, never a blend of two); both steps
    stream tile by tile through GDAL's block cache, so memory does not grow with the raster.
    On an error both files are removed, and GDAL's own errors (a full disk) are raised as
    OSError naming the file. Pixels no window covered read as `nodata` (0 when
    `nodata` is None). `class_names`, by class id, go in the band's metadata (`CLASS_0=road`).
    The same writer serves the confidence map (no palette), whose levels
    are averaged for its overviews (`Resampling.average`, nodata left out). `threads`:
    GDAL's for compressing tiles and building the overviews (`rasters.gdal_env`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        width: int,
        height: int,
        crs: CRS | None,
        transform: Affine,
        nodata: int | None,
        palette: Sequence[Sequence[int]] | None = None,
        class_names: Sequence[str] | None = None,
        overview_resampling: Resampling = Resampling.mode,
        threads: int = 1,
    ) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise ValueError(f"{self.path.parent} is not a local folder; MaskWriter writes to local disk first")
        if width < 1 or height < 1:
            raise ValueError(f"width and height must be >= 1, got {width}x{height}")
        if nodata is not None and not 0 <= nodata <= 255:
            raise ValueError(f"nodata={nodata} does not fit uint8; use a value in [0, 255] or None")
        if palette is not None and (len(palette) > 256 or any(
            len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in palette
        )):
            raise ValueError("palette must be at most 256 (r, g, b) colours with values in [0, 255]")
        if overview_resampling not in (Resampling.mode, Resampling.nearest, Resampling.average):
            raise ValueError(f"overview_resampling={overview_resampling.name}: use mode or nearest for class ids, "
                             "average for levels")
        if palette is not None and overview_resampling == Resampling.average:
            raise ValueError("overview_resampling=average with a palette: class ids must not be blended; use mode or nearest")
        if class_names is not None and nodata is not None and nodata < len(class_names):
            raise ValueError(f"{len(class_names)} class names for a uint8 band whose nodata is {nodata}: class ids "
                             "must lie below the nodata value")
        self.width, self.height = width, height
        self.crs, self.transform, self.nodata = crs, transform, nodata
        self.palette, self.class_names = palette, class_names
        self.overview_resampling = overview_resampling
        self.threads = threads
        # hidden, so that a folder listing or a glob for *.tif never picks up a partial file
        self._staging = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.staging.tif")
        self._dataset: rasterio.io.DatasetWriter | None = None

    def __enter__(self) -> Self:
        with gdal_env(self.threads), _written(self._staging):
            self._dataset = rasterio.open(
                self._staging, "w", driver="GTiff", width=self.width, height=self.height, count=1,
                dtype="uint8", crs=self.crs, transform=self.transform, nodata=self.nodata,
                tiled=True, blockxsize=BLOCK_SIZE, blockysize=BLOCK_SIZE, compress="deflate",
                # a 50,000 px square mask is 2.5 GB raw: past 4 GB (with overviews) TIFF needs BigTIFF
                BIGTIFF="IF_SAFER",
            )
            if self.palette is not None:
                self._dataset.write_colormap(1, {i: (*colour, 255) for i, colour in enumerate(self.palette)})
            if self.class_names is not None:
                # inside the file (TIFF's GDAL_METADATA tag, which the COG copy keeps), as
                # gdalinfo and rasterio's tags(1) show them: GDAL keeps a GeoTIFF's category
                # names in a .aux.xml beside it, a second file to every mask
                self._dataset.set_band_description(1, "class")
                self._dataset.update_tags(1, **{f"CLASS_{i}": name for i, name in enumerate(self.class_names)})
        return self

    def write(self, window: Window, array: np.ndarray) -> None:
        """Write one window: an (height, width) array of integers in [0, 255] (labels, with
        the nodata value where invalid, or confidence levels)."""
        if self._dataset is None:
            raise RuntimeError("MaskWriter.write called outside its `with` block")
        col, row, w, h = _integer_window(window, self.width, self.height)
        array = np.asarray(array)
        if array.shape != (h, w):
            raise ValueError(f"array of shape {array.shape} for a window of {h} rows x {w} cols")
        if array.dtype != np.uint8:
            if not np.issubdtype(array.dtype, np.integer):
                raise ValueError(f"array must hold integers (uint8), got {array.dtype}")
            if array.size and (array.min() < 0 or array.max() > 255):
                raise ValueError(f"values must lie in [0, 255] for a uint8 raster, got [{array.min()}, {array.max()}]")
            array = array.astype(np.uint8)
        with gdal_env(self.threads), _written(self._staging):
            self._dataset.write(array, 1, window=Window(col, row, w, h))

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        dataset, self._dataset = self._dataset, None
        try:
            with gdal_env(self.threads):
                if dataset is not None:
                    with _written(self._staging):
                        dataset.close()
                if exc_type is None:
                    with _written(self.path):
                        rasterio.shutil.copy(
                            self._staging, self.path, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=BLOCK_SIZE,
                            OVERVIEW_RESAMPLING=self.overview_resampling.name.upper(), BIGTIFF="IF_SAFER",
                            # a column of pixels cannot be halved across: GDAL's overview of it keeps
                            # its width, which readers take for a decimation of 1 (rio-cogeo refuses it)
                            OVERVIEWS="NONE" if self.width == 1 else "AUTO",
                        )
                    self._check_complete()
        except BaseException:
            with contextlib.suppress(OSError):  # GDAL's error is the one to see
                self.path.unlink(missing_ok=True)
            raise
        finally:
            with contextlib.suppress(OSError):
                self._staging.unlink(missing_ok=True)
        if exc_type is not None:
            with contextlib.suppress(OSError):  # the caller's error is the one to see
                self.path.unlink(missing_ok=True)

    def _check_complete(self) -> None:
        """Raise OSError unless the COG reads to its end. GDAL's COG driver reports a write
        that fails while it closes the file (a full disk) only as a logged error, and returns:
        the file is then cut short. Its last bytes are the full-resolution band's last tile
        (a COG puts the overviews before the full resolution, tiles in row order), so reading
        that tile back proves every byte before it was written."""
        try:
            with rasterio.open(self.path) as cog:
                block_height, block_width = cog.block_shapes[0]
                row, col = (cog.height - 1) // block_height * block_height, (cog.width - 1) // block_width * block_width
                cog.read(1, window=Window(col, row, min(block_width, cog.width - col), min(block_height, cog.height - row)))
        except (RasterioError, CPLE_BaseError) as err:
            raise OSError(f"cannot write {self.path}: the COG was cut short ({err.__cause__ or err}); is its disk full?"
                          ) from err


# what GDAL raises when a file cannot be written: libtiff's failed writes and seeks (a full
# disk) come as application-defined errors. Not its other kinds (an illegal argument, a
# driver without a capability), which are mistakes of the code, not of the disk.
_WRITE_ERRORS = (RasterioIOError, CPLE_AppDefinedError, CPLE_FileIOError, CPLE_NoWriteAccessError, CPLE_OpenFailedError)


@contextlib.contextmanager
def _written(path: Path) -> Iterator[None]:
    """GDAL's errors writing `path` (rasterio raises some as its own types, not OSError: a
    full disk's among them) raised as OSError naming the file: an output that cannot be
    written, not an input that cannot be read."""
    try:
        yield
    except _WRITE_ERRORS as err:
        raise OSError(f"cannot write {path}: {err.__cause__ or err}") from err


class GroundArea:
    """The area on the ground of a raster's pixels and of its regions: m² on the ellipsoid of
    the raster's CRS, projected or geographic, as GIS tools measure with an ellipsoid; pixels
    for a local (engineering) CRS, which lies on no ellipsoid.

    A map's own area is the ground's only in a projection that keeps areas: UTM's differs by
    up to 0.2%, Web Mercator's by 1/cos² of the latitude (4x at 60°), and a geographic CRS's
    square degrees are no area at all. So each pixel row's area is measured once, and a row's
    pixels share it: for a north-up raster in longitude and latitude, the exact area of the
    ellipsoid's band between the row's parallels; otherwise the mean area of the row's pixels
    at `_AREA_COLUMNS` columns, each taken into a Lambert azimuthal equal-area projection
    centred on the raster. That is the pixels' own area where rows follow parallels (Web
    Mercator, any cylindrical CRS); elsewhere a region's area is its rows' mean, off by how
    much a projection's scale changes along a row (see the README).
    """

    def __init__(self, crs: CRS | None, transform: Affine, *, width: int, height: int) -> None:
        self.unit = "pixels"
        self.row_area = np.ones(height)
        if crs is not None:
            source = pyproj.CRS.from_wkt(crs.to_wkt())
            if source.geodetic_crs is not None:
                self.row_area = _row_areas(source, transform, width, height)
                self.unit = "m²"
        # the area of the rows above each pixel row's top edge: a region's area from its outline
        self._above = np.concatenate(([0.0], np.cumsum(self.row_area)))

    def of_regions(self, pixel_polygons: np.ndarray) -> np.ndarray:
        """The area of each polygon whose vertices are pixel corners (the raster's pixel
        coordinates, as `rasterio.features.shapes` outlines regions): Green's theorem over the
        outline, whose horizontal edges each add their length times the area above them."""
        rings, polygon_of_ring = shapely.get_rings(pixel_polygons, return_index=True)
        xy, ring_of_point = shapely.get_coordinates(rings, return_index=True)
        # consecutive vertices of one ring (a ring's last vertex repeats its first)
        same_ring = ring_of_point[1:] == ring_of_point[:-1]
        dx = np.where(same_ring, xy[1:, 0] - xy[:-1, 0], 0.0)
        above = self._above[np.rint(xy[:-1, 1]).astype(np.int64)]
        ring_area = np.abs(np.bincount(ring_of_point[:-1], weights=dx * above, minlength=len(rings)))
        # each polygon's first ring is its outline, the others its holes
        outline = np.ones(len(rings), dtype=bool)
        outline[1:] = polygon_of_ring[1:] != polygon_of_ring[:-1]
        return np.bincount(polygon_of_ring, weights=np.where(outline, ring_area, -ring_area),
                           minlength=len(pixel_polygons))


# columns at which a projected raster's pixel rows are measured, spread over its width: where
# rows do not follow parallels (a polar stereographic, a national grid, a rotated grid) a row's
# pixels differ in area, and the row takes their mean
_AREA_COLUMNS = 9


def _row_areas(source: pyproj.CRS, transform: Affine, width: int, height: int) -> np.ndarray:
    """m² of a pixel in each row of the raster, on the CRS's own datum (so no datum shift moves
    it). ValueError where a row lies outside what the CRS can place on the earth."""
    if source.is_geographic and transform.b == 0 and transform.d == 0:
        areas = _lonlat_row_areas(source, transform, height)
    else:
        areas = _projected_row_areas(source, transform, width, height)
    if not np.isfinite(areas).all():
        bad = np.flatnonzero(~np.isfinite(areas))
        raise ValueError(f"rows {bad[0]} to {bad[-1]} of the raster lie outside what {source.name} places on the "
                         "earth: their ground area cannot be measured")
    return areas


def _lonlat_row_areas(source: pyproj.CRS, transform: Affine, height: int) -> np.ndarray:
    """North-up longitude and latitude: each row a band of the ellipsoid between two parallels,
    whose area is exact (the authalic integral), latitudes beyond the poles taken at the pole
    (a global grid's edge rows, centred on ±90°, reach half a pixel past it)."""
    radians = source.axis_info[0].unit_conversion_factor
    a, b = source.ellipsoid.semi_major_metre, source.ellipsoid.semi_minor_metre
    e = np.sqrt(max(0.0, 1.0 - (b / a) ** 2))
    edges = np.clip((transform.f + transform.e * np.arange(height + 1)) * radians, -np.pi / 2, np.pi / 2)
    sin = np.sin(edges)
    if e < 1e-12:  # a sphere
        below_edge = a * a * sin
    else:  # the area from the equator to each edge, per radian of longitude
        below_edge = b * b / 2 * (sin / (1 - (e * sin) ** 2) + np.log((1 + e * sin) / (1 - e * sin)) / (2 * e))
    return abs(transform.a) * radians * np.abs(np.diff(below_edge))


def _projected_row_areas(source: pyproj.CRS, transform: Affine, width: int, height: int) -> np.ndarray:
    """Each row's mean pixel area at `_AREA_COLUMNS` columns, each pixel's corners taken into a
    Lambert azimuthal equal-area projection centred on the raster."""
    geodetic = source.geodetic_crs
    centre = transform @ (width / 2, height / 2)
    lon, lat = pyproj.Transformer.from_crs(source, geodetic, always_xy=True).transform(*centre)
    if not np.isfinite((lon, lat)).all():  # the projection has no centre for it: no row can be placed
        return np.full(height, np.nan)
    equal_area = ProjectedCRS(conversion=LambertAzimuthalEqualAreaConversion(lat, lon), geodetic_crs=geodetic)
    to_equal_area = pyproj.Transformer.from_crs(source, equal_area, always_xy=True)
    columns = np.unique(np.linspace(0, width - 1, _AREA_COLUMNS).round())
    rows = np.arange(height + 1, dtype=np.float64)  # the rows' top edges, and the last one's bottom
    # corners of the measured pixels: (rows + 1) x columns, left and right
    row, column = np.meshgrid(rows, columns, indexing="ij")
    left = np.stack(to_equal_area.transform(*(transform @ (column, row))))
    right = np.stack(to_equal_area.transform(*(transform @ (column + 1, row))))
    # each pixel's quadrilateral: top left, top right, bottom right, bottom left (shoelace)
    xs = np.stack([left[0, :-1], right[0, :-1], right[0, 1:], left[0, 1:]])
    ys = np.stack([left[1, :-1], right[1, :-1], right[1, 1:], left[1, 1:]])
    pixel = 0.5 * np.abs(np.sum(xs * np.roll(ys, -1, axis=0) - np.roll(xs, -1, axis=0) * ys, axis=0))
    return pixel.mean(axis=1)


class ClassPolygon(NamedTuple):
    """One connected region of one class: a Polygon in the raster's CRS, and the area of its
    pixels on the ground (`GroundArea`'s units)."""

    class_id: int
    geometry: shapely.Polygon
    area: float


class PolygonCollector:
    """Vectorises a label raster block by block into one polygon per connected region (pixels
    joined by their sides, as rasterio's 4-connectivity), whatever the blocks.

    Blocks come in rows, top to bottom (as `rasters.plan_blocks` lists them). `add` returns the
    block's regions that lie wholly inside it, and holds back the pieces touching an edge
    shared with another block, joined to the held pieces of the blocks above and to the left
    that they share an edge with (a union-find over pieces: the pixels on both sides of that
    edge are of one class, so one region). When a new row of blocks begins, the regions that
    end above it (which no later block can reach) are merged, each once, and returned too;
    `finish` returns the rest. So memory holds the pieces of about one row of blocks, not of
    the whole raster (a region as large as the raster, say a background class around every
    building, is held until it ends: it is one polygon, with a hole per building), and the
    caller can stream the final rows out as they come.

    Pieces are polygonised and merged in the raster's pixel coordinates: there the vertices
    two neighbouring blocks share are the same integers, so the union closes every seam
    exactly (map coordinates computed from two window transforms may differ in the last bit
    and leave slivers). Geometries go to map coordinates only when final. A region's `area`
    is that of its pixels on the ground (`ground`: m², or pixels for a local CRS), and
    `min_area` drops regions by it. `simplify` then simplifies each polygon on its own
    (Douglas-Peucker preserving its topology, as `ogr2ogr -simplify` does), with its tolerance
    in metres in a projected CRS, else in pixels (a geographic CRS's degrees are no unit to
    take a tolerance in metres), from a canonical form of the polygon, so that the
    result does not depend on how the blocks cut it; neighbouring polygons may gain gaps or
    overlaps up to the tolerance where their shared edge simplifies differently.
    """

    def __init__(
        self,
        transform: Affine,
        crs: CRS | None,
        *,
        width: int,
        height: int,
        min_area: float = 0.0,
        simplify: float = 0.0,
    ) -> None:
        if width < 1 or height < 1:
            raise ValueError(f"width and height must be >= 1, got {width}x{height}")
        if min_area < 0 or simplify < 0:
            raise ValueError(f"min_area and simplify must be >= 0, got {min_area} and {simplify}")
        self.transform, self.crs = transform, crs
        self.width, self.height = width, height
        self.ground = GroundArea(crs, transform, width=width, height=height)
        self.min_area, self.simplify = min_area, simplify
        # held pieces by id: polygon, class, bounds; and the union-find joining a region's pieces
        self._pieces: dict[int, tuple[shapely.Polygon, int, tuple[float, float, float, float]]] = {}
        self._parent: dict[int, int] = {}
        # the held pieces ending on each pixel row (their bottom) and column (their right side):
        # those a piece of a later block may continue across its top or left edge
        self._ending_at_row: dict[float, list[int]] = defaultdict(list)
        self._ending_at_col: dict[float, list[int]] = defaultdict(list)
        self._next_id = 0
        self._row = 0  # the top of the row of blocks being added
        # every region found so far, per class, those `min_area` drops included: the raster's
        # connected regions (class statistics' `components`), whatever the polygons' settings,
        # and their area: each class's, as its regions tile its pixels
        self.regions: Counter[int] = Counter()
        self.area: defaultdict[int, float] = defaultdict(float)
        self._finished = False

    @property
    def held(self) -> int:
        """How many pieces are held back (the memory this collector holds)."""
        return len(self._pieces)

    def add(self, core_window: Window, labels: np.ndarray, valid: np.ndarray | None = None) -> list[ClassPolygon]:
        """Vectorise one block: `labels` (core_window's height x width class ids) where `valid`
        (same shape, bool; None: everywhere). Returns the block's final polygons."""
        if self._finished:
            raise RuntimeError("PolygonCollector.add called after finish")
        col, row, w, h = _integer_window(core_window, self.width, self.height)
        if row < self._row:
            raise ValueError(f"block {core_window} comes after a block starting at row {self._row}: "
                             "blocks must come in rows, top to bottom")
        labels = np.asarray(labels)
        if labels.shape != (h, w):
            raise ValueError(f"labels of shape {labels.shape} for a window of {h} rows x {w} cols")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integer class ids, got {labels.dtype}")
        if labels.dtype not in _SHAPES_DTYPES:
            labels = labels.astype(np.int32)
        if valid is not None:
            valid = np.asarray(valid, dtype=bool)
            if valid.shape != (h, w):
                raise ValueError(f"valid of shape {valid.shape} for labels of shape {(h, w)}")
            if valid.all():  # most blocks: GDAL's polygonize then reads no mask band (a sixth of its time)
                valid = None
        settled = self._settle(above=row) if row > self._row else []  # the block checked: nothing is lost
        self._row = row
        # which block edges a region may continue across: not the raster's own border
        seams = (col > 0, row > 0, col + w < self.width, row + h < self.height)
        final_ids: list[int] = []
        final: list[shapely.Polygon] = []
        for geojson, value in rasterio.features.shapes(
            labels, mask=valid, connectivity=4, transform=Affine.translation(col, row)
        ):
            polygon = shapely.geometry.shape(geojson)
            minx, miny, maxx, maxy = polygon.bounds
            touches = (minx == col, miny == row, maxx == col + w, maxy == row + h)
            if any(t and s for t, s in zip(touches, seams, strict=True)):
                self._hold(polygon, int(value), (minx, miny, maxx, maxy), top=row, left=col)
            else:
                final_ids.append(int(value))
                final.append(polygon)
        return settled + self._finalise(final_ids, final)

    def finish(self) -> list[ClassPolygon]:
        """The regions still held at block edges, merged per class: one polygon per region."""
        if self._finished:
            raise RuntimeError("PolygonCollector.finish called twice")
        self._finished = True
        return self._settle(above=None)

    def _hold(self, polygon: shapely.Polygon, class_id: int, bounds: tuple[float, float, float, float], *,
              top: int, left: int) -> None:
        """Holds a piece of block (`top`, `left`), joined to the held pieces of its class it
        shares an edge with across the block's top or left side. Sharing a point is not
        enough: pixels that meet at a corner are not 4-connected."""
        piece = self._next_id
        self._next_id += 1
        self._parent[piece] = piece
        minx, miny, maxx, maxy = bounds
        candidates = (self._ending_at_row.get(top, []) if miny == top else []) + \
                     (self._ending_at_col.get(left, []) if minx == left else [])
        for other in candidates:
            other_polygon, other_class, (ox0, oy0, ox1, oy1) = self._pieces[other]
            # along the shared side, the two pieces' extents overlap by a pixel or more
            overlap = min(maxx, ox1) - max(minx, ox0) if oy1 == top else min(maxy, oy1) - max(miny, oy0)
            if other_class == class_id and overlap > 0 and shapely.relate_pattern(polygon, other_polygon, "****1****"):
                self._parent[self._root(piece)] = self._root(other)
        self._pieces[piece] = (polygon, class_id, bounds)
        if maxy < self.height:
            self._ending_at_row[maxy].append(piece)
        if maxx < self.width:
            self._ending_at_col[maxx].append(piece)

    def _root(self, piece: int) -> int:
        while self._parent[piece] != piece:
            self._parent[piece] = self._parent[self._parent[piece]]  # path halving
            piece = self._parent[piece]
        return piece

    def _settle(self, *, above: int | None) -> list[ClassPolygon]:
        """Returns the held regions whose last row is above pixel row `above` (None: all of
        them), each merged from its pieces, once; the others stay held, as pieces."""
        regions: dict[int, list[int]] = defaultdict(list)
        for piece in self._pieces:
            regions[self._root(piece)].append(piece)
        class_ids: list[int] = []
        merged: list[shapely.Polygon] = []
        for pieces in regions.values():
            # a region ending exactly at `above` touches the next row of blocks: it may go on
            if above is not None and max(self._pieces[p][2][3] for p in pieces) >= above:
                continue
            # without the vertices the seams left on straight edges: the region as found whole.
            # A tolerance of 0 removes only points on a straight line, which changes nothing of
            # the shape: no need for the topology checks, which cost a polygon with a hole per
            # building seconds (30 s for 65,000 holes)
            parts = shapely.simplify(shapely.get_parts(shapely.union_all([self._pieces[p][0] for p in pieces])), 0,
                                     preserve_topology=False)
            class_ids += [self._pieces[pieces[0]][1]] * len(parts)
            merged += list(parts)
            for p in pieces:
                del self._pieces[p]
        self._forget_released()
        return self._finalise(class_ids, merged)

    def _forget_released(self) -> None:
        """Drops the released pieces from the union-find and the edge lists. A root that is
        released went with all its pieces, so the parents of the pieces left are all held."""
        self._parent = {p: q for p, q in self._parent.items() if p in self._pieces}
        for ending in (self._ending_at_row, self._ending_at_col):
            for key in list(ending):
                ending[key] = [p for p in ending[key] if p in self._pieces]
                if not ending[key]:
                    del ending[key]

    def _finalise(self, class_ids: list[int], pixel_polygons: list[shapely.Polygon]) -> list[ClassPolygon]:
        """Pixel-space polygons -> their areas, filtered by area, in map coordinates, simplified."""
        self.regions.update(class_ids)
        if not pixel_polygons:
            return []
        # where a ring starts differs between a region found whole in one block and the same
        # region merged from pieces: the normal form starts it at the same vertex either way,
        # so the rows are the same whatever the blocks, and so are the sums of its area and
        # Douglas-Peucker's result, which depend on it (taken in pixels, so that a CRS's axes,
        # flipped or scaled, make no difference either)
        geometries = shapely.normalize(np.asarray(pixel_polygons, dtype=object))
        areas = self.ground.of_regions(geometries)
        for class_id, area in zip(class_ids, areas.tolist(), strict=True):
            self.area[class_id] += area
        keep = areas >= self.min_area
        geometries, areas = geometries[keep], areas[keep]
        class_ids = [class_id for class_id, kept in zip(class_ids, keep, strict=True) if kept]
        a, b, c, d, e, f = self.transform[:6]

        def to_map(xy: np.ndarray) -> np.ndarray:
            return np.column_stack((a * xy[:, 0] + b * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f))

        projected = self.crs is not None and self.crs.is_projected
        if self.simplify > 0 and not projected:
            # pixels: in degrees, a tolerance meant for metres would reduce every region to a
            # triangle or nothing
            geometries = shapely.simplify(geometries, self.simplify, preserve_topology=True)
        geometries = shapely.transform(geometries, to_map)
        if self.simplify > 0 and projected:
            _, metres_per_unit = self.crs.linear_units_factor
            geometries = shapely.simplify(geometries, self.simplify / metres_per_unit, preserve_topology=True)
        return [
            ClassPolygon(class_id, geometry, float(area))
            for class_id, geometry, area in zip(class_ids, geometries, areas, strict=True)
            if not geometry.is_empty
        ]


def crs_projjson(crs: CRS | None) -> dict | None:
    """The CRS as PROJJSON, as GeoParquet wants it; None (JSON null: "unknown") without one."""
    return None if crs is None else crs.to_dict(projjson=True)


def _geo_metadata(projjson: dict | None, bbox: Sequence[float] | None) -> dict:
    column: dict = {
        "encoding": "WKB",
        "geometry_types": ["Polygon"],
        # written even when None: GeoParquet reads a missing "crs" as OGC:CRS84 (lon/lat), and
        # null as "unknown", which is what a raster without a CRS has
        "crs": projjson,
        "covering": {"bbox": {name: ["bbox", name] for name in ("xmin", "ymin", "xmax", "ymax")}},
    }
    if bbox is not None:  # optional; an empty table has none
        column["bbox"] = [float(v) for v in bbox]
    return {"version": _GEO_METADATA_VERSION, "primary_column": "geometry", "columns": {"geometry": column}}


def polygons_table(
    rows: Iterable[ClassPolygon],
    *,
    run_id: str,
    image_id: str,
    class_names: Sequence[str],
    crs: CRS | None,
) -> pa.Table:
    """One raster's polygons as a table of POLYGONS_SCHEMA, with GeoParquet 1.1 metadata
    (key b"geo": WKB encoding, the raster's CRS as PROJJSON, the bounding box, and the `bbox`
    column as the geometry's covering)."""
    rows = list(rows)
    for r in rows:
        if not 0 <= r.class_id < len(class_names):
            raise ValueError(f"class_id {r.class_id} has no name: class_names has {len(class_names)} entries")
    geometries = np.asarray([r.geometry for r in rows], dtype=object)
    bounds = shapely.bounds(geometries).reshape(-1, 4)
    table = pa.table(
        {
            "run_id": [run_id] * len(rows),
            "image_id": [image_id] * len(rows),
            "class_id": [r.class_id for r in rows],
            "class_name": [class_names[r.class_id] for r in rows],
            "area": [r.area for r in rows],
            "geometry": shapely.to_wkb(geometries) if rows else [],
            "bbox": pa.StructArray.from_arrays([pa.array(bounds[:, i], pa.float64()) for i in range(4)],
                                               fields=list(POLYGONS_SCHEMA.field("bbox").type)),
        },
        schema=POLYGONS_SCHEMA,
    )
    bbox = shapely.total_bounds(geometries).tolist() if rows else None
    return table.replace_schema_metadata({b"geo": json.dumps(_geo_metadata(crs_projjson(crs), bbox)).encode()})


class PolygonsWriter:
    """One raster's polygons written to a local GeoParquet file as they are found, so memory
    holds a row group of them, whatever the raster's number of regions.

    Rows gather into row groups of `row_group_rows` in a scratch Parquet file beside `path`;
    `close` copies those, one at a time, into `path` under the GeoParquet metadata, whose
    bounding box is known only once every row is (a Parquet file's metadata is written once,
    in its footer, and GeoParquet readers take `geo` from the schema written at its start).
    """

    def __init__(self, path: str, *, run_id: str, image_id: str, class_names: Sequence[str], crs: CRS | None,
                 row_group_rows: int = 1 << 16) -> None:
        self.path, self._rows_path = path, f"{path}.rows"
        self._table_fields = {"run_id": run_id, "image_id": image_id, "class_names": class_names, "crs": crs}
        self._crs, self._row_group_rows = crs, row_group_rows
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._bounds: list[float] | None = None
        self.rows = 0

    def write(self, rows: Sequence[ClassPolygon]) -> None:
        if not rows:
            return
        table = polygons_table(rows, **self._table_fields)
        box = json.loads(table.schema.metadata[b"geo"])["columns"]["geometry"]["bbox"]
        self._bounds = box if self._bounds is None else [
            min(self._bounds[0], box[0]), min(self._bounds[1], box[1]),
            max(self._bounds[2], box[2]), max(self._bounds[3], box[3]),
        ]
        self._pending.append(table.replace_schema_metadata(None))
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        if self._pending_rows >= self._row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._rows_path, POLYGONS_SCHEMA)
        self._writer.write_table(pa.concat_tables(self._pending), row_group_size=self._pending_rows)
        self._pending, self._pending_rows = [], 0

    def close(self) -> int:
        """Finish `path` and return its number of rows; with none, no file is written."""
        if self.rows == 0:
            return 0
        self._flush()
        assert self._writer is not None
        self._writer.close()
        geo = _geo_metadata(crs_projjson(self._crs), self._bounds)
        schema = POLYGONS_SCHEMA.with_metadata({b"geo": json.dumps(geo).encode()})
        gathered = pq.ParquetFile(self._rows_path)
        with pq.ParquetWriter(self.path, schema) as out:
            for index in range(gathered.num_row_groups):
                out.write_table(gathered.read_row_group(index))
        os.remove(self._rows_path)
        return self.rows
