"""The inference engine: one model on one device, images in, probabilities out.

`Segmenter.predict` takes decoded RGB images of any sizes and returns class probabilities at
each image's own size. Preprocessing (mean, std, resize policy) comes from the weights'
metadata and is `pipeline.preprocess`'s, the one training uses too. Images of one size are
batched together; images larger than a configured crop can be segmented with sliding windows
whose overlaps are blended with weights that fade toward the window edges.

Precision: bf16 autocast wherever the device computes bf16 natively (CUDA; a CPU with
AVX512_BF16 or AMX, through oneDNN), float32 elsewhere. On CPU, bf16 needs the model compiled
with inductor's freezing: eager bf16 reorders every convolution's weights at every call
(visible with ONEDNN_VERBOSE=1) and runs slower than float32, while a frozen graph prepacks them
once. channels_last on every device (oneDNN's convolutions and PyTorch's bilinear upsampling
are faster in it: 1.3 to 1.5x for the whole forward of DeepLabV3 and LR-ASPP on 2 cores). The
precision, layout and compilation can be forced either way, so each path runs in tests on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .models import ModelMeta
from .models._base import GridHead
from .numerics import floored_exp_
from .preprocess import ImageLike, Normalizer, to_chw_uint8
from .windows import ceil_to, padded_windows


@dataclass(frozen=True)
class SlidingWindow:
    """Tile images bigger than `crop` (height, width) into windows `stride` apart.

    The last window of each row and column is snapped inward so it ends at the image edge,
    as MMSegmentation does. `batch_size` windows go through the model at once, which bounds
    the model's memory whatever the image size.
    """

    crop: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (384, 384)
    batch_size: int = 8

    def __post_init__(self) -> None:
        if min(self.crop) < 1 or min(self.stride) < 1 or self.batch_size < 1:
            raise ValueError(f"crop, stride and batch_size must be positive: {self}")
        if self.stride[0] > self.crop[0] or self.stride[1] > self.crop[1]:
            raise ValueError(f"stride {self.stride} larger than crop {self.crop} would leave gaps")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: a CUDA GPU that supports it, or a CPU whose
    oneDNN kernels have bf16 instructions (AVX512_BF16, AMX). Elsewhere bf16 is emulated, and
    slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class WindowStore(Protocol):
    """Window logits shared between the regions of one larger image that `predict_region`
    segments one at a time, keyed by each window's (row, col) origin in that image, so a window
    that reaches into several regions goes through the model once."""

    def take(self, origin: tuple[int, int]) -> torch.Tensor | None:
        """The window's (C, h, w) logits if they were kept, else None; either way this
        region's use of the window is counted."""

    def keep(self, origin: tuple[int, int], logits: torch.Tensor) -> None:
        """Offer a window's logits, just computed, for the regions still to come."""


def blend_ramp(length: int, device: torch.device) -> torch.Tensor:
    """(length,) weights along one side of a window: a sine ramp that is largest in the centre
    and fades toward the edges without reaching zero, so every pixel keeps a positive total
    weight. A window's (H, W) weights are the outer product of its two sides' ramps."""
    t = (torch.arange(length, device=device, dtype=torch.float32) + 0.5) / length
    return torch.sin(math.pi * t).clamp_min(1e-3)


