"""Name -> builder registry, in the manner of torchvision's `register_model`.

A builder is a keyword-only function `(*, num_classes, **kwargs) -> nn.Module` that returns a
randomly initialised model; loading weights is done once, centrally, by `build_model`.
The built-in names are also listed in `pipeline.config.MODEL_NAMES`, which validates configs
without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..config import unknown_model_message

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Builder
    # torchvision's own builder name, where torchvision publishes weight enums for it
    torchvision_name: str | None = None


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, *, torchvision_name: str | None = None) -> Callable[[Builder], Builder]:
    def wrap(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelSpec(name, builder, torchvision_name)
        return builder

    return wrap


def list_models() -> list[str]:
    """Names accepted by `build_model`, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(unknown_model_message(name, list_models())) from None
