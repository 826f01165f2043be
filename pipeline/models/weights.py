"""Weights and the metadata that travels with them.

Three sources of weights, one entry point (`build_model`):
- `None` / "none": random initialisation, nothing downloaded (backbone included).
- a torchvision weight enum name ("COCO_WITH_VOC_LABELS_V1", "DEFAULT"), for the models
  torchvision publishes weights for; fetched into torch.hub's cache.
- a segpipe checkpoint at any fsspec URL (local path, s3://, gs://), loaded with
  `torch.load(weights_only=True)`. It holds `ModelMeta` (architecture, classes, palette,
  preprocessing), so a checkpoint alone says how to run it.

Checkpoints are read and written through `pipeline.storage` like every other object: retried
on transient errors, and replaced atomically, so a job loading a checkpoint while training
rewrites it gets the old one or the new one whole.
"""

from __future__ import annotations

import io
import os
import pickle
import urllib.error
import zipfile
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from ..config import is_checkpoint_uri
from ..model_meta import ModelMeta, Preprocessing
from ..preflight import (  # read there too, without torch, before a job starts
    CHECKPOINT_FORMAT,
    checkpoint_digest,
)
from ..storage import open_file, read_bytes, write_atomic
from ._registry import get_spec


class WeightsUnavailableError(RuntimeError):
    """Weights could not be fetched (offline, missing file, no permission)."""


def save_checkpoint(
    model: nn.Module, url: str, meta: ModelMeta, *, storage_options: dict[str, Any] | None = None,
    training_state: dict[str, Any] | None = None,
) -> str | None:
    """Write `model`'s weights with `meta` to any fsspec URL, loadable by `build_model`.
    `training_state` (optimizer state, epoch: plain data and tensors) lets training resume.
    Returns the written file's `checkpoint_digest`, which a reader of it finds again (None
    when torch was told to save without CRC-32s, and so without one)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # the digest describes the file it is read from, not the model: never saved
    payload = {"format": CHECKPOINT_FORMAT, "meta": meta.model_dump(mode="json", exclude={"weights_digest"}),
               "state_dict": state}
    if training_state is not None:
        payload["training_state"] = training_state
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    location, key = open_file(url, storage_options)
    write_atomic(location, key, buffer.getvalue())
    with zipfile.ZipFile(buffer) as archive:
        try:
            return checkpoint_digest(archive)
        except ValueError:
            return None


def _read_payload(url: str, storage_options: dict[str, Any] | None) -> tuple[dict[str, Any], bytes]:
    """The unpickled contents of a segpipe checkpoint, and the file's bytes; only tensors and
    plain data are unpickled (weights_only)."""
    try:
        location, key = open_file(url, storage_options)
        data = read_bytes(location, key)
    except Exception as err:  # fsspec surfaces each backend's own error types
        raise WeightsUnavailableError(
            f"cannot read checkpoint {url}: {type(err).__name__}: {err}. Check the URL and its credentials (AWS_* "
            "variables, or storage options: --storage-options, or storage_options= in Python), or use weights none "
            "for an untrained model"
        ) from err
    if data is None:
        raise WeightsUnavailableError(
            f"cannot read checkpoint {url}: no such file. Check the URL, or use weights none for an untrained model"
        )
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refused to load {url}: it is not a plain tensor checkpoint (weights_only=True rejected it: "
            f"{str(err).splitlines()[0]}). Only load checkpoints you trust, re-saved with segpipe's save_checkpoint"
        ) from err
    except Exception as err:
        raise ValueError(f"{url} is not a readable PyTorch checkpoint: {type(err).__name__}: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{url} is not a segpipe checkpoint (no format={CHECKPOINT_FORMAT!r} entry); "
            "write it with pipeline.models.save_checkpoint so it carries classes and preprocessing"
        )
    return payload, data


def load_checkpoint(
    url: str, *, storage_options: dict[str, Any] | None = None
) -> tuple[ModelMeta, dict[str, torch.Tensor]]:
    """Read a segpipe checkpoint's metadata, its contents' digest set, and its weights."""
    meta, state, _ = load_resumable(url, storage_options=storage_options)
    return meta, state


def load_resumable(
    url: str, *, storage_options: dict[str, Any] | None = None
) -> tuple[ModelMeta, dict[str, torch.Tensor], dict[str, Any] | None]:
    """`load_checkpoint`, and the checkpoint's `training_state` (None if it has none), from one
    read of the file: a training worker resuming from it needs all three."""
    payload, data = _read_payload(url, storage_options)
    try:  # a legacy (not zip) file torch still reads has no members to digest: known by its path then
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            digest = checkpoint_digest(archive)
    except zipfile.BadZipFile:
        digest = None
    except ValueError as err:
        raise ValueError(f"checkpoint {url}: {err}") from err
    try:
        meta = ModelMeta.model_validate({**payload.get("meta", {}), "weights_digest": digest})
    except (ValidationError, TypeError) as err:  # TypeError: metadata that is not a mapping
        raise ValueError(f"checkpoint {url} has invalid metadata: {err}") from err
    return meta, payload["state_dict"], payload.get("training_state")


def load_training_state(url: str, *, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The `training_state` saved with a checkpoint (None if it has none)."""
    return _read_payload(url, storage_options)[0].get("training_state")


