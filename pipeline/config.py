"""The settings of each job, validated once at the edge and passed inward as one typed object.

`SegmentConfig`, `EvaluateConfig` and `TrainConfig` are the only lists of a job's parameters:
the command line generates its options from their fields (name, type, default, description),
the Prefect flows take them as their parameter, and `infra/prefect.yaml` passes the same
fields. Storage options travel as `StorageOptions`, the one type that keeps credentials out
of reprs, logs and the parameters Prefect stores.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    field_validator,
    model_validator,
)
from pydantic_core import core_schema

from .windows import window_stride

DEFAULT_MODEL = "deeplabv3_resnet101"
# the names `pipeline.models` registers, listed here so that a config is validated, and
# `segpipe models` answers, without importing torch (2 to 5 s); tests/test_config.py checks
# that the two lists agree
MODEL_NAMES = (
    "deeplabv3_mobilenet_v3_large", "deeplabv3_resnet101", "deeplabv3_resnet50", "deeplabv3plus_resnet101",
    "deeplabv3plus_resnet50", "fcn_resnet50", "lraspp_mobilenet_v3_large", "pspnet_resnet101", "pspnet_resnet50",
    "unet_resnet34",
)
# Pillow's own decompression-bomb threshold (2 x Image.MAX_IMAGE_PIXELS): Pillow refuses
# anything bigger while opening, before segpipe could check it
DEFAULT_MAX_PIXELS = 2 * 89_478_485
# georeferenced rasters are read block by block, so their size costs time, not memory: a
# bound against a header that claims a raster no survey has (2^34: 131,072 pixels a side)
DEFAULT_MAX_RASTER_PIXELS = 1 << 34


def repeated(names: Sequence[str]) -> list[str]:
    """The names given more than once, sorted."""
    return sorted({name for name in names if names.count(name) > 1})


def _each_once(names: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """Class names, none given twice: tables and reports name columns and rows by them
    (evaluate's iou_<name>), where one would hide the other."""
    if names is not None and (twice := repeated(names)):
        raise ValueError(f"names {', '.join(twice)} more than once: each class needs a name of its own")
    return names


class RunError(RuntimeError):
    """The run could not start or could not go on (bad settings, no workers left)."""


class TrainingError(RuntimeError):
    """Training started but a worker failed; the message is the worker's error."""


def parse_json_object(text: str, origin: str) -> dict[str, Any]:
    """A JSON object from text that may hold credentials: an error names the position, never
    the content."""
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"{origin} is not valid JSON ({err.msg.removesuffix(' at')} at position {err.pos})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{origin} must be a JSON object, got {type(value).__name__}")
    return value


class StorageOptions(dict[str, Any]):
    """fsspec storage options (endpoint, region, credentials), given as a dict or JSON text.

    Values that are not known to be harmless are hidden from repr and from JSON serialisation:
    Prefect stores a flow run's parameters (serialised to JSON) and shows them in its UI, so
    a key or a token must never reach them. Python code receives the values themselves.

    Options merged from several places (`merged`) remember which place each came from, so
    that a refusal names the one to fix: SEGPIPE_STORAGE_OPTIONS, a Secret block, or the
    config's own --storage-options.
    """

    # fsspec/s3fs options that are settings, never secrets; every other value is hidden
    VISIBLE = frozenset({"endpoint_url", "region_name", "anon", "use_ssl", "requester_pays", "version_aware", "profile"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # where each option was given, as a user names the place (`merged`); never in JSON nor in
        # model_dump: it tells of this process's environment, which a deployment's run resolves again
        self.origins: dict[str, str] = {}

    @classmethod
    def merged(cls, layers: Iterable[tuple[str, Mapping[str, Any]]]) -> StorageOptions:
        """The options of `layers`, each (where they were given, the options), later ones
        winning key by key, each option remembering where it came from."""
        options = cls()
        for origin, layer in layers:
            options.update(layer)
            # options merged before keep their own origins
            known = layer.origins if isinstance(layer, StorageOptions) else {}
            options.origins |= {key: known.get(key, origin) for key in layer}
        return options

    def origin(self, key: str) -> str:
        """Where the option `key` was given: a place `merged` recorded, else the config's own."""
        return self.origins.get(key, option_name("storage_options"))

    def hidden_keys(self) -> list[str]:
        return sorted(k for k in self if k not in self.VISIBLE)

    def redacted(self) -> dict[str, Any]:
        return {k: (v if k in self.VISIBLE else "<hidden>") for k, v in self.items()}

    def __repr__(self) -> str:
        return f"StorageOptions({self.redacted()!r})"

    @classmethod
    def _validate(cls, value: Any) -> StorageOptions:
        if isinstance(value, str):
            value = parse_json_object(value, "storage_options")
        if not isinstance(value, dict):
            raise ValueError(f"storage_options must be a JSON object, got {type(value).__name__}")
        # options already merged keep where each was given (`merged`)
        return value if isinstance(value, StorageOptions) else cls(value)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate,
            json_schema_input_schema=core_schema.dict_schema(),
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda value, info: value.redacted() if info.mode_is_json() else dict(value), info_arg=True,
            ),
        )


