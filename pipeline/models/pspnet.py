"""PSPNet (Zhao et al., 2017): dilated ResNet (output stride 8) + pyramid pooling module."""

from __future__ import annotations

import torch
from torch import nn

from ._base import FCNAuxHead, ResNetFeatures, conv_bn_relu, outputs, resize_to
from ._registry import register_model


class PyramidPooling(nn.Module):
    """Pool to each bin size, reduce channels, upsample back and concatenate with the input."""

    def __init__(self, in_channels: int, bins: tuple[int, ...] = (1, 2, 3, 6)) -> None:
        super().__init__()
        reduced = in_channels // len(bins)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), conv_bn_relu(in_channels, reduced, 1)) for b in bins
        )
        self.out_channels = in_channels + reduced * len(bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return torch.cat([x, *(resize_to(stage(x), size) for stage in self.stages)], dim=1)


class PSPNet(nn.Module):
    def __init__(
        self,
        depth: int,
        num_classes: int,
        *,
        aux_loss: bool = False,
        weights_backbone: str | None = None,
        bins: tuple[int, ...] = (1, 2, 3, 6),
    ) -> None:
        super().__init__()
        self.backbone = ResNetFeatures(depth, weights_backbone=weights_backbone, dilation=(False, True, True))
        self.ppm = PyramidPooling(2048, bins)
        self.classifier = nn.Sequential(
            conv_bn_relu(self.ppm.out_channels, 512), nn.Dropout(0.1), nn.Conv2d(512, num_classes, 1)
        )
        self.aux_classifier = FCNAuxHead(1024, num_classes) if aux_loss else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        _, c3, c4 = self.backbone(x)
        aux = self.aux_classifier(c3) if self.aux_classifier is not None else None
        return outputs(self._head(c4), aux, size)

    def grid_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits on the output grid (1/8 of the input), before their resize to the input."""
        return self._head(self.backbone(x)[2])

    def _head(self, c4: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.ppm(c4))


@register_model("pspnet_resnet50")
def pspnet_resnet50(*, num_classes: int, aux_loss: bool = False, weights_backbone: str | None = None) -> PSPNet:
    return PSPNet(50, num_classes, aux_loss=aux_loss, weights_backbone=weights_backbone)


@register_model("pspnet_resnet101")
def pspnet_resnet101(*, num_classes: int, aux_loss: bool = False, weights_backbone: str | None = None) -> PSPNet:
    return PSPNet(101, num_classes, aux_loss=aux_loss, weights_backbone=weights_backbone)
