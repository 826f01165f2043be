"""The training flow: fine-tune a model on labelled images with Ray Train and publish its
epochs. Wiring only; the work is `pipeline.runtime.training.run_training`."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows._storage import resolve_storage_options
from pipeline.config import TrainConfig
from pipeline.runtime.training import TrainSummary, run_training

_DEFAULTS = {name: field.default for name, field in TrainConfig.model_fields.items()}


@task(cache_policy=NO_CACHE)
def train_on_ray(config: TrainConfig) -> TrainSummary:
    """The whole Ray Train job in one task, not retried: a rerun starts over (or pass
    resume=<the checkpoint> to continue after its epoch)."""
    return run_training(config)


@task(cache_policy=NO_CACHE)
def publish(summary: TrainSummary) -> None:
    create_table_artifact(
        summary.epochs, key="segpipe-training",
        description=f"{summary.model} -> {summary.output}: best {summary.score} {summary.best_score} "
        f"at epoch {summary.best_epoch}",
    )


@flow(name="train-model", log_prints=True)
def train_model(
    images: str,
    labels: str,
    output: str,
    model: str,
    num_classes: int,
    class_names: list[str] | None = None,
    palette: list[tuple[int, int, int]] | None = None,
    epochs: int = _DEFAULTS["epochs"],
    batch_size: int = _DEFAULTS["batch_size"],
    crop: tuple[int, int] = _DEFAULTS["crop"],
    scale: tuple[float, float] = _DEFAULTS["scale"],
    ignore_index: int = _DEFAULTS["ignore_index"],
    init: str = _DEFAULTS["init"],
    optimizer: Literal["sgd", "adamw"] = _DEFAULTS["optimizer"],
    lr: float | None = None,
    weight_decay: float | None = None,
    label_suffix: str = "",
    val_images: str | None = None,
    val_labels: str | None = None,
    val_last: int = 0,
    workers: int | None = None,
    device: Literal["auto", "cuda", "cpu"] = _DEFAULTS["device"],
    cpus_per_worker: float = _DEFAULTS["cpus_per_worker"],
    resume: str | None = None,
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
    storage_secret: str | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Train MODEL on the images under IMAGES and their label masks under LABELS (paired by
    key, as the evaluation pairs masks) and write the best checkpoint to OUTPUT, which
    `segpipe segment --weights OUTPUT` runs as it is. Credentials: as for segment-archive."""
    config = TrainConfig(
        images=images, labels=labels, output=output, model=model, num_classes=num_classes,
        class_names=class_names, palette=palette, epochs=epochs, batch_size=batch_size, crop=crop, scale=scale,
        ignore_index=ignore_index, init=init, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
        label_suffix=label_suffix, val_images=val_images, val_labels=val_labels, val_last=val_last, workers=workers,
        device=device, cpus_per_worker=cpus_per_worker, resume=resume, seed=seed,
        storage_options=resolve_storage_options(storage_options, storage_secret), ray_address=ray_address,
    )
    summary = train_on_ray(config)
    publish(summary)
    print(f"{summary.model}: best {summary.score} {summary.best_score} at epoch {summary.best_epoch}; "
          f"checkpoint {summary.output}")
    return dataclasses.asdict(summary) | {"images_per_second": summary.images_per_second}
