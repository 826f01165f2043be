"""Image files to RGB images: the one way from a file's bytes to pixels.

`decode` is the entry point, and the one place that decides how a file is decoded. Most files
are decoded there, on the CPU, where they were read. With `jpeg_on_device`, a plain JPEG
(`plain_jpeg_shape`) is instead returned undecoded as a `DeviceJpeg`, for
`stages.decode_on_device` to decode next to the model (nvjpeg through `torchvision.io.decode_jpeg` on a GPU) with the
same result: only compressed bytes then cross to the GPU.

An image is segmented as a viewer displays it: EXIF orientation is applied, and every mode
(greyscale, palette, RGBA, CMYK) becomes 8-bit RGB. Samples deeper than 8 bits (16-bit PNG,
uint16 or float GeoTIFF) are stretched per band between their 2nd and 98th percentiles, as GIS
viewers display them: satellite data often fills only 11 or 12 of its 16 bits, and a plain
division by 65535 would leave it black. Of more than three bands the first three are used.
Multi-frame files give their first frame. A file whose header claims more pixels than
`max_pixels` is refused before its pixels are decoded.

On the CPU (`decode_image`), Pillow decodes everything it can; TIFFs it cannot (separate band
planes, many bands, float samples) go to tifffile.

`time_limit` bounds the wall time of a CPU decode: a file can be small, within the pixel limit
and still take minutes (a highly compressed plane of zeros, a JPEG with thousands of scans).
"""
from __future__ import annotations

import io
import logging
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import tifffile
from PIL import Image, ImageOps

from .config import DEFAULT_MAX_PIXELS
from .text import counted

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class ImageDecodeError(ValueError):
    """A file that cannot become an RGB image; `reason` is a short category for error counts."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # picklable with both arguments, so Ray can carry it between processes
        return type(self), (self.reason, str(self))


def unreadable(err: OSError) -> ImageDecodeError:
    """A permanent storage error reading a source file (forbidden: S3's AccessDenied) as the
    file's `read_error`, whether an image's bytes or a raster's blocks were being read.
    Transient errors were retried, and end as StorageUnavailableError, which stops the run."""
    return ImageDecodeError("read_error", f"cannot read: {type(err).__name__}: {err}")


class DecodeTimeout(BaseException):
    """Raised into a decode that ran past its time limit.

    A BaseException, like KeyboardInterrupt, so that no decoder's `except Exception` swallows
    it and reports a broken file instead.
    """


@contextmanager
def time_limit(seconds: float | None, *, hard_stop_after: float | None = None) -> Iterator[None]:
    """Interrupt the block with DecodeTimeout after `seconds` of wall time.

    The interruption is a SIGALRM, delivered between the decoder's steps (Pillow feeds its
    decoders 64 KiB at a time), so it needs the main thread; elsewhere the block runs
    unlimited. A decoder stuck inside one C call never sees the signal: with
    `hard_stop_after`, a watchdog thread then ends the whole process after that many seconds,
    which only a disposable worker process (a Ray task) should ask for.
    """
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum: int, frame: object) -> None:
        raise DecodeTimeout(f"decoding took longer than the {seconds:g} s limit")

    watchdog = None
    if hard_stop_after is not None:
        watchdog = threading.Timer(hard_stop_after, _stop_process, (hard_stop_after,))
        watchdog.daemon = True
        watchdog.start()
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if watchdog is not None:
            watchdog.cancel()


def _stop_process(after: float) -> None:
    sys.stderr.write(f"segpipe: a decode ignored its time limit for {after:g} s; stopping this worker process\n")
    sys.stderr.flush()
    os._exit(70)


@dataclass(frozen=True)
class DeviceJpeg:
    """A plain JPEG left undecoded for the model's device; its size read from the header."""

    data: bytes
    height: int
    width: int


