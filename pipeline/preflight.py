"""What can be checked of a job before anything starts: no cluster, no model, no Prefect.

`check_segment`, `check_evaluate` and `check_train` take a job's config (dated, with its
storage options resolved) and raise `PreflightError`, one line naming the option as the
command line spells it, for the first mistake they find:

- the model, its weights and `num_classes` (and `class_names`) agree. A checkpoint's metadata
  is read from its pickle alone, without torch and without its tensors; torchvision's
  published weights are known from `PUBLISHED_WEIGHTS`, and must be in torch.hub's cache or
  reachable for download (both also tell `pipeline.run.model_meta` what a run's model is,
  without torch);
- each input folder (SOURCE, GROUND_TRUTH, ...) exists and can be read, which on object
  storage also proves the credentials; evaluate's and train's hold masks or images;
- OUTPUT is a folder that can be written and, when it records a layout (`_segpipe.json`),
  the run's layout is the same; it is not an input folder nor in one; train's replaces no
  checkpoint unless told to.

They only read. The command line calls them before it imports Prefect or Ray, so a mistake
costs a second rather than the start of a cluster and a model, and nothing reaches OUTPUT;
the flows call them at their start, for deployment runs. Importing this module imports
neither torch (2 to 5 s), Ray nor Prefect.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import json
import os
import pickle
import socket
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .config import (
    EvaluateConfig,
    SegmentConfig,
    StorageOptions,
    TrainConfig,
    is_checkpoint_uri,
    repeated,
)
from .errors import error_chain
from .storage import (
    Location,
    StorageUnavailableError,
    absolute_url,
    folder_exists,
    is_image_key,
    is_local_url,
    is_mask_key,
    iter_files,
    missing_folder,
    open_file,
    open_location,
    read_bytes,
    retry_io,
)
from .text import counted

T = TypeVar("T")

CHECKPOINT_FORMAT = "segpipe-checkpoint/1"
# pipeline.outputs' layout record and its format, named here because importing pipeline.outputs
# imports torch; tests/test_preflight.py checks that the two agree
LAYOUT_KEY = "_segpipe.json"
LAYOUT_FORMAT = "segpipe-output/4"
# seconds a download URL may take to answer before the weights count as unreachable
DOWNLOAD_CHECK_TIMEOUT_S = 3.0

ENDPOINT_HINT = ("check the URL and, for an S3-compatible store, its endpoint (AWS_ENDPOINT_URL, or "
                 "--storage-options '{\"endpoint_url\": \"...\"}')")
CREDENTIALS_HINT = (
    "give them in the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE), with "
    "--storage-options '{\"key\": \"...\", \"secret\": \"...\"}', or in a Prefect Secret block named by "
    "--storage-secret; for a public bucket pass --storage-options '{\"anon\": true}'"
)


class PreflightError(ValueError):
    """A job that cannot run as given: one line saying what is wrong and what to pass instead."""


@dataclass(frozen=True)
class PublishedWeights:
    """torchvision's published weights for one registered model, and what they mean: what
    `pipeline.models` reads of torchvision's weights enum (class names, transforms)."""

    enum: str  # torchvision's weights enum, e.g. DeepLabV3_ResNet101_Weights
    members: tuple[str, ...]  # the names that select them; DEFAULT is an alias
    url: str
    name: str  # the member all those names select: what a run records as its weights
    categories: tuple[str, ...]  # the class names, in id order
    resize_size: int  # the transforms resize the short side to this
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def num_classes(self) -> int:
        return len(self.categories)


