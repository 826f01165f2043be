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
    is_checkpoint_uri,
    load_checkpoint,
    load_resumable,
    load_training_state,
    save_checkpoint,
)

__all__ = [
    "ModelMeta",
    "Preprocessing",
    "WeightsUnavailableError",
    "build_model",
    "is_checkpoint_uri",
    "list_models",
    "load_checkpoint",
    "load_resumable",
    "load_training_state",
    "register_model",
    "save_checkpoint",
]
