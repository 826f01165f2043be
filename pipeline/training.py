"""Fine-tuning: labelled images in, a segpipe checkpoint out, which `segpipe segment --weights`
runs with no other flag.

Plain functions run inside Ray Train's workers by `pipeline.runtime.training` and callable
without Ray: pairing images with label masks (by key, with the evaluation's pairing rule),
random scale, crop and flip, the loss (cross-entropy with the ignore index, plus `aux_weight`
times the auxiliary head's where the model has one), SGD or AdamW with polynomial decay, as
MMSegmentation's schedules do, and validation mIoU with `pipeline.metrics` on the labels a
`Segmenter` gives, the path `segpipe segment` runs.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rasterio.windows import Window
from torch import nn

from .config import TrainConfig
from .decode import DEFAULT_MAX_PIXELS, ImageDecodeError, check_pixels, decode_image
from .evaluation import (
    index_by_key,
    nodata_rule,
    read_mask_window,
    suggested_suffix,
    unmatched_suffix,
)
from .inference import Segmenter
from .masks import decode_mask, default_palette, map_labels
from .metrics import check_label_range, confusion_matrix, scores
from .models import ModelMeta, Preprocessing, build_model
from .models._registry import get_spec
from .preprocess import Normalizer, to_chw_uint8
from .rasters import (
    band_colour_table,
    band_limits,
    choose_bands,
    is_georeferenced,
    open_raster,
    read_rgb,
)
from .storage import Location, is_image_key, is_mask_key, is_raster_key, read_bytes
from .text import counted, verb_for


@dataclass(frozen=True)
class TrainingPair:
    key: str  # the pairing key
    image: str  # key under the images root
    label: str  # key under the labels root


@dataclass
class Sample:
    key: str
    image: np.ndarray  # (H, W, 3) uint8
    label: np.ndarray  # (H, W) int64 class ids, ignore_index where unlabelled


def _index_training(location: Location, suffix: str, accepts: Callable[[str], bool]) -> dict[str, str]:
    """Files by pairing key; other files (notes, thumbnails) are not training data. Two files
    under one key (a.jpg and a.png) are refused: which one to train on is the user's call."""
    groups, _ = index_by_key(location, suffix, accepts)
    clashes = [keys for keys in groups.values() if len(keys) > 1]
    if clashes:
        raise ValueError(f"{' and '.join(location.uri(key) for key in clashes[0])} pair under the same key "
                         f"({len(clashes)} such keys under {location.url}); rename or move all but one")
    return {key: keys[0] for key, keys in groups.items()}


@dataclass
class TrainingPairing:
    """What `pair_training_data` made of two folders: the pairs, and the files of either that
    paired with nothing, which training goes on without."""

    pairs: list[TrainingPair]  # sorted by key
    images_without_label: list[str]  # keys under the images root, sorted
    labels_without_image: list[str]  # keys under the labels root, sorted

    def left_out(self, images: str, labels: str) -> list[str]:
        """What was not paired, one line per side: trained around, and so said."""
        return [f"{counted(len(keys), what)} under {root} without {partner} {verb_for(len(keys), 'was', 'were')} left "
                f"out, e.g. {keys[0]}"
                for keys, what, root, partner in ((self.images_without_label, "image", images, "a label mask"),
                                                  (self.labels_without_image, "label mask", labels, "an image"))
                if keys]


def pair_training_data(images: Location, labels: Location, *, label_suffix: str = "") -> TrainingPairing:
    """Images and PNG label masks with the same key relative to their roots (extension and
    `label_suffix` removed; `pipeline.evaluation.index_by_key`), and what pairs with nothing.
    Refuses an empty pairing, naming both roots, and two files under one key."""
    image_keys = _index_training(images, "", is_image_key)
    label_keys = _index_training(labels, label_suffix, is_mask_key)
    # a suffix that ends no label's name removes nothing: a mistyped one, trained around silently
    if unmatched := unmatched_suffix("--label-suffix", label_suffix, list(label_keys.values()), "label mask"):
        raise ValueError(f"{unmatched}: give the suffix the labels' names end with, or leave it out")
    pairs = [TrainingPair(k, image_keys[k], label_keys[k]) for k in sorted(image_keys.keys() & label_keys.keys())]
    if not pairs:
        suffix = suggested_suffix(image_keys.keys(), list(label_keys.values()))
        instead = f", not {label_suffix}" if label_suffix else ""
        advice = (f"; the labels' names end with {suffix} after an image's: pass --label-suffix {suffix}{instead}"
                  if suffix and suffix != label_suffix else "")
        raise ValueError(
            f"no image under {images.url} has a label mask under {labels.url} with the same key "
            f"({len(image_keys)} images, {len(label_keys)} PNG masks{f'; label suffix {label_suffix!r}' if label_suffix else ''})"
            f"{advice}"
        )
    return TrainingPairing(pairs, sorted(image_keys[k] for k in image_keys.keys() - label_keys.keys()),
                           sorted(label_keys[k] for k in label_keys.keys() - image_keys.keys()))


