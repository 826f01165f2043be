"""What a segmentation run is, apart from where it runs: its identity (id and settings
fingerprint), the sizing rules of its replicas, its progress and its summary.

Nothing here imports Ray; `pipeline.runtime` applies these rules on a cluster.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .outputs import LAYOUT_FORMAT

T = TypeVar("T")


def new_run_id(now: dt.datetime | None = None) -> str:
    """Sortable by start time, unique across concurrent runs: 20261122T040000Z-1a2b3c."""
    now = now or dt.datetime.now(dt.UTC)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def fingerprint(meta: dict[str, Any], crf: bool, tile: tuple[int | None, int | None]) -> str:
    """Changes whenever results would differ (model, weights, classes, preprocessing, CRF,
    tiling): shards committed under another fingerprint are processed again."""
    settings = {
        "format": LAYOUT_FORMAT, "architecture": meta["architecture"], "weights": meta["weights"],
        "num_classes": meta["num_classes"], "class_names": meta["class_names"],
        "preprocessing": meta["preprocessing"], "model_kwargs": meta["model_kwargs"], "crf": crf, "tile": tile,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def batched(items: Sequence[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def replica_threads(node_cpus: float, replicas_per_node: int, cpus_per_actor: float) -> int:
    """Torch threads for a CPU replica: its node's CPUs shared among the replicas on it.

    More than the CPUs the replica reserves from Ray: the decode and write tasks beside it
    are short, and a forward limited to its reservation left half of a 2-core machine idle
    (end-to-end at 0.14 of the bare model's speed; bench/ measures it).
    """
    return max(1, int(cpus_per_actor), int(node_cpus // max(replicas_per_node, 1)))


def batches_in_flight(configured: int | None, spare_cpus: float, replicas: int) -> int:
    """Batches in flight per replica: as configured, or one per CPU left beside the replicas
    (each batch in flight can hold a CPU decoding or encoding), at least 3 so the three stages
    overlap, at most 8 so that memory stays flat."""
    if configured is not None:
        return configured
    return min(8, max(3, int(spare_cpus // max(replicas, 1))))


@dataclass
class Progress:
    run_id: str = ""
    images: int = 0
    errors: int = 0
    shards_committed: int = 0
    shards_skipped: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def images_per_second(self) -> float:
        return self.images / max(time.monotonic() - self.started, 1e-9)


@dataclass
class RunSummary:
    run_id: str
    source: str
    output: str
    model: str
    weights: str
    shards_committed: int
    shards_skipped: int
    images: int
    errors: int
    errors_by_type: dict[str, int]
    non_image_keys: int
    # pixels per class name over the images segmented in this run
    pixels_by_class: dict[str, int]
    retried_batches: int
    # starting Ray and loading the model, before the first image
    setup_seconds: float
    # where the run happened: a local Ray, or the cluster it joined
    ray_cluster: str
    # one entry per model replica: the device it ran on, the GPUs Ray gave it, its torch CPU threads
    replicas: list[dict[str, Any]]
    seconds: float

    @property
    def images_per_second(self) -> float:
        """Throughput once the replicas were up (setup excluded)."""
        busy = self.seconds - self.setup_seconds
        return self.images / busy if busy > 0 else 0.0


