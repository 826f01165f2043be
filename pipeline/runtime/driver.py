"""The shard driver: the streamed listing in, a bounded number of batches through the
replicas, shards committed as they complete.

Why persistent actors and a driver loop rather than Ray Data `map_batches`: a run is a stream
of shards that must each be committed atomically once all its inputs are accounted for, and
skipped when already committed. Here the driver pulls shards from the streamed listing only
as capacity frees up, so its memory holds the shards in flight and nothing more; each batch
is a chain of three Ray calls (decode task -> model actor -> mask-writing task) that Ray
pipelines, so decode and upload of neighbouring batches overlap the model; the number of
batches in flight is bounded (per replica), which keeps memory flat whatever the archive
size; the model is built once per actor for the whole run, across shards; and a batch lost
with its actor is sent again, so nothing is lost or written twice (outputs have fixed paths).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray.exceptions import RayActorError, RayError

from ..config import RunError, SegmentConfig
from ..outputs import OpenShard, OutputStore, RunInfo, prepare_output
from ..records import ImageRecord
from ..run import (
    DONE,
    NOT_YET,
    Prefetched,
    Progress,
    RunSummary,
    batched,
    fingerprint,
    list_source,
    new_run_id,
)
from ..stages import plan_shard
from ..storage import (
    ListingCounts,
    Location,
    Shard,
    SourceFile,
    StorageUnavailableError,
    open_location,
)
from .cluster import connect_ray, short_error
from .replicas import SegmentWorker, _ReplicaPool, decode, write

log = logging.getLogger(__name__)


@dataclass
class _Batch:
    shard: OpenShard
    files: list[SourceFile]
    replica: int = -1
    attempts: int = 0
    # split from a batch that failed: runs on an idle replica with nothing beside it, so that
    # if it kills the replica again, the blame (and the attempt) is its own
    alone: bool = False


class _Run:
    """The driver loop: shards in, a bounded number of batches through Ray, shards committed."""

    def __init__(self, config: SegmentConfig, source: Location, store: OutputStore, pool: _ReplicaPool,
                 run: RunInfo, palette: list[list[int]], on_progress: Callable[[Progress], None] | None) -> None:
        self.config, self.source, self.store, self.pool, self.run = config, source, store, pool, run
        self.palette = palette
        self.on_progress = on_progress or (lambda _: None)
        self.pending: dict[ray.ObjectRef, _Batch] = {}
        self.queue: deque[_Batch] = deque()  # batches waiting for a replica
        self.limit = pool.in_flight * len(pool.actors)
        self.progress = Progress(run_id=run.run_id)
        self.errors_by_type: Counter[str] = Counter()
        self.pixels_by_class: Counter[str] = Counter()
        self.retried = 0

    def process(self, listing: Prefetched[Shard], counts: ListingCounts) -> None:
        while (shard := self._next_shard(listing, counts)) is not None:
            if self.store.is_current(shard, self.run, redo_errors=self.config.redo_errors):
                self.progress.shards_skipped += 1
                self.on_progress(self.progress)
                continue
            todo, refused = plan_shard(shard.files, fold_case=self.store.case_insensitive)
            open_shard = OpenShard(shard, records=[])
            self._account(open_shard, refused)
            for files in batched(todo, self.config.batch_size):
                open_shard.outstanding += 1
                self.queue.append(_Batch(open_shard, files))
                self._submit_queued()
                while self.queue or len(self.pending) >= self.limit:
                    self._wait_one()
                    self._submit_queued()
            open_shard.queueing = False
            if open_shard.complete():
                self._commit(open_shard)
        self.progress.listed, self.progress.listing_done = counts.images, True
        self.on_progress(self.progress)
        while self.queue or self.pending:
            self._wait_one()
            self._submit_queued()
        self.progress.finished = True
        self.on_progress(self.progress)

    def _next_shard(self, listing: Prefetched[Shard], counts: ListingCounts) -> Shard | None:
        """The next shard of the listing, pulled only as capacity frees up. While its page is
        on its way, finished batches come back and complete shards are committed."""
        while (shard := listing.get(timeout=0.2)) is NOT_YET:
            self.progress.listed = counts.images
            if self.pending or self.queue:
                self._wait_one()
                self._submit_queued()
        self.progress.listed = counts.images
        return None if shard is DONE else shard  # type: ignore[return-value]

    def _submit_queued(self) -> None:
        while self.queue and len(self.pending) < self.limit:
            replica = self.pool.pick(alone=self.queue[0].alone)
            if replica is None:
                return
            batch = self.queue.popleft()
            batch.replica = replica
            decoded = decode.remote(self.source, batch.files, self.config.max_pixels, self.config.max_raster_pixels,
                                    self.config.image_timeout_s, self.pool.decodes_jpeg(replica, self.config.jpeg_decode))
            segmented = self.pool.actors[replica].segment.remote(decoded)
            written = write.remote(self.store.location, segmented, self.palette)
            self.pool.load[replica] += 1
            self.pending[written] = batch

    def _wait_one(self) -> None:
        self.pool.ping_due()
        if self.pool.down_for() > self.config.no_replica_timeout_s:  # e.g. every worker node lost, none added
            raise RunError(f"no model replica has been alive for {self.config.no_replica_timeout_s:g} s "
                           "(no_replica_timeout_s; were their worker nodes lost?); committed shards are kept, "
                           "run again to resume once the cluster has workers")
        refs = [*self.pending, *self.pool.checks]
        if not refs:
            if self.pool.all_dead():
                raise RunError("every model replica died and Ray could not restart them (max_restarts); "
                               "committed shards are kept, and the next run resumes from them")
            time.sleep(0.1)  # replicas are restarting; their next ping is due shortly
            return
        ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
        for ref in ready:
            if ref in self.pool.checks:
                self.pool.resolve(ref)
            else:
                self._finish(ref)

    def _finish(self, ref: ray.ObjectRef) -> None:
        batch = self.pending.pop(ref)
        self.pool.load[batch.replica] -= 1
        if batch.alone:
            self.pool.alone.discard(batch.replica)
        try:
            records = ray.get(ref)
        except StorageUnavailableError as err:  # Ray re-raises the task's error as this type too
            raise RunError(f"storage unavailable: {short_error(err)}; committed shards are kept, run again to resume") from err
        except RayError as err:
            if isinstance(err, RayActorError):
                self.pool.suspect(batch.replica)
            batch.attempts += 1
            if batch.attempts < self.config.batch_attempts:
                log.warning("batch of %d images failed (%s); sending them again one by one", len(batch.files), short_error(err))
                self.retried += 1
                # one by one, each alone on its replica: if an image crashed or hung the worker,
                # only that image fails again; its neighbours were collateral
                singles = [_Batch(batch.shard, [file], attempts=batch.attempts, alone=True) for file in batch.files]
                batch.shard.outstanding += len(singles) - 1
                self.queue.extendleft(reversed(singles))
                return
            records = []
            for file in batch.files:
                record = ImageRecord(key=file.key, size=file.size, version=file.version)
                record.fail("worker_failed", f"failed {batch.attempts} times: {short_error(err)}")
                records.append(record)
        batch.shard.outstanding -= 1
        self._account(batch.shard, records)
        if batch.shard.complete():
            self._commit(batch.shard)

    def _account(self, open_shard: OpenShard, records: list[ImageRecord]) -> None:
        open_shard.records.extend(records)
        failed = [r for r in records if not r.ok]
        self.errors_by_type.update(r.error_type for r in failed)
        for record in records:
            if record.stats is not None:
                for class_id, count in zip(record.stats.class_id, record.stats.pixel_count, strict=True):
                    self.pixels_by_class[self.run.class_names[class_id]] += int(count)
        self.progress.images += len(records)
        self.progress.errors += len(failed)
        self.on_progress(self.progress)

    def _commit(self, open_shard: OpenShard) -> None:
        try:
            self.store.commit_shard(open_shard.shard, open_shard.records, self.run)
        except (OSError, StorageUnavailableError) as err:
            raise RunError(
                f"cannot commit shard {open_shard.shard.shard_id} to {self.store.location.url}: {type(err).__name__}: {err}; "
                "committed shards are kept, run again to resume"
            ) from err
        self.progress.shards_committed += 1
        self.on_progress(self.progress)


def run_segmentation(
    config: SegmentConfig,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    worker_class: type = SegmentWorker,
) -> RunSummary:
    """Segment every image under config.source into config.output; see `pipeline.outputs`
    for the layout. Shards already committed with the same inputs and settings are skipped."""
    started = time.monotonic()
    source = open_location(config.source, config.storage_options)
    counts = ListingCounts()
    # SOURCE is checked by its first page before anything is written to OUTPUT
    shards = list_source(source, shard_by=config.shard_by, shard_size=config.shard_size, counts=counts)
    run_id = new_run_id()
    stop_ray, pool = False, None
    try:
        store = prepare_output(config, source)
        stop_ray, ray_cluster = connect_ray(config.ray_address)
        pool = _ReplicaPool(config, worker_class, run_id)
        meta = pool.meta
        run = RunInfo(
            run_id=run_id, run_date=dt.datetime.now(dt.UTC).date(), model=meta["architecture"], weights=meta["weights"],
            num_classes=meta["num_classes"], class_names=tuple(meta["class_names"]), crf=config.crf,
            source_url=source.url, fingerprint=fingerprint(meta, config),
        )
        setup_seconds = time.monotonic() - started
        loop = _Run(config, source, store, pool, run, meta["palette"], on_progress)
        try:
            loop.process(shards, counts)
        except (StorageUnavailableError, OSError) as err:  # listing, or reading commit markers
            raise RunError(f"storage unavailable: {type(err).__name__}: {err}; committed shards are kept, "
                           "run again to resume") from err
        progress = loop.progress
        return RunSummary(
            run_id=run_id, source=source.url, output=store.location.url, model=run.model, weights=run.weights,
            shards_committed=progress.shards_committed, shards_skipped=progress.shards_skipped,
            images=progress.images, errors=progress.errors, errors_by_type=dict(loop.errors_by_type),
            non_image_keys=counts.skipped, pixels_by_class=dict(loop.pixels_by_class), retried_batches=loop.retried,
            setup_seconds=setup_seconds, ray_cluster=ray_cluster,
            replicas=[{"device": p["device"], "gpu_ids": p["gpu_ids"], "threads": p["threads"]} for p in pool.placements],
            seconds=time.monotonic() - started,
        )
    finally:
        shards.close()
        if pool is not None:
            pool.shutdown()
        if stop_ray:
            ray.shutdown()