_COCO_VOC = ("COCO_WITH_VOC_LABELS_V1", "DEFAULT")
# Pascal VOC's classes, which torchvision's segmentation weights (trained on COCO) predict
_VOC_CATEGORIES = (
    "__background__", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def _coco_voc(enum: str, url: str) -> PublishedWeights:
    return PublishedWeights(enum, _COCO_VOC, url, "COCO_WITH_VOC_LABELS_V1", _VOC_CATEGORIES, 520)


# what torchvision publishes for the registry's models, so that a weights name is checked, and
# a run's model known, without importing torchvision (4 s); tests/test_preflight.py checks it
# against torchvision
PUBLISHED_WEIGHTS: dict[str, PublishedWeights] = {
    "deeplabv3_mobilenet_v3_large": _coco_voc(
        "DeepLabV3_MobileNet_V3_Large_Weights", "https://download.pytorch.org/models/deeplabv3_mobilenet_v3_large-fc3c493d.pth"),
    "deeplabv3_resnet101": _coco_voc(
        "DeepLabV3_ResNet101_Weights", "https://download.pytorch.org/models/deeplabv3_resnet101_coco-586e9e4e.pth"),
    "deeplabv3_resnet50": _coco_voc(
        "DeepLabV3_ResNet50_Weights", "https://download.pytorch.org/models/deeplabv3_resnet50_coco-cd0a2569.pth"),
    "fcn_resnet50": _coco_voc("FCN_ResNet50_Weights", "https://download.pytorch.org/models/fcn_resnet50_coco-1167a1af.pth"),
    "lraspp_mobilenet_v3_large": _coco_voc(
        "LRASPP_MobileNet_V3_Large_Weights", "https://download.pytorch.org/models/lraspp_mobilenet_v3_large-d234d4ea.pth"),
}


_RESNET34, _RESNET50, _RESNET101, _MOBILENET_V3_LARGE = (
    f"https://download.pytorch.org/models/{name}.pth"
    for name in ("resnet34-b627a593", "resnet50-11ad3fa6", "resnet101-cd907fc2", "mobilenet_v3_large-5c1a4163"))

# what `train --init imagenet` downloads for each registered model: its backbone's ImageNet
# weights, torchvision's DEFAULT for that backbone
IMAGENET_BACKBONES: dict[str, str] = {
    "deeplabv3_mobilenet_v3_large": _MOBILENET_V3_LARGE,
    "deeplabv3_resnet101": _RESNET101,
    "deeplabv3_resnet50": _RESNET50,
    "deeplabv3plus_resnet101": _RESNET101,
    "deeplabv3plus_resnet50": _RESNET50,
    "fcn_resnet50": _RESNET50,
    "lraspp_mobilenet_v3_large": _MOBILENET_V3_LARGE,
    "pspnet_resnet101": _RESNET101,
    "pspnet_resnet50": _RESNET50,
    "unet_resnet34": _RESNET34,
}


def published_weights(model: str | None, weights: str) -> PublishedWeights | None:
    """The published weights that `weights` (a member's name, or the enum's and the member's)
    names for `model`; None when it names none of them."""
    published = PUBLISHED_WEIGHTS.get(model or "")
    if published is None or weights.removeprefix(published.enum + ".") not in published.members:
        return None
    return published


@dataclass(frozen=True)
class CheckpointSummary:
    """What a segpipe checkpoint says it holds."""

    architecture: str
    num_classes: int
    class_names: tuple[str, ...]
    # epochs a checkpoint written by `segpipe train` has trained; None: no training state
    trained_epochs: int | None
    # its whole metadata as saved (`ModelMeta` as JSON when save_checkpoint wrote it), unvalidated
    meta: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # `checkpoint_digest` of the file: its contents
    digest: str = ""
    # the plain fields of its training state (epoch, best score; a last epoch's checkpoint's
    # best epoch and where it went: `TrainConfig.resumed_best`), without the optimizer's
    training_state: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


# ---------------------------------------------------------------------------------- the jobs


def check_segment(config: SegmentConfig, *, remote: bool = True) -> None:
    """Everything `segment` can be refused for before it starts. `remote=False` leaves remote
    URLs unchecked: their credentials are in a Prefect Secret block, which the flow loads and
    checks them with at its start."""
    published = _classes_given(config)
    _client_settings((config.source, config.output, config.weights), config.storage_options, remote)
    _output_outside_source(config)
    source = _readable_folder(config.source, config.storage_options, "SOURCE", remote)
    _writable_folder(config.output, config.storage_options, "OUTPUT", remote,
                     layout={"source": source.url if source else None, "shard_by": config.shard_by,
                             "shard_size": config.shard_size})
    _model_weights(config, published, remote)
    _ray_answers(config.ray_address, config.argument_name("ray_address"))


def check_serve(config: SegmentConfig, *, remote: bool = True) -> None:
    """What `serve` can be refused for before it registers a schedule that would fail every
    night: the model's settings as `segment` checks them, and the folders the nights' folders
    are in (SOURCE and OUTPUT up to their {date}). Each night's own folders, and OUTPUT's
    record of earlier runs, are its run's to check (`check_segment`), when they exist."""
    published = _classes_given(config)
    _client_settings((config.source, config.output, config.weights), config.storage_options, remote)
    _output_outside_source(config)
    for name, check in (("source", _readable_folder), ("output", _writable_folder)):
        url = getattr(config, name)
        check(undated_folder(url), config.storage_options, f"--{name} {url}: the folder of its nights" if "{date}" in url
              else f"--{name}", remote)
    _model_weights(config, published, remote)


def _output_outside_source(config: SegmentConfig) -> None:
    """OUTPUT is neither SOURCE nor in it: every run would list the masks the one before wrote
    as images, and segment them too (a URL's {date} the same night in both)."""
    _output_outside(config.output, config.source, "SOURCE", config.storage_options,
                    "each run would segment the masks the last one wrote")


def _output_outside(output_url: str, folder_url: str, folder: str, options: dict[str, Any] | None, why: str) -> None:
    """OUTPUT (at `output_url`) is neither the input `folder` (at `folder_url`) nor in it, since `why`."""
    inputs, output = (_open(lambda url=url: open_location(url, options), label)
                      for url, label in ((folder_url, folder), (output_url, "OUTPUT")))
    if type(inputs.fs) is not type(output.fs):
        return
    input_root, output_root = inputs.root, output.root
    if inputs.is_local:  # as the filesystem resolves them: `..` and symbolic links taken
        input_root, output_root = os.path.realpath(input_root), os.path.realpath(output_root)
    inside = input_root.rstrip("/") + "/"
    if output_root.rstrip("/") + "/" == inside:
        raise PreflightError(f"OUTPUT {output_url} is {folder}: {why}; write OUTPUT outside {folder}")
    if output_root.startswith(inside):
        raise PreflightError(f"OUTPUT {output_url} is inside {folder} {folder_url}: {why}; write OUTPUT outside {folder}")


def undated_folder(url: str) -> str:
    """The folder that holds the nights' folders of a URL with {date} (up to the last / before
    it; the current folder for a relative path with none), or the URL itself without one."""
    if "{date}" not in url:
        return url
    head = url[: url.index("{date}")]
    return head.rpartition("/")[0] + "/" if "/" in head else "."


def _classes_given(config: SegmentConfig) -> PublishedWeights | None:
    """The classes `segment` is asked for agree with published weights (returned, if those
    are what it runs); checked before any folder, since they need no storage."""
    weights = config.weights
    if weights is None and config.num_classes is None:
        raise PreflightError("--weights none needs --num-classes: an untrained model has no classes of its own")
    if weights is None or is_checkpoint_uri(weights):
        return None
    published = _published(config.model, weights, "--weights")
    _same_classes(config.num_classes, published.num_classes, f"--weights {weights}")
    return published


def _model_weights(config: SegmentConfig, published: PublishedWeights | None, remote: bool) -> None:
    """The weights can be had (downloaded, or read as a checkpoint of --model) and hold the
    classes --num-classes and --class-names name."""
    weights, classes, of = config.weights, config.num_classes, "--num-classes"
    if published is not None:
        _downloadable(published.url, f"the weights of {config.model or ''}", "--weights", str(weights))
        classes, of = published.num_classes, f"--weights {weights}"
    elif weights is not None:
        checkpoint = read_checkpoint(weights, config.storage_options, "--weights", remote)
        if checkpoint is not None:
            if config.model is not None and checkpoint.architecture != config.model:
                raise PreflightError(f"--weights {weights} holds a {checkpoint.architecture} model, not --model "
                                     f"{config.model}; pass --model {checkpoint.architecture}, or leave --model out")
            _same_classes(config.num_classes, checkpoint.num_classes, f"--weights {weights}")
            classes, of = checkpoint.num_classes, f"--weights {weights}"
    if config.class_names is not None and classes is not None and len(config.class_names) != classes:
        raise PreflightError(f"{len(config.class_names)} --class-names for the {classes} classes of {of}")


def check_evaluate(config: EvaluateConfig, *, remote: bool = True) -> None:
    """Everything `evaluate` can be refused for before it starts (`remote`: as for `check_segment`)."""
    options = config.storage_options
    _client_settings((config.predictions, config.ground_truth, config.output), options, remote)
    # the report beside the masks it scores, not among them; and masks to score in each folder
    # (an empty one is often a {date} that named the wrong night)
    for url, folder in ((config.predictions, "PREDICTIONS"), (config.ground_truth, "GROUND_TRUTH")):
        _output_outside(config.output, url, folder, options,
                        "the report's files would be listed among the masks of the next evaluation")
        _readable_folder(url, options, folder, remote, holding=(is_mask_key, "masks", "nothing to score"))
    _writable_folder(config.output, options, "OUTPUT", remote)
    # the masks/ folder of a segpipe OUTPUT holds its model's class ids: with fewer classes
    # every pair holding one past them would be left out, and the report made of the rest.
    # Imported here: pyarrow and numpy come with the outputs, which other commands' checks skip
    from .outputs import class_names_of_masks

    if (remote or is_local_url(config.predictions)) and \
            (model_classes := class_names_of_masks(config.predictions, options)) is not None and \
            config.num_classes < len(model_classes):
        raise PreflightError(f"--num-classes {config.num_classes}: PREDICTIONS {config.predictions} are the masks of a "
                             f"model of {len(model_classes)} classes (its OUTPUT's newest run record); pass "
                             f"--num-classes {len(model_classes)}, or more where the ground truth has classes it lacks")
    _ray_answers(config.ray_address, config.argument_name("ray_address"))


# what train's folders must hold (see _readable_folder)
_IMAGES = (is_image_key, "images", "nothing to train on")
_MASKS = (is_mask_key, "label masks", "nothing to train on")


def check_train(config: TrainConfig, *, remote: bool = True) -> None:
    """Everything `train` can be refused for before it starts (`remote`: as for `check_segment`).
    A resumed run is checked as it will run: with the settings its checkpoint was trained with
    where none are given (`TrainConfig.resumed_with`), its validation set included."""
    options = config.storage_options
    _client_settings((config.images, config.labels, config.val_images, config.val_labels, config.output,
                             config.resume, config.init), options, remote)
    config, _ = resume_point(config, remote=remote)
    resumed = read_checkpoint(config.resume, options, "--resume", remote) if config.resume is not None else None
    trained = resumed.meta.get("extra", {}).get("training", {}) if resumed is not None else {}
    config, _, _ = config.resumed_with(trained)
    for name, holding in (("images", _IMAGES), ("labels", _MASKS), ("val_images", _IMAGES), ("val_labels", _MASKS)):
        if getattr(config, name) is not None:
            _readable_folder(getattr(config, name), options, config.argument_name(name), remote, holding=holding)
    _writable_file(config.output, options, "OUTPUT", remote)
    _ray_answers(config.ray_address, config.argument_name("ray_address"))
    if config.resume is None:
        _no_checkpoint_replaced(config, remote)
    if config.init == "imagenet":
        if config.model not in IMAGENET_BACKBONES:
            raise PreflightError(f"--model {config.model} has no ImageNet backbone weights to start from; pass --init a "
                                 "checkpoint path or URL, or --init none (random)")
        # offline, imagenet is no way out either
        _downloadable(IMAGENET_BACKBONES[config.model], f"the ImageNet weights of {config.model}'s backbone", "--init",
                      "imagenet", instead="--init none (random)")
    elif config.init != "none":
        if is_checkpoint_uri(config.init):
            start = read_checkpoint(config.init, options, "--init", remote)
            if start is not None and start.architecture != config.model:
                raise PreflightError(f"--init {config.init} holds a {start.architecture} model, not --model {config.model}; "
                                     f"start from a checkpoint of {config.model}, or train --model {start.architecture}")
        else:
            _downloadable(_published(config.model, config.init, "--init").url, f"the weights of {config.model}", "--init",
                          config.init)
    if resumed is not None:
        # its names go on unless given: each once (`config._each_once`), as a checkpoint written
        # before they were checked may not have them
        if config.class_names is None and (twice := repeated(resumed.class_names)):
            raise PreflightError(f"--resume {config.resume} names {', '.join(twice)} more than once among its classes; "
                                 "pass --class-names, a name of its own for each class")
        if resumed.trained_epochs is None:
            raise PreflightError(f"--resume {config.resume} holds no training state; resume from a checkpoint written by "
                                 "segpipe train")
        if (resumed.architecture, resumed.num_classes) != (config.model, config.num_classes):
            raise PreflightError(f"--resume {config.resume} trains a {resumed.architecture} model of {resumed.num_classes} "
                                 f"classes; pass --model {resumed.architecture} --num-classes {resumed.num_classes}")
        if resumed.trained_epochs >= config.epochs:
            raise PreflightError(f"--resume {config.resume} already trained {resumed.trained_epochs} epochs; ask for "
                                 "more than that with --epochs")
        # the optimizer's state goes on from the checkpoint's: another optimizer cannot take it
        if trained.get("optimizer", config.optimizer) != config.optimizer:
            raise PreflightError(f"--resume {config.resume} was trained with --optimizer {trained['optimizer']}, whose "
                                 f"state it goes on from; pass --optimizer {trained['optimizer']}")
        # its best was chosen by validation mIoU, or by training mIoU without a validation set
        validated = bool(trained.get("val_images") or trained.get("val_last"))
        if trained and validated != bool(config.val_images or config.val_last):
            held_out = (f"--val-last {trained['val_last']}" if trained.get("val_last")
                        else f"--val-images {trained.get('val_images')} --val-labels {trained.get('val_labels')}")
            raise PreflightError(f"--resume {config.resume} chose its best epoch by "
                                 f"{'validation' if validated else 'training'} mIoU; resume "
                                 f"{f'with its {held_out}' if validated else 'without a validation set'}, "
                                 "so that epochs are compared by the same score")
        check_resumed_best(config, resumed.training_state, remote=remote)
        carried = config.resumed_best(resumed.training_state)
        _no_checkpoint_replaced(config, remote, own={absolute_url(config.resume)}
                                | ({absolute_url(carried[0])} if carried else set()))


def _no_checkpoint_replaced(config: TrainConfig, remote: bool, own: Collection[str] = ()) -> None:
    """A run writes OUTPUT and its .last checkpoint, whatever they held: often the weights a
    nightly `segment --weights` reads, which one mistyped command would replace with an epoch
    of something else. Unless told to (`overwrite`), or OUTPUT is one of `own`, the
    checkpoints (absolute URLs) of the run resumed, which goes on in them."""
    if config.overwrite or absolute_url(config.output) in own:
        return
    options = config.storage_options
    last = _file_exists(config.last_checkpoint, options, "OUTPUT", remote)
    best = _file_exists(config.output, options, "OUTPUT", remote)
    if best or last:
        found = config.output if best else config.last_checkpoint
        go_on = f"--resume {config.last_checkpoint} to go on training it, " if last and config.resume is None else ""
        raise PreflightError(f"{found} exists, and this run would replace it: pass {go_on}--overwrite to replace it, "
                             "or another OUTPUT")


def _file_exists(url: str, options: dict[str, Any], label: str, remote: bool) -> bool:
    """Whether there is a file at `url` (False, unasked, when it is remote and `remote` is False)."""
    location, key = _open(lambda: open_file(url, options), label)
    if not (remote or location.is_local):
        return False
    return _ask(f"{label} {url}", lambda: retry_io(location.uri(key), lambda: location.fs.exists(location.path(key))),
                local=location.is_local)


def check_resumed_best(config: TrainConfig, training_state: Mapping[str, Any], *, remote: bool = True) -> None:
    """A last epoch's checkpoint goes on with its run's best so far, which stays OUTPUT (copied
    there first when OUTPUT is another file) until an epoch scores better: it must still be
    that run's best epoch, and OUTPUT must not be the checkpoint resumed from."""
    if (carried := config.resumed_best(training_state)) is None:
        return
    best, best_epoch = carried
    if absolute_url(config.output) == absolute_url(config.resume):
        last = config.model_copy(update={"output": best}).last_checkpoint
        raise PreflightError(f"OUTPUT {config.output} is the --resume checkpoint, the last epoch's of a run whose best "
                             f"is {best}; pass that as OUTPUT (the last epoch then goes on in {last})")
    try:
        found = read_checkpoint(best, config.storage_options, "--resume's best", remote)
    except PreflightError as err:
        raise PreflightError(f"--resume {config.resume} goes on with its run's best epoch ({best_epoch}) in {best}, "
                             "which cannot be read; put it back, or resume from another checkpoint") from err
    # the very file that run wrote, not one written over it since (by another run, or by this
    # one at an epoch after its last checkpoint, which a crash between the two writes leaves)
    if found is not None and found.digest != training_state.get("best_digest"):
        raise PreflightError(f"--resume {config.resume} goes on with its run's best epoch ({best_epoch}) in {best}, "
                             f"which was written over since (it now holds epoch {found.trained_epochs}); pass --resume "
                             f"{best} to go on from that one instead")


def resume_point(config: TrainConfig, *, remote: bool = True) -> tuple[TrainConfig, str | None]:
    """`config`, going on from the checkpoint its run got furthest in, and a line saying so when
    that is not `resume`. An epoch that beats the best writes OUTPUT and then the last epoch's
    checkpoint: a run stopped between the two (a signal, a lost node) leaves a last epoch's
    checkpoint whose best was written over by that same run's next epoch, which holds more of
    it. That run is told by its history, which the later file's goes on from; a best written
    over by anything else is refused (`check_resumed_best`)."""
    if config.resume is None or absolute_url(config.output) == absolute_url(config.resume):
        return config, None
    resumed = read_checkpoint(config.resume, config.storage_options, "--resume", remote)
    if resumed is None or (carried := config.resumed_best(resumed.training_state)) is None:
        return config, None
    best = carried[0]
    try:
        found = read_checkpoint(best, config.storage_options, "--resume's best", remote)
    except PreflightError:  # check_resumed_best says what is wrong with it
        return config, None
    if found is None or found.digest == resumed.training_state.get("best_digest"):
        return config, None
    # one epoch on, no more: a stop can fall between an epoch's two writes only; a .last further
    # behind (put back from a backup, to train again from there) is refused as written over
    done, later = (summary.meta.get("extra", {}).get("history") or [] for summary in (resumed, found))
    if not done or found.trained_epochs != (resumed.trained_epochs or 0) + 1 or later[:len(done)] != done:
        return config, None
    return config.model_copy(update={"resume": best}), (
        f"--resume {config.resume}: its run went on to epoch {found.trained_epochs} (its best, in {best}) and was "
        f"stopped before writing it to {config.resume}; going on from {best}")


# ---------------------------------------------------------------------------- model weights


def _published(model: str | None, weights: str, option: str) -> PublishedWeights:
    """The published weights that `weights` names for `model`."""
    if (found := published_weights(model, weights)) is not None:
        return found
    published = PUBLISHED_WEIGHTS.get(model or "")
    if published is None:
        raise PreflightError(f"--model {model} has no published weights to load as {option} {weights}; pass {option} a "
                             f"checkpoint path or URL, or {_UNTRAINED[option]}")
    raise PreflightError(f"unknown {option} {weights} for --model {model}: torchvision publishes "
                         f"{' and '.join(published.members)} (the same weights) for it; or pass a checkpoint path "
                         f"or URL, or {_UNTRAINED[option]}")


# what to pass instead of weights that cannot be had
_UNTRAINED = {"--weights": "--weights none with --num-classes for an untrained model",
              "--init": "--init none (random) or imagenet"}


def _same_classes(given: int | None, held: int, what: str) -> None:
    if given is not None and given != held:
        raise PreflightError(f"--num-classes {given} but {what} has {held} classes; pass --num-classes {held}, "
                             "or leave it out")


def hub_cache_path(url: str) -> str:
    """Where torch.hub keeps the file downloaded from `url` (torch.hub.get_dir(), without torch)."""
    torch_home = os.getenv("TORCH_HOME") or os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch")
    return os.path.join(os.path.expanduser(torch_home), "hub", "checkpoints", os.path.basename(url))


def download_problem(url: str) -> str | None:
    """Why the weights torch.hub downloads from `url` could not be had here, or None: they
    are in torch.hub's cache, or their URL answers. Offline, a run would otherwise start
    everything and then fail in each replica (or training worker)."""
    cache = hub_cache_path(url)
    if os.path.exists(cache):
        return None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                    timeout=DOWNLOAD_CHECK_TIMEOUT_S):
            return None
    except urllib.error.HTTPError:
        return None  # the server answered: the network is there, and the download says what it answers
    except (OSError, ValueError) as err:  # no route, no name, refused, timed out
        reason = getattr(err, "reason", err)
        return f"cannot download them from {url} ({type(err).__name__}: {reason}); offline, copy that file to {cache}"