@dataclass(frozen=True)
class GridLogits:
    """Class logits of an image on the model's output grid, before the final resize to pixels.

    `values` (C, h, w) float32 are those of cells `cell` x `cell` pixels, the first one's
    top-left corner at pixel `origin` (row, col) of the image; `grid` (rows, cols) is the
    number of cells of the whole image of `size` (height, width) pixels, padded at its end to
    whole cells. `values` may hold only some of them. Cells of 1 pixel are the image's pixels.
    """

    values: torch.Tensor
    cell: int
    origin: tuple[int, int]
    grid: tuple[int, int]
    size: tuple[int, int]

    def cells(self, rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
        """(C, h, w) values of the cells [rows) x [cols), counted in the whole grid."""
        top, left = self.origin[0] // self.cell, self.origin[1] // self.cell
        if rows[0] < top or cols[0] < left or rows[1] > top + self.values.shape[-2] or cols[1] > left + self.values.shape[-1]:
            raise ValueError(f"cells {rows} x {cols} are not all among those held: {top}.. x {left}..")
        return self.values[:, rows[0] - top : rows[1] - top, cols[0] - left : cols[1] - left]

    def with_values(self, values: torch.Tensor, origin: tuple[int, int]) -> GridLogits:
        return GridLogits(values, self.cell, origin, self.grid, self.size)

    def on_pixels(self) -> torch.Tensor:
        """(C, H, W) logits of the whole image (all its cells must be held)."""
        return self.pixels((0, self.size[0]), (0, self.size[1]))

    def cells_around(self, rows: tuple[int, int], cols: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """The cells [rows) x [cols) of the grid whose values the bilinear resize of the pixels
        [rows) x [cols) reads: each pixel's two nearest along each axis."""
        c = self.cell
        return ((max(0, rows[0] // c - 1), min(self.grid[0], -(-rows[1] // c) + 1)),
                (max(0, cols[0] // c - 1), min(self.grid[1], -(-cols[1] // c) + 1)))

    def pixels(self, rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
        """(C, h, w) logits of the pixels [rows) x [cols) of the image: the model's own bilinear
        resize (align_corners=False), of only the cells those pixels need. Exactly the pixels
        of the whole grid resized, because each pixel takes its two nearest cells along each
        axis, and a cell beyond the pixels' own is taken wherever the grid has one."""
        c = self.cell
        if c == 1:
            return self.cells(rows, cols)
        (y0, y1), (x0, x1) = self.cells_around(rows, cols)
        values = self.cells((y0, y1), (x0, x1))[None]
        # channels_last: PyTorch's vectorised bilinear kernel on CPU, about 3x the NCHW one
        resized = F.interpolate(values.contiguous(memory_format=torch.channels_last), size=((y1 - y0) * c, (x1 - x0) * c),
                                mode="bilinear", align_corners=False)[0]
        return resized[:, rows[0] - y0 * c : rows[1] - y0 * c, cols[0] - x0 * c : cols[1] - x0 * c]


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode model in which every BatchNorm2d that directly follows a Conv2d
    is folded into that convolution's weights and bias, as MMSegmentation's `fuse_conv_bn`
    does for inference: one pass over the activations instead of two (batch norm took 7 to 13%
    of a MobileNetV3 DeepLab's forward on CPU, profiled).

    Pairs are folded only where the order of definition is the order of execution:
    consecutive children of an nn.Sequential or of torchvision's IntermediateLayerGetter (never
    a child whose output it returns), and the convN/bnN pairs of ResNet blocks.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    def foldable(conv: nn.Module | None, bn: nn.Module | None) -> bool:
        return (
            type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.num_features == conv.out_channels
            and bn.running_mean is not None and bn.running_var is not None
        )

    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if isinstance(module, nn.Sequential | IntermediateLayerGetter):
            returned = set(getattr(module, "return_layers", {}))
            names = list(module._modules)
            for first, second in itertools.pairwise(names):
                conv, bn = module._modules[first], module._modules[second]
                if first not in returned and foldable(conv, bn):
                    module._modules[first] = fuse_conv_bn_eval(conv, bn)
                    module._modules[second] = nn.Identity()
        if isinstance(module, BasicBlock | Bottleneck | ResNet):
            for index in (1, 2, 3):
                conv, bn = getattr(module, f"conv{index}", None), getattr(module, f"bn{index}", None)
                if foldable(conv, bn):
                    setattr(module, f"conv{index}", fuse_conv_bn_eval(conv, bn))
                    setattr(module, f"bn{index}", nn.Identity())
    return model


def softmax_classes(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1 of (B, C, H, W) logits, in the layout they come in.

    For channels_last logits, PyTorch's softmax over dim 1 is 2 to 3 times slower on CPU than
    the same arithmetic over the last dimension of the (B, H, W, C) view; that one in turn is
    fast only for 16 classes or more (its vector lanes): below, the max / exp / sum over the
    class dimension is 3x faster (7 classes, 2048x2048: 80 against 254 ms on 2 cores).
    """
    if logits.dim() == 4 and not logits.is_contiguous() and logits.is_contiguous(memory_format=torch.channels_last):
        if logits.shape[1] >= 16:
            return torch.softmax(logits.permute(0, 2, 3, 1), dim=-1).permute(0, 3, 1, 2)
        exp = floored_exp_(logits - logits.amax(dim=1, keepdim=True))
        return exp.div_(exp.sum(dim=1, keepdim=True))
    return torch.softmax(logits, dim=1)


class Segmenter:
    """One model on one device, loaded once, serving batches of images.

    It runs its own copy of the model, in eval mode with batch norms folded into the
    convolutions before them (`fold_batch_norms`): the model given is left as it is, so
    training can validate through a Segmenter and go on training.

    `precision`: "auto" is bf16 autocast where the device has native bf16 (`native_bf16`), on
    CPU unless `compile` is False, float32 elsewhere. `channels_last`: None means yes, on every device. `compile`: wrap the
    model in `torch.compile`, on CPU with inductor's freezing (weights prepacked once); None
    compiles where it pays: bf16 on CPU. The model runs without its final resize to the input's
    pixels (`models.GridHead`); its output stride (`output_stride`) is measured once, here, by
    one forward of the uncompiled model on a 128 x 128 input. A compiled model pays its compilation at the first batch
    of each input shape, in every process (seconds: PyTorch does not cache a frozen graph, whose
    prepacked weights it cannot pickle; inductor's cache of built kernels on local disk saves their
    C++ builds).
    Process-wide settings (`torch.backends.cudnn.benchmark`, thread counts) are the caller's: the
    process that serves the model sets them.
    """

    def __init__(
        self,
        model: nn.Module,
        meta: ModelMeta | None = None,
        *,
        device: str | torch.device | None = None,
        batch_size: int = 8,
        sliding_window: SlidingWindow | None = None,
        precision: Literal["auto", "fp32", "bf16"] = "auto",
        channels_last: bool | None = None,
        compile: bool | None = None,
    ) -> None:
        self.meta: ModelMeta = meta if meta is not None else model.meta
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if precision not in {"auto", "fp32", "bf16"}:
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
        self.batch_size = batch_size
        self.sliding_window = sliding_window
        # auto on CPU: bf16 only compiled, where it pays (eager bf16 is slower than float32)
        bf16 = precision == "bf16" or (precision == "auto" and native_bf16(self.device)
                                       and (self.device.type != "cpu" or compile is not False))
        self.autocast_dtype = torch.bfloat16 if bf16 else None
        self.channels_last = True if channels_last is None else channels_last
        head = GridHead(fold_batch_norms(model)).to(self.device)
        if self.channels_last:
            head = head.to(memory_format=torch.channels_last)
        self.compiled = compile if compile is not None else bf16 and self.device.type == "cpu"
        if self.compiled and not torch.cuda.is_available():
            # inductor's C++ build imports torch.utils.cpp_extension, which warns "No CUDA runtime
            # is found, using CUDA_HOME=..." wherever a CUDA toolkit is installed without a GPU:
            # about GPUs, on every CPU run, and nothing to act on
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        # the logits on the model's output grid (`GridHead`): resized to pixels by the caller
        self.model = torch.compile(head) if self.compiled else head
        self.normalize = Normalizer(self.meta.preprocessing, self.device)
        self.output_stride = self._output_stride(head)
        # a compiled model's first call of each input shape compiles it: seconds by shape,
        # shared with the copies `at_native_resolution` makes (see `compile_seconds`)
        self._first_calls: dict[tuple[int, ...], float] = {}

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    @property
    def compile_seconds(self) -> float:
        """Seconds the first call of each input shape took, for a compiled model: its
        compilation for that shape (and one forward), paid once per process and shape."""
        return float(sum(self._first_calls.values()))

    def at_native_resolution(self, sliding_window: SlidingWindow) -> Segmenter:
        """This segmenter (the same model, not a copy) sliding `sliding_window` over images
        at their own resolution, whatever resize the weights ask for: a georeferenced raster
        keeps its ground sampling distance, and a block's windows fall exactly where the whole
        raster's would."""
        other = copy.copy(self)
        other.sliding_window = sliding_window
        native = self.meta.preprocessing.model_copy(update={"resize": "none"})
        other.meta = self.meta.model_copy(update={"preprocessing": native})
        return other

    @torch.inference_mode()
    def predict(self, images: Sequence[ImageLike]) -> list[torch.Tensor]:
        """Class probabilities, one float32 (C, H, W) tensor per image at its original size,
        on the segmenter's device, in the order given."""
        return [softmax_classes(grid.on_pixels()[None])[0] for grid in self.predict_logits(images)]

    @torch.inference_mode()
    def predict_logits(self, images: Sequence[ImageLike]) -> list[GridLogits]:
        """Class logits of each image on the model's output grid, in the order given, on the
        segmenter's device: `GridLogits.on_pixels` gives them at the image's own size.

        At native resolution the image is padded at its end to whole cells of that grid
        (edge pixels repeated), as MMSegmentation's data preprocessor pads to a size divisor,
        so the grid lies on the image's pixels exactly; an image resized for the model
        (`Preprocessing.resize`) gets its logits resized back to its pixels (cells of 1)."""
        tensors = [to_chw_uint8(image) for image in images]
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, image in enumerate(tensors):
            groups[tuple(image.shape[-2:])].append(index)
        results: list[GridLogits | None] = [None] * len(tensors)
        for size, indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                # to the device as uint8 (a quarter of float32's bytes); resized and normalised there
                batch = self.normalize.to_device(torch.stack([tensors[i] for i in chunk]))
                for i, grid in zip(chunk, self._grids(batch, size), strict=True):
                    results[i] = grid
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def region_logits(self, image: ImageLike, *, origin: tuple[int, int], cell: int, windows: WindowStore,
                      part: tuple[tuple[int, int], tuple[int, int]] | None = None) -> GridLogits:
        """Blended logits of one region of a larger image on the model's output grid, the
        region's pixels at `origin` (row, col) in the larger image, with windows shared with
        the other regions through `windows`; only the cells the rectangle `part` needs
        ((top, bottom), (left, right) in the region's pixels; default: all of it), which is
        all the caller keeps, and one more around it wherever the region has one, so that
        `GridLogits.pixels` gives the rectangle's pixels exactly.

        The region must be cut along the larger image's sliding-window grid (see
        `rasters.plan_blocks`) with the same `cell` (`grid_cell`), so its windows are that
        grid's; and the segmenter must work at native resolution
        (`at_native_resolution`). Logits, not probabilities: the caller takes the class
        softmax (it may refine them first).
        """
        if self.sliding_window is None or self.meta.preprocessing.resize != "none":
            raise ValueError("region_logits needs a sliding window at native resolution (at_native_resolution)")
        pixels = self.normalize.to_device(to_chw_uint8(image)[None])
        return self._slide(pixels[0], cell, origin=origin, windows=windows, part=part)

    def grid_cell(self) -> int:
        """The side, in pixels, of the cells on which the sliding window blends: the model's
        output stride where the window's crop and stride are whole numbers of cells, else 1
        (each window's logits resized to pixels first)."""
        window = self.sliding_window
        if window is None:
            raise ValueError("grid_cell is that of a sliding window")
        cell = self.output_stride
        return 1 if any(n % cell for n in (*window.crop, *window.stride)) else cell

    def _output_stride(self, head: nn.Module) -> int:
        """Input pixels per output cell of the model, measured on a small input with the
        uncompiled model (1 if the output is not a whole fraction of the input)."""
        probe = 128
        with torch.inference_mode():
            out = head(torch.zeros(1, 3, probe, probe, device=self.device))
        height, width = out.shape[-2:]
        return probe // height if height == width and probe % height == 0 else 1

    def _grids(self, batch: torch.Tensor, size: tuple[int, int]) -> list[GridLogits]:
        """Logits on the model's grid for a uint8 batch of one size (see `predict_logits`)."""
        height, width = self.meta.preprocessing.input_size(*size)
        pixels = self._resize_pixels(batch, (height, width))
        window = self.sliding_window
        if window is not None and (height > window.crop[0] or width > window.crop[1]):
            cell = self.grid_cell()
            grids = [self._slide(image, cell) for image in pixels]
        else:
            grids = self._whole(pixels)
        if (height, width) == size:
            return grids
        # resized for the model: its logits at the model's input size, then at the image's own
        return [GridLogits(F.interpolate(grid.on_pixels()[None], size=size, mode="bilinear", align_corners=False)[0],
                           1, (0, 0), size, size) for grid in grids]

    def _whole(self, pixels: torch.Tensor) -> list[GridLogits]:
        """Logits of each image of a batch in one forward, the images padded to whole cells."""
        cell = self.output_stride
        height, width = pixels.shape[-2:]
        padded = _pad_to_cells(pixels, cell)
        grid = (padded.shape[-2] // cell, padded.shape[-1] // cell)
        out = self._forward(padded, batch_size=self.batch_size)
        if tuple(out.shape[-2:]) != grid:  # not a whole fraction of this input: its pixels, as the model resizes
            out = F.interpolate(out, size=padded.shape[-2:], mode="bilinear", align_corners=False)
            cell, grid = 1, tuple(padded.shape[-2:])
        return [GridLogits(values, cell, (0, 0), grid, (height, width)) for values in out]

    @staticmethod
    def _resize_pixels(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Resize uint8 pixels to `size`, keeping 0..255 values; uint8 stays uint8 when no resize."""
        if tuple(batch.shape[-2:]) == size:
            return batch
        return F.interpolate(batch.float(), size=size, mode="bilinear", align_corners=False, antialias=True)

    def _forward(self, pixels: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
        """Float32 logits on the model's output grid (`GridHead`).

        A compiled model sees two batch sizes only: `batch_size`, and 1 for the images of a
        last, smaller batch, which go through one at a time (on a CPU, about as fast per image:
        13.7 against 14.3 ms per 512-pixel window for LR-ASPP in bf16). Any other batch size
        would make dynamo recompile the model with a dynamic batch dimension, whose kernels ran
        14% slower for every batch after it (measured); the batch dimension is marked static,
        so each of the two sizes gets its own compiled graph instead."""
        if self.compiled and batch_size is not None and 1 < len(pixels) < batch_size:
            return torch.cat([self._forward(one) for one in pixels.split(1)])
        x = self.normalize(pixels)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        first = False
        if self.compiled:
            torch._dynamo.mark_static(x, 0)
            first = tuple(x.shape) not in self._first_calls
        started = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None), \
                self._freezing():
            out = self.model(x)
        if first:
            self._first_calls[tuple(x.shape)] = time.perf_counter() - started
        return out.float()

    def _freezing(self) -> contextlib.AbstractContextManager:
        """On CPU, a compiled model is compiled with inductor's freezing: its weights become
        constants of the graph, prepacked for oneDNN once. Inductor reads the setting when it
        compiles, which is at the first call of each input shape, not at `torch.compile`
        (whose `options={"freezing": True}` leaves the weights graph inputs, re-cast and
        re-packed at every call: measured, half the bf16 speed), so every call carries it."""
        if not (self.compiled and self.device.type == "cpu"):
            return contextlib.nullcontext()
        import torch._inductor.config

        return torch._inductor.config.patch(freezing=True)

    def _slide(self, image: torch.Tensor, cell: int, *, origin: tuple[int, int] = (0, 0),
               windows: WindowStore | None = None, part: tuple[tuple[int, int], tuple[int, int]] | None = None) -> GridLogits:
        """Logits of one (3, H, W) image from overlapping windows, blended on cells of `cell`
        pixels (`grid_cell`): of the cells the rectangle `part` of the image needs (see
        `region_logits`), or of all of them.

        The image is taken as padded at its end to whole cells with its edge's pixels, so that
        every window, the last one of a row or column snapped to the padded end included,
        starts on the grid. Only `batch_size` windows are normalised and run at a time. With
        `windows`, a window whose logits another region kept is not run again; the windows are
        still blended in the same order, so the sums are the same.
        """
        window = self.sliding_window
        assert window is not None
        height, width = image.shape[-2:]
        image = _pad_to_cells(image, cell)
        padded_h, padded_w = image.shape[-2:]
        grid = (padded_h // cell, padded_w // cell)
        (top, bottom), (left, right) = part or ((0, height), (0, width))
        # the cells the part needs, and one more on each side for the resize to pixels
        top, bottom = max(0, top // cell - 1), min(grid[0], -(-bottom // cell) + 1)
        left, right = max(0, left // cell - 1), min(grid[1], -(-right // cell) + 1)
        crop_h, rows = padded_windows(height, window.crop[0], window.stride[0], cell)
        crop_w, cols = padded_windows(width, window.crop[1], window.stride[1], cell)
        cells_h, cells_w = crop_h // cell, crop_w // cell
        boxes = [(y, x) for y in rows for x in cols]
        ramp_h, ramp_w = blend_ramp(cells_h, image.device), blend_ramp(cells_w, image.device)
        weight = ramp_h[:, None] * ramp_w[None, :]
        # the windows form a grid, so the weights' sum is the outer product of the sums of the
        # ramps along each axis: one pass over the logits fewer per window
        sum_h, sum_w = torch.zeros(grid[0], device=image.device), torch.zeros(grid[1], device=image.device)
        for y in rows:
            sum_h[y // cell : y // cell + cells_h] += ramp_h
        for x in cols:
            sum_w[x // cell : x // cell + cells_w] += ramp_w
        logits_sum = torch.zeros(1, self.num_classes, bottom - top, right - left, device=image.device)
        if self.channels_last:
            # the model's own layout: window logits then add in without a transposing copy
            logits_sum = logits_sum.contiguous(memory_format=torch.channels_last)
        total = logits_sum[0]
        ready: dict[tuple[int, int], torch.Tensor] = {}  # windows' logits taken or run, not yet blended
        asked: set[tuple[int, int]] = set()  # windows whose store was asked already

        def run_ahead(first: int) -> None:
            """Logits of the windows from `boxes[first]` on: those the store kept, and those it
            did not, run through the model `batch_size` at a time."""
            todo = []
            for box in boxes[first:]:
                if len(todo) == window.batch_size:
                    break
                if box in asked:
                    continue
                asked.add(box)
                kept = windows.take((origin[0] + box[0], origin[1] + box[1])) if windows is not None else None
                if kept is None:
                    todo.append(box)
                else:
                    ready[box] = kept
            if not todo:
                return
            crops = torch.stack([image[:, y : y + crop_h, x : x + crop_w] for y, x in todo])
            out = self._forward(crops, batch_size=window.batch_size)
            if tuple(out.shape[-2:]) != (cells_h, cells_w):  # cells of 1 pixel: the model's own resize
                out = F.interpolate(out, size=(cells_h, cells_w), mode="bilinear", align_corners=False)
            for (y, x), logits in zip(todo, out, strict=True):
                ready[(y, x)] = logits
                if windows is not None:
                    windows.keep((origin[0] + y, origin[1] + x), logits)

        # blended in the grid's order, whatever the store kept, so that every region of an
        # image sums a cell's windows in the same order; at most a batch of windows ahead
        for index, (y, x) in enumerate(boxes):
            if (y, x) not in ready:
                run_ahead(index)
            logits = ready.pop((y, x))
            # the window's overlap with the cells kept, in the window's and the kept cells' indices
            wy, wx = y // cell, x // cell
            y0, y1, x0, x1 = max(wy, top), min(wy + cells_h, bottom), max(wx, left), min(wx + cells_w, right)
            if y0 < y1 and x0 < x1:
                total[:, y0 - top : y1 - top, x0 - left : x1 - left].addcmul_(
                    logits[:, y0 - wy : y1 - wy, x0 - wx : x1 - wx].to(total.device),
                    weight[y0 - wy : y1 - wy, x0 - wx : x1 - wx],
                )
        total.div_(sum_h[top:bottom, None] * sum_w[None, left:right])
        return GridLogits(total, cell, (top * cell, left * cell), grid, (height, width))


def _pad_to_cells(pixels: torch.Tensor, cell: int) -> torch.Tensor:
    """(..., H, W) pixels padded at their end to whole cells of `cell` pixels by repeating the
    last row and column (by indexing, which works for uint8 too)."""
    height, width = pixels.shape[-2:]
    padded_h, padded_w = ceil_to(height, cell), ceil_to(width, cell)
    if (padded_h, padded_w) == (height, width):
        return pixels
    # only along the sides that need it: selecting all of a batch's columns as they are took
    # 1.2 ms of copying per 4 CamVid frames (padded to 368 rows, their 480 columns whole)
    if padded_h != height:
        pixels = pixels.index_select(-2, torch.arange(padded_h, device=pixels.device).clamp_max_(height - 1))
    if padded_w != width:
        pixels = pixels.index_select(-1, torch.arange(padded_w, device=pixels.device).clamp_max_(width - 1))
    return pixels
