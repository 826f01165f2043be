"""Scoring on Ray: batches of mask pairs read and scored in parallel CPU tasks, their
confusion matrices summed in the driver."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import ray

from ..evaluation import (
    BatchScore,
    NothingToScoreError,
    Pair,
    ScoreSettings,
    exclusion_summary,
    score_pairs,
)
from ..storage import Location
from ..text import counted
from .cluster import connect_ray


@ray.remote
def _score(predictions: Location, ground_truth: Location, pairs: list[Pair], settings: ScoreSettings) -> BatchScore:
    return score_pairs(predictions, ground_truth, pairs, settings)


def score_on_ray(
    predictions: Location,
    ground_truth: Location,
    pairs: Sequence[Pair],
    settings: ScoreSettings,
    *,
    ray_address: str | None = None,
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
) -> BatchScore:
    """Score every pair; at most two batches per CPU are in flight, so memory stays flat.
    Raises NothingToScoreError, naming why pairs were left out, when none could be scored:
    there would be no report to write."""
    stop_ray, _ = connect_ray(ray_address)
    try:
        n = settings.num_classes
        total = BatchScore(confusion=np.zeros((n, n), dtype=np.int64))
        limit = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        batches = (list(pairs[i : i + batch_size]) for i in range(0, len(pairs), batch_size))
        pending: list[ray.ObjectRef] = []
        for batch in batches:
            if len(pending) >= limit:
                pending = _collect(pending, total, on_batch)
            pending.append(_score.remote(predictions, ground_truth, batch, settings))
        while pending:
            pending = _collect(pending, total, on_batch)
        if not total.image_ids:
            raise NothingToScoreError(f"none of the {counted(len(pairs), 'pair')} could be scored: "
                                      f"{exclusion_summary(total, settings)}")
        return total
    finally:
        if stop_ray:
            ray.shutdown()


def _collect(pending: list[ray.ObjectRef], total: BatchScore, on_batch: Callable[[int], None] | None) -> list[ray.ObjectRef]:
    [ready], rest = ray.wait(pending, num_returns=1)
    batch = ray.get(ready)
    total.add(batch)
    if on_batch is not None:
        on_batch(len(batch.image_ids) + len(batch.excluded))
    return rest
