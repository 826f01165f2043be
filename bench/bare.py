"""The bare forward that the pipelines' efficiency figures divide by."""

from __future__ import annotations

import torch
from torch import nn


class AsGiven(nn.Module):
    """The model as its users call it, `model(x)["out"]`: logits resized to the input's
    pixels. A Segmenter given it runs the bare forward with a replica's settings (precision,
    compilation, layout, batch norms folded); given the model itself, it leaves out the final
    resize (`models.GridHead`), which segpipe makes once per image or block instead."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(x)
