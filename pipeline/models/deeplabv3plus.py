"""DeepLabV3+ (Chen et al., 2018): ResNet at output stride 16, ASPP, and a decoder that fuses
stride-4 features reduced to 48 channels."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP

from ._base import FCNAuxHead, ResNetFeatures, conv_bn_relu, outputs, resize_to
from ._registry import register_model


class DeepLabV3Plus(nn.Module):
    def __init__(
        self,
        depth: int,
        num_classes: int,
        *,
        aux_loss: bool = False,
        weights_backbone: str | None = None,
        atrous_rates: tuple[int, int, int] = (6, 12, 18),
    ) -> None:
        super().__init__()
        self.backbone = ResNetFeatures(depth, weights_backbone=weights_backbone, dilation=(False, False, True))
        self.aspp = ASPP(2048, list(atrous_rates), out_channels=256)
        self.low_level = conv_bn_relu(256, 48, 1)
        self.decoder = nn.Sequential(
            conv_bn_relu(256 + 48, 256), conv_bn_relu(256, 256), nn.Conv2d(256, num_classes, 1)
        )
        self.aux_classifier = FCNAuxHead(1024, num_classes) if aux_loss else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        c1, c3, c4 = self.backbone(x)
        aux = self.aux_classifier(c3) if self.aux_classifier is not None else None
        return outputs(self._decode(c1, c4), aux, size)

    def grid_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits on the output grid (1/4 of the input), before their resize to the input."""
        c1, _, c4 = self.backbone(x)
        return self._decode(c1, c4)

    def _decode(self, c1: torch.Tensor, c4: torch.Tensor) -> torch.Tensor:
        low = self.low_level(c1)
        high = resize_to(self.aspp(c4), low.shape[-2:])
        return self.decoder(torch.cat([high, low], dim=1))


@register_model("deeplabv3plus_resnet50")
def deeplabv3plus_resnet50(
    *, num_classes: int, aux_loss: bool = False, weights_backbone: str | None = None
) -> DeepLabV3Plus:
    return DeepLabV3Plus(50, num_classes, aux_loss=aux_loss, weights_backbone=weights_backbone)


@register_model("deeplabv3plus_resnet101")
def deeplabv3plus_resnet101(
    *, num_classes: int, aux_loss: bool = False, weights_backbone: str | None = None
) -> DeepLabV3Plus:
    return DeepLabV3Plus(101, num_classes, aux_loss=aux_loss, weights_backbone=weights_backbone)