def decode(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    time_limit_s: float | None = None,
    hard_stop: bool = False,
    jpeg_on_device: bool = False,
) -> np.ndarray | DeviceJpeg:
    """(H, W, 3) uint8 RGB from the bytes of an image file or, with `jpeg_on_device`, a plain
    JPEG left for `stages.decode_on_device`.

    The one place that decides which path a file takes: to the device only a JPEG whose header
    promises that the device decoder gives what `decode_image` gives; every other file, broken
    ones included, is decoded here, by `decode_image`, which knows why a file fails.

    `time_limit_s` bounds the CPU decode (see `time_limit`); with `hard_stop` a decode stuck
    past twice the limit (at least the limit plus 5 s) ends the process, for Ray to replace.
    Raises ImageDecodeError, with reason "timeout" for a decode stopped at the limit.
    """
    shape = plain_jpeg_shape(data, max_pixels=max_pixels) if jpeg_on_device else None
    if shape is not None:
        return DeviceJpeg(data, *shape)
    hard_stop_after = time_limit_s + max(time_limit_s, 5.0) if hard_stop and time_limit_s else None
    try:
        with time_limit(time_limit_s, hard_stop_after=hard_stop_after):
            return decode_image(data, max_pixels=max_pixels)
    except DecodeTimeout as err:
        raise ImageDecodeError("timeout", str(err)) from err


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """ImageDecodeError("too_large") for an image whose header claims more than `max_pixels`,
    before its pixels are decoded (or, for a TIFF read by its header, downloaded)."""
    if width * height > max_pixels:
        raise ImageDecodeError("too_large", f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}")


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """(H, W, 3) uint8 RGB from the bytes of an image file, as displayed."""
    if not data:
        raise ImageDecodeError("empty", "the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # what Pillow finds wrong in a file it still reads ("Tag data larger than file",
            # "Corrupt EXIF data"): a line per tag, per worker; a file it cannot read is an error row
            warnings.simplefilter("ignore", UserWarning)
            with Image.open(io.BytesIO(data)) as image:
                check_pixels(*image.size, max_pixels)
                image.seek(0)
                image = ImageOps.exif_transpose(image)
                return _to_rgb(image)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageDecodeError("too_large", str(err)) from err
    except Image.UnidentifiedImageError as err:
        if data[:4] in _TIFF_MAGIC:
            return _decode_tiff(data, max_pixels, err)
        raise ImageDecodeError("not_an_image", "not a recognised image format") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        if data[:4] in _TIFF_MAGIC:
            return _decode_tiff(data, max_pixels, err)
        reason = _pillow_reason(err)
        if "truncated" in reason.lower():
            reason += f" (the file ends after {counted(len(data), 'byte')})"
        raise ImageDecodeError("corrupt", f"cannot decode: {reason}") from err


def _pillow_reason(err: BaseException) -> str:
    """Pillow's error, as said of the file: its "cannot identify image file <_io.BytesIO object
    at 0x...>" names the buffer it read, and its "(8 bytes not processed)" counts what its last
    read left over, not what is missing (the file's own size says more)."""
    if isinstance(err, Image.UnidentifiedImageError):
        return "Pillow recognises no format in it"
    return re.sub(r" \(\d+ bytes not processed\)$", "", str(err))


_EXIF_ORIENTATION = 0x0112


def plain_jpeg_shape(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int] | None:
    """(height, width) of a JPEG that a device decoder turns into the same RGB image as
    `decode_image`, read from its header alone; None for every other file. `decode` asks it.

    Plain means: baseline (a progressive file can hold thousands of scans, a decode-time bomb
    that only the time-limited CPU decode may meet), 8-bit greyscale or YCbCr (not CMYK), no
    EXIF rotation, and within `max_pixels`. Anything else, broken files included, goes to
    `decode_image`, which knows why it fails.
    """
    if data[:3] != b"\xff\xd8\xff":
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                plain = (
                    image.format == "JPEG" and image.mode in {"RGB", "L"} and not image.info.get("progressive")
                    and image.width * image.height <= max_pixels and image.getexif().get(_EXIF_ORIENTATION, 1) == 1
                )
                return (image.height, image.width) if plain else None
    except Exception:
        return None


class _Unsaid(logging.Filter):
    """Drops every record: tifffile logs what it finds wrong in a broken file as a warning (one
    line a tag, printed by each worker), and then raises; the error row says it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return False


def _decode_tiff(data: bytes, max_pixels: int, pillow_error: BaseException) -> np.ndarray:
    tifffile_log, unsaid = logging.getLogger("tifffile"), _Unsaid()
    tifffile_log.addFilter(unsaid)
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            page = tiff.pages.first
            height, width = page.imagelength, page.imagewidth
            check_pixels(width, height, max_pixels)
            array = page.asarray()
    except ImageDecodeError:
        raise
    except Exception as err:  # tifffile raises many types for broken files
        raise ImageDecodeError("corrupt", f"cannot decode TIFF ({counted(len(data), 'byte')}): "
                                          f"{_pillow_reason(pillow_error)}; tifffile: {err}") from err
    finally:
        tifffile_log.removeFilter(unsaid)
    if array.ndim == 3 and array.shape[:2] != (height, width):
        array = np.moveaxis(array, 0, -1)  # separate band planes: (bands, H, W)
    return _bands_to_rgb(array)


def stretch_limits(values: np.ndarray) -> tuple[float, float]:
    """Low and high of the linear stretch of deep samples to 0..255: the 2nd and 98th
    percentiles, as GIS viewers show them (satellite data often uses 11 or 12 of its 16 bits);
    min and max where those meet; (v, v + 1) for a constant. The one rule, for images decoded
    whole and for georeferenced rasters (`rasters.band_limits`, over the whole raster)."""
    low, high = (float(v) for v in np.percentile(values, (2, 98)))
    if high <= low:
        low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1.0
    return low, high


def _stretch(band: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(band.astype(np.float64))
    low, high = stretch_limits(values)
    return np.clip((values - low) / (high - low) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _bands_to_rgb(array: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, bands) of any dtype to (H, W, 3) uint8."""
    if array.ndim == 2:
        array = array[..., None]
    array = array[..., :3]
    if array.dtype != np.uint8:
        array = np.stack([_stretch(array[..., b]) for b in range(array.shape[-1])], axis=-1)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    elif array.shape[-1] == 2:  # grey + alpha
        array = np.repeat(array[..., :1], 3, axis=-1)
    return np.ascontiguousarray(array)


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}:
        return _bands_to_rgb(np.asarray(image))
    return np.asarray(image.convert("RGB"))
