"""The inference engine: one model on one device, images in, probabilities out.

`Segmenter.predict` takes decoded RGB images of any sizes and returns class probabilities at
each image's own size. Preprocessing (mean, std, resize policy) comes from the weights'
metadata. Images of one size are batched together; images larger than a configured crop
can be segmented with sliding windows whose overlaps are blended with weights that fade
toward the window edges; test-time augmentation (flip, scales) averages probabilities.

On CUDA: bf16 autocast, channels_last and optional torch.compile. On CPU: float32, and
channels_last too (oneDNN's convolutions and PyTorch's bilinear upsampling are faster in it:
1.3 to 1.5x for the whole forward of DeepLabV3 and LR-ASPP, measured on 2 cores). The precision
and layout can be forced either way, so the CUDA code path is exercised on CPU too.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .models import ModelMeta, build_model

ImageLike = torch.Tensor | np.ndarray


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


@dataclass(frozen=True)
class TTA:
    """Test-time augmentation: every scale, each also mirrored when `flip`, probabilities averaged."""

    flip: bool = False
    scales: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be positive, got {self.scales}")


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows along one axis, the last one snapped inward to end at `length`."""
    if length <= crop:
        return [0]
    count = math.ceil((length - crop) / stride) + 1
    return [min(i * stride, length - crop) for i in range(count)]


def blend_weights(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(H, W) window weights: a sine ramp that is largest in the centre and fades toward the
    edges without reaching zero, so every pixel keeps a positive total weight."""

    def ramp(n: int) -> torch.Tensor:
        t = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n
        return torch.sin(math.pi * t).clamp_min(1e-3)

    return ramp(height)[:, None] * ramp(width)[None, :]


def to_chw_uint8(image: ImageLike) -> torch.Tensor:
    """An RGB image as a (3, H, W) uint8 tensor; accepts (3, H, W) tensors or (H, W, 3) arrays."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"numpy images must be (H, W, 3) RGB, got shape {image.shape}")
        # arrays from Ray's object store are read-only views; torch wants memory it may own
        image = np.ascontiguousarray(image) if image.flags.writeable else image.copy()
        image = torch.from_numpy(image).permute(2, 0, 1)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"tensor images must be (3, H, W) RGB, got shape {tuple(image.shape)}")
    if image.dtype != torch.uint8:
        raise TypeError(f"images must be uint8, got {image.dtype}")
    return image


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

    For channels_last logits it is taken over the last dimension of the (B, H, W, C) view,
    which is the same arithmetic on the same memory: PyTorch's softmax over dim 1 of a
    channels_last tensor is 2 to 3 times slower on CPU.
    """
    if logits.dim() == 4 and not logits.is_contiguous() and logits.is_contiguous(memory_format=torch.channels_last):
        return torch.softmax(logits.permute(0, 2, 3, 1), dim=-1).permute(0, 3, 1, 2)
    return torch.softmax(logits, dim=1)


class Segmenter:
    """One model on one device, loaded once, serving batches of images.

    `precision`: "auto" is bf16 autocast on CUDA and float32 elsewhere. `channels_last`:
    None means yes, on every device. `compile`: wrap the model in `torch.compile` (pays off on long
    runs of same-sized batches on a GPU). `fold_bn`: fold batch norms into the convolutions
    before them (`fold_batch_norms`; the model given is left as it is).
    """

    def __init__(
        self,
        model: nn.Module,
        meta: ModelMeta | None = None,
        *,
        device: str | torch.device | None = None,
        batch_size: int = 8,
        sliding_window: SlidingWindow | None = None,
        tta: TTA | None = None,
        precision: Literal["auto", "fp32", "bf16"] = "auto",
        channels_last: bool | None = None,
        compile: bool = False,
        fold_bn: bool = True,
    ) -> None:
        self.meta: ModelMeta = meta if meta is not None else model.meta
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if precision not in {"auto", "fp32", "bf16"}:
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
        self.batch_size = batch_size
        self.sliding_window = sliding_window
        self.tta = tta or TTA()
        on_cuda = self.device.type == "cuda"
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" or (precision == "auto" and on_cuda) else None
        self.channels_last = True if channels_last is None else channels_last
        model = (fold_batch_norms(model) if fold_bn else model.eval()).to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if on_cuda:
            torch.backends.cudnn.benchmark = True
        self.model = torch.compile(model) if compile else model
        pre = self.meta.preprocessing
        # normalisation folded into one multiply-add on 0..255 pixels
        std = torch.tensor(pre.std, device=self.device).view(1, 3, 1, 1) * 255.0
        self._scale = 1.0 / std
        self._shift = -torch.tensor(pre.mean, device=self.device).view(1, 3, 1, 1) * 255.0 / std

    @classmethod
    def from_name(
        cls,
        name: str | None,
        *,
        num_classes: int | None = None,
        weights: str | None = None,
        storage_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> Segmenter:
        model = build_model(name, num_classes=num_classes, weights=weights, storage_options=storage_options)
        return cls(model, **options)

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

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
                batch = torch.stack([tensors[i] for i in chunk])
                if self.device.type == "cuda" and batch.device.type == "cpu":
                    batch = batch.pin_memory()  # lets the copy below overlap with compute
                batch = batch.to(self.device, non_blocking=True)
                for i, probs in zip(chunk, self._probabilities(batch, size), strict=True):
                    results[i] = probs
        return results  # type: ignore[return-value]

    def _probabilities(self, batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, C, H, W) probabilities for a uint8 batch of one size, TTA averaged."""
        base = self.meta.preprocessing.input_size(*size)
        total: torch.Tensor | None = None
        views = 0
        for scale in self.tta.scales:
            scaled = (max(1, round(base[0] * scale)), max(1, round(base[1] * scale)))
            pixels = self._resize_pixels(batch, scaled)
            for flip in (False, True) if self.tta.flip else (False,):
                logits = self._logits(pixels.flip(-1) if flip else pixels)
                if flip:
                    logits = logits.flip(-1)
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False) if logits.shape[-2:] != size else logits
                probs = softmax_classes(logits)
                total = probs if total is None else total.add_(probs)
                views += 1
        return total / views if views > 1 else total  # type: ignore[operator, return-value]

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
        x = pixels.float() * self._scale + self._shift
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            out = self.model(x)["out"]
        return out.float()

    def _slide(self, image: torch.Tensor, logits_sum: torch.Tensor) -> None:
        """Logits for one (3, H, W) image from overlapping windows, blended, into the zeroed
        (C, H, W) `logits_sum`.

        Only `batch_size` windows are normalised and run at a time; the full-size buffers are
        the logits sum and the weight sum.
        """
        window = self.sliding_window
        assert window is not None
        height, width = image.shape[-2:]
        crop_h, crop_w = min(window.crop[0], height), min(window.crop[1], width)
        boxes = [
            (y, x)
            for y in window_starts(height, crop_h, window.stride[0])
            for x in window_starts(width, crop_w, window.stride[1])
        ]
        weight = blend_weights(crop_h, crop_w, image.device)
        weight_sum = torch.zeros(1, height, width, device=image.device)
        for start in range(0, len(boxes), window.batch_size):
            chunk = boxes[start : start + window.batch_size]
            crops = torch.stack([image[:, y : y + crop_h, x : x + crop_w] for y, x in chunk])
            for (y, x), logits in zip(chunk, self._forward(crops), strict=True):
                logits_sum[:, y : y + crop_h, x : x + crop_w].add_(logits * weight)
                weight_sum[:, y : y + crop_h, x : x + crop_w].add_(weight)
        logits_sum.div_(weight_sum)
