"""Georeferenced rasters read by window: band choice, one stretch per raster (from overviews
or sampled windows), windows equal to the same region of the whole array, nodata as invalid
pixels, ranged reads on S3, errors named, and output blocks whose sliding-window logits equal
those of the whole raster."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from rasterio.enums import Resampling
from rasterio.transform import Affine
from rasterio.windows import Window
from torch import nn

from pipeline.decode import ImageDecodeError
from pipeline.inference import Segmenter, SlidingWindow
from pipeline.models import ModelMeta, Preprocessing
from pipeline.rasters import (
    Block,
    band_colour_table,
    band_limits,
    block_windows,
    choose_bands,
    is_georeferenced,
    open_raster,
    plan_blocks,
    read_rgb,
)
from pipeline.storage import Location, StorageUnavailableError, is_raster_key, open_location
from pipeline.windows import ceil_to, window_starts

UTM_16N = "EPSG:32616"
TRANSFORM = Affine(0.5, 0.0, 733601.0, 0.0, -0.5, 3725139.0)


def _write(path: Path, array: np.ndarray, *, nodata: float | None = None, block: int = 128, **options) -> Path:
    """(bands, h, w) array as a tiled GeoTIFF with a CRS and transform."""
    count, height, width = array.shape
    with rasterio.open(
        path, "w", driver="GTiff", width=width, height=height, count=count, dtype=array.dtype,
        crs=UTM_16N, transform=TRANSFORM, nodata=nodata, tiled=True, blockxsize=block, blockysize=block, **options,
    ) as dst:
        dst.write(array)
    return path


def _mosaic(shared_data: Path, tiles: int, size: int) -> np.ndarray:
    """(3, tiles*size, tiles*size) uint8: LoveDA crops laid out tiles x tiles, each a different
    crop, so any misplaced window shows."""
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((shared_data / "aerial/loveda/images").iterdir())]
    rows = []
    for r in range(tiles):
        row = []
        for c in range(tiles):
            image = images[(r * tiles + c) % len(images)]
            y, x = (r * 97) % (image.shape[0] - size), (c * 131) % (image.shape[1] - size)
            row.append(image[y : y + size, x : x + size])
        rows.append(np.concatenate(row, axis=1))
    return np.ascontiguousarray(np.moveaxis(np.concatenate(rows, axis=0), -1, 0))


def test_raster_keys_by_extension() -> None:
    assert is_raster_key("a/b/scene.TIF") and is_raster_key("cog.tiff")
    assert not is_raster_key("tile.png") and not is_raster_key("photo.jpg") and not is_raster_key("tif")


def test_spacenet_geotiff_read_by_window(shared_data: Path) -> None:
    folder = shared_data / "aerial/geotiff"
    with rasterio.open(folder / "sample_geotiff.tif") as src:
        whole = src.read(1)
        nodata = src.nodata
    with open_raster(open_location(str(folder)), "sample_geotiff.tif") as ds:
        assert is_georeferenced(ds)
        assert ds.dtypes == ("uint16",) and ds.overviews(1) == []
        bands = choose_bands(ds, None)
        assert bands == (1, 1, 1)
        limits = band_limits(ds, bands)
        # no overviews: 16 windows of 256x256 at 0, 215, 429, 644 along each axis
        starts = [0, 215, 429, 644]
        sample = np.concatenate([whole[y : y + 256, x : x + 256].ravel() for y in starts for x in starts])
        expected = np.percentile(sample[sample != nodata].astype(np.float64), (2, 98))
        np.testing.assert_allclose(limits, np.tile(expected, (3, 1)))
        window = Window(100, 200, 300, 250)
        rgb, valid = read_rgb(ds, window, bands, limits)
    assert rgb.shape == (250, 300, 3) and rgb.dtype == np.uint8 and valid.shape == (250, 300) and valid.dtype == bool
    raw = whole[200:450, 100:400].astype(np.float64)
    np.testing.assert_array_equal(valid, raw != nodata)
    low, high = expected
    scaled = np.clip((raw - low) / (high - low) * 255 + 0.5, 0, 255).astype(np.uint8)
    scaled[~valid] = 0
    # float32 arithmetic in read_rgb against float64 here: at most one level apart
    assert np.abs(rgb[..., 0].astype(int) - scaled).max() <= 1
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()


def test_mosaic_read_by_window_equals_the_whole_array(shared_data: Path, tmp_path: Path) -> None:
    whole = _mosaic(shared_data, tiles=4, size=256)  # 1024 x 1024 RGB
    whole[:, 40:170, 300:620] = 0  # a nodata region
    whole[0, 600:610, 600:610] = 0  # red alone at 0 there: still valid data
    _write(tmp_path / "mosaic.tif", whole, nodata=0, photometric="RGB")
    expected_valid = (whole != 0).any(axis=0)
    with open_raster(open_location(str(tmp_path)), "mosaic.tif") as ds:
        assert is_georeferenced(ds)
        bands = choose_bands(ds, None)
        assert bands == (1, 2, 3)
        limits = band_limits(ds, bands)
        np.testing.assert_array_equal(limits, [[0, 255]] * 3)
        blocks = plan_blocks(ds.height, ds.width, crop=384, stride=256, block=512, margin=32, cell=1)
        assert len(blocks) == 4
        for block in blocks:
            for window in (block.core, block.extent):
                rgb, valid = read_rgb(ds, window, bands, limits)
                rows, cols = window.toslices()
                np.testing.assert_array_equal(rgb, np.moveaxis(whole[:, rows, cols], 0, -1))
                np.testing.assert_array_equal(valid, expected_valid[rows, cols])
        # bands in another order (read, then reordered), and in an order of their own
        window = Window(37, 11, 300, 200)
        rows, cols = window.toslices()
        for order in ((3, 2, 1), (2, 2, 1)):
            rgb, valid = read_rgb(ds, window, order, limits)
            assert rgb.flags.c_contiguous and rgb.shape == (200, 300, 3)
            np.testing.assert_array_equal(rgb, np.moveaxis(whole[[b - 1 for b in order]][:, rows, cols], 0, -1))
        rgb, valid = read_rgb(ds, Window(300, 40, 320, 130), bands, limits)
        assert not valid.any() and not rgb.any()
        assert read_rgb(ds, Window(600, 600, 10, 10), bands, limits)[1].all()
        # given bands, one shown as grey, checked against the raster
        assert choose_bands(ds, [2]) == (2, 2, 2) and choose_bands(ds, [3, 2, 1]) == (3, 2, 1)
        with pytest.raises(ImageDecodeError, match=r"--bands .*\[4\] not in the raster, which has 3") as missing:
            choose_bands(ds, [4, 2, 1])
        assert missing.value.reason == "missing_bands"
        with pytest.raises(ValueError, match="--bands takes 1 or 3"):
            choose_bands(ds, [1, 2])
        with pytest.raises(ValueError, match="not a whole-pixel window inside"):
            read_rgb(ds, Window(1000, 0, 100, 10), bands, limits)


def test_compressed_tiles_are_decoded_by_gdal_threads_into_the_same_pixels(shared_data: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # a window over many deflate tiles: GDAL decompresses them side by side, and reads their
    # bytes through the retried file object from its worker threads
    whole = _mosaic(shared_data, tiles=4, size=256)
    _write(tmp_path / "deflate.tif", whole, compress="deflate", photometric="RGB", block=64)
    monkeypatch.delenv("GDAL_NUM_THREADS", raising=False)
    location = Location(fs=DroppingFileSystem(), root=str(tmp_path), url=str(tmp_path))
    with open_raster(location, "deflate.tif", threads=4) as ds:
        assert rasterio.env.getenv()["GDAL_NUM_THREADS"] == 4
        bands = choose_bands(ds, None)
        limits = band_limits(ds, bands)
        rgb, valid = read_rgb(ds, Window(37, 5, 900, 1000), bands, limits)
        np.testing.assert_array_equal(rgb, np.moveaxis(whole[:, 5:1005, 37:937], 0, -1))
        assert valid.all()
        # storage lost under GDAL's threads: the storage's error, not a corrupt file
        monkeypatch.setattr("pipeline.storage.time.sleep", lambda seconds: None)
        monkeypatch.setattr(Dropping, "down", True)
        with pytest.raises(StorageUnavailableError, match="ConnectionError"):
            read_rgb(ds, Window(0, 0, 1024, 1024), bands, limits)
    # one thread (decode tasks, evaluation, a replica per core) sets none, and an operator's
    # GDAL_NUM_THREADS wins over a replica's
    with open_raster(open_location(str(tmp_path)), "deflate.tif"):
        assert "GDAL_NUM_THREADS" not in rasterio.env.getenv()
    monkeypatch.setenv("GDAL_NUM_THREADS", "1")
    with open_raster(open_location(str(tmp_path)), "deflate.tif", threads=4):
        assert "GDAL_NUM_THREADS" not in rasterio.env.getenv()


def test_float_nodata_and_nan_are_invalid(tmp_path: Path) -> None:
    values = np.linspace(0.0, 1.0, 4 * 64 * 64, dtype=np.float32).reshape(4, 64, 64)
    values[:, :8, :] = -9999.0  # nodata in every band
    values[1, 20, 20] = np.nan
    _write(tmp_path / "float.tif", values, nodata=-9999.0, block=32)
    with open_raster(open_location(str(tmp_path)), "float.tif") as ds:
        bands = choose_bands(ds, None)
        assert bands == (1, 2, 3)  # four bands without colour interpretation: the first three
        limits = band_limits(ds, bands)
        rgb, valid = read_rgb(ds, Window(0, 0, 64, 64), bands, limits)
    valid_expected = np.ones((64, 64), bool)
    valid_expected[:8] = False
    valid_expected[20, 20] = False
    np.testing.assert_array_equal(valid, valid_expected)
    # one sample window (the raster is smaller than 256x256), each band's valid values only
    bands_valid = [v[8:][np.isfinite(v[8:])] for v in values[:3]]
    assert [v.size for v in bands_valid] == [56 * 64, 56 * 64 - 1, 56 * 64]
    np.testing.assert_allclose(limits, [np.percentile(v.astype(np.float64), (2, 98)) for v in bands_valid])
    assert not rgb[~valid].any() and rgb[valid].any()


def test_a_colour_mapped_band_is_read_in_its_colours_as_pillow_shows_a_palette_png(shared_data: Path,
                                                                                   tmp_path: Path) -> None:
    """A paletted GeoTIFF (one band of colour indexes and its colour table) is read as the RGB
    its table gives, the pixels Pillow gives for the same image as a palette PNG, not as grey
    indexes; nodata, and the table's transparent colours, are invalid."""
    quantised = Image.fromarray(np.moveaxis(_mosaic(shared_data, 2, 96), 0, -1)).quantize(colors=200)
    indexes = np.asarray(quantised).copy()
    indexes[:5] = 250  # nodata: an index the table leaves out
    indexes[5:8] = 201  # a colour made transparent below: no data either
    quantised.putdata(indexes.ravel())
    colours = np.array(quantised.getpalette()[: 3 * 200], dtype=np.uint8).reshape(200, 3)
    path = _write(tmp_path / "paletted.tif", indexes[None], nodata=250, block=64, photometric="palette")
    with rasterio.open(path, "r+") as dst:
        dst.write_colormap(1, {i: (*map(int, colours[i]), 255) for i in range(200)} | {201: (9, 9, 9, 255)})
    with open_raster(open_location(str(tmp_path)), "paletted.tif") as ds:
        bands = choose_bands(ds, None)
        table = band_colour_table(ds, bands)
        assert bands == (1, 1, 1) and table is not None and table.shape == (256, 4)
        table[201, 3] = 0  # transparent, as a VRT's or PNG's table can say (a GeoTIFF's has no alpha)
        rgb, valid = read_rgb(ds, Window(32, 0, 128, 160), bands, None, colour_table=table)
        grey, _ = read_rgb(ds, Window(32, 0, 128, 160), bands, band_limits(ds, bands))
    shown = np.asarray(quantised.convert("RGB"))[:160, 32:160]
    assert not valid[:8].any() and valid[8:].all()
    np.testing.assert_array_equal(rgb[8:], shown[8:])
    assert not rgb[:8].any()
    assert not np.array_equal(grey[8:], shown[8:])  # what reading the indexes as grey gave