def _downloadable(url: str, what: str, option: str, value: str, *, instead: str | None = None) -> None:
    """`download_problem` as the one line a job is refused with: `what` weights, which `option`
    `value` asks for; besides a checkpoint, `instead` (default: the option's untrained value)."""
    problem = download_problem(url)
    if problem is not None:
        raise PreflightError(f"{what} ({option} {value}): {problem}, pass {option} a checkpoint path or URL, or "
                             f"{instead or _UNTRAINED[option]}")


class _MetadataUnpickler(pickle.Unpickler):
    """Reads a checkpoint's pickle without torch: each torch global (tensor and storage
    rebuilders, dtypes) becomes a stub that builds nothing, each tensor's data (a persistent id)
    None. Any other global is refused, as torch.load(weights_only=True) refuses it, so no code
    can run."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" or module.startswith("torch."):
            return _stub
        raise pickle.UnpicklingError(f"{module}.{name} is not a tensor or plain data")

    def persistent_load(self, pid: Any) -> None:
        return None


class _Opaque:
    """What a stub returns: takes any state pickle gives it, and holds nothing."""

    def __setstate__(self, state: Any) -> None:
        pass


def _stub(*args: Any, **kwargs: Any) -> _Opaque:
    return _Opaque()


def checkpoint_digest(archive: zipfile.ZipFile) -> str:
    """A digest of a checkpoint's contents: the names, sizes and CRC-32s of the members of the
    zip torch.save writes (its pickle, and each tensor's bytes), which the zip's central
    directory lists at its end. So it is read by range, a few kilobytes whatever the
    weights' size, and it changes when any tensor does. The members' folder, which torch.save
    names after the file, is left out: a checkpoint renamed or copied is the same one.
    ValueError for one saved without its CRC-32s, whose weights could change unseen."""
    members = sorted((info.filename.split("/", 1)[-1], info.file_size, info.CRC) for info in archive.infolist())
    if any(size and not crc for _, size, crc in members):
        raise ValueError("it was saved without CRC-32 checksums (torch.serialization.set_crc32_options(False)), so "
                         "a change to its weights could not be told from the file; save it again with them, the default")
    return hashlib.sha256(repr(members).encode()).hexdigest()[:16]


def read_checkpoint(url: str, storage_options: dict[str, Any], option: str, remote: bool = True) -> CheckpointSummary | None:
    """What the checkpoint at `url` holds, from its metadata alone: torch.save writes a zip
    whose tensors are separate members, so only its pickle (kilobytes) is read, whatever the
    size of the weights. None when `url` is remote and `remote` is False."""
    location, key = _open(lambda: open_file(url, storage_options), option)
    if not (remote or location.is_local):
        return None
    what = f"{option} {url}"

    def pickled() -> tuple[bytes, str] | None:
        try:
            handle = location.fs.open(location.path(key), "rb", block_size=1 << 20)
        except FileNotFoundError:
            return None
        with handle, zipfile.ZipFile(handle) as archive:
            digest = checkpoint_digest(archive)  # first: without CRCs, reading the pickle fails its check
            names = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            return (archive.read(names[0]) if names else b""), digest

    try:
        read = _ask(what, lambda: retry_io(location.uri(key), pickled), local=location.is_local)
    except zipfile.BadZipFile:
        read = b"", ""
    except ValueError as err:  # checkpoint_digest's
        raise PreflightError(f"{what}: {err}") from err
    data, digest = read if read is not None else (None, "")
    if data is None:
        raise PreflightError(f"{what}: no such file; check the path, or pass --weights none for an untrained model"
                             if option == "--weights" else f"{what}: no such file")
    try:
        payload = _MetadataUnpickler(io.BytesIO(data)).load() if data else None
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as err:
        raise PreflightError(f"{what} is not a plain tensor checkpoint ({err}); only load checkpoints you trust, "
                             "saved with segpipe's save_checkpoint") from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise PreflightError(f"{what} is not a segpipe checkpoint (no format={CHECKPOINT_FORMAT!r} entry); write it with "
                             "segpipe train or pipeline.models.save_checkpoint, so it carries its classes")
    meta, state = payload.get("meta"), payload.get("training_state")
    try:
        summary = CheckpointSummary(
            architecture=str(meta["architecture"]), num_classes=int(meta["num_classes"]),
            class_names=tuple(meta["class_names"]),
            trained_epochs=int(state["epoch"]) if isinstance(state, dict) else None, meta=dict(meta), digest=digest,
            training_state={key: value for key, value in state.items() if isinstance(value, (str, int, float))}
            if isinstance(state, dict) else {},
        )
    except (KeyError, TypeError, ValueError) as err:
        raise PreflightError(f"{what} has invalid metadata ({type(err).__name__}: {err})") from err
    return summary


# -------------------------------------------------------------------------------- storage


def _no_credentials(err: BaseException | None) -> bool:
    """botocore's error for a request it could not sign (named, so botocore stays optional),
    itself or as the cause of one of ours."""
    return any(type(link).__name__ in {"NoCredentialsError", "PartialCredentialsError"}
               for link in error_chain(err, implicit=False))


def _ask(what: str, call: Callable[[], T], *, local: bool) -> T:
    """`call()`, a storage request about `what`; its failure becomes one line saying what to
    do (at once for a store that cannot be connected to, within `unreachable_fails_fast`, as
    the command line checks)."""
    try:
        return call()
    except Exception as err:
        if _no_credentials(err):
            raise PreflightError(f"no credentials for {what}: {CREDENTIALS_HINT}") from err
        if isinstance(err, PermissionError):
            fix = "check its permissions" if local else "check the credentials it is read with"
            raise PreflightError(f"access denied to {what} ({err}); {fix}") from err
        if isinstance(err, OSError | StorageUnavailableError):
            failed, hint = ("cannot read", "") if local else ("cannot reach", f"; {ENDPOINT_HINT}")
            raise PreflightError(f"{failed} {what}: {type(err).__name__}: {err}{hint}") from err
        if isinstance(err, TypeError) and "unexpected keyword argument" in str(err):
            # a misspelled storage option, which the filesystem's client meets at its first request
            raise PreflightError(f"--storage-options: {what} cannot be opened with them: {err}") from err
        raise


def _ray_answers(address: str | None, option: str) -> None:
    """A Ray cluster named by its host and port (`option`, else RAY_ADDRESS) where nothing
    answers: ray.init would wait minutes for it (its GCS client retries) before it failed.
    One TCP connection, 3 s at most. "auto" and "local" are Ray's own to find or start."""
    origin = option if address else "RAY_ADDRESS"
    wanted = address or os.environ.get("RAY_ADDRESS") or ""
    host, _, port = wanted.rpartition(":")
    if not host or not port.isdigit() or "://" in wanted or "," in wanted:  # Ray's to refuse (ray:// clients)
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
    except OSError as err:
        raise PreflightError(f"{origin} {wanted}: no Ray cluster answers there ({err.strerror or err}); start it, give "
                             "the address of its head node, or leave it out for a local Ray") from err


def _client_settings(urls: Collection[str | None], options: StorageOptions, remote: bool) -> None:
    """What the client of remote URLs is set up with, checked before its first request: the
    endpoint (`_endpoints_have_schemes`) and, for S3, the profile (`_profile_exists`)."""
    urls = [url for url in urls if url and not is_local_url(url)]
    _endpoints_have_schemes(urls, options, remote)
    if any(url.partition("://")[0] in {"s3", "s3a"} for url in urls):
        _profile_exists(options, remote)


def _profile_exists(options: StorageOptions, remote: bool) -> None:
    """A named AWS profile that no config file holds. botocore raises ProfileNotFound at the
    first request, which escapes a listing as a traceback and which s3fs's exists() takes for
    a bucket that does not exist. Named by the storage option `profile`, else by
    AWS_DEFAULT_PROFILE or AWS_PROFILE as botocore reads them (not with `remote=False`: the
    Secret block may name another). botocore wants it in ~/.aws/config or ~/.aws/credentials,
    or where AWS_CONFIG_FILE and AWS_SHARED_CREDENTIALS_FILE point (the line names the files
    it read), "default" included."""
    profile, origin = options.get("profile"), f"{options.origin('profile')} profile"
    if profile is None and remote:
        origin = next((name for name in ("AWS_DEFAULT_PROFILE", "AWS_PROFILE") if os.environ.get(name)), "")
        profile = os.environ.get(origin)
    if not profile:
        return
    import botocore.session  # s3fs's own dependency; only where a profile is named

    session = botocore.session.Session()
    available = session.available_profiles
    if profile not in available:
        known = f"profiles there: {', '.join(sorted(available))}" if available else "no profile is configured there"
        files = " or ".join(dict.fromkeys(session.get_config_variable(name) for name in ("config_file", "credentials_file")))
        raise PreflightError(f"{origin} {profile!r} names no AWS profile of {files} ({known})")


def _endpoints_have_schemes(urls: Collection[str], options: StorageOptions, remote: bool) -> None:
    """An endpoint given without its scheme (127.0.0.1:9000), which botocore refuses at the
    first request as "Invalid endpoint: 127.0.0.1:9000", naming neither where it was given nor
    what it lacks: refused naming the place it was given in (`StorageOptions.origin`:
    --storage-options, SEGPIPE_STORAGE_OPTIONS, a Secret block; or botocore's variable). The
    storage options go to remote URLs only, and botocore reads its variables
    (AWS_ENDPOINT_URL_S3 before AWS_ENDPOINT_URL) only for S3 and only where no option names
    the endpoint: a job that would not use one is not refused for it. `remote=False` (options
    in a Secret block, which the flow checks with them): the variables are not looked at,
    since the Secret may name the endpoint."""
    if not urls:
        return
    nested = options.get("client_kwargs")
    given = [(f"{options.origin('endpoint_url')} endpoint_url ", options.get("endpoint_url")),
             (f"{options.origin('client_kwargs')} client_kwargs.endpoint_url ",
              nested.get("endpoint_url") if isinstance(nested, Mapping) else None)]
    if remote and not any(value for _, value in given) and any(url.partition("://")[0] in {"s3", "s3a"} for url in urls):
        given = [(f"{name}=", os.environ.get(name)) for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")]
    for origin, value in given:
        if isinstance(value, str) and value.strip() and "://" not in value:
            raise PreflightError(f"{origin}{value} has no scheme; give it as http://{value} (or https://{value} for "
                                 "a store served over TLS)")
        if value:  # the one used (s3fs's option over client_kwargs', _S3 over the plain variable)
            return


def _open(call: Callable[[], T], label: str) -> T:
    try:
        return call()
    except ValueError as err:  # an unknown protocol, a URL without a file
        raise PreflightError(f"{label}: {err}") from err


# files a check looks through for the first one of the kind it wants; past them, the job
# itself lists the folder and says what it found
FOLDER_SCAN_LIMIT = 1000


def _readable_folder(url: str, options: dict[str, Any], label: str, remote: bool, *,
                     holding: tuple[Callable[[str], bool], str, str] | None = None) -> Location | None:
    """The folder or prefix at `url`, once it is known to exist and to be readable (None when
    it is remote and `remote` is False). Lists until its first file: one page on S3. With
    `holding` (which keys count, what they are called, and what a job without them has to
    do), until its first file of that kind, and a folder without any is refused too: an empty
    one, or one whose listing ends within `FOLDER_SCAN_LIMIT` files of other kinds (the images
    given for the masks)."""
    location = _open(lambda: open_location(url, options), label)
    if not (remote or location.is_local):
        return None
    if location.is_local and os.path.isfile(location.root):
        raise PreflightError(f"{label} {os.path.normpath(location.root)} is a file; give the folder that holds it "
                             f"({os.path.dirname(os.path.normpath(location.root))})")
    what = f"{label} {location.url}"
    accepts = holding[0] if holding else lambda _key: True

    def found() -> tuple[str, list[str]]:
        others: list[str] = []
        try:
            for _, file in iter_files(location):
                if accepts(file.key):
                    return "files", others
                others.append(file.key)
                if len(others) == FOLDER_SCAN_LIMIT:  # the job's own listing says what it finds
                    return "files", others
        except FileNotFoundError:
            pass
        if others:
            return "others", others
        return ("empty" if folder_exists(location) else "missing"), others

    state, others = _ask(what, found, local=location.is_local)
    # an object given for its folder lists as a prefix that holds nothing (one under which
    # others are listed too is a folder): asked only then, so a folder with files costs nothing
    if state in {"empty", "missing"} and not location.is_local and _ask(
            what, lambda: retry_io(location.url, location.fs.isfile, location.root), local=False):
        raise PreflightError(f"{what} is a file; give the folder that holds it ({location.url.rpartition('/')[0]})")
    if state == "missing":
        raise PreflightError(missing_folder(location, what))
    if holding is not None and state == "empty":
        raise PreflightError(f"{what} holds no {holding[1]}: {holding[2]}")
    if holding is not None and state == "others":
        raise PreflightError(f"{what} holds no {holding[1]}, only {counted(len(others), 'other file')} such as "
                             f"{others[0]}: {holding[2]}")
    return location


def _writable_folder(url: str, options: dict[str, Any], label: str, remote: bool,
                     layout: dict[str, Any] | None = None) -> None:
    """OUTPUT can be written (locally: it, or the folder it will be made in, is a writable
    folder; on object storage: its bucket exists and can be read) and, with `layout`, what it
    records of earlier runs (`_segpipe.json`) is this run's."""
    location = _open(lambda: open_location(url, options), label)
    if not (remote or location.is_local):
        return
    _writable(location, label)
    if layout is None:
        return
    data = _ask(f"{label} {location.url}", lambda: read_bytes(location, LAYOUT_KEY), local=location.is_local)
    if data is None:
        _holds_no_tables(location, label)
        return
    try:
        found = json.loads(data)
    except ValueError as err:
        raise PreflightError(f"{location.uri(LAYOUT_KEY)} is not JSON ({err}); use a new {label}, or remove it "
                             "if the folder holds nothing else") from err
    if found.get("format") != LAYOUT_FORMAT:
        raise PreflightError(f"{label} {location.url} was written by another version of segpipe (layout "
                             f"{found.get('format')!r}, this one writes {LAYOUT_FORMAT!r}); use a new {label}")
    if layout["source"] is not None and found.get("source") != layout["source"]:
        raise PreflightError(f"{label} {location.url} holds the results of SOURCE {found.get('source')}, not of "
                             f"{layout['source']}; use a new {label} for another source")
    for name in ("shard_by", "shard_size"):
        if found.get(name) != layout[name]:
            option = "--" + name.replace("_", "-")
            raise PreflightError(f"{label} {location.url} was sharded with {option} {found.get(name)}, not "
                                 f"{layout[name]}; pass {option} {found.get(name)} or use a new {label} (other shard "
                                 "boundaries would leave the old shards' rows behind)")


# the folders of OUTPUT that segpipe writes only once it has recorded its layout (a run's
# first commit): masks may be there before it, from a run stopped earlier
_TABLE_FOLDERS = ("images", "class_stats")


def _holds_no_tables(location: Location, label: str) -> None:
    """An OUTPUT that records no layout holds nothing in the tables' folders: there it would
    be a folder segpipe did not write (another tool's work folder, a copy), whose files
    would be mixed with the tables and stop a reader of them (pyarrow's dataset takes every
    file under images/ for Parquet)."""
    def first_file(folder: str) -> str | None:
        try:
            return next((file.key for _, file in iter_files(
                Location(location.fs, location.path(folder), location.uri(folder)))), None)
        except FileNotFoundError:
            return None

    for folder in _TABLE_FOLDERS:
        if (key := _ask(f"{label} {location.url}", functools.partial(first_file, folder), local=location.is_local)) is not None:
            raise PreflightError(f"{label} {location.url} holds {folder}/{key}, but no {LAYOUT_KEY}: segpipe did not "
                                 f"write it (it records that before its tables); use a new {label}, or an empty one")


def _writable_file(url: str, options: dict[str, Any], label: str, remote: bool) -> None:
    """A file can be written at `url` (a checkpoint): its folder as `_writable_folder` checks it."""
    location, key = _open(lambda: open_file(url, options), label)
    if not (remote or location.is_local):
        return
    if location.is_local and os.path.isdir(location.path(key)):
        raise PreflightError(f"{label} {url} is a folder; give the path of the checkpoint file to write, e.g. model.pt")
    _writable(location, label, shown=url)


def _writable(location: Location, label: str, shown: str | None = None) -> None:
    shown = shown or location.url
    if location.is_local:
        nearest = location.root
        while not os.path.exists(nearest) and os.path.dirname(nearest) != nearest:
            nearest = os.path.dirname(nearest)
        if not os.path.isdir(nearest):
            raise PreflightError(f"cannot write to {label} {shown}: {nearest} is a file, not a folder")
        if not os.access(nearest, os.W_OK | os.X_OK):
            raise PreflightError(f"cannot write to {label} {shown}: {nearest} is not writable")
        # access() answers from permission bits, which root passes everywhere, /proc and /sys
        # included: only making something there tells. An empty hidden folder, removed at once.
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".segpipe-write-check-", dir=nearest))
        except OSError as err:
            # a pseudo-filesystem answers "no such file" for what it cannot hold: no reason then
            why = "" if isinstance(err, FileNotFoundError) else f" ({err.strerror or type(err).__name__})"
            raise PreflightError(f"cannot write to {label} {shown}: {nearest} is not writable{why}") from err
        return
    if not _ask(f"{label} {shown}", lambda: folder_exists(location), local=False):
        raise PreflightError(f"cannot write to {label} {shown}: its bucket {location.bucket} does not exist")
