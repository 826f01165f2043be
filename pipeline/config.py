"""The settings of a segmentation run, validated once at the edge (CLI, flow parameters)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .images import DEFAULT_MAX_PIXELS

DEFAULT_MODEL = "deeplabv3_resnet101"


class RunError(RuntimeError):
    """The run could not start or could not go on (bad settings, no workers left)."""


class SegmentConfig(BaseModel):
    """Everything `segpipe segment` needs. Field names are the CLI's option names."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=1, description="fsspec URL of the images")
    output: str = Field(min_length=1, description="fsspec URL for masks and tables")
    # None: the architecture a checkpoint given as weights names, else DEFAULT_MODEL
    model: str | None = None
    # a torchvision weights name ("DEFAULT", "COCO_WITH_VOC_LABELS_V1"), a checkpoint path or
    # URL, or None for an untrained model (then num_classes is required)
    weights: str | None = "DEFAULT"
    num_classes: int | None = Field(default=None, gt=0)
    crf: bool = True
    # torch.compile the model in each replica: pays on GPUs over long runs of one image size;
    # the first batch of each new size waits for a compilation (seconds to minutes)
    compile: bool = False
    # sliding-window inference for images larger than tile x tile (aerial tiles): windows of
    # that side, tile_stride apart, blended; None segments every image whole
    tile: int | None = Field(default=None, ge=32)
    tile_stride: int | None = Field(default=None, ge=16)
    # also re-process committed shards that hold error rows (after fixing what failed)
    redo_errors: bool = False
    batch_size: int = Field(default=8, ge=1)
    shard_by: Literal["directory", "count"] = "directory"
    shard_size: int = Field(default=1000, ge=1)
    ray_address: str | None = None
    storage_options: dict[str, Any] = {}
    # "auto": GPU replicas when the cluster has GPUs now; "cuda": GPU replicas even when it has
    # none yet (an autoscaling cluster adds GPU workers on demand); "cpu": CPU replicas only
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # model replicas; default: one per GPU in the cluster, or one CPU replica without GPUs
    actors: int | None = Field(default=None, ge=1)
    gpus_per_actor: float = Field(default=1.0, gt=0, le=1)
    cpus_per_actor: float = Field(default=1.0, gt=0)
    # torch threads of each CPU replica; None: its node's CPUs shared among the CPU replicas
    # there (see pipeline.run.replica_threads)
    threads_per_actor: int | None = Field(default=None, ge=1)
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)
    # where plain JPEGs are decoded: "auto" on the replica's GPU when it has one (nvjpeg),
    # else in the CPU decode tasks; "device" always on the replica's device; "cpu" always in
    # the decode tasks (Pillow). Other formats are always decoded in the decode tasks.
    jpeg_decode: Literal["auto", "device", "cpu"] = "auto"
    # wall-time limit for decoding one image: past it the image becomes a `timeout` error row
    image_timeout_s: float = Field(default=120.0, gt=0)
    # how long replicas may take to be placed and load their model (autoscaling included)
    startup_timeout_s: float = Field(default=900.0, gt=0)
    # a batch whose replica died is sent again this many times before its images become
    # error rows; the replica itself is restarted up to max_restarts times
    batch_attempts: int = Field(default=3, ge=1)
    max_restarts: int = Field(default=3, ge=0)
    # batches in flight per replica: enough to keep decode, inference and upload overlapped,
    # few enough that memory stays flat; None: the CPUs Ray has beside the replicas, shared
    # among them, between 3 and 8 (see pipeline.run.batches_in_flight)
    batches_in_flight_per_actor: int | None = Field(default=None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _default_model(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("model") is None:
            from .models import is_checkpoint_uri

            weights = data.get("weights", "DEFAULT")
            if not (isinstance(weights, str) and weights.strip().lower() not in {"", "none"} and is_checkpoint_uri(weights)):
                data = {**data, "model": DEFAULT_MODEL}
        return data

    @model_validator(mode="after")
    def _stride_within_tile(self) -> SegmentConfig:
        if self.tile_stride is not None and (self.tile is None or self.tile_stride > self.tile):
            raise ValueError(f"tile_stride={self.tile_stride} needs a tile at least as large (tile={self.tile})")
        return self

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str | None) -> str | None:
        from .models import list_models

        if value is not None and value not in list_models():
            raise ValueError(f"unknown model {value!r}; choose one of: {', '.join(list_models())}")
        return value

    @field_validator("ray_address")
    @classmethod
    def _no_ray_client(cls, value: str | None) -> str | None:
        if value and value.startswith("ray://"):
            raise ValueError(
                f"{value!r} is a Ray Client address; segpipe joins the cluster as a driver on one of its "
                "nodes: use 'auto' (or the GCS address host:6379) from a process running in the cluster"
            )
        return value

    @field_validator("weights")
    @classmethod
    def _none_weights(cls, value: str | None) -> str | None:
        return None if value is None or value.strip().lower() in {"", "none"} else value

    @field_validator("storage_options", mode="before")
    @classmethod
    def _parse_options(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as err:
                # the text may hold credentials: name the position, not the content
                raise ValueError(f"storage_options is not valid JSON ({err.msg} at position {err.pos})") from None
        if not isinstance(value, dict):
            raise ValueError(f"storage_options must be a JSON object, got {type(value).__name__}")
        return value

    def __repr_args__(self):  # keep credentials out of logs and tracebacks
        for name, value in super().__repr_args__():
            yield name, ("<hidden>" if name == "storage_options" and value else value)


class TrainConfig(BaseModel):
    """Everything `segpipe train` needs. Field names are the CLI's option names."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    images: str = Field(min_length=1, description="fsspec URL of the training images")
    labels: str = Field(min_length=1, description="fsspec URL of their label masks (PNG, class ids)")
    output: str = Field(min_length=1, description="fsspec URL of the checkpoint to write")
    model: str
    num_classes: int = Field(gt=0)
    class_names: tuple[str, ...] | None = None
    palette: tuple[tuple[int, int, int], ...] | None = None
    epochs: int = Field(default=20, ge=1)
    batch_size: int = Field(default=8, ge=2)  # per worker; batch norm needs two samples
    crop: tuple[int, int] = (512, 512)
    scale: tuple[float, float] = (0.5, 2.0)
    ignore_index: int = 255
    # "none" (random), "imagenet" (the backbone's ImageNet weights), a torchvision weights name
    # of the model, or a checkpoint URL; tensors whose shapes differ (the classifier, for other
    # classes) start random
    init: str = "none"
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float | None = Field(default=None, gt=0)  # default 0.01 for SGD, 1e-4 for AdamW
    weight_decay: float | None = Field(default=None, ge=0)  # default 1e-4 for SGD, 0.01 for AdamW
    aux_weight: float = Field(default=0.4, ge=0)
    label_suffix: str = ""
    val_images: str | None = None
    val_labels: str | None = None
    # without a validation set: hold out the last N pairs in key order (0: validate on none)
    val_last: int = Field(default=0, ge=0)
    workers: int | None = Field(default=None, ge=1)  # default: one per GPU, else 1
    device: Literal["auto", "cuda", "cpu"] = "auto"
    cpus_per_worker: float = Field(default=1.0, gt=0)
    resume: str | None = None  # a checkpoint written by segpipe train: continue after its epoch
    seed: int = 0
    storage_options: dict[str, Any] = {}
    ray_address: str | None = None

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        from .models._registry import get_spec

        get_spec(self.model)  # unknown model: ValueError naming the choices
        if (self.val_images is None) != (self.val_labels is None):
            raise ValueError("give both val_images and val_labels, or neither")
        if self.val_images is not None and self.val_last:
            raise ValueError("val_last holds pairs out of the training data; it cannot be combined with val_images")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for num_classes={self.num_classes}")
        if min(self.crop) < 32:
            raise ValueError(f"crop {self.crop} is too small; the models downsample by up to 32")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {self.scale}")
        return self

    @property
    def learning_rate(self) -> float:
        return self.lr or (0.01 if self.optimizer == "sgd" else 1e-4)

    @property
    def decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else (1e-4 if self.optimizer == "sgd" else 0.01)

    def __repr_args__(self):  # keep credentials out of logs and tracebacks
        for name, value in super().__repr_args__():
            yield name, ("<hidden>" if name == "storage_options" and value else value)


def yesterday_utc() -> str:
    return (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)).isoformat()


def substitute_date(url: str, date: str | None) -> str:
    """`{date}` in `url` becomes `date` (YYYY-MM-DD; default yesterday, UTC)."""
    if date is not None:
        try:
            dt.date.fromisoformat(date)
        except ValueError as err:
            raise ValueError(f"date must be YYYY-MM-DD, got {date!r}") from err
    return url.replace("{date}", date or yesterday_utc())


def fill_date(source: str, output: str, date: str | None) -> tuple[str, str]:
    """Substitute `{date}` in SOURCE and OUTPUT, so a scheduled run processes one night's
    folder. A dated SOURCE needs a dated OUTPUT: image keys are relative to SOURCE, so two
    nights would otherwise overwrite each other's masks."""
    if "{date}" in source and "{date}" not in output:
        raise ValueError(
            f"source {source!r} contains {{date}} but output {output!r} does not; put {{date}} in the output too "
            "(e.g. s3://bucket/segpipe/date={date}/) so each night has its own masks and tables"
        )
    return substitute_date(source, date), substitute_date(output, date)