def option_name(field: str) -> str:
    """A config field's command-line option, as a user types it: num_classes -> --num-classes."""
    return "--" + field.replace("_", "-")


def model_names() -> list[str]:
    """The model names a config accepts, sorted: the built-in ones, and those a program
    registered itself (`pipeline.models.register_model`), which it has imported to do so."""
    registry = sys.modules.get("pipeline.models._registry")
    return sorted({*MODEL_NAMES, *(registry.list_models() if registry is not None else ())})


def unknown_model_message(name: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown model {name!r}{hint}; choose one of: {', '.join(choices)}"


def is_checkpoint_uri(weights: str) -> bool:
    """Whether `weights` names a checkpoint file rather than a torchvision weights name."""
    return "://" in weights or os.sep in weights or weights.endswith((".pt", ".pth", ".ckpt")) or os.path.exists(weights)


def _three_bands(value: tuple[int, ...] | None) -> tuple[int, ...] | None:
    if value is not None and (len(value) not in (1, 3) or min(value) < 1):
        raise ValueError(f"give one band (grey) or three (R G B), numbered from 1; got {' '.join(map(str, value))}")
    return value


def _known_model(value: str | None) -> str | None:
    if value is not None and value not in (names := model_names()):
        raise ValueError(unknown_model_message(value, names))
    return value


def yesterday_utc() -> str:
    return (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)).isoformat()


def substitute_date(url: str, date: str | None) -> str:
    """`{date}` in `url` becomes `date` (YYYY-MM-DD; default yesterday, UTC)."""
    return url.replace("{date}", date or yesterday_utc())


class JobConfig(BaseModel):
    """What the three job configs share: strict fields, frozen, and the `{date}` template."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # fields the command line takes as positional arguments, in order; the others are --options
    positional: ClassVar[tuple[str, ...]] = ()
    # URL fields that may hold {date}; `date_fields[0]` holding it means the last one must too
    dated_urls: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="after")
    def _date_template(self) -> Self:
        if not self.dated_urls:
            return self
        urls = {name: getattr(self, name) for name in self.dated_urls}
        first, last = self.dated_urls[0], self.dated_urls[-1]
        if "{date}" in urls[first] and "{date}" not in urls[last]:
            first_name, last_name = self.argument_name(first), self.argument_name(last)
            raise ValueError(
                f"{first_name} {urls[first]!r} contains {{date}} but {last_name} {urls[last]!r} does not; put {{date}} "
                f"in {last_name} too (e.g. s3://bucket/segpipe/date={{date}}/) so each night has its own results"
            )
        return self

    @classmethod
    def argument_name(cls, field: str) -> str:
        """How the command line names a field: SOURCE for a positional one, --num-classes for an option."""
        return field.upper() if field in cls.positional else option_name(field)

    def dated(self, date: str | None = None) -> Self:
        """A copy with `{date}` in its URLs replaced by `date`, else its `date` field, else
        yesterday (UTC): a scheduled run processes one night's folder."""
        when = date or getattr(self, "date", None)
        return self.model_copy(update={name: substitute_date(getattr(self, name), when) for name in self.dated_urls})

    def with_absolute_paths(self, *names: str) -> Self:
        """A copy with the local paths among these fields made absolute (of `init` and
        `weights`, a checkpoint's only), for a process that runs in another folder: Ray
        Train's workers, a deployment's worker."""
        from .storage import absolute_url  # fsspec's import, for the commands that need it

        update = {}
        for name in names:
            value = getattr(self, name)
            if value and (name not in ("init", "weights") or is_checkpoint_uri(value)):
                update[name] = absolute_url(value)
        return self.model_copy(update=update)

    def with_storage_options(self, options: Mapping[str, Any]) -> Self:
        """A copy with these storage options; a `StorageOptions` is kept as it is, with the
        origin of each (`StorageOptions.merged`)."""
        kept = options if isinstance(options, StorageOptions) else StorageOptions(options)
        return self.model_copy(update={"storage_options": kept})


