"""torchvision's own segmentation models (DeepLabV3, FCN, LR-ASPP), registered under our names.

Builders here never download: torchvision is called with `weights=None` and the caller's
`weights_backbone` (None by default); published weights are loaded by `build_model`.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import segmentation as tvseg

from ._registry import register_model


def _with_aux(fn, *, num_classes: int, aux_loss: bool, weights_backbone: str | None) -> nn.Module:
    return fn(weights=None, weights_backbone=weights_backbone, num_classes=num_classes, aux_loss=aux_loss)


@register_model("deeplabv3_resnet50", torchvision_name="deeplabv3_resnet50")
def deeplabv3_resnet50(*, num_classes: int, aux_loss: bool = False, weights_backbone: str | None = None) -> nn.Module:
    return _with_aux(tvseg.deeplabv3_resnet50, num_classes=num_classes, aux_loss=aux_loss, weights_backbone=weights_backbone)


@register_model("deeplabv3_resnet101", torchvision_name="deeplabv3_resnet101")
def deeplabv3_resnet101(*, num_classes: int, aux_loss: bool = False, weights_backbone: str | None = None) -> nn.Module:
    return _with_aux(tvseg.deeplabv3_resnet101, num_classes=num_classes, aux_loss=aux_loss, weights_backbone=weights_backbone)


@register_model("deeplabv3_mobilenet_v3_large", torchvision_name="deeplabv3_mobilenet_v3_large")
def deeplabv3_mobilenet_v3_large(
    *, num_classes: int, aux_loss: bool = False, weights_backbone: str | None = None
) -> nn.Module:
    return _with_aux(
        tvseg.deeplabv3_mobilenet_v3_large, num_classes=num_classes, aux_loss=aux_loss, weights_backbone=weights_backbone
    )


@register_model("fcn_resnet50", torchvision_name="fcn_resnet50")
def fcn_resnet50(*, num_classes: int, aux_loss: bool = False, weights_backbone: str | None = None) -> nn.Module:
    return _with_aux(tvseg.fcn_resnet50, num_classes=num_classes, aux_loss=aux_loss, weights_backbone=weights_backbone)


@register_model("lraspp_mobilenet_v3_large", torchvision_name="lraspp_mobilenet_v3_large")
def lraspp_mobilenet_v3_large(*, num_classes: int, weights_backbone: str | None = None) -> nn.Module:
    return tvseg.lraspp_mobilenet_v3_large(weights=None, weights_backbone=weights_backbone, num_classes=num_classes)