def _raster(location: Location, key: str, opened: contextlib.ExitStack) -> Any:
    """The raster at `key` as GDAL opens it, open until `opened` closes; None for a key that is
    no raster's or a file GDAL cannot read (the image or mask decoder then names what is wrong)."""
    if not is_raster_key(key):
        return None
    with contextlib.suppress(ImageDecodeError):
        return opened.enter_context(open_raster(location, key))
    return None


def read_label(labels: Location, key: str, label_map: dict[int, int] | None = None, *, num_classes: int,
               ignore_index: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A label mask's class ids, int64, `label_map` applied, and where it has data (None:
    everywhere); one that is no single-channel image is refused naming the file. A GeoTIFF is
    read as `evaluate` reads ground truth: its pixels without data (its nodata value unless that
    is a class id after `label_map`, NaN, an internal mask: `evaluation.nodata_rule`) are
    `ignore_index`, nothing learnt from them; a float one's values are class ids when whole.
    Any other file is decoded whole (`decode_mask`)."""
    try:
        with contextlib.ExitStack() as opened:
            dataset = _raster(labels, key, opened)
            if dataset is None or dataset.driver != "GTiff":
                return map_labels(decode_mask(read_bytes(labels, key) or b""), label_map), None
            if dataset.count != 1:
                raise ValueError(f"it has {dataset.count} bands; a mask of class ids has one")
            check_pixels(dataset.width, dataset.height, DEFAULT_MAX_PIXELS)
            rule = nodata_rule(dataset, lambda value: int(map_labels(np.array([value]), label_map)[0]), num_classes)
            values, nodata = read_mask_window("label", key, dataset, Window(0, 0, dataset.width, dataset.height), rule)
    except (OSError, ValueError) as err:  # Pillow's UnidentifiedImageError is an OSError
        raise ValueError(f"{labels.uri(key)} is no label mask: {type(err).__name__}: {err}") from None
    label = map_labels(np.where(nodata, 0, values), label_map)  # 0 first: NaN has no int64
    label[nodata] = ignore_index
    return label, None if not nodata.any() else ~nodata


def read_image(images: Location, key: str, bands: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """A training image's RGB as `segment` reads it, and where it has data (None: everywhere).
    A georeferenced raster goes through `rasters`, as its blocks do: its bands by colour
    interpretation (or `bands`), deep samples stretched by limits its nodata takes no part in,
    nodata black. Any other file is decoded whole (`decode_image`)."""
    with contextlib.ExitStack() as opened:
        dataset = _raster(images, key, opened)
        if dataset is None or not is_georeferenced(dataset):
            return decode_image(read_bytes(images, key) or b""), None
        check_pixels(dataset.width, dataset.height, DEFAULT_MAX_PIXELS)
        chosen = choose_bands(dataset, bands)
        colour_table = band_colour_table(dataset, chosen)
        limits = band_limits(dataset, chosen) if colour_table is None else None
        rgb, valid = read_rgb(dataset, Window(0, 0, dataset.width, dataset.height), chosen, limits,
                              colour_table=colour_table)
    return rgb, None if valid.all() else valid


def load_samples(images: Location, labels: Location, pairs: Sequence[TrainingPair], *, num_classes: int,
                 ignore_index: int, bands: Sequence[int] | None = None,
                 label_map: dict[int, int] | None = None) -> list[Sample]:
    """Decoded pairs, checked: a mask whose size differs from its image, or that holds a label
    outside [0, num_classes) other than ignore_index (after `label_map`), is refused naming the
    file. A raster's pixels without data are labelled ignore_index: nothing is learnt from them."""
    samples = []
    for pair in pairs:
        try:
            image, valid = read_image(images, pair.image, bands)
        except ValueError as err:  # a training set with a broken file is fixed, not trained around
            raise ValueError(f"{images.uri(pair.image)}: {err}") from None
        label, _ = read_label(labels, pair.label, label_map, num_classes=num_classes, ignore_index=ignore_index)
        if label.shape != image.shape[:2]:
            raise ValueError(f"{labels.uri(pair.label)} is {label.shape[1]}x{label.shape[0]} but its image "
                             f"{images.uri(pair.image)} is {image.shape[1]}x{image.shape[0]}")
        if valid is not None:
            label[~valid] = ignore_index
        check_label_range(label, num_classes, ignore_index, source=labels.uri(pair.label))
        samples.append(Sample(pair.key, image if image.flags.writeable else image.copy(), label))
    return samples


