"""The training flow: fine-tune a model on labelled images with Ray Train and publish its
epochs. Wiring only; the work is `pipeline.runtime.training.run_training`."""

from __future__ import annotations

import dataclasses
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from flows._checks import failed_checks
from flows._storage import resolve_storage_options
from pipeline.config import TrainConfig
from pipeline.preflight import check_train, read_checkpoint, resume_point
from pipeline.runtime.training import TrainSummary, run_training


@task(cache_policy=NO_CACHE)
def train_on_ray(config: TrainConfig) -> TrainSummary:
    """The whole Ray Train job in one task, not retried: a rerun starts over (or pass
    resume=<the last epoch's checkpoint> to continue after it)."""
    return run_training(config)


@task(cache_policy=NO_CACHE)
def publish(summary: TrainSummary) -> None:
    create_table_artifact(
        summary.epochs, key="segpipe-training",
        description=f"{summary.model} -> {summary.output}: best {summary.score} {summary.best_score} "
        f"at epoch {summary.best_epoch}",
    )


@flow(name="train-model", log_prints=True)
def train_model(config: TrainConfig, storage_secret: str | None = None) -> dict[str, Any] | State:
    """Train config.model on the images under config.images and their label masks under
    config.labels (paired by key, as the evaluation pairs masks) and write the best checkpoint
    to config.output, which `segpipe segment --weights OUTPUT` runs as it is, and each epoch's
    to config.last_checkpoint, which `resume` goes on from. Credentials: as for segment-archive."""
    config = config.with_storage_options(resolve_storage_options(config.storage_options, storage_secret))
    # as the command line does; here with the credentials of a Secret block too
    if (failed := failed_checks(check_train, config)) is not None:
        return failed
    resumed = None  # the lines saying what a resumed run goes on from and took from it, if anything
    if config.resume is not None:
        config, went_on = resume_point(config)
        trained = read_checkpoint(config.resume, config.storage_options, "--resume").meta.get("extra", {})
        config, taken, overridden = config.resumed_with(trained.get("training", {}))
        said = [went_on] if went_on else []
        if taken:
            said.append(f"resumed with the settings {config.resume} was trained with: {', '.join(taken)}")
        if overridden:
            said.append(f"resumed with settings other than {config.resume} was trained with: {', '.join(overridden)}")
        for line in said:
            print(line)
        resumed = "\n".join(said) or None
    summary = train_on_ray(config)
    publish(summary)
    print(f"{summary.model}: best {summary.score} {summary.best_score} at epoch {summary.best_epoch}; "
          f"checkpoint {summary.output}")
    return dataclasses.asdict(summary) | {"images_per_second": summary.images_per_second, "resumed": resumed}
