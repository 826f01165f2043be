"""The evaluation flow: pair prediction and ground-truth masks -> score on Ray -> write the
report -> publish the per-class table. Wiring only; the work is `pipeline.evaluation`."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from flows._checks import failed, failed_checks, refused
from flows._retries import IO_TASK
from flows._storage import resolve_storage_options
from pipeline.config import EvaluateConfig
from pipeline.evaluation import (
    BatchScore,
    NothingToScoreError,
    Pairing,
    ScoreSettings,
    build_report,
    class_table,
    pair_masks,
    per_image_table,
    resolve_class_names,
    write_report,
)
from pipeline.outputs import class_names_of_masks
from pipeline.preflight import check_evaluate
from pipeline.runtime.scoring import score_on_ray
from pipeline.storage import open_location
from pipeline.text import counted


@task(**IO_TASK)
def pair(predictions: str, ground_truth: str, prediction_suffix: str, ground_truth_suffix: str,
         storage_options: dict[str, Any]) -> Pairing:
    try:
        pairing = pair_masks(open_location(predictions, storage_options), open_location(ground_truth, storage_options),
                             prediction_suffix=prediction_suffix, ground_truth_suffix=ground_truth_suffix)
    except NothingToScoreError as err:  # the folders' contents, not a crash: one line in serve's log
        raise refused(err) from None
    logger = get_run_logger()
    logger.info("%d pairs; %d predictions and %d ground-truth masks without a partner",
                len(pairing.pairs), len(pairing.unpaired_predictions), len(pairing.unpaired_ground_truth))
    if pairing.unmatched_suffixes:  # the masks paired by their whole names, maybe not all of them
        logger.warning("%s", "; ".join(pairing.unmatched_suffixes))
    return pairing


@task(cache_policy=NO_CACHE)
def score(predictions: str, ground_truth: str, pairing: Pairing, settings: ScoreSettings,
          storage_options: dict[str, Any], ray_address: str | None) -> BatchScore:
    try:
        return score_on_ray(open_location(predictions, storage_options), open_location(ground_truth, storage_options),
                            pairing.pairs, settings, ray_address=ray_address)
    except NothingToScoreError as err:
        raise refused(err) from None


@task(**IO_TASK)
def write(output: str, report: dict[str, Any], total: BatchScore, class_names: list[str],
          storage_options: dict[str, Any]) -> list[str]:
    return write_report(open_location(output, storage_options), report, per_image_table(total, class_names))


@task(cache_policy=NO_CACHE)
def publish(report: dict[str, Any], files: list[str], description: str) -> None:
    create_markdown_artifact(class_table(report, markdown=True) + "\n\nFiles: " + ", ".join(f"`{f}`" for f in files),
                             key="segpipe-evaluation", description=description)


@flow(name="evaluate-predictions", log_prints=True)
def evaluate_predictions(config: EvaluateConfig, storage_secret: str | None = None) -> dict[str, Any] | State:
    """Dataset-wide IoU of the masks under config.predictions against those under
    config.ground_truth, written to config.output (metrics.json, per_image.parquet,
    confusion_matrix.png, per_class_iou.png).

    Pairs are made by key relative to each root, extension and suffixes removed. `label_map`
    remaps ground-truth values before scoring (values not in it are kept); `reduce_zero_label`
    makes 0 the ignore index and shifts the other labels down by one. `{date}` in the URLs
    becomes config.date (default yesterday, UTC). Credentials: as for segment-archive.
    """
    config = config.dated().with_storage_options(resolve_storage_options(config.storage_options, storage_secret))
    # as the command line does; here with the credentials of a Secret block too
    if (checks_failed := failed_checks(check_evaluate, config)) is not None:
        return checks_failed
    options = config.storage_options
    # masks of a segpipe OUTPUT are named by the classes of the run that wrote them
    of_masks = None if config.class_names else class_names_of_masks(config.predictions, options)
    names = resolve_class_names(config.class_names, config.num_classes, of_masks=of_masks)
    settings = ScoreSettings(num_classes=config.num_classes, ignore_index=config.ignore_index,
                             label_map=config.label_map, reduce_zero_label=config.reduce_zero_label)
    try:
        pairing = pair(config.predictions, config.ground_truth, config.prediction_suffix, config.ground_truth_suffix, options)
        total = score(config.predictions, config.ground_truth, pairing, settings, options, config.ray_address)
    except NothingToScoreError as err:
        return failed(err)
    report = build_report(total, pairing, settings, names)
    files = write(config.output, report, total, names, options)
    publish(report, files, f"{config.predictions} against {config.ground_truth}")
    miou = "n/a" if report["miou"] is None else f"{report['miou']:.4f}"  # as the report's table gives it
    print(f"mIoU {miou} over {counted(report['images'], 'image')}; report in {config.output}")
    return report
