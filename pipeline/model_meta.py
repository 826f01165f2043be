"""What a set of weights means (`ModelMeta`: architecture, classes, palette, preprocessing),
as plain pydantic data: a checkpoint carries it, a replica reports it, and the command line
reads it before it decides whether a night has anything to do, without importing torch
(`pipeline.models` re-exports it)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .masks import default_palette

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Preprocessing(BaseModel):
    """How pixels must be prepared for a set of weights.

    `resize`: "none" runs at the image's own size (aerial tiles, with sliding windows for big
    ones); "short_side"/"long_side" scale that side to `size` keeping the aspect ratio (what
    torchvision's published segmentation weights expect: short side 520); "fixed" resizes to
    `size` = (height, width). Predictions are always returned at the original size.

    `bands`: the 1-based bands of a georeferenced raster the weights were trained on, as R G B
    (or one, as grey); None: each raster's red, green and blue by colour interpretation. A
    checkpoint trained with `--bands` carries them, so `segment` reads the same bands without
    being told (its own `--bands` wins).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: Literal["none", "short_side", "long_side", "fixed"] = "none"
    size: tuple[int, ...] | None = None
    bands: tuple[int, ...] | None = None

    @model_validator(mode="after")
    def _check_size(self) -> Preprocessing:
        wanted = {"none": 0, "short_side": 1, "long_side": 1, "fixed": 2}[self.resize]
        got = 0 if self.size is None else len(self.size)
        if got != wanted or (self.size and min(self.size) <= 0):
            raise ValueError(
                f"resize={self.resize!r} needs {wanted} positive size value(s), got size={self.size}"
            )
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if self.bands is not None and (len(self.bands) not in (1, 3) or min(self.bands) < 1):
            raise ValueError(f"bands must be 1 or 3 band indexes from 1, got {self.bands}")
        return self

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) the network sees for an image of the given size."""
        if self.resize == "none":
            return height, width
        if self.resize == "fixed":
            return self.size[0], self.size[1]  # type: ignore[index]
        side = min(height, width) if self.resize == "short_side" else max(height, width)
        scale = self.size[0] / side  # type: ignore[index]
        return max(1, round(height * scale)), max(1, round(width * scale))


class ModelMeta(BaseModel):
    """What a set of weights means: the contract between a checkpoint and the pipeline."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    architecture: str
    num_classes: int = Field(gt=0)
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    preprocessing: Preprocessing = Preprocessing()
    # where the weights came from: "none", a torchvision enum, or a checkpoint URI
    weights: str = "none"
    # a checkpoint's contents (`preflight.checkpoint_digest`), set whenever one is read, never saved in
    # one: what a run knows a checkpoint by, so that one rewritten in place is segmented again
    # and one path spelled two ways is one checkpoint; None for other weights
    weights_digest: str | None = None
    # builder arguments needed to rebuild the same module (e.g. {"aux_loss": True})
    model_kwargs: dict[str, Any] = {}
    # free-form: training configuration, validation mIoU, dataset name...
    extra: dict[str, Any] = {}

    @model_validator(mode="after")
    def _check_lengths(self) -> ModelMeta:
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} entries but num_classes={self.num_classes}"
            )
        if len(self.palette) < min(self.num_classes, 256):
            raise ValueError(f"palette has {len(self.palette)} colours for {self.num_classes} classes")
        return self

    @classmethod
    def default(cls, architecture: str, num_classes: int, **overrides: Any) -> ModelMeta:
        fields: dict[str, Any] = {
            "architecture": architecture,
            "num_classes": num_classes,
            "class_names": tuple(f"class_{i}" for i in range(num_classes)),
            "palette": default_palette(num_classes),
        }
        return cls(**(fields | overrides))