def test_limits_come_from_the_smallest_overview_of_enough_pixels(shared_data: Path, tmp_path: Path) -> None:
    """Overviews of 450, 225 and 113 pixels a side: the smallest of at least 256x256 pixels
    is the first, 1/2. The smaller ones average the tails away."""
    with rasterio.open(shared_data / "aerial/geotiff/sample_geotiff.tif") as src:
        spacenet = src.read()
    path = _write(tmp_path / "with_overviews.tif", spacenet, nodata=0)
    plain = _write(tmp_path / "plain.tif", spacenet, nodata=0)
    with rasterio.open(path, "r+") as dst:
        dst.build_overviews([2, 4, 8], Resampling.average)
    with rasterio.open(path, overview_level=0) as overview:  # 1/2
        assert overview.shape == (450, 450)
        values, masks = overview.read(1), overview.read_masks(1)
    expected = np.percentile(values[masks != 0].astype(np.float64), (2, 98))
    location = open_location(str(tmp_path))
    with open_raster(location, path.name) as ds, open_raster(location, plain.name) as ds_plain:
        assert ds.overviews(1) == [2, 4, 8]
        limits = band_limits(ds, (1, 1, 1))
        sampled = band_limits(ds_plain, (1, 1, 1))
    np.testing.assert_allclose(limits, np.tile(expected, (3, 1)))
    assert not np.allclose(limits, sampled)  # the overview was what was read, not windows


