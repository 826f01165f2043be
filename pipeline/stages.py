"""The three stages of a batch, as plain functions and one class, so each can be called in a
test without Ray:

1. `io_stages.read_and_decode` (CPU): bytes from the source, decoded to RGB by
   `decode.decode`, or left encoded for the model's device if it says so.
2. `SegmentStage` (GPU when there is one): the JPEGs left encoded decoded on the device, then
   probabilities, dense CRF, argmax, statistics. Only the label map and the statistics leave
   the device.
3. `io_stages.write_masks` (CPU): palette PNGs written to OUTPUT/masks/.

Stages 1 and 3 run in Ray's task workers and import no torch (`pipeline.io_stages`); this
module is the replicas'.

A georeferenced raster (`storage.is_raster_key` and a CRS) takes another road: the decode
stage only opens it (a few range requests for its header), and `RasterStage`, beside the
model, segments it block by block and writes its COG mask and polygons itself, so its pixels
never travel between processes and memory stays flat whatever its size.

Every image travels as one `ImageRecord`. A failure in any stage turns that image into an
error record that names the stage's reason; the other images of the batch go on.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rasterio.enums import Resampling
from torchvision.io import ImageReadMode, decode_jpeg

from .config import RasterSettings
from .crf import DEFAULT_DOWNSAMPLE, crf_logits, dense_crf
from .decode import DeviceJpeg, ImageDecodeError, decode_image, unreadable
from .geo import ClassPolygon, MaskWriter, PolygonCollector, PolygonsWriter
from .inference import GridLogits, Segmenter, SlidingWindow, softmax_classes
from .labels import PixelLabeler
from .masks import confidence_levels
from .preprocess import to_chw_uint8
from .rasters import (
    Block,
    band_colour_table,
    band_limits,
    block_windows,
    choose_bands,
    open_raster,
    plan_blocks,
    read_rgb,
)
from .records import ClassStats, ImageRecord, confidence_key_for, mask_key, staged_polygons_key
from .stats import class_statistics
from .storage import (
    Location,
    StorageUnavailableError,
    put_file_atomic,
)

# pixels refined in one CRF call on a CPU: a frame's CRF on the model's grid is thousands of
# small operations, bound by dispatching them, which images of one size refined together
# share (CamVid frames in fours: 4.9 against 4.3 ms a frame at one thread, 3.5 against 2.5 at
# two); a large image gains nothing from company, and would hold its neighbours' buffers too
CPU_REFINE_PIXELS = 1 << 21

# an image whose logits hold a NaN or an infinity fails with this reason rather than giving a
# mask: argmax over a NaN is arbitrary, and the CRF would carry it over the image's cells
NON_FINITE_LOGITS = "the model's logits are not finite (NaN or infinity): a broken checkpoint, or an overflow"


def decode_on_device(jpegs: Sequence[DeviceJpeg], device: torch.device) -> list[torch.Tensor | ImageDecodeError]:
    """(3, H, W) uint8 RGB tensors on `device`, or why each JPEG cannot be decoded.

    All in one call (nvjpeg's batched decode on CUDA). A file the device decoder refuses is
    decoded again alone, then by `decode_image` on the CPU, which names what is wrong.
    """
    if not jpegs:
        return []
    data = [torch.frombuffer(bytearray(jpeg.data), dtype=torch.uint8) for jpeg in jpegs]
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec; still the one
        # batched nvjpeg decoder in the stack we pin
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            images: list[torch.Tensor | None] = list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # one bad file fails the whole call
            images = [None] * len(jpegs)
        for index, image in enumerate(images):
            if image is None:
                with contextlib.suppress(RuntimeError):  # decode_image says why, below
                    images[index] = decode_jpeg(data[index], mode=ImageReadMode.RGB, device=device)
    results: list[torch.Tensor | ImageDecodeError] = []
    for jpeg, image in zip(jpegs, images, strict=True):
        if image is None or tuple(image.shape) != (3, jpeg.height, jpeg.width):
            try:
                # the header was checked: a baseline JPEG within max_pixels, whose decode
                # time its pixel count bounds
                pixels = decode_image(jpeg.data, max_pixels=jpeg.height * jpeg.width)
            except ImageDecodeError as err:
                results.append(err)
                continue
            # torch.tensor copies: Pillow's arrays are read-only
            image = torch.tensor(pixels).permute(2, 0, 1).to(device)
        results.append(image)
    return results


class SegmentStage:
    """Segmenter + optional dense CRF + statistics, for one batch of decoded records."""

    def __init__(self, segmenter: Segmenter, *, crf: bool = True, confidence: bool = False,
                 refine_pixels: float | None = None) -> None:
        self.segmenter = segmenter
        self.crf = crf
        self.confidence = confidence  # also keep each label's probability, for a confidence mask
        # pixels refined in one CRF call at most (see _chunks; 0: one image at a time); by
        # default every image of one size on a GPU, CPU_REFINE_PIXELS on a CPU
        default = math.inf if segmenter.device.type == "cuda" else CPU_REFINE_PIXELS
        self.refine_pixels = default if refine_pixels is None else refine_pixels
        self.num_classes = segmenter.num_classes
        # the per-pixel labels' own compiled kernels where the model is compiled for a CPU
        self.labeler = PixelLabeler(compiled=segmenter.compiled and segmenter.device.type == "cpu")
        self._label_dtype = np.uint8 if self.num_classes <= 256 else np.uint16
        # torch has no general uint16: wider labels cross as int32
        self._label_device_dtype = torch.uint8 if self.num_classes <= 256 else torch.int32

    @property
    def compile_seconds(self) -> float:
        """Seconds the compiled model spent in the first call of each input shape, and the
        compiled labelling kernels in theirs (`labels.PixelLabeler`)."""
        return self.segmenter.compile_seconds + self.labeler.compile_seconds

    def __call__(self, records: list[ImageRecord]) -> list[ImageRecord]:
        self._decode_jpegs([r for r in records if r.ok and r.encoded is not None])
        todo = [r for r in records if r.ok and not r.georeferenced]
        if not todo:
            return records
        # an image's seconds leave out the compilation its batch paid (the run's summary says
        # it): the first image of each size would be the night's slowest in the table otherwise
        start, compiled = time.perf_counter(), self.compile_seconds
        try:
            grids = self.segmenter.predict_logits([r.image for r in todo])
        except (RuntimeError, ValueError):
            # one bad image (or out of memory) must not cost its neighbours: retry one by one
            grids = [self._predict_one(r) for r in todo]
        # the first call's forward is counted with its compilation (`Segmenter.compile_seconds`)
        share = max(0.0, time.perf_counter() - start - (self.compile_seconds - compiled)) / len(todo)
        ready = [(record, grid) for record, grid in zip(todo, grids, strict=True) if grid is not None]
        for chunk in self._chunks(ready):
            started, compiled = time.perf_counter(), self.compile_seconds
            self._refine(chunk)
            each = max(0.0, time.perf_counter() - started - (self.compile_seconds - compiled)) / len(chunk)
            for record, _ in chunk:
                record.seconds.inference = share + each
                record.image = None  # the decoded pixels need not travel further
        return records

    def _refine(self, chunk: list[tuple[ImageRecord, GridLogits]]) -> None:
        try:
            self._finish(chunk)
        except (RuntimeError, ValueError) as err:
            if len(chunk) == 1:
                chunk[0][0].fail("inference", f"{type(err).__name__}: {err}")
                return
            for pair in chunk:  # one by one, so that only the image at fault fails
                self._refine([pair])

    def _chunks(self, ready: list[tuple[ImageRecord, GridLogits]]) -> list[list[tuple[ImageRecord, GridLogits]]]:
        """Images refined together: those of one size, up to `refine_pixels` pixels in all
        (always at least one image). A small image's CRF is bound by kernel launches on a GPU,
        and by dispatching its small operations on a CPU, which one call shares."""
        groups: dict[tuple, list[tuple[ImageRecord, GridLogits]]] = {}
        for record, grid in ready:
            groups.setdefault((grid.size, grid.cell, tuple(grid.values.shape)), []).append((record, grid))
        chunks = []
        for group in groups.values():
            height, width = group[0][1].size
            pixels = max(1, height * width)
            per_chunk = len(group) if math.isinf(self.refine_pixels) else max(1, int(self.refine_pixels // pixels))
            chunks += [group[i : i + per_chunk] for i in range(0, len(group), per_chunk)]
        return chunks

    def _decode_jpegs(self, records: list[ImageRecord]) -> None:
        """Decode the JPEGs `read_and_decode` left for the model's device, all in one call (see
        `decode_on_device`), so only compressed bytes cross to the GPU."""
        if not records:
            return
        start = time.perf_counter()
        jpegs = [DeviceJpeg(r.encoded, r.height, r.width) for r in records]  # type: ignore[arg-type]
        images = decode_on_device(jpegs, self.segmenter.device)
        share = (time.perf_counter() - start) / len(records)
        for record, image in zip(records, images, strict=True):
            if isinstance(image, ImageDecodeError):
                record.fail(image.reason, str(image))
                continue
            record.image, record.encoded = image, None
            record.seconds.decode = (record.seconds.decode or 0.0) + share

    def _predict_one(self, record: ImageRecord) -> GridLogits | None:
        try:
            return self.segmenter.predict_logits([record.image])[0]
        except (RuntimeError, ValueError) as err:
            record.fail("inference", f"{type(err).__name__}: {err}")
            return None

    def _finish(self, chunk: list[tuple[ImageRecord, GridLogits]]) -> None:
        """CRF, labels and statistics for images of one size, on the model's device: on the
        model's output grid, then its logits resized to the images' pixels once; only the
        label maps (a byte per pixel up to 256 classes) and the statistics reach the host."""
        grids = [grid for _, grid in chunk]
        # checked on the device and read with the labels, so that no sync of its own stands
        # between the forward and the CRF's kernels; each image's CRF is its own, so an image
        # with a NaN leaves the others' untouched
        finite = torch.stack([torch.isfinite(grid.values).all() for grid in grids])
        if self.crf:
            height, width = grids[0].size
            pixels = torch.stack([to_chw_uint8(r.image).to(grids[0].values.device, non_blocking=True) for r, _ in chunk])
            grids = crf_refine(grids, pixels, (0, height), (0, width))
        each = [self.labeler(grid, (0, grid.size[0]), (0, grid.size[1])) for grid in grids]
        labels, confidence = map(torch.stack, zip(*each, strict=True))
        host = labels.to(self._label_device_dtype).cpu().numpy().astype(self._label_dtype, copy=False)
        for index, ((record, _), ok) in enumerate(zip(chunk, finite.tolist(), strict=True)):
            if not ok:
                record.fail("inference", NON_FINITE_LOGITS)
                continue
            record.stats = class_statistics(labels[index], confidence[index], self.num_classes, host_labels=host[index])
            record.labels = host[index]
            if self.confidence:
                record.confidence = confidence_levels(confidence[index]).cpu().numpy()


def crf_refine(grids: Sequence[GridLogits], pixels: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int]) -> list[GridLogits]:
    """The dense CRF over the pixels [rows) x [cols) of images of one geometry, whose logits
    `grids` hold; `pixels` are those of the rectangle, uint8 (B, 3, h, w). On the grid itself
    where its cells are the CRF's (8 pixels: `crf_logits`) or are made so (a coarser grid
    resized to it, 16 pixels for DeepLabV3-MobileNetV3); a finer grid, or an image resized for
    the model, has its pixels refined (`dense_crf`)."""
    cell = DEFAULT_DOWNSAMPLE
    first = grids[0]
    if first.cell > cell and first.cell % cell == 0:
        factor = first.cell // cell
        values = F.interpolate(torch.stack([grid.values for grid in grids]), scale_factor=factor, mode="bilinear",
                               align_corners=False)
        grids = [GridLogits(v, cell, first.origin, (first.grid[0] * factor, first.grid[1] * factor), first.size)
                 for v in values]
    if grids[0].cell == cell:
        # at the image's end, all the grid's cells: the resize to pixels takes the last one too
        grid = grids[0].grid
        cells_r = (rows[0] // cell, grid[0] if rows[1] >= first.size[0] else -(-rows[1] // cell))
        cells_c = (cols[0] // cell, grid[1] if cols[1] >= first.size[1] else -(-cols[1] // cell))
        refined = crf_logits(torch.stack([grid.cells(cells_r, cells_c) for grid in grids]), pixels)
        return [grid.with_values(v, (cells_r[0] * cell, cells_c[0] * cell)) for grid, v in zip(grids, refined, strict=True)]
    probs = dense_crf(softmax_classes(torch.stack([grid.pixels(rows, cols) for grid in grids])), pixels)
    padded = (first.grid[0] * first.cell, first.grid[1] * first.cell)
    return [GridLogits(v, 1, (rows[0], cols[0]), padded, first.size) for v in probs.clamp_min_(1e-30).log_()]


# the mask's value where the raster has no data: a label no class takes (masks are uint8, so
# rasters take models of at most 255 classes)
RASTER_NODATA = 255


@contextlib.contextmanager
def _source_read() -> Iterator[None]:
    """A permanent storage error reading the raster as its error row (`decode.unreadable`, as
    the decode stage makes it for an image): the raster's fault, not the output's. A missing
    object and an outage (StorageUnavailableError, after the retries) pass as they are."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as err:
        raise unreadable(err) from err


