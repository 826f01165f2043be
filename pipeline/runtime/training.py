"""Distributed fine-tuning with Ray Train: a TorchTrainer with one worker per GPU (CPU
workers when there is no GPU), each training on its share of the pairs under DDP.

The driver pairs the data and checks every label mask before any worker starts, so a wrong
label range is one clear error, not a failed trial. Rank 0 writes the checkpoint straight to
its URL (any fsspec URL) whenever the score improves: validation mIoU, or training mIoU
without a validation set. Ray Train's own checkpoint storage is not used, so no shared
filesystem is needed between the nodes.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ..config import TrainingError
from ..metrics import LabelRangeError, check_label_range, likely_unlabelled
from ..models import load_resumable, save_checkpoint
from ..preflight import check_resumed_best, read_checkpoint, resume_point
from ..preprocess import Normalizer
from ..storage import absolute_url, open_file, open_location, read_bytes, write_atomic
from ..text import counted, score_text, verb_for
from ..training import (
    TrainConfig,
    TrainingPair,
    build_training_model,
    improves,
    load_samples,
    make_optimizer,
    miou,
    pair_training_data,
    precise_batch_norm,
    read_label,
    resume_schedule,
    train_epoch,
    validate,
    worker_share,
)
from .cluster import connect_ray

log = logging.getLogger(__name__)


@dataclass
class TrainSummary:
    output: str  # the best epoch's checkpoint
    last_checkpoint: str  # the last epoch's, to resume from
    model: str
    train_images: int
    val_images: int
    workers: int
    device: str
    epochs: list[dict[str, Any]] = field(default_factory=list)  # one row of metrics per epoch
    left_out: list[str] = field(default_factory=list)  # the files that paired with nothing, a line per folder
    absent_classes: list[str] = field(default_factory=list)  # classes no training mask holds (`check_labels`)
    best_epoch: int | None = None
    best_score: float | None = None
    score: str = "val_miou"
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        rates = [e["images_per_second"] for e in self.epochs if e.get("images_per_second")]
        return float(np.mean(rates)) if rates else 0.0


def split_pairs(config: TrainConfig) -> tuple[list[TrainingPair], list[TrainingPair], list[str]]:
    """The training pairs and the validation pairs, and a line for each folder's files that
    paired with nothing (`TrainingPairing.left_out`)."""
    images, labels = open_location(config.images, config.storage_options), open_location(config.labels, config.storage_options)
    pairing = pair_training_data(images, labels, label_suffix=config.label_suffix)
    pairs, left_out = pairing.pairs, pairing.left_out(images.url, labels.url)
    if config.val_images is not None:
        val_images, val_labels = (open_location(config.val_images, config.storage_options),
                                  open_location(config.val_labels, config.storage_options))
        val = pair_training_data(val_images, val_labels, label_suffix=config.label_suffix)
        return pairs, val.pairs, left_out + val.left_out(val_images.url, val_labels.url)
    if config.val_last >= len(pairs):
        raise ValueError(f"{config.argument_name('val_last')} {config.val_last} leaves nothing to train on ({len(pairs)} pairs)")
    cut = len(pairs) - config.val_last
    return pairs[:cut], pairs[cut:], left_out


def check_labels(url: str, pairs: list[TrainingPair], config: TrainConfig) -> list[str]:
    """Every mask's values within [0, num_classes) or ignore_index, before any training; and a
    line for the classes none of the masks holds, which the model cannot learn."""
    labels = open_location(url, config.storage_options)
    n = config.num_classes
    counts = np.zeros(n, dtype=np.int64)
    ignored = total = 0
    for pair in pairs:
        label, valid = read_label(labels, pair.label, config.label_map, num_classes=n, ignore_index=config.ignore_index)
        counts += np.bincount(label[(label >= 0) & (label < n)], minlength=n)
        # the ignore index's own pixels, which a --label-map can make a class: not nodata's
        marked = label == config.ignore_index if valid is None else (label == config.ignore_index) & valid
        ignored, total = ignored + int(marked.sum()), total + label.size
        try:
            check_label_range(label, n, config.ignore_index, source=labels.uri(pair.label))
        except LabelRangeError as err:
            if (value := likely_unlabelled(err.values, n, config.ignore_index)) is not None:
                as_class = f", or --num-classes {n + 1} if it is a class" if value == n else ""
                raise ValueError(f"{labels.uri(pair.label)} holds the label {value}, outside the {n} classes: pass "
                                 f"--ignore-index {value} if it marks unlabelled pixels (void){as_class}") from None
            if tuple(err.values) == (n,):  # just above the classes, with an ignore index of the user's own: a class
                raise ValueError(f"{labels.uri(pair.label)} holds the label {n}, outside the {n} classes and not "
                                 f"--ignore-index {config.ignore_index}: pass --num-classes {n + 1} if it is a class"
                                 ) from None
            raise
    absent = [int(c) for c in np.flatnonzero(counts == 0) if c != config.ignore_index]  # an ignored class is not learnt
    if not absent or not pairs:
        return []
    names = config.class_names or tuple(f"class_{c}" for c in range(n))
    line = (f"{counted(len(absent), 'class', 'classes')} {verb_for(len(absent), 'is', 'are')} in none of the "
            f"{counted(len(pairs), 'training mask')} under {labels.url}, so the model cannot learn "
            f"{verb_for(len(absent), 'it', 'them')}: {', '.join(f'{c} ({names[c]})' for c in absent)}")
    if ignored:  # 0/255 footprint masks: the class is the ignore index's value
        line += (f"; the ignore index {config.ignore_index} covers {ignored / total:.0%} of their pixels: if it "
                 f"marks {'that class' if len(absent) == 1 else 'one of them'}, pass --label-map "
                 f"'{{\"{config.ignore_index}\": {absent[0]}}}'")
    return [line]


def _all_reduce(*tensors: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized():
        for tensor in tensors:
            dist.all_reduce(tensor)


def _average_batch_norm(model: torch.nn.Module, world: int) -> None:
    """Every worker recomputed its statistics on its own share: average them, so all ranks
    validate (and rank 0 saves) the same model."""
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            for buffer in (module.running_mean, module.running_var):
                dist.all_reduce(buffer)
                buffer /= world


def _worker_samples(config: TrainConfig, loop: dict[str, Any], rank: int, world: int) -> tuple[list, list]:
    """This worker's share of the training and validation pairs, decoded and checked."""
    options = config.storage_options
    read = {"num_classes": config.num_classes, "ignore_index": config.ignore_index, "bands": config.bands,
            "label_map": config.label_map}
    train = load_samples(open_location(config.images, options), open_location(config.labels, options),
                         worker_share(loop["train"], rank, world), **read)
    val = load_samples(open_location(config.val_images or config.images, options),
                       open_location(config.val_labels or config.labels, options), loop["val"][rank::world], **read)
    return train, val


