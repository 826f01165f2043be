"""The nightly segmentation flow: discover -> run on Ray -> commit the run record -> summarise.

Wiring only: the work is `pipeline.runtime.driver.run_segmentation`. The Prefect process is the
Ray driver: it joins the cluster it runs in (`ray_address="auto"`, or RAY_ADDRESS) or starts a
local Ray; never a `ray://` client connection.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows._retries import IO_TASK
from flows._storage import resolve_storage_options
from pipeline.config import SegmentConfig, fill_date
from pipeline.outputs import prepare_locations
from pipeline.run import Progress, RunSummary
from pipeline.runtime.driver import run_segmentation
from pipeline.storage import ListingCounts, iter_shards, open_location, write_atomic

# Callables a caller in this process (the CLI's progress bar) can add to follow a run. They are
# not flow parameters: a scheduled run has no terminal to draw on.
progress_listeners: list[Callable[[Progress], None]] = []

_DEFAULTS = {name: field.default for name, field in SegmentConfig.model_fields.items()}


@task(**IO_TASK)
def discover_shards(config: SegmentConfig) -> dict[str, int]:
    """Check SOURCE and OUTPUT and count the work (one streamed listing; safe to repeat)."""
    source, _ = prepare_locations(config)
    counts = ListingCounts()
    shards = sum(1 for _ in iter_shards(source, shard_by=config.shard_by, shard_size=config.shard_size, counts=counts))
    get_run_logger().info("%s: %d images in %d shards; %d other keys skipped", source.url, counts.images, shards, counts.skipped)
    return {"shards": shards, "images": counts.images, "non_image_keys": counts.skipped}


@task(cache_policy=NO_CACHE)
def run_on_ray(config: SegmentConfig, images_expected: int) -> RunSummary:
    """The whole Ray job in one task: shards are committed inside it as they complete, so a
    retry of the flow resumes from them; the task itself is not retried."""
    logger = get_run_logger()
    last_log = [0.0]

    def report(progress: Progress) -> None:
        for listener in progress_listeners:
            listener(progress)
        if time.monotonic() - last_log[0] > 30:
            last_log[0] = time.monotonic()
            logger.info("%d/%d images, %.1f images/s, %d errors, %d shards committed, %d skipped",
                        progress.images, images_expected, progress.images_per_second, progress.errors,
                        progress.shards_committed, progress.shards_skipped)

    return run_segmentation(config, on_progress=report)


@task(**IO_TASK)
def commit_run(config: SegmentConfig, summary: RunSummary) -> str:
    """Write OUTPUT/_runs/<run_id>.json, the run's record (overwritten whole on retry)."""
    output = open_location(config.output, config.storage_options)  # already checked by discover_shards
    record = dataclasses.asdict(summary) | {"images_per_second": summary.images_per_second}
    key = f"_runs/{summary.run_id}.json"
    write_atomic(output, key, json.dumps(record, indent=2).encode())
    return output.uri(key)


@task(cache_policy=NO_CACHE)
def summarise(summary: RunSummary, survey: dict[str, int], record_uri: str) -> dict[str, Any]:
    total_pixels = sum(summary.pixels_by_class.values())
    shares = {name: count / total_pixels for name, count in sorted(summary.pixels_by_class.items(), key=lambda kv: -kv[1])}
    rows = [
        {"metric": "images segmented", "value": summary.images},
        {"metric": "images ok", "value": summary.images - summary.errors},
        {"metric": "errors", "value": summary.errors},
        *({"metric": f"errors: {reason}", "value": count} for reason, count in sorted(summary.errors_by_type.items())),
        {"metric": "images/s", "value": round(summary.images_per_second, 2)},
        {"metric": "shards committed", "value": summary.shards_committed},
        {"metric": "shards already up to date", "value": summary.shards_skipped},
        {"metric": "keys that are not images", "value": summary.non_image_keys},
        *({"metric": f"pixel share: {name}", "value": round(share, 4)} for name, share in shares.items()),
    ]
    create_table_artifact(rows, key="segpipe-run-summary", description=f"segpipe run {summary.run_id}")
    out = summary.output
    create_markdown_artifact(
        "\n".join([
            f"## segpipe run `{summary.run_id}`",
            f"{summary.images} images from `{summary.source}` ({summary.errors} errors) with "
            f"`{summary.model}` (`{summary.weights}`), {summary.images_per_second:.1f} images/s.",
            "",
            f"- images table: `{out}/images/` (one row per image, `status = 'error'` rows say why)",
            f"- class statistics: `{out}/class_stats/`",
            f"- masks: `{out}/masks/`",
            f"- run record: `{record_uri}`",
            "",
            "```sql",
            f"select * from read_parquet('{out}/images/**/*.parquet', hive_partitioning = true) where run_id = '{summary.run_id}';",
            "```",
        ]),
        key="segpipe-run-outputs",
    )
    return dataclasses.asdict(summary) | {
        "images_per_second": summary.images_per_second, "pixel_share": shares, "record": record_uri,
        "images_listed": survey["images"],
    }


@flow(name="segment-archive", log_prints=True)
def segment_archive(
    source: str,
    output: str,
    model: str | None = None,
    weights: str | None = _DEFAULTS["weights"],
    num_classes: int | None = None,
    crf: bool = _DEFAULTS["crf"],
    compile: bool = _DEFAULTS["compile"],
    tile: int | None = None,
    tile_stride: int | None = None,
    batch_size: int = _DEFAULTS["batch_size"],
    shard_by: Literal["directory", "count"] = _DEFAULTS["shard_by"],
    shard_size: int = _DEFAULTS["shard_size"],
    ray_address: str | None = None,
    storage_options: dict[str, Any] | None = None,
    storage_secret: str | None = None,
    device: Literal["auto", "cuda", "cpu"] = _DEFAULTS["device"],
    actors: int | None = None,
    gpus_per_actor: float = _DEFAULTS["gpus_per_actor"],
    cpus_per_actor: float = _DEFAULTS["cpus_per_actor"],
    threads_per_actor: int | None = None,
    max_pixels: int = _DEFAULTS["max_pixels"],
    jpeg_decode: Literal["auto", "device", "cpu"] = _DEFAULTS["jpeg_decode"],
    image_timeout_s: float = _DEFAULTS["image_timeout_s"],
    redo_errors: bool = False,
    date: str | None = None,
) -> dict[str, Any]:
    """Segment every image under SOURCE into OUTPUT (the options of `segpipe segment`).

    `{date}` in SOURCE and OUTPUT becomes `date` (YYYY-MM-DD; default yesterday, UTC).
    Credentials come from SEGPIPE_STORAGE_OPTIONS or the Secret block named `storage_secret`,
    never from `storage_options`, which Prefect stores with the run (see flows/_storage.py).
    """
    source, output = fill_date(source, output, date)
    config = SegmentConfig(
        source=source, output=output, model=model, weights=weights, num_classes=num_classes, crf=crf, compile=compile,
        tile=tile, tile_stride=tile_stride,
        batch_size=batch_size, shard_by=shard_by, shard_size=shard_size, ray_address=ray_address,
        storage_options=resolve_storage_options(storage_options, storage_secret), device=device, actors=actors, gpus_per_actor=gpus_per_actor,
        cpus_per_actor=cpus_per_actor, threads_per_actor=threads_per_actor, max_pixels=max_pixels,
        jpeg_decode=jpeg_decode, image_timeout_s=image_timeout_s,
        redo_errors=redo_errors,
    )
    survey = discover_shards(config)
    summary = run_on_ray(config, survey["images"])
    record = commit_run(config, summary)
    return summarise(summary, survey, record)
