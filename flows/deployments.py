"""The two deployments, for `segpipe serve` (one process, Prefect's serve) and mirrored by
infra/prefect.yaml (a work pool, for clusters)."""

from __future__ import annotations

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from flows.evaluate import evaluate_predictions
from flows.segment import segment_archive
from pipeline.config import SegmentConfig

NIGHTLY_CRON = "0 2 * * *"  # 02:00 UTC, after the day's images have landed


def build_deployments(config: SegmentConfig, *, storage_secret: str | None = None,
                      cron: str = NIGHTLY_CRON) -> list[RunnerDeployment]:
    """`nightly` runs segment-archive on the cron schedule (UTC) with this config; its SOURCE
    may hold {date}, which each run fills with the previous day. `on-demand` runs
    evaluate-predictions when asked, with the config given then.

    Prefect stores a deployment's parameters, so credentials are refused here: they belong in
    the Secret block named `storage_secret`, or in the worker's environment."""
    if hidden := config.storage_options.hidden_keys():
        raise ValueError(
            f"--storage-options holds {', '.join(hidden)}, which Prefect would store with the deployment; put "
            "credentials in a Secret block (--storage-secret) or in the worker's environment (AWS_*)"
        )
    # only what was set: defaults stay the code's, so an upgrade's new defaults apply
    parameters = {"config": config.model_dump(mode="json", exclude_defaults=True), "storage_secret": storage_secret}
    nightly = segment_archive.to_deployment(
        name="nightly", schedules=[Cron(cron, timezone="UTC")], parameters=parameters,
        description="Segment last night's images", tags=["segpipe"],
    )
    on_demand = evaluate_predictions.to_deployment(
        name="on-demand", description="Dataset-wide IoU against ground truth", tags=["segpipe"],
    )
    return [nightly, on_demand]


def serve_deployments(config: SegmentConfig, *, storage_secret: str | None = None, cron: str = NIGHTLY_CRON) -> None:
    serve(*build_deployments(config, storage_secret=storage_secret, cron=cron))