def test_overviews_of_a_few_pixels_are_not_the_limits(tmp_path: Path) -> None:
    """Overviews down to 1x1 (factors 2 to 2048): the smallest holds the raster's mean alone,
    and its limits would stretch the image to two grey levels."""
    rng = np.random.default_rng(0)
    values = rng.integers(200, 1800, size=(1, 2048, 2048), dtype=np.uint16)
    path = _write(tmp_path / "deep.tif", values, nodata=0, block=256)
    with rasterio.open(path, "r+") as dst:
        dst.build_overviews([2 ** k for k in range(1, 12)], Resampling.average)
    with open_raster(open_location(str(tmp_path)), path.name) as ds:
        assert min(ds.overviews(1)) == 2 and max(ds.overviews(1)) == 2048
        low, high = band_limits(ds, (1, 1, 1))[0]
    # the 1/8 overview's values (256x256) are means of 64 draws: their spread is an eighth of
    # the draws', yet far from a single value
    assert high - low > 200, (low, high)


def test_limits_of_a_swath_the_first_windows_miss(tmp_path: Path, monkeypatch) -> None:
    """Valid data only in rows 300 to 1200 of 4096, no overviews: the 4x4 windows (rows 0,
    1280, 2560 and 3840 on) hold none of it, and the finer sample finds it. The finer sample
    (a read per window, a range request each on object storage) is taken only then."""
    import pipeline.rasters

    windows_read: list[str] = []
    read = pipeline.rasters.read_named

    def counted(dataset, what, *args, **kwargs):
        if what.startswith("window "):
            windows_read.append(what)
        return read(dataset, what, *args, **kwargs)

    monkeypatch.setattr(pipeline.rasters, "read_named", counted)
    rng = np.random.default_rng(1)
    values = np.zeros((1, 4096, 4096), dtype=np.uint16)
    values[0, 300:1200] = rng.integers(300, 1800, size=(900, 4096))
    path = _write(tmp_path / "swath.tif", values, nodata=0, block=256)
    with open_raster(open_location(str(tmp_path)), path.name) as ds:
        assert not ds.overviews(1)
        limits = band_limits(ds, (1, 1, 1))
    strip = values[0, 300:1200].astype(np.float64)
    np.testing.assert_allclose(limits[0], np.percentile(strip, (2, 98)), rtol=0.03)
    assert len(windows_read) == 16 + 32 * 32
    windows_read.clear()
    values[0] = rng.integers(300, 1800, size=(4096, 4096))  # valid everywhere: the first 16 windows do
    path = _write(tmp_path / "full.tif", values, nodata=0, block=256)
    with open_raster(open_location(str(tmp_path)), path.name) as ds:
        band_limits(ds, (1, 1, 1))
    assert len(windows_read) == 16