def _train_worker(loop: dict[str, Any]) -> list[dict[str, Any]] | None:
    """One Ray Train worker. Rank 0 returns the metrics of every epoch; it also writes the
    checkpoint, so nothing goes through ray.train.report."""
    config = TrainConfig.model_validate(loop["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.seed)
    torch.set_num_threads(max(1, int(config.cpus_per_worker)))
    rng = np.random.default_rng([config.seed, rank, loop["start_epoch"]])
    samples, val_samples = _worker_samples(config, loop, rank, world)

    model, meta, skipped = build_training_model(config)
    if skipped and rank == 0:
        sys.stdout.write(f"segpipe train: {len(skipped)} tensors start random (not in --init or other shapes): "
                         f"{', '.join(skipped[:4])}...\n")  # written: as the epochs' lines, once
    resumed = training_state = None
    if config.resume:
        resumed, state, training_state = load_resumable(config.resume, storage_options=config.storage_options)
        model.load_state_dict(state)
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(model)  # to the device; DDP when world > 1
    plain = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    # batches() drops a last batch of one
    per_epoch = max(1, len(samples) // config.batch_size + (len(samples) % config.batch_size >= 2))
    optimizer, schedule = make_optimizer(model, config, per_epoch * config.epochs)
    history: list[dict[str, Any]] = []
    # the best score so far, its epoch and the digest of its file: OUTPUT's
    best, best_epoch, best_digest = None, None, None
    if resumed is not None and training_state is not None:
        resume_schedule(optimizer, schedule, training_state["optimizer"], training_state["schedule"],
                        steps_done=loop["start_epoch"] * per_epoch)
        history, best = list(training_state["history"]), training_state["best"]
        # a best epoch's checkpoint is its own best; a last epoch's names its run's
        best_epoch = training_state.get("best_epoch", training_state["epoch"])
        best_digest = training_state.get("best_digest", resumed.weights_digest)
    normalize = Normalizer(meta.preprocessing, device)
    score_name = "val_miou" if loop["val"] else "train_miou"

    for epoch in range(loop["start_epoch"], config.epochs):
        result = train_epoch(model, samples, config, optimizer, schedule, normalize, rng)
        precise_batch_norm(plain, samples, config, normalize, rng)
        _average_batch_norm(plain, world)
        val_confusion = validate(plain, val_samples, config, device)
        totals = torch.tensor([result.loss * len(samples), len(samples), result.images], dtype=torch.float64, device=device)
        _all_reduce(result.confusion, val_confusion, totals)
        metrics = {
            "epoch": epoch + 1, "loss": round(float(totals[0] / totals[1]), 5), "train_miou": miou(result.confusion),
            "val_miou": miou(val_confusion) if loop["val"] else None,
            "images_per_second": round(float(totals[2]) / result.seconds, 2), "lr": schedule.get_last_lr()[0],
        }
        history.append(metrics)
        score = metrics[score_name]
        if rank == 0:
            # written, not print()ed: Ray Train patches print() in its workers to go to its
            # logger as well as the stream, and Ray forwards both, so each line came twice
            validation = f" val mIoU {score_text(metrics['val_miou'])}" if loop["val"] else ""
            sys.stdout.write(f"segpipe train: epoch {epoch + 1}/{config.epochs} loss {metrics['loss']:.4f} train mIoU "
                             f"{score_text(metrics['train_miou'])}{validation} {metrics['images_per_second']} img/s\n")
            sys.stdout.flush()
            if improves(score, best):
                best, best_epoch = score, epoch + 1
                best_digest = _save(plain, meta, config, optimizer, schedule, history, best, config.output)
            # every epoch, the best first: a run stopped between the two leaves a last epoch's
            # checkpoint whose best holds its next epoch, which a resume goes on from (`resume_point`)
            _save(plain, meta, config, optimizer, schedule, history, best, config.last_checkpoint,
                  best_of_run={"best_checkpoint": config.output.rpartition("/")[2], "best_epoch": best_epoch,
                               "best_digest": best_digest})
    return history if rank == 0 else None


def _save(model: torch.nn.Module, meta: Any, config: TrainConfig, optimizer: Any, schedule: Any,
          history: list[dict[str, Any]], best: float | None, url: str,
          best_of_run: dict[str, Any] | None = None) -> str | None:
    """A checkpoint `segment` runs, with what a resumed run needs to go on from it; its digest.
    A last epoch's names its run's best (`best_of_run`: its file, epoch and digest, see
    `TrainConfig.resumed_best`), which a run resumed from it keeps as OUTPUT until an epoch
    beats it."""
    epoch = history[-1]
    extra = {"training": config.model_dump(mode="json", exclude={"storage_options"}), "epoch": epoch["epoch"],
             "val_miou": epoch["val_miou"], "train_miou": epoch["train_miou"], "history": history}
    state = {"epoch": epoch["epoch"], "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
             "history": history, "best": best} | (best_of_run or {})
    return save_checkpoint(model, url, meta.model_copy(update={"extra": extra}), storage_options=config.storage_options,
                           training_state=state)


def _fit(trainer: TorchTrainer) -> ray.train.Result:
    """`trainer.fit()`, run in a thread of its own while this one waits for it. Called from the
    main thread, Ray Train puts in a SIGINT handler of its own, which asks the run to stop
    "gracefully": a Ctrl-C then went unanswered for minutes, or ended the command with exit 1
    and no word. Here a stop signal surfaces in this thread as it does in `segment`'s
    (KeyboardInterrupt, or SystemExit(15) for SIGTERM), and the caller's `ray.shutdown` (or
    this driver's exit) ends the controller and its workers; the epochs finished are in their
    checkpoints, written whole. For a Ray session this process started and ends (`ray.shutdown`),
    which ends the run with it: the thread, a daemon, goes with the process."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # handed to the waiting thread, which raises it
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="segpipe-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # short waits: a signal's handler runs between them
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def run_training(config: TrainConfig) -> TrainSummary:
    """Train `config.model` and write the best checkpoint to `config.output`."""
    started = time.monotonic()
    # Ray Train's workers run in other folders
    config = config.with_absolute_paths("images", "labels", "val_images", "val_labels", "output", "resume", "init")
    train_pairs, val_pairs, left_out = split_pairs(config)
    if len(train_pairs) < 2:
        raise ValueError(f"{len(train_pairs)} training pair(s): at least 2 are needed (batch norm)")
    absent_classes = check_labels(config.labels, train_pairs, config)
    check_labels(config.val_labels or config.labels, val_pairs, config)
    start_epoch = 0
    if config.resume:
        config, went_on = resume_point(config)
        if went_on:
            sys.stdout.write(f"segpipe train: {went_on}\n")
        # its metadata alone (the pickle, kilobytes): the workers read the whole file
        resumed = read_checkpoint(config.resume, config.storage_options, "--resume")
        if resumed.trained_epochs is None:
            raise ValueError(f"{config.resume} holds no training state; resume from a checkpoint written by segpipe train")
        state, start_epoch = resumed.training_state, resumed.trained_epochs
        if start_epoch >= config.epochs:
            raise ValueError(f"{config.resume} already trained {start_epoch} epochs; ask for more than that with --epochs")
        # the best so far, until an epoch of this run beats it: the checkpoint itself, or the
        # best that a last epoch's checkpoint names (checked as `segpipe train` checks it)
        check_resumed_best(config, state)
        # the classes' names and colours go on with the weights, unless given again: without
        # them the checkpoint would name its classes class_0, class_1, ... from here on
        config = config.model_copy(update={"class_names": config.class_names or resumed.class_names,
                                           "palette": config.palette or _palette(resumed.meta.get("palette"))})
        carried = config.resumed_best(state)
        best_so_far = carried[0] if carried else config.resume
        if absolute_url(best_so_far) != config.output:
            source, source_key = open_file(best_so_far, config.storage_options)
            data = read_bytes(source, source_key)
            if data is None:
                raise FileNotFoundError(f"{best_so_far} disappeared while resuming from it; run again")
            write_atomic(*open_file(config.output, config.storage_options), data)

    stop_ray, _ = connect_ray(config.ray_address, training=True)
    storage = tempfile.mkdtemp(prefix="segpipe-train-")  # Ray Train's run state; checkpoints go to config.output
    try:
        gpus = ray.cluster_resources().get("GPU", 0.0)
        use_gpu = config.device == "cuda" or (config.device == "auto" and gpus >= 1)
        workers = config.workers or (max(1, int(gpus)) if use_gpu else 1)
        if (share := -(-len(train_pairs) // workers)) < 2:  # `worker_share`: as many pairs each
            raise ValueError(f"{counted(len(train_pairs), 'training pair')} for {workers} workers: each would train "
                             f"on {share}, and a step takes 2 (batch norm); pass --workers {len(train_pairs) - 1} "
                             "or fewer")
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={"config": config.model_dump(), "train": train_pairs, "val": val_pairs,
                               "start_epoch": start_epoch},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": config.cpus_per_worker} | ({"GPU": 1} if use_gpu else {})),
            # Ray Train's own progress (resources requested, the worker group started, the model
            # moved to its device) at WARNING: the command prints the epochs and a summary
            run_config=RunConfig(name=f"segpipe-train-{uuid.uuid4().hex[:8]}", storage_path=storage,
                                 logging_config=LoggingConfig(log_level="WARNING")),
        )
        try:
            # a Ray this call started ends with it, and the run with that: a stop signal may
            # then reach this thread (`_fit`); in a program's own Ray session, Ray Train's
            # handler is the one that can stop the run
            history = (_fit(trainer) if stop_ray else trainer.fit()).return_value or []
        except ray.train.TrainingFailedError as err:
            lines = [line.strip() for line in str(err).splitlines() if "Error" in line and ":" in line]
            raise TrainingError(f"training failed: {lines[-1] if lines else err}") from err
    finally:
        if stop_ray:
            ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)  # after the run's last use of it
    score = "val_miou" if val_pairs else "train_miou"
    epochs = history[-(config.epochs - start_epoch):] if history else []  # this run's epochs
    best = None  # OUTPUT's epoch, chosen as the workers chose it
    for epoch in history:
        if improves(epoch.get(score), best[score] if best else None):
            best = epoch
    return TrainSummary(
        output=config.output, last_checkpoint=config.last_checkpoint, model=config.model,
        train_images=len(train_pairs), val_images=len(val_pairs), left_out=left_out, absent_classes=absent_classes,
        workers=workers, device="cuda" if use_gpu else "cpu", epochs=epochs,
        best_epoch=best["epoch"] if best else None, best_score=best[score] if best else None, score=score,
        seconds=time.monotonic() - started,
    )


def _palette(saved: Any) -> tuple[tuple[int, int, int], ...] | None:
    """A checkpoint's palette as its metadata saved it (lists, from JSON), as the config holds one."""
    return tuple(tuple(colour) for colour in saved) if saved else None