# what {date} becomes in a URL: a night's folder is named by it
DATE_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}")


def _iso_date(value: str | None) -> str | None:
    if value is not None:
        # fromisoformat alone also takes 20261122 (ISO's basic format), which would name
        # another folder than the YYYY-MM-DD ones {date} stands for
        if not DATE_PATTERN.fullmatch(value):
            raise ValueError(f"date must be YYYY-MM-DD, got {value!r}")
        try:
            dt.date.fromisoformat(value)
        except ValueError as err:  # 2026-02-30: the format's, but no day
            raise ValueError(f"{value} is no day of the calendar ({err})") from err
    return value


def _no_ray_client(value: str | None) -> str | None:
    if value and value.startswith("ray://"):
        raise ValueError(
            f"{value!r} is a Ray Client address; segpipe joins the cluster as a driver on one of its "
            "nodes: use 'auto' (or the GCS address host:6379) from a process running in the cluster"
        )
    return value


_STORAGE_OPTIONS = ("JSON object of fsspec options for remote URLs, e.g. '{\"endpoint_url\": \"http://...\"}' "
                    "(default: none; credentials from the environment, e.g. AWS_ACCESS_KEY_ID)")
_RAY_ADDRESS = "join this Ray cluster ('auto', or host:6379) (default: RAY_ADDRESS, else a local Ray started for the run)"
_DATE = "YYYY-MM-DD that replaces {date} in the URLs (default: yesterday, UTC)"