def test_a_plain_tiff_opens_without_rasterio_s_warning(shared_data: Path) -> None:
    """Plain TIFFs are opened to ask whether they are georeferenced: that is no news to
    print from every worker."""
    folder = shared_data / "aerial" / "geotiff"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with open_raster(open_location(str(folder)), "sample_fp_mask.tif") as ds:
            assert not is_georeferenced(ds)


def test_a_raster_with_nodata_and_alpha_reads_without_rasterio_s_warning(tmp_path: Path) -> None:
    """GDAL's masks follow the nodata value where a raster also has an alpha band, as the
    README says; rasterio's NodataShadowWarning about it would print from every worker."""
    rgba = np.full((4, 64, 64), 255, dtype=np.uint16)
    rgba[:3] = np.arange(64, dtype=np.uint16) * 10
    rgba[:3, :, :8] = 0  # nodata in every band
    path = _write(tmp_path / "rgba.tif", rgba, nodata=0, block=64, photometric="RGB", alpha="YES")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with open_raster(open_location(str(tmp_path)), path.name) as ds:
            bands = choose_bands(ds, None)
            _, valid = read_rgb(ds, Window(0, 0, 64, 64), bands, band_limits(ds, bands))
    assert not valid[:, :8].any() and valid[:, 8:].all()


