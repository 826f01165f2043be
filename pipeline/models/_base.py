"""Pieces shared by the architectures segpipe defines itself (PSPNet, DeepLabV3+, U-Net)."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet


def resnet_backbone(
    depth: int, *, weights_backbone: str | None, dilation: tuple[bool, bool, bool]
) -> resnet.ResNet:
    """A torchvision ResNet whose layers 2-4 may trade stride for dilation.

    `weights_backbone=None` initialises at random and downloads nothing.
    """
    builders = {18: resnet.resnet18, 34: resnet.resnet34, 50: resnet.resnet50, 101: resnet.resnet101}
    kwargs = {}
    if any(dilation):
        kwargs["replace_stride_with_dilation"] = list(dilation)
    return builders[depth](weights=weights_backbone, **kwargs)


class ResNetFeatures(nn.Module):
    """A torchvision ResNet without its classifier, returning the stride-4 (layer1), layer3 and
    layer4 features that the segmentation heads fuse."""

    def __init__(self, depth: int, *, weights_backbone: str | None, dilation: tuple[bool, bool, bool]) -> None:
        super().__init__()
        backbone = resnet_backbone(depth, weights_backbone=weights_backbone, dilation=dilation)
        self.stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool)
        self.layer1, self.layer2 = backbone.layer1, backbone.layer2
        self.layer3, self.layer4 = backbone.layer3, backbone.layer4

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c1 = self.layer1(self.stem(x))
        c3 = self.layer3(self.layer2(c1))
        return c1, c3, self.layer4(c3)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def resize_to(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    if x.shape[-2:] == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def outputs(
    out: torch.Tensor, aux: torch.Tensor | None, size: torch.Size
) -> OrderedDict[str, torch.Tensor]:
    """The torchvision contract: {"out": logits[, "aux": logits]} at the input's resolution."""
    result: OrderedDict[str, torch.Tensor] = OrderedDict(out=resize_to(out, size))
    if aux is not None:
        result["aux"] = resize_to(aux, size)
    return result


class FCNAuxHead(nn.Sequential):
    """The auxiliary head on layer3 used by PSPNet and DeepLab for deep supervision."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        mid = in_channels // 4
        super().__init__(conv_bn_relu(in_channels, mid), nn.Dropout(0.1), nn.Conv2d(mid, num_classes, 1))


class GridHead(nn.Module):
    """A segmentation model's "out" logits on its own output grid: before the final bilinear
    resize to the input's size that every model here ends with (1/8 of the input for
    DeepLabV3-ResNet, FCN, LR-ASPP and PSPNet; 1/16 for DeepLabV3-MobileNetV3; 1/4 for
    DeepLabV3+; the input's own for U-Net, whose head is at full resolution).

    Inference blends windows and refines with the CRF on that grid, then resizes once, only
    the pixels it keeps: the grid has 64 times fewer logits at 1/8.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from torchvision.models.segmentation._utils import _SimpleSegmentationModel
        from torchvision.models.segmentation.lraspp import LRASPP

        self.model = model.eval()
        if hasattr(model, "grid_logits"):
            self.kind = "own"
        elif isinstance(model, LRASPP):
            self.kind = "lraspp"
        elif isinstance(model, _SimpleSegmentationModel):  # torchvision's DeepLabV3 and FCN
            self.kind = "simple"
        else:
            self.kind = "resized"  # only the resized logits are to be had

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self.model
        if self.kind == "own":
            return model.grid_logits(x)
        if self.kind == "lraspp":
            return model.classifier(model.backbone(x))
        if self.kind == "simple":
            return model.classifier(model.backbone(x)["out"])
        return model(x)["out"]