class RasterStage:
    """One georeferenced raster, block by block (`rasters.plan_blocks`): each block's extent
    is read (only it), segmented with the replica's model in sliding windows of the whole
    raster's grid, refined by the dense CRF, and its core's labels go into the COG mask,
    the statistics and the polygons. Memory holds one block's extent, whatever the raster's
    size; the extents overlap by the windows and the CRF margin, so no block edge shows."""

    def __init__(self, stage: SegmentStage, settings: RasterSettings, *, source: Location, output: Location,
                 palette: Sequence[Sequence[int]], class_names: Sequence[str], run_id: str) -> None:
        # the bands the model was trained on (its checkpoint's), unless --bands names others
        trained_bands = stage.segmenter.meta.preprocessing.bands
        self.bands_named_by = "--bands" if settings.bands is not None or trained_bands is None else "the model's bands"
        self.settings = settings if settings.bands is not None else replace(settings, bands=trained_bands)
        self.run_id = run_id  # the polygons' rows carry it
        self.stage = stage  # its compilation seconds, which its segmenter copy shares
        self.crf = stage.crf
        self.num_classes = stage.num_classes
        self.labeler = stage.labeler
        window = SlidingWindow(crop=(settings.tile, settings.tile), stride=(settings.stride, settings.stride),
                               batch_size=stage.segmenter.batch_size)
        self.segmenter = stage.segmenter.at_native_resolution(window)
        self.source, self.output = source, output
        self.palette, self.class_names = palette, class_names
        # GDAL's threads for reading blocks and writing the COG: the replica's own, idle then
        self.gdal_threads = torch.get_num_threads()

    def __call__(self, record: ImageRecord) -> ImageRecord:
        start, compiled = time.perf_counter(), self.stage.compile_seconds
        try:
            with tempfile.TemporaryDirectory(prefix="segpipe-raster-") as scratch, contextlib.ExitStack() as opened:
                with _source_read():
                    dataset = opened.enter_context(open_raster(self.source, record.key, threads=self.gdal_threads))
                reading, writing = self._segment(record, dataset, scratch)
        except ImageDecodeError as err:
            record.fail(err.reason, str(err))
        except FileNotFoundError:
            record.fail("missing", "the file disappeared after it was listed")
        except StorageUnavailableError:
            raise  # storage down: the run stops and resumes, as for every other write
        except OSError as err:  # a write that fails for the output's sake (reads are `_source_read`'s), as write_masks does
            raise StorageUnavailableError(f"cannot write the mask of {record.key}: {type(err).__name__}: {err}") from err
        except (RuntimeError, ValueError) as err:
            record.fail("inference", f"{type(err).__name__}: {err}")
        else:
            # the images table's stages, for a raster: reading its blocks, segmenting them, and
            # writing its COGs and polygons
            record.seconds.decode = (record.seconds.decode or 0.0) + reading
            record.seconds.encode = writing
            start += reading + writing
        # without the compilation paid (`SegmentStage.__call__`)
        record.seconds.inference = max(0.0, time.perf_counter() - start - (self.stage.compile_seconds - compiled))
        return record

    def _segment(self, record: ImageRecord, dataset: Any, scratch: str) -> tuple[float, float]:
        """Segments the raster into its outputs; the seconds spent reading its blocks and
        writing its outputs."""
        s = self.settings
        if self.num_classes > 255:
            raise ValueError(f"a raster mask is uint8 with a nodata value: at most 255 classes, not {self.num_classes}")
        bands = choose_bands(dataset, s.bands, named_by=self.bands_named_by)
        colour_table = band_colour_table(dataset, bands)  # a colour-mapped band is shown in its colours
        started = time.perf_counter()
        with _source_read():  # from overviews, or windows read
            limits = band_limits(dataset, bands) if colour_table is None else None
        reading, writing = time.perf_counter() - started, 0.0
        mask_path, confidence_path = os.path.join(scratch, "mask.tif"), os.path.join(scratch, "confidence.tif")
        # the masks' geometry, and GDAL's threads to compress them
        profile = {"width": dataset.width, "height": dataset.height, "crs": dataset.crs, "transform": dataset.transform,
                   "threads": self.gdal_threads}
        totals = _ClassTotals(self.num_classes)
        # run without --polygons too: its regions are the statistics' `components` and `area`
        collector = PolygonCollector(dataset.transform, dataset.crs, width=dataset.width, height=dataset.height,
                                     min_area=s.min_polygon_area, simplify=s.simplify)
        polygons_path = os.path.join(scratch, "polygons.parquet")
        polygons = PolygonsWriter(polygons_path, run_id=self.run_id, image_id=record.key,
                                  class_names=self.class_names, crs=dataset.crs)

        def take(regions: list[ClassPolygon]) -> None:
            nonlocal writing
            if s.polygons:
                started = time.perf_counter()
                polygons.write(regions)
                writing += time.perf_counter() - started

        with MaskWriter(mask_path, **profile, nodata=RASTER_NODATA, palette=self.palette,
                        class_names=self.class_names) as mask, \
                MaskWriter(confidence_path, **profile, nodata=0, overview_resampling=Resampling.average) \
                if s.confidence else _NoWriter() as confidence:
            cell = self.segmenter.grid_cell()
            blocks = plan_blocks(dataset.height, dataset.width, crop=s.tile, stride=s.stride, block=s.block,
                                 margin=s.crf_margin if self.crf else 0, cell=cell)
            windows = WindowFiles(os.path.join(scratch, "windows"), blocks, crop=s.tile, stride=s.stride, cell=cell)
            for block in blocks:
                started = time.perf_counter()
                with _source_read():
                    rgb, valid = read_rgb(dataset, block.extent, bands, limits, colour_table=colour_table)
                reading += time.perf_counter() - started
                labels, score, valid = self._block(block, rgb, valid, windows, cell)
                totals.add(labels, score, valid)
                take(collector.add(block.core, labels, valid))
                started = time.perf_counter()
                mask.write(block.core, np.where(valid, labels, RASTER_NODATA).astype(np.uint8))
                if s.confidence:  # 0: nodata, so valid pixels take at least 1
                    levels = confidence_levels(torch.from_numpy(score)).numpy()
                    confidence.write(block.core, np.where(valid, np.maximum(levels, 1), 0).astype(np.uint8))
                writing += time.perf_counter() - started
            take(collector.finish())
            started = time.perf_counter()  # the COGs are built as their writers close
        record.mask_key = mask_key(record.key, ".tif")
        put_file_atomic(self.output, record.mask_key, mask_path)
        if s.confidence:
            record.confidence_key = confidence_key_for(record.key, ".tif")
            put_file_atomic(self.output, record.confidence_key, confidence_path)
        record.stats = totals.stats(components=collector.regions, area=collector.area)
        if polygons.close():
            record.polygons_key = staged_polygons_key(self.run_id, record.key)
            put_file_atomic(self.output, record.polygons_key, polygons_path)
        record.height, record.width = dataset.height, dataset.width
        return reading, writing + time.perf_counter() - started

    def _block(self, block: Block, rgb: np.ndarray, valid: np.ndarray, windows: WindowFiles, cell: int):
        """Labels, confidence and validity of the block's core, from its extent's pixels `rgb`
        and their validity."""
        extent = block.extent
        # the part that is refined (the core and the CRF's margin) or else just the core, in
        # the extent's pixels: only its logits are blended and its class softmax taken
        core_rows = _span(block.core.row_off, block.core.height, extent.row_off)
        core_cols = _span(block.core.col_off, block.core.width, extent.col_off)
        rows, cols = core_rows, core_cols
        if self.crf:
            rows = _crf_span(core_rows, int(extent.row_off), int(extent.height), self.settings.crf_margin)
            cols = _crf_span(core_cols, int(extent.col_off), int(extent.width), self.settings.crf_margin)
        grid = self.segmenter.region_logits(rgb, origin=(int(extent.row_off), int(extent.col_off)), cell=cell,
                                            windows=windows, part=(rows, cols))
        if not bool(torch.isfinite(grid.values).all()):
            raise ValueError(NON_FINITE_LOGITS)
        if self.crf:
            pixels = to_chw_uint8(rgb[rows[0]:rows[1], cols[0]:cols[1]]).to(grid.values.device)[None]
            grid = crf_refine([grid], pixels, rows, cols)[0]
        labels, score = self.labeler(grid, core_rows, core_cols)
        return labels.cpu().numpy(), score.cpu().numpy(), valid[core_rows[0]:core_rows[1], core_cols[0]:core_cols[1]]


