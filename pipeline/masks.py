"""Label masks as files: palette PNGs of class ids (uint16 PNGs beyond 256 classes) and
8-bit confidence maps."""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:  # annotations only: the palette is needed where torch is not imported
    import torch


def default_palette(num_classes: int) -> tuple[tuple[int, int, int], ...]:
    """The PASCAL VOC colour map (0 black, 1 dark red, 2 dark green, ...), up to 256 colours.

    Used when weights carry no palette of their own; distinct and stable across runs.
    """
    colours = []
    for index in range(min(num_classes, 256)):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


def encode_mask(labels: np.ndarray, palette: Sequence[Sequence[int]] | None = None) -> bytes:
    """PNG bytes for an (H, W) array of class ids.

    Ids below 256 become a palette ("P" mode) PNG: viewers show colours, readers get the ids
    back. Larger ids need a 16-bit greyscale PNG (no palette is possible there).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 65535):
        raise ValueError(f"class ids must lie in [0, 65535], got [{labels.min()}, {labels.max()}]")
    buffer = io.BytesIO()
    if labels.size == 0 or labels.max() < 256:
        image = Image.fromarray(labels.astype(np.uint8), mode="P")
        colours = list(palette) if palette is not None else list(default_palette(256))
        flat = [channel for colour in colours[:256] for channel in colour]
        image.putpalette(flat + [0] * (768 - len(flat)))
    else:
        image = Image.fromarray(labels.astype(np.uint16))
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    """Class ids from a mask PNG written by `encode_mask` (or any single-channel image Pillow
    reads): uint8, uint16, or int64 for 32-bit masks, whose values are kept as they are."""
    if not data:
        raise ValueError("the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():  # past half Pillow's limit it warns; past the limit it refuses
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as err:  # its message names the in-memory buffer, never the file
        raise ValueError("not an image file (Pillow recognises no format in it)") from err
    except Image.DecompressionBombError as err:  # not an OSError: it would stop a whole run
        size = str(err).split(",")[0]  # "Image size (N pixels) exceeds limit of M pixels"
        raise ValueError(f"{size}, Pillow's for one image; a mask this large is read window by window as a "
                         "GeoTIFF (gdal_translate -of COG)") from err
    with opened as image:
        # "1": one bit a pixel, as binary masks (footprints) are often saved: class ids 0 and 1
        if image.mode not in {"1", "P", "L", "I;16", "I;16B", "I"}:
            raise ValueError(f"a mask must be a single-channel image, got mode {image.mode!r}")
        array = np.array(image)
    if array.dtype in (np.uint8, np.bool_):
        return array.astype(np.uint8, copy=False)
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:  # 16-bit, either byte order
        return array.astype(np.uint16)
    # 32-bit, signed: a nodata value such as -2147483648 stays out of every class's range, where
    # uint16 would wrap it onto class 0
    return array.astype(np.int64)


def map_labels(labels: np.ndarray, label_map: Mapping[int, int] | None) -> np.ndarray:
    """int64 labels with `label_map`'s values put in, all at once (others kept), as
    MMSegmentation's `label_map`: ground truth for scoring, label masks for training."""
    out = labels.astype(np.int64)
    if not label_map:
        return out
    mapped = out
    if values := {old: new for old, new in label_map.items() if old >= 0}:
        # one lookup table up to the largest value mapped (not the largest in the mask: a 32-bit
        # nodata such as 2147483647 would ask for 16 GiB), one pass over the pixels
        top = max(values)
        table = np.arange(top + 1, dtype=np.int64)
        for old, new in values.items():
            table[old] = new
        mapped = np.where((out >= 0) & (out <= top), table[np.clip(out, 0, top)], out)
    for old, new in label_map.items():  # a signed nodata such as -9999: few, and compared as read
        if old < 0:
            mapped = np.where(out == old, new, mapped)
    return mapped


def confidence_levels(confidence: torch.Tensor) -> torch.Tensor:
    """Per-pixel confidence in [0, 1] as uint8 levels (255 = certain): a quarter of float32's
    bytes, on the confidence's device, for confidence masks."""
    return (confidence.float() * 255.0).round_().clamp_(0, 255).byte()


def encode_confidence(levels: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG of confidence levels (`confidence_levels`)."""
    levels = np.asarray(levels)
    if levels.ndim != 2 or levels.dtype != np.uint8:
        raise ValueError(f"confidence levels must be (H, W) uint8, got {levels.dtype} {levels.shape}")
    buffer = io.BytesIO()
    Image.fromarray(levels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()
