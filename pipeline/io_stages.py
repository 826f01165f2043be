"""Stages 1 and 3 of a batch (see `pipeline.stages`): the source's files read and decoded,
and their masks written. They run in Ray's task workers beside the replicas and import no
torch, so a task worker starts in a fraction of a second and holds no torch of its own.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from .config import DEFAULT_MAX_RASTER_PIXELS
from .decode import (
    DEFAULT_MAX_PIXELS,
    DeviceJpeg,
    ImageDecodeError,
    check_pixels,
    decode,
    unreadable,
)
from .masks import encode_confidence, encode_mask
from .rasters import is_georeferenced, open_raster
from .records import ImageRecord, confidence_key_for, mask_key
from .storage import (
    Location,
    SourceFile,
    StorageUnavailableError,
    is_raster_key,
    read_bytes,
    write_atomic,
)


def read_and_decode(
    source: Location,
    files: Sequence[SourceFile],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_raster_pixels: int = DEFAULT_MAX_RASTER_PIXELS,
    time_limit_s: float | None = None,
    hard_stop: bool = False,
    jpeg_on_device: bool = False,
) -> list[ImageRecord]:
    """Records with decoded images, or the reason each file could not be decoded.

    The settings are those of `decode.decode`, which decodes each file. With `jpeg_on_device`,
    the plain JPEGs it leaves undecoded keep their bytes in `encoded`, for `SegmentStage` to
    decode on the model's device; their size comes from the header.
    """
    records = []
    for file in files:
        record = ImageRecord(key=file.key, size=file.size, version=file.version)
        start = time.perf_counter()
        try:
            if is_raster_key(file.key) and _sized_by_header(source, file.key, record, max_pixels, max_raster_pixels):
                records.append(record)  # its blocks are read beside the model (RasterStage), or it is refused
                record.seconds.decode = time.perf_counter() - start
                continue
            data = read_bytes(source, file.key)
            if data is None:
                raise FileNotFoundError(source.uri(file.key))
            decoded = decode(data, max_pixels=max_pixels, time_limit_s=time_limit_s, hard_stop=hard_stop,
                             jpeg_on_device=jpeg_on_device)
            if file.png_mask_taken_by is not None:  # a raster that is a plain image: its mask would be a taken PNG
                record.fail("mask_collision", f"it is not a georeferenced raster, so its mask {mask_key(file.key)} would "
                                              f"overwrite the mask of {file.png_mask_taken_by}; rename one of them")
            elif isinstance(decoded, DeviceJpeg):
                record.encoded, record.height, record.width = decoded.data, decoded.height, decoded.width
            else:
                record.image = decoded
                record.height, record.width = decoded.shape[:2]
        except ImageDecodeError as err:
            record.fail(err.reason, str(err))
        except FileNotFoundError:
            record.fail("missing", "the file disappeared after it was listed")
        except OSError as err:  # permanent (forbidden...): transient ones were retried, then raised
            error = unreadable(err)
            record.fail(error.reason, str(error))
        record.seconds.decode = time.perf_counter() - start
        records.append(record)
    return records


def _sized_by_header(source: Location, key: str, record: ImageRecord, max_pixels: int, max_raster_pixels: int) -> bool:
    """Whether the raster under `key` is settled by its header alone (read by range requests):
    georeferenced (the record says so and gets its size), or refused as `too_large`. A raster
    whose header claims more than `max_raster_pixels` is refused before any block is read. A
    TIFF without a CRS is an image like another, decoded whole: one that claims more than
    `max_pixels` is refused as `decode_image` would refuse it, but before its bytes are read."""
    try:
        with open_raster(source, key) as dataset:
            width, height = dataset.width, dataset.height
            if not is_georeferenced(dataset):
                try:
                    check_pixels(width, height, max_pixels)
                except ImageDecodeError as err:
                    record.fail(err.reason, str(err))
                    return True
                return False
            record.georeferenced, record.height, record.width = True, height, width
            if width * height > max_raster_pixels:
                record.fail("too_large", f"{width}x{height} pixels, more than --max-raster-pixels {max_raster_pixels}")
            return True
    except ImageDecodeError:
        return False  # not something GDAL reads: the image decoder names what is wrong


def write_masks(output: Location, records: list[ImageRecord], palette: Sequence[Sequence[int]]) -> list[ImageRecord]:
    for record in records:
        if not record.ok or record.mask_key is not None:  # a raster's mask is written beside the model
            continue
        start = time.perf_counter()
        try:
            key = mask_key(record.key)
        except ValueError as err:  # refused when the shard was planned; here for a caller that did not plan
            record.fail("unsafe_key", str(err))
            record.labels = record.confidence = None
            continue
        try:
            write_atomic(output, key, encode_mask(record.labels, palette))
            if record.confidence is not None:
                record.confidence_key = confidence_key_for(record.key)
                write_atomic(output, record.confidence_key, encode_confidence(record.confidence))
            record.mask_key = key
        except ValueError as err:  # labels no mask can hold (as the model's stage fails an image)
            record.fail("inference", f"cannot encode its mask: {err}")
        except OSError as err:
            # a write fails for the output's sake (disk full, no permission), not the image's:
            # stop the run rather than commit error rows for images that are fine
            raise StorageUnavailableError(f"cannot write {output.uri(mask_key(record.key))}: {type(err).__name__}: {err}") from err
        record.labels = record.confidence = None
        record.seconds.encode = time.perf_counter() - start
    return records
