"""U-Net with a torchvision ResNet-34 encoder.

Each decoder stage upsamples to its skip connection's exact size, so any input size works,
not only multiples of 32.
"""

from __future__ import annotations

import torch
from torch import nn

from ._base import conv_bn_relu, outputs, resize_to, resnet_backbone
from ._registry import register_model


class DecoderBlock(nn.Sequential):
    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__(conv_bn_relu(in_channels + skip_channels, out_channels), conv_bn_relu(out_channels, out_channels))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if skip is not None:
            x = torch.cat([resize_to(x, skip.shape[-2:]), skip], dim=1)
        return super().forward(x)


class UNetResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, *, weights_backbone: str | None = None) -> None:
        super().__init__()
        backbone = resnet_backbone(depth, weights_backbone=weights_backbone, dilation=(False, False, False))
        self.stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu)  # stride 2, 64 ch
        self.pool = backbone.maxpool
        self.encoder = nn.ModuleList([backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4])
        self.decoder = nn.ModuleList(
            [
                DecoderBlock(512, 256, 256),
                DecoderBlock(256, 128, 128),
                DecoderBlock(128, 64, 64),
                DecoderBlock(64, 64, 32),
            ]
        )
        self.head = nn.Sequential(DecoderBlock(32, 0, 16), nn.Conv2d(16, num_classes, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        stem = self.stem(x)
        features = [stem]
        y = self.pool(stem)
        for layer in self.encoder:
            y = layer(y)
            features.append(y)
        # features: stem(64, /2), layer1(64, /4), layer2(128, /8), layer3(256, /16), layer4(512, /32)
        y = features[-1]
        for block, skip in zip(self.decoder, reversed(features[:-1]), strict=True):
            y = block(y, skip)
        y = self.head(resize_to(y, size))
        return outputs(y, None, size)


@register_model("unet_resnet34")
def unet_resnet34(*, num_classes: int, weights_backbone: str | None = None) -> UNetResNet:
    return UNetResNet(34, num_classes, weights_backbone=weights_backbone)