def test_errors_are_named(tmp_path: Path, shared_data: Path) -> None:
    (tmp_path / "notes.tif").write_bytes(b"not a raster at all" * 10)
    data = (shared_data / "aerial/geotiff/sample_geotiff.tif").read_bytes()
    (tmp_path / "truncated.tif").write_bytes(data[: len(data) // 2])
    location = open_location(str(tmp_path))
    with pytest.raises(ImageDecodeError, match="not a raster GDAL can read") as caught, open_raster(location, "notes.tif"):
        pass
    assert caught.value.reason == "not_an_image"
    with pytest.raises(FileNotFoundError, match=r"missing\.tif: no such object"), open_raster(location, "missing.tif"):
        pass
    # the header is in the first half; the last rows are not
    with pytest.raises(ImageDecodeError, match="cannot read window") as caught, open_raster(location, "truncated.tif") as ds:
        read_rgb(ds, Window(0, 800, 900, 100), (1, 1, 1), np.array([[0, 1000]] * 3))
    assert caught.value.reason == "corrupt"
    # GDAL's reason, not rasterio's "Read failed. See previous exception for details."
    assert "previous exception" not in str(caught.value) and "IReadBlock failed" in str(caught.value)


class Dropping:
    """A local file whose reads fail while the storage is "down"."""

    down = False

    def __init__(self, file) -> None:
        self.file = file

    def read(self, size: int = -1) -> bytes:
        if Dropping.down:
            raise ConnectionError("connection reset by peer")
        return self.file.read(size)

    def __getattr__(self, name: str):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


class DroppingFileSystem(LocalFileSystem):
    def _open(self, path, mode="rb", **kwargs):
        return Dropping(super()._open(path, mode, **kwargs))


def test_a_storage_failure_is_not_reported_as_a_corrupt_file(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pipeline.storage.time.sleep", lambda seconds: None)  # the retries' backoff
    folder = str(shared_data / "aerial/geotiff")
    location = Location(fs=DroppingFileSystem(), root=folder, url=folder)
    monkeypatch.setattr(Dropping, "down", True)
    with pytest.raises(StorageUnavailableError, match="after 5 attempts"), open_raster(location, "sample_geotiff.tif"):
        pass
    monkeypatch.setattr(Dropping, "down", False)
    with open_raster(location, "sample_geotiff.tif") as ds:
        monkeypatch.setattr(Dropping, "down", True)
        with pytest.raises(StorageUnavailableError, match="ConnectionError"):
            read_rgb(ds, Window(0, 600, 900, 300), (1, 1, 1), np.array([[0, 1000]] * 3))


def test_raster_on_s3_is_read_by_ranges(shared_data: Path, tmp_path: Path, s3_bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    whole = _mosaic(shared_data, tiles=8, size=256)  # 2048 x 2048 RGB, 12 MiB uncompressed
    _write(tmp_path / "big.tif", whole, block=256, photometric="RGB")
    bucket, options = s3_bucket
    location = open_location(f"{bucket}/scenes", options)
    location.fs.put_file(str(tmp_path / "big.tif"), location.path("a/big.tif"))
    size = location.fs.size(location.path("a/big.tif"))
    fetched: list[int] = []
    fetch_range = s3fs.core.S3File._fetch_range

    def counting(self, start: int, end: int) -> bytes:
        data = fetch_range(self, start, end)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counting)
    with open_raster(location, "a/big.tif") as ds:
        assert is_georeferenced(ds) and ds.shape == (2048, 2048)
        rgb, valid = read_rgb(ds, Window(1024, 1024, 256, 256), (1, 2, 3), np.array([[0, 255]] * 3))
    np.testing.assert_array_equal(rgb, np.moveaxis(whole[:, 1024:1280, 1024:1280], 0, -1))
    assert valid.all()
    # two ranged GETs, the header's and the tile's (192 KiB), each with fsspec's 1 MiB read-ahead:
    # under a fifth of the object
    assert len(fetched) == 2 and sum(fetched) < 192 * 1024 + 2 * 1024 * 1024 + 64 * 1024, fetched
    assert sum(fetched) < size / 5
    location.fs.pipe_file(location.path("a/notes.tif"), b"hello")
    with pytest.raises(ImageDecodeError) as caught, open_raster(location, "a/notes.tif"):
        pass
    assert caught.value.reason == "not_an_image"
    with pytest.raises(FileNotFoundError), open_raster(location, "a/missing.tif"):
        pass


SIZES = [
    # height, width, crop, stride, block, margin, cell
    (1000, 777, 512, 384, 1024, 0, 1),
    (1000, 777, 512, 384, 1024, 64, 1),
    (300, 200, 512, 384, 1024, 16, 1),  # smaller than one crop
    (2600, 2049, 512, 384, 1000, 200, 1),
    (1537, 1000, 256, 256, 700, 0, 1),  # stride == crop: windows do not overlap
    (1001, 999, 300, 97, 250, 500, 1),  # margin wider than a block
    (1001, 777, 512, 384, 1024, 0, 8),  # logits at 1/8: the raster padded to whole cells
    (2600, 2049, 512, 384, 1000, 128, 8),
    (1537, 1001, 256, 128, 700, 0, 16),
]


@pytest.mark.parametrize(("height", "width", "crop", "stride", "block", "margin", "cell"), SIZES)
def test_blocks_tile_the_raster_and_read_whole_grid_windows(height, width, crop, stride, block, margin, cell) -> None:
    blocks = plan_blocks(height, width, crop=crop, stride=stride, block=block, margin=margin, cell=cell)
    covered = np.zeros((height, width), np.int8)
    for b in blocks:
        covered[b.core.toslices()] += 1
    assert (covered == 1).all()
    assert blocks == sorted(blocks, key=lambda b: (b.core.row_off, b.core.col_off))
    # the Segmenter's grid of the whole raster, padded at its end to whole cells
    padded_h, padded_w = ceil_to(height, cell), ceil_to(width, cell)
    size_h, size_w = min(crop, padded_h), min(crop, padded_w)
    grid = list(itertools.product(window_starts(padded_h, size_h, stride), window_starts(padded_w, size_w, stride)))
    assert all(y % cell == 0 and x % cell == 0 for y, x in grid)
    reach = margin + (cell if cell > 1 else 0)  # the core's resize from the grid takes the next cell
    for b in blocks:
        core, extent = b.core, b.extent
        assert extent.row_off >= 0 and extent.row_off + extent.height <= height
        assert extent.col_off >= 0 and extent.col_off + extent.width <= width
        # the core widened by the margin, clipped to the raster, lies in the extent
        assert extent.row_off <= max(0, core.row_off - margin)
        assert extent.row_off + extent.height >= min(height, core.row_off + core.height + margin)
        assert extent.col_off <= max(0, core.col_off - margin)
        assert extent.col_off + extent.width >= min(width, core.col_off + core.width + margin)
        inside = {
            (y, x) for y, x in grid
            if y >= extent.row_off and y + size_h <= ceil_to(extent.row_off + extent.height, cell)
            and x >= extent.col_off and x + size_w <= ceil_to(extent.col_off + extent.width, cell)
        }
        touching = {
            (y, x) for y, x in grid
            if y < core.row_off + core.height + reach and y + size_h > core.row_off - reach
            and x < core.col_off + core.width + reach and x + size_w > core.col_off - reach
        }
        assert touching <= inside
        # the sliding windows run inside the extent alone are the grid windows that lie in it
        assert set(block_windows(b, crop=crop, stride=stride, cell=cell)) == inside


def test_plan_blocks_checks_its_arguments() -> None:
    assert plan_blocks(10, 10, crop=8, stride=8, block=100, margin=0, cell=1) == [Block(Window(0, 0, 10, 10), Window(0, 0, 10, 10))]
    with pytest.raises(ValueError, match="stride <= crop"):
        plan_blocks(100, 100, crop=8, stride=9, block=10, margin=0, cell=1)
    with pytest.raises(ValueError, match="margin >= 0"):
        plan_blocks(100, 100, crop=8, stride=8, block=10, margin=-1, cell=1)
    with pytest.raises(ValueError, match="whole numbers of cells"):
        plan_blocks(100, 100, crop=12, stride=8, block=10, margin=0, cell=8)


class Padded(nn.Module):
    """A 5x5 convolution with zero padding: a pixel's logits depend on where it sits in its
    window, so sliding windows differ from whole-image inference, and a block reproduces the
    raster's logits only if it runs the raster's own windows."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 5, padding=2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv(x) * 4}


def test_block_logits_over_the_core_equal_the_whole_raster() -> None:
    height, width, crop, stride = 150, 131, 32, 20
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    meta = ModelMeta.default("test", 4, preprocessing=Preprocessing())
    segmenter = Segmenter(Padded(), meta, device="cpu", sliding_window=SlidingWindow((crop, crop), (stride, stride), 16), precision="fp32")
    whole = segmenter.predict([image])[0]
    blocks = plan_blocks(height, width, crop=crop, stride=stride, block=48, margin=6, cell=1)
    assert len(blocks) == 4 * 3  # cores of 40 (two strides), the last ones longer
    for b in blocks:
        (er, ec), (cr, cc) = b.extent.toslices(), b.core.toslices()
        probs = segmenter.predict([image[:, er, ec]])[0]
        inner = (slice(cr.start - er.start, cr.stop - er.start), slice(cc.start - ec.start, cc.stop - ec.start))
        torch.testing.assert_close(probs[:, inner[0], inner[1]], whole[:, cr, cc], atol=1e-5, rtol=1e-5)
    # the test can fail: the core widened by the margin alone runs other windows
    b = blocks[4]  # the second row's middle block: rows and columns 40 to 80
    rows = slice(b.core.row_off - 6, b.core.row_off + b.core.height + 6)
    cols = slice(b.core.col_off - 6, b.core.col_off + b.core.width + 6)
    naive = segmenter.predict([image[:, rows, cols]])[0][:, 6:-6, 6:-6]
    assert not torch.allclose(naive, whole[:, b.core.toslices()[0], b.core.toslices()[1]], atol=1e-3)