def _torchvision_weights(tv_name: str | None, weights: str) -> Any | None:
    """The torchvision enum member that `weights` names for this model, or None."""
    if tv_name is None:
        return None
    from torchvision.models import get_model_weights

    enum_cls = get_model_weights(tv_name)
    member = weights.removeprefix(enum_cls.__name__ + ".")
    return enum_cls[member] if member in enum_cls.__members__ else None


def _check_num_classes(num_classes: int | None, source: str, expected: int) -> None:
    if num_classes is not None and num_classes != expected:
        raise ValueError(
            f"num_classes={num_classes} but weights {source} have {expected} classes; "
            f"pass num_classes={expected} (or omit it)"
        )


def _named(meta: ModelMeta, class_names: Sequence[str] | None, source: str) -> ModelMeta:
    """`meta` with the class names given, for weights whose classes have none of their own."""
    if class_names is None:
        return meta
    if len(class_names) != meta.num_classes:
        raise ValueError(f"{len(class_names)} class_names for the {meta.num_classes} classes of weights {source}")
    return meta.model_copy(update={"class_names": tuple(class_names)})


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"weights {source} do not fit {model.__class__.__name__}: {err}") from err


def build_model(
    name: str | None,
    *,
    num_classes: int | None = None,
    weights: str | None = None,
    storage_options: dict[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model, optionally with weights; its `ModelMeta` is at `model.meta`.

    `num_classes` is required without weights and otherwise checked against them. Auxiliary
    heads in published weights or checkpoints are dropped unless `aux_loss=True` is passed.
    `name` may be None when `weights` is a segpipe checkpoint: it names its architecture.
    `class_names`, one per class, name the classes of weights that have no names of their own
    (class_0, class_1, ...: no weights, or a checkpoint trained without names).
    """
    checkpoint = None
    if name is None:
        if weights is None or weights.lower() == "none" or not is_checkpoint_uri(weights):
            raise ValueError("a model name is needed unless weights is a segpipe checkpoint (which names its architecture)")
        checkpoint = load_checkpoint(weights, storage_options=storage_options)
        name = checkpoint[0].architecture
    spec = get_spec(name)
    want_aux = bool(kwargs.get("aux_loss", False))

    if weights is None or weights.lower() == "none":
        if num_classes is None:
            raise ValueError(f"num_classes is required to build {name!r} without weights")
        model = spec.builder(num_classes=num_classes, **kwargs)
        model.meta = _named(ModelMeta.default(name, num_classes, model_kwargs=kwargs), class_names, "none")
        return model

    enum = _torchvision_weights(spec.torchvision_name, weights)
    if enum is not None:
        categories = enum.meta["categories"]
        _check_num_classes(num_classes, str(enum), len(categories))
        try:
            state = enum.get_state_dict(progress=False, weights_only=True)
        except (urllib.error.URLError, OSError, RuntimeError) as err:
            cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(enum.url))
            raise WeightsUnavailableError(
                f"cannot download {enum} from {enum.url} ({type(err).__name__}: {err}). Offline, either "
                f"copy that file to {cache}, pass a checkpoint path or URL as --weights, or use --weights none "
                "for an untrained model"
            ) from err
        has_aux = any(k.startswith("aux_classifier.") for k in state)
        build_kwargs = {**kwargs, "aux_loss": True} if has_aux else kwargs
        model = spec.builder(num_classes=len(categories), **build_kwargs)
        _load_state(model, state, str(enum))
        transforms = enum.transforms()
        preprocessing = Preprocessing(
            mean=tuple(transforms.mean), std=tuple(transforms.std),
            resize="short_side", size=(int(transforms.resize_size[0]),),
        )
        meta = ModelMeta.default(
            name, len(categories), class_names=tuple(categories), preprocessing=preprocessing,
            weights=str(enum).split(".")[-1], model_kwargs=kwargs,
        )
    elif is_checkpoint_uri(weights):
        meta, state = checkpoint or load_checkpoint(weights, storage_options=storage_options)
        if meta.architecture != name:
            raise ValueError(
                f"checkpoint {weights} holds a {meta.architecture!r} model, not {name!r}; "
                f"pass model={meta.architecture!r}"
            )
        _check_num_classes(num_classes, weights, meta.num_classes)
        model = spec.builder(num_classes=meta.num_classes, **(meta.model_kwargs | kwargs))
        _load_state(model, state, weights)
        meta = meta.model_copy(update={"weights": weights})
    else:
        known = ""
        if spec.torchvision_name:
            from torchvision.models import get_model_weights

            known = f" torchvision weights for it: {', '.join(get_model_weights(spec.torchvision_name).__members__)};"
        raise ValueError(
            f"unknown weights {weights!r} for {name!r};{known} or pass a checkpoint path/URL, or 'none'"
        )

    if getattr(model, "aux_classifier", None) is not None and not want_aux:
        model.aux_classifier = None  # inference does not need deep supervision
    model.meta = _named(meta, class_names, weights)
    return model