def _span(offset: float, length: float, extent_offset: float) -> tuple[int, int]:
    """[start, end) of a window's pixels along one axis, counted from its extent's start."""
    start = int(offset - extent_offset)
    return start, start + int(length)


def _crf_span(core: tuple[int, int], extent_offset: int, extent_length: int, margin: int) -> tuple[int, int]:
    """The core widened by the CRF's margin along one axis, within the extent (extent
    coordinates), its ends on the CRF's cells: multiples of its downsampling in raster
    coordinates, so neighbouring blocks refine on the cells the whole raster would."""
    cell = DEFAULT_DOWNSAMPLE
    start = extent_offset + max(0, core[0] - margin)
    start -= start % cell
    if start < extent_offset:
        start += cell
    end = extent_offset + min(extent_length, core[1] + margin)
    end = min(extent_offset + extent_length, end + -end % cell)
    assert start <= extent_offset + core[0], "the CRF margin is narrower than its cells"
    return start - extent_offset, end - extent_offset


class WindowFiles:
    """Window logits kept between the blocks of one raster (`inference.WindowStore`), so each
    window of the raster's grid goes through the model once.

    A window on the edge between blocks belongs to two to four blocks' extents: the first
    runs it and writes its logits to `folder`; the others read them back; the last deletes
    them. The windows along a row of blocks' lower edge wait there for the next row: on local
    disk, not in memory, because there are two rows of them the raster's width long (about
    19 MB for a 32768-pixel-wide raster, 512-pixel windows, 7 classes, logits at 1/8: 1.2 GB
    for a model whose logits are at full resolution).
    """

    def __init__(self, folder: str, blocks: Sequence[Block], *, crop: int, stride: int, cell: int) -> None:
        os.makedirs(folder, exist_ok=True)
        self.folder = folder
        self.uses = Counter(origin for block in blocks
                            for origin in block_windows(block, crop=crop, stride=stride, cell=cell))
        self.computed = self.reused = 0

    def _path(self, origin: tuple[int, int]) -> str:
        return os.path.join(self.folder, f"{origin[0]}-{origin[1]}.npy")

    def take(self, origin: tuple[int, int]) -> torch.Tensor | None:
        self.uses[origin] -= 1
        path = self._path(origin)
        if not os.path.exists(path):
            self.computed += 1
            return None
        self.reused += 1
        logits = torch.from_numpy(np.load(path)).permute(2, 0, 1)  # stored (h, w, C): the model's layout
        if self.uses[origin] <= 0:
            os.remove(path)
        return logits

    def keep(self, origin: tuple[int, int], logits: torch.Tensor) -> None:
        if self.uses[origin] > 0:
            np.save(self._path(origin), logits.permute(1, 2, 0).cpu().numpy())


