"""Each pixel's label and confidence from logits on the model's output grid.

A pixel's logits are the grid's resized bilinearly to the pixels (the model's own resize,
`GridLogits.pixels`); its label is their argmax and its confidence the largest class
probability, 1 / sum(exp(logits - their max)). Done as tensor operations, that is a C x H x W
tensor of resized logits, written once and read twice: 8 of the 29 ms a CPU replica spent on a
CamVid frame with 21 classes (`bench/profile_replica.py`), bound by that tensor's memory
traffic, not by its arithmetic.

`PixelLabeler` compiled makes it one inductor kernel per group of classes: the logits are
resized along the width only (C x h x W, an eighth of the pixels for cells of 8), and the
kernel lerps each pixel's two rows of every class in registers, keeps the running argmax and
the sum of exponentials, and writes one label and one confidence per pixel. The classes are
taken `CLASS_GROUP` at a time, each group's kernel updating the running maximum, label and
sum (as an online softmax does), so the kernel's size, and its compilation, stay bounded
whatever the number of classes.
"""

from __future__ import annotations

import time

import torch
import torch.fx.experimental._config
import torch.nn.functional as F

from .inference import GridLogits
from .numerics import floored_exp_
from .stats import labels_and_confidence_of_logits

# classes per compiled kernel: the kernel unrolls them, so its compilation grows with them
CLASS_GROUP = 32
# the logit of the classes that pad the last group: never the maximum, exp() of it is 0
_ABSENT = -1e30


def _reduce_classes(values: torch.Tensor, top: torch.Tensor, bottom: torch.Tensor, weight: torch.Tensor,
                    best: torch.Tensor, label: torch.Tensor, total: torch.Tensor,
                    first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One group of classes: `values` (G, rows, W) logits resized along the width; each pixel
    row y lerps rows `top[y]` and `bottom[y]` with `weight[y]` (the bottom row's). Updates the
    running maximum `best`, its class `label` (float, as the group's first class `first`, a
    0-d tensor: so the kernel stays vectorised, and one compiled kernel serves every group) and the
    sum `total` of exp(logit - best) over the classes seen, all (H, W)."""
    weight = weight[:, None]
    keep = 1 - weight

    def logit(k: int) -> torch.Tensor:
        return values[k, top] * keep + values[k, bottom] * weight

    new_best = best
    for k in range(values.shape[0]):
        value = logit(k)
        label = torch.where(value > new_best, first + k, label)  # the first of equal maxima, as torch.max
        new_best = torch.maximum(new_best, value)
    total = total * floored_exp_(best - new_best)  # the earlier groups' sum, at the new maximum
    for k in range(values.shape[0]):
        total = total + floored_exp_(logit(k) - new_best)
    return new_best, label, total


class PixelLabeler:
    """Labels (H, W) int64 and confidence (H, W) float32 of the pixels [rows) x [cols) of a
    `GridLogits`, as `labels_and_confidence_of_logits(grid.pixels(rows, cols))` gives them.

    `compiled` (a compiled CPU model's replica): one inductor kernel per group of classes, as
    the module says, its compilation paid at the first call (`compile_seconds`), and shared by
    parts of every size; its labels equal the tensor operations' but where two classes tie
    within float rounding. Otherwise, for logits already on the pixels (cells of 1), and for
    parts one pixel or one row of cells wide, the tensor operations. (A NaN logit, from a
    broken model, gives a NaN confidence either way; the kernel's label is then the largest
    class before it, torch.max's the NaN's.)"""

    def __init__(self, *, compiled: bool) -> None:
        self.compiled = compiled
        # dynamic: images and regions of every size share the kernels
        self._reduce = torch.compile(_reduce_classes, dynamic=True) if compiled else None
        self._compiled_for: set[int] = set()  # group sizes whose kernel was compiled
        self.compile_seconds = 0.0

    def __call__(self, grid: GridLogits, rows: tuple[int, int], cols: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        (y0, y1), (x0, x1) = grid.cells_around(rows, cols)
        # a part one row or column wide (or of one row of cells) would make dynamo compile the
        # kernel again, specialised to that size of 1: such parts are small, and take the tensor operations
        if self._reduce is None or grid.cell == 1 or min(y1 - y0, rows[1] - rows[0], cols[1] - cols[0]) < 2:
            return labels_and_confidence_of_logits(grid.pixels(rows, cols))
        cell = grid.cell
        values = grid.cells((y0, y1), (x0, x1))
        classes, height, width = values.shape
        # along the width only: a height of its own size is an identity for the bilinear
        # resize, which is then the linear one over every row of every class, the same numbers
        # in half the time (0.31 against 0.62 ms for a CamVid frame's 21 x 45 x 60 cells)
        values = F.interpolate(values.reshape(1, classes * height, width), size=width * cell, mode="linear",
                               align_corners=False).view(classes, height, width * cell)
        values = values[:, :, cols[0] - x0 * cell : cols[1] - x0 * cell]
        top, bottom, weight = _row_lerp(rows[0] - y0 * cell, rows[1] - y0 * cell, y1 - y0, cell, values.device)
        shape = (rows[1] - rows[0], cols[1] - cols[0])
        best = torch.full(shape, float("-inf"), device=values.device)
        label = torch.zeros(shape, device=values.device)
        total = torch.zeros(shape, device=values.device)
        # without duck shaping: by default dynamo gives sizes that are equal at the first call
        # one symbol, and compiles again when they differ (a square part, then another)
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            for first in range(0, values.shape[0], CLASS_GROUP):
                group = values[first : first + CLASS_GROUP]
                if len(group) < min(CLASS_GROUP, len(values)):  # the last group, padded to the others' size
                    group = F.pad(group, (0, 0, 0, 0, 0, CLASS_GROUP - len(group)), value=_ABSENT)
                started = time.perf_counter()
                best, label, total = self._reduce(group.contiguous(), top, bottom, weight, best, label, total,
                                                  torch.tensor(float(first), device=values.device))
                if len(group) not in self._compiled_for:
                    self._compiled_for.add(len(group))
                    self.compile_seconds += time.perf_counter() - started
        return label.long(), total.reciprocal_()


def _row_lerp(start: int, stop: int, cells: int, cell: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """For pixel rows [start, stop) of `cells` cells of `cell` rows each: the two cells each
    row lerps and the second one's weight, as PyTorch's bilinear resize (align_corners=False)
    computes them: source row (y + 0.5) / cell - 0.5, clamped at 0, and the last cell alone
    at the end."""
    source = ((torch.arange(start, stop, device=device, dtype=torch.float32) + 0.5) / cell - 0.5).clamp_min_(0)
    top = source.long().clamp_max_(cells - 1)
    bottom = (top + 1).clamp_max_(cells - 1)
    return top, bottom, source - top
