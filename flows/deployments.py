"""The two deployments, for `segpipe serve` (one process, Prefect's serve) and mirrored by
infra/prefect.yaml (a work pool, for clusters)."""

from __future__ import annotations

from typing import Any

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from flows.evaluate import evaluate_predictions
from flows.segment import segment_archive

NIGHTLY_CRON = "0 2 * * *"  # 02:00 UTC, after the day's images have landed


def build_deployments(segment_parameters: dict[str, Any], *, cron: str = NIGHTLY_CRON) -> list[RunnerDeployment]:
    """`nightly` runs segment-archive on the cron schedule (UTC) with these parameters; its
    SOURCE may hold {date}, which each run fills with the previous day. `on-demand` runs
    evaluate-predictions when asked, with the parameters given then."""
    nightly = segment_archive.to_deployment(
        name="nightly", schedules=[Cron(cron, timezone="UTC")], parameters=segment_parameters,
        description="Segment last night's images", tags=["segpipe"],
    )
    on_demand = evaluate_predictions.to_deployment(
        name="on-demand", description="Dataset-wide IoU against ground truth", tags=["segpipe"],
    )
    return [nightly, on_demand]


def serve_deployments(segment_parameters: dict[str, Any], *, cron: str = NIGHTLY_CRON) -> None:
    serve(*build_deployments(segment_parameters, cron=cron))