class SegmentConfig(JobConfig):
    """Everything `segpipe segment` needs."""

    positional: ClassVar[tuple[str, ...]] = ("source", "output")
    dated_urls: ClassVar[tuple[str, ...]] = ("source", "output")

    source: str = Field(min_length=1, description="fsspec URL of the images (s3://bucket/prefix, a folder, gs://...)")
    output: str = Field(min_length=1, description="fsspec URL for masks/, images/ and class_stats/")
    model: str | None = Field(default=None, description=(
        "model name (see `segpipe models`); default: the architecture a checkpoint given as --weights names, "
        f"else {DEFAULT_MODEL}"))
    weights: str | None = Field(default="DEFAULT", description=(
        "torchvision weights name (DEFAULT, COCO_WITH_VOC_LABELS_V1), a checkpoint path or URL, or none for an "
        "untrained model (then --num-classes is required)"))
    num_classes: int | None = Field(default=None, gt=0, description=(
        "classes; required with --weights none (default: the weights' own)"))
    class_names: tuple[str, ...] | None = Field(default=None, description=(
        "one name per class, in id order, for weights without names: an untrained model, a checkpoint whose "
        "classes are class_0, class_1, ... (default: the weights' own)"))
    crf: bool = Field(default=True, description="refine the labels with the dense CRF")
    precision: Literal["auto", "fp32", "bf16"] = Field(default="auto", description=(
        "the model's arithmetic: auto is bf16 where the device has it natively (CUDA; CPUs with AVX512_BF16 or "
        "AMX, compiled: with --no-compile fp32, the faster there), else fp32"))
    compile: bool | None = Field(default=None, description=(
        "torch.compile the model in each replica (on CPU with inductor's freezing: weights prepacked once); the "
        "first batch of each new image size waits for a compilation (default: where it pays, bf16 on CPU)"))
    tile: int | None = Field(default=None, ge=32, description=(
        "segment images larger than TILE x TILE in sliding windows of that side (aerial tiles); default: whole"))
    tile_stride: int | None = Field(default=None, ge=16, description="window stride (default: 3/4 of --tile)")
    bands: tuple[int, ...] | None = Field(default=None, description=(
        "georeferenced rasters: the 1-based bands to segment, as R G B (default: those the checkpoint was trained "
        "on, else the raster's RGB by colour interpretation, else its first three)"))
    block: int = Field(default=2048, ge=256, description=(
        "georeferenced rasters are segmented in blocks of about this side, so memory stays flat whatever "
        "their size (windows of --tile, default 512, slide within and across blocks)"))
    confidence: bool = Field(default=False, description=(
        "also write a uint8 confidence mask (the label's probability x 255) beside each mask"))
    polygons: bool = Field(default=False, description=(
        "georeferenced rasters: vectorise class regions into OUTPUT/polygons/ (GeoParquet)"))
    min_polygon_area: float = Field(default=0.0, ge=0, description=(
        "drop polygons smaller than this, in m² on the ground"))
    simplify: float = Field(default=0.0, ge=0, description=(
        "simplify polygons with this tolerance: metres in a projected CRS, else pixels (0: exact pixel edges)"))
    redo_errors: bool = Field(default=False, description="also segment again the images of committed error rows")
    batch_size: int = Field(default=8, ge=1, description="images per batch sent to a replica")
    shard_by: Literal["directory", "count"] = Field(default="directory", description=(
        "one shard per directory (split at --shard-size), or chunks of --shard-size keys"))
    shard_size: int = Field(default=1000, ge=1, description="images per shard at most")
    ray_address: str | None = Field(default=None, description=_RAY_ADDRESS)
    storage_options: StorageOptions = Field(default_factory=StorageOptions, description=_STORAGE_OPTIONS)
    device: Literal["auto", "cuda", "cpu"] = Field(default="auto", description=(
        "auto: GPU replicas when the cluster has GPUs now; cuda: always (an autoscaler adds GPU workers on "
        "demand); cpu: CPU replicas only"))
    actors: int | None = Field(default=None, ge=1, description=(
        "model replicas (default: one per GPU; CPU replicas: one on each node with a CPU to spare beside it)"))
    gpus_per_actor: float = Field(default=1.0, gt=0, le=1, description="fraction of a GPU per replica")
    cpus_per_actor: float = Field(default=1.0, gt=0, description="CPUs Ray reserves for each replica")
    threads_per_actor: int | None = Field(default=None, ge=1, description=(
        "torch threads of a CPU replica (default: its node's CPUs shared among the replicas there)"))
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1, description=(
        "refuse images with more pixels than this (georeferenced rasters: --max-raster-pixels)"))
    max_raster_pixels: int = Field(default=DEFAULT_MAX_RASTER_PIXELS, ge=1, description=(
        "refuse georeferenced rasters with more pixels than this (they are read block by block)"))
    jpeg_decode: Literal["auto", "device", "cpu"] = Field(default="auto", description=(
        "where plain JPEGs are decoded: auto = on the replica's GPU when it has one, device = always on the "
        "replica's device, cpu = by Pillow on the CPU (in the decode tasks, or in a replica that reads its own "
        "batches: --batch-io)"))
    batch_io: Literal["auto", "replica", "tasks"] = Field(default="auto", description=(
        "where a batch's files are read and decoded and its masks written: replica = in the model replica's own "
        "process, tasks = in Ray tasks beside it, which hide storage latency and keep a GPU fed; auto = in the "
        "replica for CPU replicas with SOURCE and OUTPUT on a filesystem, else tasks"))
    image_timeout_s: float = Field(default=120.0, gt=0, description=(
        "seconds one image may take to decode before it becomes a `timeout` error row"))
    startup_timeout_s: float = Field(default=900.0, gt=0, description=(
        "seconds the replicas may take to be placed and load their model (autoscaling included)"))
    batch_attempts: int = Field(default=3, ge=1, description=(
        "times a batch whose replica died is sent before its images become error rows"))
    max_restarts: int = Field(default=3, ge=0, description=(
        "times in a row a replica that died is restarted without finishing a batch between (0: never)"))
    no_replica_timeout_s: float = Field(default=900.0, gt=0, description=(
        "seconds without any live replica (every worker node lost) before the run stops; long enough for an "
        "autoscaler to add nodes"))
    batches_in_flight_per_actor: int | None = Field(default=None, ge=1, description=(
        "batches in flight per replica (default: the spare CPUs shared among the replicas, 3 to 8)"))
    date: str | None = Field(default=None, description=_DATE)

    @model_validator(mode="before")
    @classmethod
    def _default_model(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("model") is None:
            weights = data.get("weights", "DEFAULT")
            if not (isinstance(weights, str) and weights.strip().lower() not in {"", "none"} and is_checkpoint_uri(weights)):
                data = {**data, "model": DEFAULT_MODEL}
        return data

    @model_validator(mode="after")
    def _stride_within_tile(self) -> SegmentConfig:
        if self.tile_stride is not None and self.tile is None:
            raise ValueError(f"--tile-stride {self.tile_stride} needs a --tile, the side of the windows it strides")
        if self.tile_stride is not None and self.tile_stride > self.tile:
            raise ValueError(f"--tile-stride {self.tile_stride} is larger than --tile {self.tile}: windows would leave gaps")
        if self.class_names is not None and self.num_classes is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} --class-names for --num-classes {self.num_classes}")
        return self

    @model_validator(mode="after")
    def _raster_settings_agree(self) -> SegmentConfig:
        RasterSettings.of(self)  # its own checks, with the options' names
        return self

    _model = field_validator("model")(_known_model)
    _ray_address = field_validator("ray_address")(_no_ray_client)
    _date = field_validator("date")(_iso_date)
    _class_names = field_validator("class_names")(_each_once)

    _bands = field_validator("bands")(_three_bands)

    @field_validator("weights")
    @classmethod
    def _none_weights(cls, value: str | None) -> str | None:
        return None if value is None or value.strip().lower() in {"", "none"} else value


