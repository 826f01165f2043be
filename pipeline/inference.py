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
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .models import ModelMeta
from .preprocess import ImageLike, Normalizer, to_chw_uint8


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


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows along one axis, the last one snapped inward to end at `length`."""
    if length <= crop:
        return [0]
    count = math.ceil((length - crop) / stride) + 1
    return [min(i * stride, length - crop) for i in range(count)]


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
        exp = (logits - logits.amax(dim=1, keepdim=True)).exp_()
        return exp.div_(exp.sum(dim=1, keepdim=True))
    return torch.softmax(logits, dim=1)


class Segmenter:
    """One model on one device, loaded once, serving batches of images.

    It runs its own copy of the model, in eval mode with batch norms folded into the
    convolutions before them (`fold_batch_norms`): the model given is left as it is, so
    training can validate through a Segmenter and go on training.

    `precision`: "auto" is bf16 autocast where the device has native bf16 (`native_bf16`),
    float32 elsewhere. `channels_last`: None means yes, on every device. `compile`: wrap the
    model in `torch.compile`, on CPU with inductor's freezing (weights prepacked once); None
    compiles where it pays: bf16 on CPU. A compiled model pays its compilation at the first batch
    of each input shape (seconds; inductor's caches on local disk make later processes' faster).
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
        bf16 = precision == "bf16" or (precision == "auto" and native_bf16(self.device))
        self.autocast_dtype = torch.bfloat16 if bf16 else None
        self.channels_last = True if channels_last is None else channels_last
        model = fold_batch_norms(model).to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.compiled = compile if compile is not None else bf16 and self.device.type == "cpu"
        self.model = torch.compile(model) if self.compiled else model
        self.normalize = Normalizer(self.meta.preprocessing, self.device)

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

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
        tensors = [to_chw_uint8(image) for image in images]
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, image in enumerate(tensors):
            groups[tuple(image.shape[-2:])].append(index)
        results: list[torch.Tensor | None] = [None] * len(tensors)
        for size, indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                # to the device as uint8 (a quarter of float32's bytes); resized and normalised there
                batch = self.normalize.to_device(torch.stack([tensors[i] for i in chunk]))
                for i, probs in zip(chunk, self._probabilities(batch, size), strict=True):
                    results[i] = probs
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def region_logits(self, image: ImageLike, *, origin: tuple[int, int], windows: WindowStore,
                      part: tuple[tuple[int, int], tuple[int, int]] | None = None) -> torch.Tensor:
        """Blended (C, h, w) float32 logits of one region of a larger image, the region's
        pixels at `origin` (row, col) in it, with windows shared with the other regions
        through `windows`; only of the rectangle `part` ((top, bottom), (left, right) in the
        region's pixels; default: all of it), which is all the caller keeps.

        The region must be cut along the larger image's sliding-window grid (see
        `rasters.plan_blocks`), so its windows are that grid's; and the segmenter must work at
        native resolution (`at_native_resolution`). Logits, not probabilities: the caller
        takes the class softmax (it may refine them first).
        """
        if self.sliding_window is None or self.meta.preprocessing.resize != "none":
            raise ValueError("region_logits needs a sliding window at native resolution (at_native_resolution)")
        pixels = self.normalize.to_device(to_chw_uint8(image)[None])
        (top, bottom), (left, right) = part or ((0, pixels.shape[-2]), (0, pixels.shape[-1]))
        logits = torch.zeros(1, self.num_classes, bottom - top, right - left, device=pixels.device)
        if self.channels_last:
            logits = logits.contiguous(memory_format=torch.channels_last)
        self._slide(pixels[0], logits[0], origin=origin, windows=windows, offset=(top, left))
        return logits[0]

    def _probabilities(self, batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, C, H, W) probabilities for a uint8 batch of one size, at that size."""
        pixels = self._resize_pixels(batch, self.meta.preprocessing.input_size(*size))
        logits = self._logits(pixels)
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return softmax_classes(logits)

    @staticmethod
    def _resize_pixels(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Resize uint8 pixels to `size`, keeping 0..255 values; uint8 stays uint8 when no resize."""
        if tuple(batch.shape[-2:]) == size:
            return batch
        return F.interpolate(batch.float(), size=size, mode="bilinear", align_corners=False, antialias=True)

    def _logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """Float32 logits at the pixels' size, by whole image or sliding window."""
        window = self.sliding_window
        if window is not None and (pixels.shape[-2] > window.crop[0] or pixels.shape[-1] > window.crop[1]):
            batch, _, height, width = pixels.shape
            logits = torch.zeros(batch, self.num_classes, height, width, device=pixels.device)
            if self.channels_last:
                # the model's own layout: window logits then add in without a transposing copy,
                # which otherwise cost more than the windows' forward on CPU (measured)
                logits = logits.contiguous(memory_format=torch.channels_last)
            for image, out in zip(pixels, logits, strict=True):
                self._slide(image, out)
            return logits
        return self._forward(pixels)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.normalize(pixels)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None), \
                self._freezing():
            out = self.model(x)["out"]
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

    def _slide(self, image: torch.Tensor, logits_sum: torch.Tensor, *, origin: tuple[int, int] = (0, 0),
               windows: WindowStore | None = None, offset: tuple[int, int] = (0, 0)) -> None:
        """Logits for one (3, H, W) image from overlapping windows, blended, into the zeroed
        `logits_sum`: (C, H, W), or a smaller rectangle of the image at `offset`, which then
        gets only the windows' parts that fall in it.

        Only `batch_size` windows are normalised and run at a time; the full-size buffer is
        the logits sum. With `windows`, a window whose logits another region kept is not run
        again; the windows are still blended in the same order, so the sums are the same.
        """
        window = self.sliding_window
        assert window is not None
        height, width = image.shape[-2:]
        top, left = offset
        bottom, right = top + logits_sum.shape[-2], left + logits_sum.shape[-1]
        crop_h, crop_w = min(window.crop[0], height), min(window.crop[1], width)
        rows, cols = window_starts(height, crop_h, window.stride[0]), window_starts(width, crop_w, window.stride[1])
        boxes = [(y, x) for y in rows for x in cols]
        ramp_h, ramp_w = blend_ramp(crop_h, image.device), blend_ramp(crop_w, image.device)
        weight = ramp_h[:, None] * ramp_w[None, :]
        # the windows form a grid, so the weights' sum is the outer product of the sums of the
        # ramps along each axis: one pass over the logits fewer per window
        sum_h, sum_w = torch.zeros(height, device=image.device), torch.zeros(width, device=image.device)
        for y in rows:
            sum_h[y : y + crop_h] += ramp_h
        for x in cols:
            sum_w[x : x + crop_w] += ramp_w
        for start in range(0, len(boxes), window.batch_size):
            chunk = boxes[start : start + window.batch_size]
            kept = {box: windows.take((origin[0] + box[0], origin[1] + box[1])) for box in chunk} if windows is not None else {}
            todo = [box for box in chunk if kept.get(box) is None]
            if todo:
                crops = torch.stack([image[:, y : y + crop_h, x : x + crop_w] for y, x in todo])
                for (y, x), logits in zip(todo, self._forward(crops), strict=True):
                    kept[(y, x)] = logits
                    if windows is not None:
                        windows.keep((origin[0] + y, origin[1] + x), logits)
            for y, x in chunk:
                # the window's overlap with the rectangle, in the window's and the rectangle's pixels
                y0, y1, x0, x1 = max(y, top), min(y + crop_h, bottom), max(x, left), min(x + crop_w, right)
                if y0 < y1 and x0 < x1:
                    logits_sum[:, y0 - top : y1 - top, x0 - left : x1 - left].addcmul_(
                        kept[(y, x)][:, y0 - y : y1 - y, x0 - x : x1 - x].to(logits_sum.device),
                        weight[y0 - y : y1 - y, x0 - x : x1 - x],
                    )
        logits_sum.div_(sum_h[top:bottom, None] * sum_w[None, left:right])
