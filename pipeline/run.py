"""What a segmentation run is, apart from where it runs: its identity (id and settings
fingerprint), the sizing rules of its replicas, its progress and its summary.

Nothing here imports Ray; `pipeline.runtime` applies these rules on a cluster.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .config import RunError, SegmentConfig
from .outputs import LAYOUT_FORMAT
from .storage import ListingCounts, Location, Shard, ShardBy, iter_shards, retry_io

T = TypeVar("T")


def new_run_id(now: dt.datetime | None = None) -> str:
    """Sortable by start time, unique across concurrent runs: 20261122T040000Z-1a2b3c."""
    now = now or dt.datetime.now(dt.UTC)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


# the settings that change what a run writes; the others (batch sizes, replicas, --block, which
# gives the same labels in other blocks) only change how fast it is written
RESULT_SETTINGS = ("crf", "tile", "tile_stride", "bands", "confidence", "polygons", "min_polygon_area", "simplify")


def fingerprint(meta: dict[str, Any], config: SegmentConfig) -> str:
    """Changes whenever results would differ (model, weights, classes, preprocessing, and the
    RESULT_SETTINGS): shards committed under another fingerprint are processed again."""
    settings = {
        "format": LAYOUT_FORMAT, "architecture": meta["architecture"], "weights": meta["weights"],
        "num_classes": meta["num_classes"], "class_names": meta["class_names"],
        "preprocessing": meta["preprocessing"], "model_kwargs": meta["model_kwargs"],
        **{name: getattr(config, name) for name in RESULT_SETTINGS},
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def list_source(source: Location, *, shard_by: ShardBy, shard_size: int, counts: ListingCounts) -> Prefetched[Shard]:
    """The run's one streamed listing of SOURCE, as shards. Its first shard is listed here,
    before Ray or a model starts, so a SOURCE that cannot be read stops the run at once; the
    rest is listed by a thread a few shards ahead of the run, so work starts with the first
    page and a slow listing never holds finished shards back from their commit."""
    shards = iter_shards(source, shard_by=shard_by, shard_size=shard_size, counts=counts)
    try:
        first = next(shards, None)
        # an empty listing: the prefix may not exist at all (asked only then, once)
        missing = first is None and counts.skipped == 0 and not retry_io(source.url, source.fs.exists, source.root)
    except FileNotFoundError:
        missing = True
    except OSError as err:
        raise RunError(f"cannot read source {source.url}: {type(err).__name__}: {err}") from err
    if missing:
        raise RunError(f"source {source.url} is not a folder or prefix that exists")
    return Prefetched(itertools.chain([first] if first is not None else [], shards))


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NOT_YET = _Marker("NOT_YET")  # Prefetched.get: nothing arrived in time
DONE = _Marker("DONE")  # Prefetched.get: the iterator is exhausted


class Prefetched(Generic[T]):
    """An iterator drained by a thread, at most `depth` items ahead of its reader, so that a
    slow producer (a listing page on its way) and the reader's own work overlap. An error in
    the producer is raised in the reader, at the point it would have been reached."""

    def __init__(self, items: Iterator[T], depth: int = 2) -> None:
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._fill, args=(items,), name="segpipe-listing", daemon=True)
        self._thread.start()

    def _put(self, entry: tuple[str, Any]) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(entry, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, items: Iterator[T]) -> None:
        try:
            for item in items:
                if not self._put(("item", item)):
                    return
            self._put(("done", None))
        except BaseException as err:  # handed to the reader, which decides what it means
            self._put(("error", err))

    def get(self, timeout: float | None = None) -> T | _Marker:
        """The next item; NOT_YET if none arrived within `timeout`; DONE at the end."""
        if self._done:
            return DONE
        try:
            kind, value = self._queue.get(timeout=timeout)
        except queue.Empty:
            return NOT_YET
        if kind == "error":
            self._done = True
            raise value
        if kind == "done":
            self._done = True
            return DONE
        return value

    def close(self) -> None:
        """Stop the producer (a run that ends early leaves no listing running behind it): it
        stops at its next item, or when the page it waits for arrives."""
        self._closed.set()
        self._thread.join(timeout=1.0)

    def __iter__(self) -> Iterator[T]:
        while (item := self.get()) is not DONE:
            yield item  # type: ignore[misc]


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
    """A run as it goes. The archive is listed while it is segmented: `listed` counts the
    images found so far, and is the total once `listing_done`."""

    run_id: str = ""
    listed: int = 0
    listing_done: bool = False
    images: int = 0
    errors: int = 0
    shards_committed: int = 0
    shards_skipped: int = 0
    finished: bool = False
    started: float = field(default_factory=time.monotonic)

    @property
    def images_per_second(self) -> float:
        return self.images / max(time.monotonic() - self.started, 1e-9)

    def describe(self) -> str:
        found = f"of {self.listed}" if self.listing_done else f"of {self.listed}+ found so far"
        return (f"{self.images} images {found}, {self.images_per_second:.1f} img/s, {self.errors} errors, "
                f"{self.shards_committed} shards committed, {self.shards_skipped} up to date")


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