@dataclass(frozen=True)
class RasterSettings:
    """How georeferenced rasters are segmented and what is written for them (SegmentConfig's
    raster fields)."""

    tile: int = 512
    tile_stride: int | None = None
    bands: tuple[int, ...] | None = None
    block: int = 2048
    # the dense CRF of a block runs over its core widened by this much, so a block edge leaves
    # no seam in the labels: its mean field reaches 3 cells of 8 pixels per iteration, 5
    # iterations, 120 pixels. Up to crop - stride (128 for 512-pixel windows) the margin costs
    # no windows: they reach that far beyond the core anyway.
    crf_margin: int = 128
    confidence: bool = False
    polygons: bool = False
    min_polygon_area: float = 0.0
    simplify: float = 0.0

    def __post_init__(self) -> None:
        # --simplify and --min-polygon-area shape the polygons --polygons writes, and nothing
        # else: without it they would do nothing, silently. Their values, not whether they were
        # given: a deployment's parameters give every field, the defaults (0) included
        if not self.polygons:
            for name in ("min_polygon_area", "simplify"):
                if getattr(self, name):
                    raise ValueError(f"{option_name(name)} applies to polygons; add --polygons (or leave it out)")

    @property
    def stride(self) -> int:
        return window_stride(self.tile, self.tile_stride)

    @classmethod
    def of(cls, config: SegmentConfig) -> RasterSettings:
        return cls(tile=config.tile or cls.tile, tile_stride=config.tile_stride, bands=config.bands, block=config.block,
                   confidence=config.confidence, polygons=config.polygons, min_polygon_area=config.min_polygon_area,
                   simplify=config.simplify)


class EvaluateConfig(JobConfig):
    """Everything `segpipe evaluate` needs."""

    positional: ClassVar[tuple[str, ...]] = ("predictions", "ground_truth", "output")
    dated_urls: ClassVar[tuple[str, ...]] = ("predictions", "ground_truth", "output")

    predictions: str = Field(min_length=1, description="fsspec URL of predicted masks (e.g. a segment OUTPUT/masks)")
    ground_truth: str = Field(min_length=1, description="fsspec URL of ground-truth masks")
    output: str = Field(min_length=1, description="fsspec URL for the report")
    num_classes: int = Field(gt=0, description="classes the predictions use")
    ignore_index: int = Field(default=255, description="ground-truth label of pixels that are not scored")
    class_names: tuple[str, ...] | None = Field(default=None, description=(
        "one name per class, in id order (default: those of the run that wrote PREDICTIONS when they are a "
        "segpipe OUTPUT's masks/, else class_0, class_1, ...)"))
    label_map: dict[int, int] | None = Field(default=None, description=(
        "JSON object remapping ground-truth values before scoring, e.g. '{\"7\": 0, \"8\": 1}' (others kept)"))
    reduce_zero_label: bool = Field(default=False, description=(
        "ground truth 0 is ignored and the other labels shift down by one"))
    prediction_suffix: str = Field(default="", description="suffix removed from prediction names before pairing")
    ground_truth_suffix: str = Field(default="", description="suffix removed from ground-truth names, e.g. _L")
    storage_options: StorageOptions = Field(default_factory=StorageOptions, description=_STORAGE_OPTIONS)
    ray_address: str | None = Field(default=None, description=_RAY_ADDRESS)
    date: str | None = Field(default=None, description=_DATE)

    _ray_address = field_validator("ray_address")(_no_ray_client)
    _date = field_validator("date")(_iso_date)
    _class_names = field_validator("class_names")(_each_once)

    @model_validator(mode="after")
    def _names_per_class(self) -> EvaluateConfig:
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} --class-names for --num-classes {self.num_classes}")
        return self


