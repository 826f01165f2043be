"""Model registry: DeepLabV3/V3+, PSPNet, FCN, LR-ASPP and U-Net, all returning
`{"out": logits}` at the input's own resolution."""

# importing the architecture modules registers their builders
from . import deeplabv3plus, pspnet, torchvision_models, unet  # noqa: F401
from ._registry import list_models, register_model
from .weights import (
    ModelMeta,
    Preprocessing,
    WeightsUnavailableError,
    build_model,
    load_checkpoint,
    save_checkpoint,
)

__all__ = [
    "ModelMeta",
    "Preprocessing",
    "WeightsUnavailableError",
    "build_model",
    "list_models",
    "load_checkpoint",
    "register_model",
    "save_checkpoint",
]
