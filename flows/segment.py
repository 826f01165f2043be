"""The nightly segmentation flow: run on Ray (listing as it goes) -> commit the run record -> summarise.

Wiring only: the work is `pipeline.runtime.driver.run_segmentation`. The Prefect process is the
Ray driver: it joins the cluster it runs in (`ray_address="auto"`, or RAY_ADDRESS) or starts a
local Ray; never a `ray://` client connection. A night with nothing new starts neither Ray nor
a model: the run reads the commit markers first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from flows._checks import failed_checks
from flows._retries import IO_TASK
from flows._storage import resolve_storage_options
from pipeline.config import SegmentConfig
from pipeline.preflight import check_segment
from pipeline.run import ListingUnderway, Progress, RunSummary, record_run, summary_lines
from pipeline.runtime.driver import run_segmentation
from pipeline.runtime.replicas import Replicas
from pipeline.storage import open_location
from pipeline.text import counted, every, per_second, verb_for


@task(cache_policy=NO_CACHE)
def run_on_ray(config: SegmentConfig, on_progress: Callable[[Progress], None] | None,
               replicas: Replicas | None = None, listing: ListingUnderway | None = None) -> RunSummary:
    """The whole Ray job in one task: the archive is listed once, as the run goes, and shards
    are committed inside it as they complete, so a retry of the flow resumes from them; the
    task itself is not retried."""
    logger = get_run_logger()
    last_log = [0.0]

    def report(progress: Progress) -> None:
        if on_progress is not None:
            on_progress(progress)
        if time.monotonic() - last_log[0] > 30 or progress.finished:
            last_log[0] = time.monotonic()
            logger.info("%s", progress.describe())

    return run_segmentation(config, on_progress=report, replicas=replicas, listing=listing)


@task(**IO_TASK)
def commit_run(config: SegmentConfig, summary: RunSummary) -> str:
    """Write OUTPUT/_runs/<run_id>.json, the run's record (overwritten whole on retry)."""
    return record_run(open_location(config.output, config.storage_options), summary)  # OUTPUT checked by the run


@task(cache_policy=NO_CACHE)
def summarise(summary: RunSummary, record_uri: str, polygons: bool = False, confidence: bool = False) -> dict[str, Any]:
    """The run's Prefect artifacts, and what the command line prints: the run record, the
    pixel shares, and the folders written (`confidence/` and `polygons/` too with
    --confidence and --polygons)."""
    total_pixels = sum(summary.pixels_by_class.values())
    shares = {name: count / total_pixels for name, count in sorted(summary.pixels_by_class.items(), key=lambda kv: -kv[1])}
    rows = [
        {"metric": "images", "value": summary.images},
        {"metric": "images ok", "value": summary.images - summary.errors},
        {"metric": "errors", "value": summary.errors},
        *({"metric": f"errors: {reason}", "value": count} for reason, count in sorted(summary.errors_by_type.items())),
        {"metric": "images/s", "value": round(summary.images_per_second, 2)},
        {"metric": "shards committed", "value": summary.shards_committed},
        {"metric": "shards already up to date", "value": summary.shards_skipped},
        {"metric": "shards removed (SOURCE no longer has them)", "value": summary.shards_removed},
        {"metric": "images of changed shards kept as they were (unchanged)", "value": summary.images_kept},
        {"metric": "error rows of unchanged images kept (--redo-errors retries them)", "value": summary.errors_kept},
        {"metric": "keys that are not images", "value": summary.non_image_keys},
        *({"metric": f"pixel share: {name}", "value": round(share, 4)} for name, share in shares.items()),
    ]
    create_table_artifact(rows, key="segpipe-run-summary", description=f"segpipe run {summary.run_id}")
    out = summary.output
    create_markdown_artifact(
        "\n".join([
            f"## segpipe run `{summary.run_id}`",
            *([f"{'Nothing to do' if summary.shards_committed == 0 else 'Nothing to segment'}: "
               f"{every(summary.shards_skipped + summary.shards_committed, 'shard')} of `{summary.source}` "
               f"{verb_for(summary.shards_skipped + summary.shards_committed, 'was', 'were')} already up to date"
               f"{'' if summary.shards_committed == 0 else ' once the images deleted there were left out'}.", ""]
              if summary.images == 0 else []),
            f"{counted(summary.images, 'image')} from `{summary.source}` ({counted(summary.errors, 'error')}) with "
            f"`{summary.model}` (`{summary.weights}`), {per_second(summary.images_per_second)} images/s.",
            "",
            f"- images table: `{out}/images/` (one row per image, `status = 'error'` rows say why)",
            f"- class statistics: `{out}/class_stats/`",
            f"- masks: `{out}/masks/`",
            *([f"- confidence masks: `{out}/confidence/`"] if confidence else []),
            *([f"- class polygons (GeoParquet): `{out}/polygons/`"] if polygons else []),
            f"- run record: `{record_uri}`",
            "",
            "```sql",
            f"select * from read_parquet('{out}/images/**/*.parquet', hive_partitioning = true) where run_id = '{summary.run_id}';",
            "```",
        ]),
        key="segpipe-run-outputs",
    )
    folders = ["images/", "class_stats/", "masks/"] + (["confidence/"] if confidence else []) + (
        ["polygons/"] if polygons else [])
    return summary.as_record() | {"pixel_share": shares, "record": record_uri, "folders": folders}


@flow(name="segment-archive", log_prints=True)
def segment_archive(
    config: SegmentConfig,
    storage_secret: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    replicas: Replicas | None = None,
    listing: ListingUnderway | None = None,
) -> dict[str, Any] | State:
    """Segment every image under config.source into config.output (`segpipe segment`).

    `{date}` in SOURCE and OUTPUT becomes config.date (YYYY-MM-DD; default yesterday, UTC).
    Credentials come from SEGPIPE_STORAGE_OPTIONS or the Secret block named `storage_secret`
    (see flows/_storage.py); Prefect stores the config with its credentials hidden.
    `on_progress` follows the run from the calling process (the command line's progress bar);
    `replicas`, Ray and the model replicas that process started for this config while Prefect
    started (see `pipeline.runtime.replicas.Replicas`), which the run takes over; `listing`,
    SOURCE's listing as that process began it (`pipeline.run.up_to_date`), which the run goes
    on with.
    """
    config = config.dated().with_storage_options(resolve_storage_options(config.storage_options, storage_secret))
    # as the command line does; here with the credentials of a Secret block too
    if (failed := failed_checks(check_segment, config)) is not None:
        return failed
    summary = run_on_ray(config, on_progress, replicas, listing)
    record = commit_run(config, summary)
    result = summarise(summary, record, config.polygons, config.confidence)
    logger = get_run_logger()
    for line in summary_lines(result):  # `segpipe serve`'s log of the night; the command line prints them itself
        logger.info("%s", line)
    return result
