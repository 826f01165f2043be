"""The sliding-window grid along one axis of an image: where windows start, on an image
padded at its end to whole cells of the model's output grid. Integer geometry, shared by the
model's sliding windows (`pipeline.inference`) and a raster's blocks (`pipeline.rasters`),
which plan windows without importing torch."""

from __future__ import annotations

import math


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows along one axis, the last one snapped inward to end at `length`."""
    if length <= crop:
        return [0]
    count = math.ceil((length - crop) / stride) + 1
    return [min(i * stride, length - crop) for i in range(count)]


def padded_windows(length: int, crop: int, stride: int, cell: int) -> tuple[int, list[int]]:
    """The windows along one axis of an image `length` pixels long, taken as padded at its end
    to whole cells of `cell` pixels: their side (`crop`, or the padded length if shorter) and
    their starts (`window_starts` over the padded length: the last one ends at its end)."""
    padded = ceil_to(length, cell)
    size = min(crop, padded)
    return size, window_starts(padded, size, stride)


def ceil_to(length: int, cell: int) -> int:
    """`length` rounded up to a multiple of `cell`."""
    return -(-length // cell) * cell


def window_stride(tile: int, stride: int | None) -> int:
    """The stride of `tile`-pixel windows: as given, else 3/4 of the tile (a quarter overlaps)."""
    return stride or tile * 3 // 4
