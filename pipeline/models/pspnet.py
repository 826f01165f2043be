"""PSPNet (Zhao et al., 2017): dilated ResNet (output stride 8) + pyramid pooling module."""

from __future__ import annotations

import torch
from torch import nn

from ._base import FCNAuxHead, conv_bn_relu, outputs, resize_to, resnet_backbone
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
        backbone = resnet_backbone(depth, weights_backbone=weights_backbone, dilation=(False, True, True))
        self.stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool)
        self.layer1, self.layer2 = backbone.layer1, backbone.layer2
        self.layer3, self.layer4 = backbone.layer3, backbone.layer4
        self.ppm = PyramidPooling(2048, bins)
        self.classifier = nn.Sequential(
            conv_bn_relu(self.ppm.out_channels, 512), nn.Dropout(0.1), nn.Conv2d(512, num_classes, 1)
        )
        self.aux_classifier = FCNAuxHead(1024, num_classes) if aux_loss else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        c3 = self.layer3(self.layer2(self.layer1(self.stem(x))))
        out = self.classifier(self.ppm(self.layer4(c3)))
        aux = self.aux_classifier(c3) if self.aux_classifier is not None else None
        return outputs(out, aux, size)


@register_model("pspnet_resnet50")
def pspnet_resnet50(*, num_classes: int, aux_loss: bool = False, weights_backbone: str | None = None) -> PSPNet:
    return PSPNet(50, num_classes, aux_loss=aux_loss, weights_backbone=weights_backbone)


@register_model("pspnet_resnet101")
def pspnet_resnet101(*, num_classes: int, aux_loss: bool = False, weights_backbone: str | None = None) -> PSPNet:
    return PSPNet(101, num_classes, aux_loss=aux_loss, weights_backbone=weights_backbone)
