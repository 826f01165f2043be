"""Pixels -> normalised tensors: the one preprocessing of segpipe, shared by training
(`pipeline.training`) and inference (`pipeline.inference.Segmenter`), so a checkpoint sees at
`segpipe segment` exactly the input it was trained on.

Images travel as (3, H, W) uint8 tensors until the model's device; there they are normalised
with the mean and std of the weights' `Preprocessing`, folded into one multiply-add on 0..255
values.
"""

from __future__ import annotations

import numpy as np
import torch

from .models import Preprocessing

ImageLike = torch.Tensor | np.ndarray


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


class Normalizer:
    """(B, 3, H, W) pixels with 0..255 values (uint8, or float after a resize) -> normalised
    float32 batches on `device`."""

    def __init__(self, preprocessing: Preprocessing, device: str | torch.device) -> None:
        self.device = torch.device(device)
        std = torch.tensor(preprocessing.std, device=self.device).view(1, 3, 1, 1) * 255.0
        self.scale = 1.0 / std
        self.shift = -torch.tensor(preprocessing.mean, device=self.device).view(1, 3, 1, 1) * 255.0 / std

    def to_device(self, pixels: torch.Tensor) -> torch.Tensor:
        """`pixels` on the device, as they are; from host memory through pinned memory, so the
        copy can overlap with the device's work."""
        if self.device.type == "cuda" and pixels.device.type == "cpu":
            pixels = pixels.pin_memory()
        return pixels.to(self.device, non_blocking=True)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.to_device(pixels).float() * self.scale + self.shift
