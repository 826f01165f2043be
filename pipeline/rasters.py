"""Georeferenced rasters (GeoTIFF, COG) read by window, so memory stays flat whatever the
raster's size: 900 pixels a side or 50,000.

`open_raster` opens an object through its location's fsspec filesystem (local disk and S3
alike, with the same storage options): GDAL reads the header and then only the tiles or strips
of the windows asked for, as ranged reads of fsspec's file object; the object is never
downloaded whole. `read_rgb` reads one window as 8-bit RGB with its valid-pixel mask; a
colour-mapped band is shown through its colour table (`band_colour_table`), as Pillow shows a
palette PNG.

Deep samples (uint16, float) are stretched between ONE set of per-band limits for the whole
raster (`band_limits`: the 2nd and 98th percentiles, as `pipeline.decode` does for a whole
image), never per window: limits that change from window to window draw seams in the output.

`plan_blocks` splits a raster into output blocks, each with the extent to read so that its
sliding-window logits are exactly those of the whole raster.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NodataShadowWarning, NotGeoreferencedWarning, RasterioError
from rasterio.io import DatasetReader
from rasterio.transform import Affine
from rasterio.windows import Window

from .decode import ImageDecodeError, stretch_limits
from .storage import Location, retry_io
from .windows import padded_windows

log = logging.getLogger(__name__)

# fsspec's file reads this much past each read and keeps only that one block: a window's tiles
# lie one after another in the file, row by row, so a window row is usually one request, and
# memory holds one block whatever the object's size (s3fs's default block is 50 MiB, which
# would fetch most rasters whole on their first read)
_READ_BLOCK = 1 << 20
# the sample `band_limits` takes when no small overview exists: up to a 4x4 grid of windows;
# where none of them holds valid data (a swath across a mostly empty raster), a 32x32 grid of
# small ones, the same number of pixels spread finer
_SAMPLE_GRIDS = ((4, 256), (32, 32))
# the overview read whole for the limits: the smallest with at least the first many pixels
# (an overview of a few pixels averages the tails away: a 1x1 one is the raster's mean), at
# most the second; without one, windows are sampled
_MIN_OVERVIEW_PIXELS = 256 * 256
_MAX_OVERVIEW_PIXELS = 1024 * 1024


class _Opener:
    """The file opener handed to rasterio (`rasterio.open(path, opener=...)`): fsspec file
    objects for the raster's own object, with every read retried (`retry_io`).

    GDAL calls it from C, where a Python error is lost (GDAL sees only a failed call); so the
    first error is kept in `failure`, and `open_raster` and the readers raise it in place of
    GDAL's message: a storage outage is not a corrupt file.

    Only the raster's own path is served. rasterio probes a new opener with a dummy path and
    GDAL looks for sidecar files (.aux.xml, .msk, .ovr) next to the raster: on object storage
    each would be one more request per raster. COGs hold their overviews and masks inside.
    """

    def __init__(self, location: Location, key: str) -> None:
        self.fs = location.fs
        self.path = location.path(key)
        self.uri = location.uri(key)
        self.failure: BaseException | None = None

    def __call__(self, path: str, mode: str = "rb", **kwargs: Any) -> _RetriedFile:
        if path != self.path:
            raise FileNotFoundError(path)
        try:
            file = retry_io(self.uri, self.fs.open, path, mode, block_size=_READ_BLOCK, cache_type="readahead")
        except BaseException as err:
            self.failure = self.failure or err
            raise
        return _RetriedFile(file, self)

    def raise_failure(self, cause: BaseException | None = None) -> None:
        """Raise the error met under GDAL, if any (a missing object as FileNotFoundError)."""
        if isinstance(self.failure, FileNotFoundError):
            raise FileNotFoundError(f"{self.uri}: no such object") from self.failure
        if self.failure is not None:
            raise self.failure from cause


class _RetriedFile:
    """An fsspec file object whose reads are retried on transient errors, one read at a time
    (a failed read leaves fsspec's position where it was).

    A read never raises into GDAL: rasterio 1.4 hands GDAL a Python exception in `read` as a
    read of (size_t)-1 bytes, which aborts the whole process (std::length_error) when it
    happens while the header is read. A failed read returns no bytes instead, a short read
    that GDAL reports as an error, and the error is kept for the opener to raise.
    """

    def __init__(self, file: Any, opener: _Opener) -> None:
        self._file = file
        self._opener = opener

    def read(self, size: int = -1) -> bytes:
        try:
            return retry_io(self._opener.uri, self._file.read, size)
        except BaseException as err:  # a DecodeTimeout or KeyboardInterrupt too: raised later
            self._opener.failure = self._opener.failure or err
            return b""

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> _RetriedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# the opener of each open dataset, for the readers to find the errors met under GDAL
_OPENERS: weakref.WeakKeyDictionary[DatasetReader, _Opener] = weakref.WeakKeyDictionary()


# GDAL's block cache, process-wide, defaults to 5% of RAM (6 GB on a 128 GB node) and holds
# tiles read and written until it is full: the memory a mask takes would grow with the raster up to
# that. 128 MiB holds three rows of 512-px tiles of a 50,000-px-wide raster (25 MiB a row), so
# windows written row by row, up to 1024 px high, fill each tile before it is flushed (a tile
# flushed half-written is read back, and its compressed copy written twice)
GDAL_CACHE_BYTES = 128 << 20


def gdal_env(threads: int = 1) -> rasterio.Env:
    """The GDAL settings every raster read and mask write runs under: GDAL_CACHE_BYTES, and
    `threads` for one read of several compressed tiles (decompressed side by side) and for a
    COG's compression and overviews. A replica gives its own torch threads: it reads and
    writes between its forwards, when they wait (a 4096 x 4096 raster's stage in one process:
    1.89 to 1.99 s against 2.08 to 2.14 s at one thread, BENCHMARKS.md); a replica per core
    gives 1, and so does everything else. GDAL_NUM_THREADS set in the environment wins."""
    options: dict[str, Any] = {"GDAL_CACHEMAX": GDAL_CACHE_BYTES}
    if threads > 1 and "GDAL_NUM_THREADS" not in os.environ:
        options["GDAL_NUM_THREADS"] = threads
    return rasterio.Env(**options)


@contextmanager
def open_raster(location: Location, key: str, *, threads: int = 1) -> Iterator[DatasetReader]:
    """The raster at `key` as an open rasterio dataset, read through `location.fs` by ranged
    reads: opening reads the header only, and each `read(window=...)` the tiles it needs, with
    `threads` decompressing them (`gdal_env`).

    With several threads GDAL still reads the bytes through the file object one call at a time
    (rasterio's opener has no positioned reads, so GDAL serialises them under one lock) from
    its worker threads: `_Opener` and `_RetriedFile` keep no per-thread state.

    Raises ImageDecodeError ("not_an_image" for a file GDAL does not recognise, "corrupt" for
    one it cannot parse), FileNotFoundError for a missing object, and the storage error
    itself (StorageUnavailableError after the retries) when storage fails.
    """
    with gdal_env(threads):
        yield from _open(location, key)


def _open(location: Location, key: str) -> Iterator[DatasetReader]:
    opener = _Opener(location, key)
    try:
        # a plain TIFF or PNG (a frame, a ground-truth mask) is opened here too, to ask
        # `is_georeferenced`: rasterio's warning about it would print from every worker
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            dataset = rasterio.open(opener.path, opener=opener)
    except RasterioError as err:
        opener.raise_failure(err)
        if "not recognized as being in a supported file format" in str(err):
            raise ImageDecodeError("not_an_image", f"{opener.uri}: not a raster GDAL can read") from err
        raise ImageDecodeError("corrupt", f"{opener.uri}: cannot open the raster: {err}") from err
    try:
        opener.raise_failure()  # a short read GDAL got past
        _OPENERS[dataset] = opener
        yield dataset
    finally:
        dataset.close()


def read_named(dataset: DatasetReader, what: str, read: Any, *args: Any, **kwargs: Any) -> np.ndarray:
    """`read(*args, **kwargs)` (a dataset's `read` or `read_masks`), with GDAL's failures
    named: the error met under GDAL, else ImageDecodeError("corrupt")."""
    opener = _OPENERS.get(dataset)
    try:
        with warnings.catch_warnings():
            # a raster with a nodata value and an alpha band: GDAL's masks follow the nodata
            # value (documented in the README); rasterio's warning would print from every worker
            warnings.simplefilter("ignore", NodataShadowWarning)
            result = read(*args, **kwargs)
    except RasterioError as err:
        if opener is not None:
            opener.raise_failure(err)
        # rasterio says only "Read failed. See previous exception for details": that one is GDAL's
        raise ImageDecodeError("corrupt", f"{_name(dataset)}: cannot read {what}: {err.__cause__ or err}") from err
    if opener is not None:
        opener.raise_failure()  # a short read GDAL got past: the pixels may be wrong
    return result


def _name(dataset: DatasetReader) -> str:
    """The raster's URI for messages (GDAL's name for it is an internal /vsi path)."""
    opener = _OPENERS.get(dataset)
    return opener.uri if opener is not None else dataset.name


def is_georeferenced(dataset: DatasetReader) -> bool:
    """Whether the raster is placed on the earth: a CRS and a transform other than the
    identity (which GDAL reports for rasters without one)."""
    return dataset.crs is not None and dataset.transform != Affine.identity()


def choose_bands(dataset: DatasetReader, bands: Sequence[int] | None, *, named_by: str = "--bands") -> tuple[int, ...]:
    """The three 1-based band indexes shown as red, green and blue.

    `bands` as given (one index is shown as grey, three as RGB), checked against the raster
    (`named_by` says who gave them: --bands, or the model trained on them);
    without them the bands whose colour interpretation is red, green and blue, else the first
    three, else (one or two bands: grey, grey and alpha) the first band three times.
    """
    count = dataset.count
    # rasterio names GDAL's CInt16 and CInt32 complex_int16 and complex_int32, which numpy does not know
    if complex_bands := sorted({dtype for dtype in dataset.dtypes if dtype.startswith("complex")}):
        # radar's complex samples (SLC): what they show is their amplitude, which is a choice of
        # processing (amplitude, intensity, dB) the raster's producer makes, not segpipe
        raise ImageDecodeError("unsupported", f"{_name(dataset)}: complex samples ({', '.join(complex_bands)}); give "
                               "their amplitude as a real band")
    if bands is not None:
        chosen = tuple(bands)
        if len(chosen) not in (1, 3):
            raise ValueError(f"--bands takes 1 or 3 band indexes, got {list(chosen)}")
        outside = [b for b in chosen if not 1 <= b <= count]
        if outside:  # this raster's own: the others of an archive may have them
            raise ImageDecodeError(
                "missing_bands",
                f"{named_by} {list(chosen)}: band(s) {outside} not in the raster, which has {count} band(s) "
                f"(indexes 1 to {count})"
            )
        return chosen * 3 if len(chosen) == 1 else chosen
    interpretation = list(dataset.colorinterp)
    if all(colour in interpretation for colour in (ColorInterp.red, ColorInterp.green, ColorInterp.blue)):
        return tuple(interpretation.index(colour) + 1 for colour in (ColorInterp.red, ColorInterp.green, ColorInterp.blue))
    if count >= 3:
        return (1, 2, 3)
    return (1, 1, 1)


def band_colour_table(dataset: DatasetReader, bands: Sequence[int]) -> np.ndarray | None:
    """The colour table that shows `bands` as RGB when they are one colour-mapped band (GDAL's
    palette interpretation, an 8- or 16-bit band with a colour table) given three times, as
    `choose_bands` gives a single band: (entries, 4) uint8 RGBA, one row for every value the
    band's type holds, those the table leaves out black and transparent. Else None: the bands
    are shown as they are."""
    band = bands[0]
    if (len(set(bands)) != 1 or dataset.colorinterp[band - 1] != ColorInterp.palette
            or dataset.dtypes[band - 1] not in ("uint8", "uint16")):
        return None
    try:
        colours = dataset.colormap(band)
    except ValueError:  # palette interpretation without a table: rasterio's "NULL color table"
        return None
    table = np.zeros((np.iinfo(dataset.dtypes[band - 1]).max + 1, 4), dtype=np.uint8)
    for value, rgba in colours.items():
        table[value] = rgba
    return table


def _unique(bands: Sequence[int]) -> list[int]:
    return list(dict.fromkeys(bands))


def _valid(values: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(h, w) valid pixels from (n, h, w) band values and GDAL masks (0 = nodata) of the same
    bands: nodata only where every band is (GDAL's rule for a dataset mask, so a legitimate 0
    in one band of an RGB raster with nodata=0 stays valid), and nowhere a value is not finite
    (a float NaN or infinity cannot be scaled)."""
    valid = (masks != 0).any(axis=0)
    if values.dtype.kind == "f":
        valid &= np.isfinite(values).all(axis=0)
    return valid


def _sample_windows(height: int, width: int, grid: int, size: int) -> list[Window]:
    """Up to `grid` x `grid` windows of `size` pixels, spread evenly from edge to edge, in
    row-major order."""

    def starts(length: int) -> list[int]:
        return sorted({round(s) for s in np.linspace(0, length - min(size, length), grid)})

    h, w = min(size, height), min(size, width)
    return [Window(col, row, w, h) for row in starts(height) for col in starts(width)]


def _limits_overview(dataset: DatasetReader, band: int) -> tuple[int, int] | None:
    """The (height, width) of the overview `band_limits` reads whole, or None to sample windows."""
    for factor in sorted(dataset.overviews(band), reverse=True):  # the smallest first
        shape = (math.ceil(dataset.height / factor), math.ceil(dataset.width / factor))
        if shape[0] * shape[1] >= _MIN_OVERVIEW_PIXELS:
            return shape if shape[0] * shape[1] <= _MAX_OVERVIEW_PIXELS else None
    return None


def band_limits(dataset: DatasetReader, bands: Sequence[int]) -> np.ndarray:
    """(len(bands), 2) float64 low and high limits per band, one set for the whole raster,
    that `read_rgb` maps to 0 and 255.

    uint8 rasters: (0, 255), shown as they are. Deeper samples: the 2nd and 98th percentiles
    of each band's valid pixels, taken from the smallest overview of 256x256 to 1024x1024
    pixels when the raster has one, else from up to 16 windows of 256x256 spread over the
    raster, and where those hold no valid pixel, from 1,024 windows of 32x32; so a
    50,000-pixel raster costs a few reads, not a pass over it. A band whose percentiles meet
    falls back to its min and max; a constant band gets (v, v + 1), shown black; a band with
    no valid pixel in any of those reads gets (0, 1), with a warning.
    """
    bands = list(bands)
    if all(dataset.dtypes[band - 1] == "uint8" for band in bands):
        return np.tile(np.array([0.0, 255.0]), (len(bands), 1))
    unique = _unique(bands)
    shape = _limits_overview(dataset, unique[0])
    if shape is not None:
        # a read at the overview's size is served by GDAL from the overview itself
        out = {"out_shape": (len(unique), *shape), "resampling": Resampling.nearest}
        samples = [[(read_named(dataset, "the overview", dataset.read, unique, **out),
                     read_named(dataset, "the overview's mask", dataset.read_masks, unique, **out))]]
    else:
        samples = ([(read_named(dataset, f"window {window}", dataset.read, unique, window=window),
                     read_named(dataset, f"the mask of window {window}", dataset.read_masks, unique, window=window))
                    for window in _sample_windows(dataset.height, dataset.width, grid, size)]
                   for grid, size in _SAMPLE_GRIDS)  # the finer grid read only if needed
    by_band: dict[int, tuple[float, float]] = {}
    for reads in samples:
        for i, band in enumerate(unique):
            # each band's own valid values: its mask, and finite
            pixels = np.concatenate([values[i][(masks[i] != 0) & np.isfinite(values[i])] for values, masks in reads])
            if pixels.size:
                by_band.setdefault(band, stretch_limits(pixels.astype(np.float64)))
        if len(by_band) == len(unique):
            break
    for band in unique:
        if band not in by_band:
            log.warning("%s: band %d has no valid pixel in the sample taken for the stretch; limits (0, 1)",
                        _name(dataset), band)
            by_band[band] = (0.0, 1.0)
    return np.array([by_band[band] for band in bands], dtype=np.float64)


def read_rgb(
    dataset: DatasetReader, window: Window, bands: Sequence[int], limits: np.ndarray | None, *,
    colour_table: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The window as (h, w, 3) uint8 RGB and its (h, w) bool `valid` mask; only that window
    is read.

    `bands` (three, from `choose_bands`) are scaled linearly from their `limits` (from
    `band_limits`) to 0..255 and clipped; or, with a `colour_table` (`band_colour_table`), the
    one band's values are looked up in it and `limits` are not used. `valid` is False where
    GDAL's masks (the nodata value, an internal mask or an alpha band) say nodata in every
    band, and where a float value is not finite; those pixels are black.
    """
    col, row, width, height = window.flatten()
    if (any(v != int(v) for v in (col, row, width, height)) or col < 0 or row < 0 or width < 1 or height < 1
            or col + width > dataset.width or row + height > dataset.height):
        raise ValueError(f"{window} is not a whole-pixel window inside the {dataset.width}x{dataset.height} raster")
    bands = list(bands)
    if colour_table is not None:
        return _read_colour_mapped(dataset, window, bands[0], colour_table)
    limits = np.asarray(limits, dtype=np.float64)
    if limits.shape != (len(bands), 2):
        raise ValueError(f"limits have shape {limits.shape}; expected ({len(bands)}, 2), one (low, high) per band")
    unique = _unique(bands)
    # read straight into the pixel-interleaved (h, w, band) layout the model takes: GDAL fills
    # a buffer of any strides rasterio gives it, and transposing band planes afterwards took
    # 12 of a 2176 x 2176 block's 15 ms (read from GDAL's cache)
    pixels = np.empty((int(height), int(width), len(unique)),
                      dtype=np.result_type(*(dataset.dtypes[band - 1] for band in unique)))
    read_named(dataset, f"window {window}", dataset.read, unique, window=window, out=pixels.transpose(2, 0, 1))
    masks = read_named(dataset, f"mask of window {window}", dataset.read_masks, unique, window=window)
    valid = _valid(pixels.transpose(2, 0, 1), masks)
    # the bands as read when they are in order, as a raster's RGB usually is: no copy of them
    rgb = pixels if bands == unique else np.take(pixels, [unique.index(band) for band in bands], axis=-1)
    if pixels.dtype != np.uint8 or (limits != (0.0, 255.0)).any():
        low = limits[:, 0].astype(np.float32)
        scale = (255.0 / (limits[:, 1] - limits[:, 0])).astype(np.float32)
        scaled = (np.nan_to_num(rgb.astype(np.float32)) - low) * scale + 0.5
        rgb = np.clip(scaled, 0, 255).astype(np.uint8)
    if not valid.all():  # in place: `rgb` is this call's own (read, reordered or scaled)
        rgb[~valid] = 0
    return rgb, valid


def _read_colour_mapped(dataset: DatasetReader, window: Window, band: int,
                        colour_table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`read_rgb` of one colour-mapped band: its values looked up in `colour_table`, those of
    its transparent colours nodata, as a viewer leaves them out."""
    values = read_named(dataset, f"window {window}", dataset.read, band, window=window)
    valid = _valid(values[None], read_named(dataset, f"mask of window {window}", dataset.read_masks, band, window=window)[None])
    rgba = colour_table[values]
    valid &= rgba[..., 3] != 0
    rgb = np.ascontiguousarray(rgba[..., :3])
    if not valid.all():
        rgb[~valid] = 0
    return rgb, valid


@dataclass(frozen=True)
class Block:
    """One output block of a raster: `core`, the pixels it writes, and `extent`, the pixels
    it reads to compute them (the core plus the context its windows and the CRF need)."""

    core: Window
    extent: Window


def _axis_blocks(length: int, *, crop: int, stride: int, block: int, margin: int, cell: int) -> list[tuple[int, int, int, int]]:
    """(core start, core end, extent start, extent end) of the blocks along one axis."""
    # Core boundaries fall on multiples of a multiple of the stride, which are starts of the
    # global window grid; the last block takes the remainder, merged into the one before when
    # it would be shorter than half a block.
    step = max(stride, round(block / stride) * stride)
    count = max(1, round(length / step))
    bounds = [i * step for i in range(count)] + [length]
    size, starts = padded_windows(length, crop, stride, cell)
    blocks = []
    for core_start, core_end in itertools.pairwise(bounds):
        # the resize of the core's edge pixels from the model's grid takes the next cell too
        reach = margin + (cell if cell > 1 else 0)
        low, high = max(0, core_start - reach), min(length, core_end + reach)
        covering = [s for s in starts if s < high and s + size > low]
        blocks.append((core_start, core_end, covering[0], min(length, covering[-1] + size)))
    return blocks


def plan_blocks(height: int, width: int, *, crop: int, stride: int, block: int, margin: int, cell: int) -> list[Block]:
    """The raster split into output blocks of about `block` x `block` pixels, in row-major
    order, whose cores cover the raster exactly once.

    A block's extent is the union of the windows of the raster's GLOBAL sliding-window grid
    that intersect its core widened by `margin` pixels (context for the dense CRF) and one
    cell of the model's grid (the bilinear resize of the core's edge pixels takes the next
    cell), clipped to the raster; so the extent covers the widened core. The grid is the Segmenter's for a
    whole image: the raster taken as padded at its end to whole cells of the model's output
    grid (`cell`, `Segmenter.grid_cell`), then `window_starts(padded length, crop, stride)`
    along each axis. Why the grid's windows, and not the widened core alone: the extent starts
    at a grid start, its grid starts are `stride` apart and its end is a grid window's end (or
    the raster's), so the Segmenter's windows inside it are exactly the grid windows that lie
    in it (the last one, snapped inward to the padded edge, included). Every grid window that
    touches the core is among them, with the same blend weights, so the core's blended logits
    are those of the whole raster (up to the order of floating-point sums), and blocks join
    without seams.
    """
    if min(height, width) < 1:
        raise ValueError(f"the raster must have pixels, got {height}x{width}")
    if crop < 1 or not 1 <= stride <= crop:
        raise ValueError(f"need crop >= 1 and 1 <= stride <= crop, got crop={crop}, stride={stride}")
    if block < 1 or margin < 0:
        raise ValueError(f"need block >= 1 and margin >= 0, got block={block}, margin={margin}")
    if cell < 1 or crop % cell or stride % cell:
        raise ValueError(f"crop {crop} and stride {stride} must be whole numbers of cells of {cell}")
    rows = _axis_blocks(height, crop=crop, stride=stride, block=block, margin=margin, cell=cell)
    cols = _axis_blocks(width, crop=crop, stride=stride, block=block, margin=margin, cell=cell)
    return [
        Block(
            core=Window(c0, r0, c1 - c0, r1 - r0),
            extent=Window(e_c0, e_r0, e_c1 - e_c0, e_r1 - e_r0),
        )
        for r0, r1, e_r0, e_r1 in rows
        for c0, c1, e_c0, e_c1 in cols
    ]


def block_windows(block: Block, *, crop: int, stride: int, cell: int) -> list[tuple[int, int]]:
    """(row, col) origins, in the raster, of the global grid's windows that a block's extent
    holds: those its sliding window runs over (see `plan_blocks`)."""
    extent = block.extent
    rows = padded_windows(int(extent.height), crop, stride, cell)[1]
    cols = padded_windows(int(extent.width), crop, stride, cell)[1]
    return [(int(extent.row_off) + r, int(extent.col_off) + c) for r in rows for c in cols]