class _NoWriter:
    """Stands in for the confidence MaskWriter when no confidence mask is asked for."""

    def __enter__(self) -> _NoWriter:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def write(self, *_: Any) -> None:
        pass


class _ClassTotals:
    """Per-class pixel counts and confidence sums over a raster's valid pixels, block by block."""

    def __init__(self, num_classes: int) -> None:
        self.counts = np.zeros(num_classes, dtype=np.int64)
        self.confidence = np.zeros(num_classes, dtype=np.float64)

    def add(self, labels: np.ndarray, score: np.ndarray, valid: np.ndarray) -> None:
        n = len(self.counts)
        if not valid.all():  # most blocks have data everywhere: no copies of their pixels then
            labels, score = labels[valid], score[valid]
        labels = labels.ravel()
        self.counts += np.bincount(labels, minlength=n)[:n]
        self.confidence += np.bincount(labels, weights=score.ravel(), minlength=n)[:n]

    def stats(self, *, components: Counter[int], area: dict[int, float]) -> ClassStats:
        """`fraction` is of the raster's valid pixels; `components`, the connected regions of
        each class; `area`, each class's on the ground (its regions', `geo.GroundArea`)."""
        present = np.nonzero(self.counts)[0]
        counts = self.counts[present]
        return ClassStats(
            class_id=present.astype(np.int64), pixel_count=counts, fraction=counts / max(int(self.counts.sum()), 1),
            mean_confidence=self.confidence[present] / counts,
            components=np.array([components.get(int(c), 0) for c in present], dtype=np.int64),
            area=np.array([area[int(c)] for c in present], dtype=np.float64),
        )