# what a resumed training run takes from its checkpoint when not given again, as it takes its
# class names and palette: the recipe and the pairing (`TrainConfig.resumed_with`); and its
# validation set, as one, so that epochs are compared by the same score
RESUMED_SETTINGS = ("batch_size", "crop", "scale", "ignore_index", "optimizer", "lr", "weight_decay", "aux_weight",
                    "label_suffix", "bands", "label_map", "seed")
VALIDATION_SETTINGS = ("val_images", "val_labels", "val_last")


def _shown(value: Any) -> str:
    """A setting's value as it is typed on the command line."""
    if isinstance(value, dict):  # a JSON object, quoted for the shell
        return "'" + json.dumps({str(k): v for k, v in value.items()}) + "'"
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


class TrainConfig(JobConfig):
    """Everything `segpipe train` needs."""

    positional: ClassVar[tuple[str, ...]] = ("images", "labels", "output")

    images: str = Field(min_length=1, description="fsspec URL of the training images")
    labels: str = Field(min_length=1, description="fsspec URL of their label masks (PNG of class ids, paired by key)")
    output: str = Field(min_length=1, description="fsspec URL of the checkpoint to write (.pt)")
    model: str = Field(description="model name (see `segpipe models`)")
    num_classes: int = Field(gt=0, description="classes to train")
    class_names: tuple[str, ...] | None = Field(default=None, description=(
        "one name per class, in id order (default: class_0, class_1, ...)"))
    palette: tuple[tuple[int, int, int], ...] | None = Field(default=None, description=(
        "JSON list of [r, g, b], one per class (default: a fixed palette)"))
    epochs: int = Field(default=20, ge=1, description="epochs to train")
    # batch norm needs two samples
    batch_size: int = Field(default=8, ge=2, description="images per batch on each worker")
    crop: tuple[int, int] = Field(default=(512, 512), description="training crop, height and width")
    scale: tuple[float, float] = Field(default=(0.5, 2.0), description="random scale range, low and high")
    ignore_index: int = Field(default=255, description="label of unlabelled pixels")
    init: str = Field(default="none", description=(
        "none (random), imagenet (the backbone's ImageNet weights), a torchvision weights name of the model, or "
        "a checkpoint URL; tensors whose shapes differ (the classifier, for other classes) start random"))
    optimizer: Literal["sgd", "adamw"] = Field(default="sgd", description="sgd (momentum 0.9) or adamw, polynomial decay")
    lr: float | None = Field(default=None, gt=0, description="learning rate (default: 0.01 for sgd, 1e-4 for adamw)")
    weight_decay: float | None = Field(default=None, ge=0, description="weight decay (default: 1e-4 for sgd, 0.01 for adamw)")
    aux_weight: float = Field(default=0.4, ge=0, description="weight of the auxiliary head's loss, where there is one")
    label_suffix: str = Field(default="", description="suffix of label names, e.g. _L for x_L.png")
    label_map: dict[int, int] | None = Field(default=None, description=(
        "JSON object remapping label values before training, e.g. '{\"255\": 1}' for 0/255 footprint masks "
        "(others kept)"))
    bands: tuple[int, ...] | None = Field(default=None, description=(
        "georeferenced rasters: the 1-based bands to train on, as R G B (default: the raster's RGB by colour "
        "interpretation, else the first three); the checkpoint carries them, and segment reads the same"))
    val_images: str | None = Field(default=None, description="fsspec URL of validation images")
    val_labels: str | None = Field(default=None, description="fsspec URL of their label masks")
    val_last: int = Field(default=0, ge=0, description=(
        "without --val-images: hold out the last N pairs in key order (0: no validation)"))
    workers: int | None = Field(default=None, ge=1, description="Ray Train workers (default: one per GPU, else 1)")
    device: Literal["auto", "cuda", "cpu"] = Field(default="auto", description="auto: GPUs when the cluster has them")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs Ray reserves for each worker")
    resume: str | None = Field(default=None, description=(
        "a checkpoint written by segpipe train: continue after its epoch (OUTPUT's .last checkpoint: after the last "
        "epoch trained)"))
    overwrite: bool = Field(default=False, description=(
        "a new run may replace the checkpoints already at OUTPUT and its .last (refused without it)"))
    seed: int = Field(default=0, description="seed of the shuffling, cropping and initialisation")
    storage_options: StorageOptions = Field(default_factory=StorageOptions, description=_STORAGE_OPTIONS)
    ray_address: str | None = Field(default=None, description=_RAY_ADDRESS)

    _ray_address = field_validator("ray_address")(_no_ray_client)

    _model = field_validator("model")(_known_model)
    _bands = field_validator("bands")(_three_bands)
    _class_names = field_validator("class_names")(_each_once)

    @field_validator("init")
    @classmethod
    def _init_keyword(cls, value: str) -> str:
        """none and imagenet in any case, as the other values are never spelled (weights names
        are upper case, URLs their own)."""
        return value.lower() if value.lower() in {"none", "imagenet"} else value

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if (self.val_images is None) != (self.val_labels is None):
            raise ValueError("give both --val-images and --val-labels, or neither")
        if self.val_images is not None and self.val_last:
            raise ValueError("--val-last holds pairs out of the training data; it cannot be combined with --val-images")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} --class-names for --num-classes {self.num_classes}")
        if min(self.crop) < 32:
            raise ValueError(f"--crop {self.crop} is too small; the models downsample by up to 32")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"--scale must be LOW HIGH with 0 < LOW <= HIGH, got {self.scale}")
        return self

    def resumed_with(self, trained: Mapping[str, Any]) -> tuple[TrainConfig, list[str], list[str]]:
        """This config with the settings a resumed checkpoint was trained with (`trained`, as
        saved in it) where this one gives none: `RESUMED_SETTINGS`, and its validation set
        unless one is given. Also, as the command line spells them, those taken that changed a
        value, and those given that differ from the checkpoint's (another --lr or --bands is
        allowed and said; another --optimizer is refused later)."""
        names = RESUMED_SETTINGS if self.model_fields_set & set(VALIDATION_SETTINGS) else RESUMED_SETTINGS + VALIDATION_SETTINGS
        saved = {name: trained[name] for name in names if name in trained}
        if not saved:
            return self, [], []
        taken = [name for name in saved if name not in self.model_fields_set]
        resumed = type(self).model_validate(self.model_dump() | {name: saved[name] for name in taken})
        changed = [f"{option_name(name)} {_shown(getattr(resumed, name))}" for name in taken
                   if getattr(resumed, name) != getattr(self, name)]
        overridden = []
        for name in (*RESUMED_SETTINGS, *VALIDATION_SETTINGS):
            if name in self.model_fields_set and name in trained:
                trained_with = self._as_typed(name, trained[name])
                if trained_with != getattr(self, name):
                    overridden.append(f"{option_name(name)} {_shown(getattr(self, name))} (trained with "
                                      f"{_shown(trained_with)})")
        return resumed, changed, overridden

    def _as_typed(self, name: str, saved: Any) -> Any:
        """A setting as a checkpoint saved it (JSON), as this field types it; as saved where
        this version would refuse it."""
        try:
            return getattr(type(self).model_validate(self.model_dump() | {name: saved}), name)
        except ValueError:
            return saved

    @property
    def last_checkpoint(self) -> str:
        """Where each epoch's model goes, beside OUTPUT (the best epoch's): model.pt ->
        model.last.pt. `resume` from it goes on after the last epoch trained."""
        folder, separator, name = self.output.rpartition("/")
        stem, dot, suffix = name.rpartition(".")
        return folder + separator + (f"{stem}.last.{suffix}" if dot and stem else f"{name}.last")

    def resumed_best(self, training_state: Mapping[str, Any]) -> tuple[str, int] | None:
        """When `resume` is a last epoch's checkpoint, with this `training_state`: where its
        run's best epoch was written, and which epoch that was. The best is named by its file
        name, beside the last epoch's checkpoint (where `last_checkpoint` puts it), so the two
        can be moved together. None for a best epoch's checkpoint: it is its own best."""
        name = training_state.get("best_checkpoint")
        if name is None or self.resume is None:
            return None
        folder, separator, _ = self.resume.rpartition("/")
        return folder + separator + name, int(training_state["best_epoch"])

    @property
    def learning_rate(self) -> float:
        return self.lr or (0.01 if self.optimizer == "sgd" else 1e-4)

    @property
    def decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else (1e-4 if self.optimizer == "sgd" else 0.01)