def augment(sample: Sample, *, crop: tuple[int, int], scale: tuple[float, float], ignore_index: int,
            rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random scale, then a random crop (padded with ignore_index where the image is smaller),
    then a random horizontal flip: (3, h, w) uint8 pixels and (h, w) int64 labels."""
    image = to_chw_uint8(sample.image)
    label = torch.from_numpy(sample.label)
    factor = rng.uniform(*scale)
    height, width = label.shape
    size = (max(1, round(height * factor)), max(1, round(width * factor)))
    image = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    image = image.round().clamp(0, 255).to(torch.uint8)
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    pad_h, pad_w = max(0, crop[0] - size[0]), max(0, crop[1] - size[1])
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0)
        label = F.pad(label, (0, pad_w, 0, pad_h), value=ignore_index)
    top = int(rng.integers(0, label.shape[0] - crop[0] + 1))
    left = int(rng.integers(0, label.shape[1] - crop[1] + 1))
    image = image[:, top : top + crop[0], left : left + crop[1]]
    label = label[top : top + crop[0], left : left + crop[1]]
    if rng.random() < 0.5:
        image, label = image.flip(-1), label.flip(-1)
    return image.contiguous(), label.contiguous()


def batches(samples: Sequence[Sample], config: TrainConfig, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of augmented batches in a random order; a last batch of one is dropped
    (batch norm cannot train on a single sample)."""
    order = rng.permutation(len(samples))
    for start in range(0, len(order), config.batch_size):
        chosen = order[start : start + config.batch_size]
        if len(chosen) < 2:
            return
        pairs = [augment(samples[i], crop=config.crop, scale=config.scale, ignore_index=config.ignore_index, rng=rng)
                 for i in chosen]
        yield torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def has_aux_head(model_name: str) -> bool:
    return "aux_loss" in inspect.signature(get_spec(model_name).builder).parameters


def build_training_model(config: TrainConfig) -> tuple[nn.Module, ModelMeta, list[str]]:
    """The model to train, its metadata, and the names of tensors `init` could not provide
    (shapes that differ: the classifier, when the classes differ)."""
    kwargs = {"aux_loss": True} if has_aux_head(config.model) else {}
    skipped: list[str] = []
    if config.init == "imagenet":
        if "weights_backbone" not in inspect.signature(get_spec(config.model).builder).parameters:
            raise ValueError(f"{config.model} has no ImageNet backbone weights to start from")
        model = build_model(config.model, num_classes=config.num_classes, weights=None, weights_backbone="DEFAULT", **kwargs)
    else:
        model = build_model(config.model, num_classes=config.num_classes, weights=None, **kwargs)
        if config.init != "none":
            source = build_model(config.model, weights=config.init, storage_options=config.storage_options, **kwargs)
            skipped = load_matching(model, source.state_dict())
    meta = ModelMeta(
        architecture=config.model, num_classes=config.num_classes,
        class_names=config.class_names or tuple(f"class_{i}" for i in range(config.num_classes)),
        palette=config.palette or default_palette(config.num_classes),
        preprocessing=Preprocessing(bands=config.bands), weights=config.output, model_kwargs=kwargs,
    )
    model.meta = meta
    return model, meta, skipped


def load_matching(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Copy the tensors of `state` whose name and shape match; return the names left as they were."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))


def make_optimizer(model: nn.Module, config: TrainConfig, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=0.9, weight_decay=config.decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.decay)
    schedule = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=max(1, total_steps), power=0.9)
    return optimizer, schedule


def resume_schedule(optimizer: torch.optim.Optimizer, schedule: Any, state: dict[str, Any],
                    schedule_state: dict[str, Any], *, steps_done: int) -> None:
    """A checkpoint's optimizer state (momentum, Adam's moments) on this run's schedule, as if
    this run's settings had been used from the start: the polynomial decay runs over this
    run's total steps (a resume asks for more epochs; loaded as saved, the schedule would end
    where the first run ended, at a learning rate of 0, which it only multiplies), from
    `steps_done`, the epochs trained at this run's steps per epoch (another --batch-size or
    number of workers changes those), at this run's --lr and --weight-decay."""
    settings = [(group["initial_lr"], group["weight_decay"]) for group in optimizer.param_groups]
    total = schedule.total_iters
    optimizer.load_state_dict(state)
    schedule.load_state_dict(schedule_state)
    schedule.total_iters, schedule.last_epoch = total, steps_done
    schedule.base_lrs = [initial for initial, _ in settings]
    for group, (initial, decay) in zip(optimizer.param_groups, settings, strict=True):
        group["initial_lr"], group["weight_decay"] = initial, decay
        group["lr"] = initial * (1 - min(steps_done, total) / total) ** schedule.power
    schedule._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports (private)


@dataclass
class EpochResult:
    loss: float
    confusion: torch.Tensor  # (C, C) on the crops, predictions before each step
    images: int
    seconds: float


def train_epoch(model: nn.Module, samples: Sequence[Sample], config: TrainConfig, optimizer: torch.optim.Optimizer,
                schedule: Any, normalize: Normalizer, rng: np.random.Generator) -> EpochResult:
    model.train()
    device = normalize.device
    confusion = torch.zeros(config.num_classes, config.num_classes, dtype=torch.int64, device=device)
    total_loss, steps, images, started = 0.0, 0, 0, time.perf_counter()
    for pixels, labels in batches(samples, config, rng):
        x, y = normalize(pixels), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(x)
            loss = F.cross_entropy(out["out"].float(), y, ignore_index=config.ignore_index)
            if "aux" in out and config.aux_weight:
                loss = loss + config.aux_weight * F.cross_entropy(out["aux"].float(), y, ignore_index=config.ignore_index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        confusion += confusion_matrix(out["out"].detach().argmax(1), y, config.num_classes, config.ignore_index)
        total_loss += float(loss.detach())
        steps += 1
        images += len(pixels)
    return EpochResult(total_loss / max(1, steps), confusion, images, time.perf_counter() - started)


@torch.no_grad()
def precise_batch_norm(model: nn.Module, samples: Sequence[Sample], config: TrainConfig, normalize: Normalizer,
                       rng: np.random.Generator, *, images: int = 64) -> None:
    """Recompute every batch norm's running statistics as a plain average over up to `images`
    augmented training crops, with the current weights ("precise BN"). The running averages
    kept during training trail the weights: torchvision's MobileNetV3 updates them with
    momentum 0.01, so after a short fine-tuning they still describe the first steps, and the
    model in eval mode (validation, segpipe segment) predicts one class everywhere."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    model.train()
    seen = 0
    for pixels, _ in batches(samples, config, rng):
        with torch.autocast(normalize.device.type, dtype=torch.bfloat16, enabled=normalize.device.type == "cuda"):
            model(normalize(pixels))
        seen += len(pixels)
        if seen >= images:
            break
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


def validate(model: nn.Module, samples: Sequence[Sample], config: TrainConfig, device: torch.device) -> torch.Tensor:
    """Confusion matrix, on `device`, of whole images (no augmentation) labelled as `segpipe
    segment --no-crf` labels them: a `Segmenter` as a replica builds it (the weights'
    preprocessing and resize policy, its precision and layout), argmax of its probabilities.

    The Segmenter runs its own eval-mode copy (batch norms folded): `model`, its training mode
    and its weights are left as they were, so training goes on after.
    """
    confusion = torch.zeros(config.num_classes, config.num_classes, dtype=torch.int64, device=device)
    if not samples:  # a rank with no share of the validation set still takes part in the all-reduce
        return confusion
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    # on CPU, bf16 pays only once compiled, and compiling weights that change every epoch would
    # cost more than the validation: fp32 there (bf16's labels agree with fp32's, see
    # tests/test_precision.py)
    segmenter = Segmenter(model, device=device, precision="fp32" if device.type == "cpu" else "auto")
    for start in range(0, len(samples), segmenter.batch_size):
        chunk = samples[start : start + segmenter.batch_size]
        for sample, probs in zip(chunk, segmenter.predict([s.image for s in chunk]), strict=True):
            target = torch.from_numpy(sample.label).to(segmenter.device)
            confusion += confusion_matrix(probs.argmax(0), target, config.num_classes, config.ignore_index)
    return confusion


def worker_share(pairs: Sequence[TrainingPair], rank: int, world: int) -> list[TrainingPair]:
    """The pairs worker `rank` of `world` trains on: every `world`-th, with the first pairs
    again where the shares would differ (as torch's DistributedSampler does), so that every
    worker takes as many steps an epoch; each step is a collective they all take together."""
    padded = list(pairs) + list(pairs[: -len(pairs) % world])
    return padded[rank::world]


def improves(score: float | None, best: float | None) -> bool:
    """Whether an epoch's score makes it the best so far: a higher score (a tie keeps the
    earlier epoch; an epoch without a score never beats one with a score). Until an epoch has
    a score, each epoch is: the latest, trained the longest."""
    return best is None or (score is not None and score > best)


def miou(confusion: torch.Tensor) -> float | None:
    value = scores(confusion)["miou"]
    return None if np.isnan(value) else round(float(value), 4)
