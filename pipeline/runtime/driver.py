"""The shard driver: the streamed listing in, a bounded number of batches through the
replicas, shards committed as they complete.

Which shards need work is known before any model loads: the model's metadata, and so the
run's fingerprint, come from the weights' description (`pipeline.run.model_meta`), and each
shard's commit marker is read as the listing arrives. Ray and the replicas start with the
first shard that needs work (`replicas.Replicas`), and the model loads in the background
while the listing and the markers are read on; a run with nothing to do never starts them.

Why persistent actors and a driver loop rather than Ray Data `map_batches`: a run is a stream
of shards that must each be committed atomically once all its inputs are accounted for, and
skipped when already committed. Here the driver pulls shards from the streamed listing only
as capacity frees up, so its memory holds the shards in flight and nothing more; each batch
is a chain of three Ray calls (decode task -> model actor -> mask-writing task) that Ray
pipelines, so decode and upload of neighbouring batches overlap the model (a CPU replica
beside its files runs all three in one call instead: `run.io_in_replica`); the number of
batches in flight is bounded (per replica), which keeps memory flat whatever the archive
size; the model is built once per actor for the whole run, across shards; and a batch lost
with its actor is sent again, so nothing is lost or written twice (outputs have fixed paths).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError

from ..config import RunError, SegmentConfig
from ..outputs import OpenShard, OutputStore, RunInfo, is_current, prepare_output
from ..records import ImageRecord
from ..run import (
    DONE,
    NAMED_KEYS,
    NO_CLUSTER,
    NOT_YET,
    ListingUnderway,
    Prefetched,
    Progress,
    RunSummary,
    batches,
    fingerprint,
    list_source,
    model_meta,
    plan_shard,
    run_info,
    source_hints,
)
from ..storage import (
    ListingCounts,
    Location,
    Shard,
    SourceFile,
    StorageUnavailableError,
    is_raster_key,
    open_location,
)
from .cluster import short_error
from .replicas import Replicas, SegmentWorker, _ReplicaPool, decode, write

# shards that need work taken from the listing while the replicas start: until then the driver
# reads on (listing pages, the commit markers of shards up to date), and the listing stays its
# few shards ahead of the driver, so commits follow it closely once the replicas are up
STARTUP_SHARDS = 2

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

    def __init__(self, config: SegmentConfig, source: Location, store: OutputStore, replicas: Replicas,
                 run: RunInfo, palette: list[list[int]], on_progress: Callable[[Progress], None] | None) -> None:
        self.config, self.source, self.store, self.replicas, self.run = config, source, store, replicas, run
        self.palette = palette
        self.on_progress = on_progress or (lambda _: None)
        self.pool: _ReplicaPool | None = None  # once the replicas have loaded their model
        self.pending: dict[ray.ObjectRef, _Batch] = {}
        self.queue: deque[_Batch] = deque()  # batches waiting for a replica
        self.limit = 0  # batches in flight at most, once the replicas are known
        self.opened_while_starting = 0
        self.progress = Progress(run_id=run.run_id)
        self.errors_by_type: Counter[str] = Counter()
        self.error_keys: dict[str, list[str]] = {}  # the first keys of each reason (`RunSummary.error_keys`)
        # with --polygons, the TIFFs segmented as plain images: no CRS and transform, so no polygons
        self.plain_tiffs = 0
        self.plain_tiff_keys: list[str] = []
        self.rasters = 0  # georeferenced rasters, segmented or not
        self.pixels_by_class: Counter[str] = Counter()
        self.retried = 0
        self.errors_kept = 0  # error rows kept: of the shards skipped as up to date, and of unchanged images
        self.listed: set[str] = set()  # the ids of the listing's shards, up to date or not

    def take_over(self, listing: ListingUnderway) -> None:
        """Count the shards the listing had already seen to before this run took it over: up
        to date (`ListingUnderway.up_to_date`, skipped) or committed without the images deleted
        at SOURCE (`ListingUnderway.trimmed`)."""
        self.listed.update(listing.up_to_date, listing.trimmed)
        self.progress.shards_skipped += len(listing.up_to_date)
        self.progress.shards_committed += len(listing.trimmed)
        self.progress.kept += sum(images for images, _ in listing.trimmed.values())
        self.errors_kept += sum(listing.up_to_date.values()) + sum(errors for _, errors in listing.trimmed.values())

    def process(self, listing: Prefetched[Shard], counts: ListingCounts) -> None:
        while (shard := self._next_shard(listing, counts)) is not None:
            self.listed.add(shard.shard_id)
            commit = self.store.read_commit(shard.shard_id)
            if is_current(commit, shard, self.run, redo_errors=self.config.redo_errors):
                self.progress.shards_skipped += 1
                self.errors_kept += commit.get("errors", 0)
                self.on_progress(self.progress)
                continue
            kept = self.store.kept_rows(shard, commit, self.run, redo_errors=self.config.redo_errors)
            todo, refused = plan_shard(shard.files, fold_case=self.store.case_insensitive)
            if kept is not None:  # same settings: the images unchanged since keep their rows and masks
                todo = [f for f in todo if f.key not in kept.keys]
                refused = [r for r in refused if r.key not in kept.keys]
            if todo:
                self.replicas.start()  # with the first shard that needs work; the listing goes on meanwhile
                if self.pool is None:
                    self.opened_while_starting += 1
            open_shard = OpenShard(shard, records=[], commit=commit, segmenting=tuple(f.key for f in todo), kept=kept)
            if kept:
                self.progress.kept += len(kept)
                self.errors_kept += kept.errors
            self._account(open_shard, refused)
            for files in batches(todo, self.config.batch_size):
                open_shard.outstanding += 1
                self.queue.append(_Batch(open_shard, files))
                self._submit_queued()
                while self._full():
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

    def _full(self) -> bool:
        """Whether the next batch must wait: every replica has its batches in flight (or, while
        the replicas start, STARTUP_SHARDS shards wait for them)."""
        if self.pool is None:
            return self.opened_while_starting >= STARTUP_SHARDS
        return bool(self.queue) or len(self.pending) >= self.limit

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
        while self.pool is not None and self.queue and len(self.pending) < self.limit:
            replica = self.pool.pick(alone=self.queue[0].alone)
            if replica is None:
                return
            batch = self.queue.popleft()
            self._mark(batch.shard)
            batch.replica = replica
            decoding = (self.source, batch.files, self.config.max_pixels, self.config.max_raster_pixels,
                        self.config.image_timeout_s, self.pool.decodes_jpeg(replica, self.config.jpeg_decode))
            actor = self.pool.actors[replica]
            if self.pool.io_in_replica and not batch.attempts:
                written = actor.read_segment_write.remote(*decoding, self.store.location, self.palette)
            else:
                # a batch sent again takes the tasks even beside its files: if a decoder crash
                # or a decode deaf to the time limit killed its replica, it now costs a task
                # worker, not another restart and model load
                written = write.remote(self.store.location, actor.segment.remote(decode.remote(*decoding)), self.palette)
            self.pool.load[replica] += 1
            self.pending[written] = batch

    def _wait_one(self) -> None:
        if self.pool is None:
            self._take_replicas(timeout=1.0)
            return
        self.pool.ping_due()
        if self.pool.down_for() > self.config.no_replica_timeout_s:  # e.g. every worker node lost, none added
            raise RunError(f"no model replica has been alive for {self.config.no_replica_timeout_s:g} s "
                           "(no_replica_timeout_s; were their worker nodes lost?); committed shards are kept, "
                           "run again to resume once the cluster has workers")
        refs = [*self.pending, *self.pool.checks]
        if not refs:
            if self.pool.all_dead():
                raise RunError(self.pool.gone_line())
            time.sleep(0.1)  # replicas are restarting; their next ping is due shortly
            return
        ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
        for ref in ready:
            if ref in self.pool.checks:
                self.pool.resolve(ref)
            else:
                self._finish(ref)

    def _take_replicas(self, timeout: float) -> None:
        """The replicas, once they have loaded their model; their model must be the one the
        shards were judged up to date for."""
        pool = self.replicas.pool(timeout)
        if pool is None:
            return
        loaded = fingerprint(pool.meta, self.config)
        if loaded != self.run.fingerprint:
            raise RunError(
                f"the replicas loaded {pool.meta['architecture']} ({pool.meta['weights']}, {pool.meta['num_classes']} "
                f"classes), not the model the run was planned for ({self.run.model}, {self.run.weights}, "
                f"{self.run.num_classes} classes; fingerprint {loaded} != {self.run.fingerprint}): did the weights "
                "change while the run started? Run again"
            )
        self.pool, self.limit = pool, pool.in_flight * len(pool.actors)

    def _finish(self, ref: ray.ObjectRef) -> None:
        batch = self.pending.pop(ref)
        self.pool.load[batch.replica] -= 1
        if batch.alone:
            self.pool.alone.discard(batch.replica)
        try:
            records = ray.get(ref)
            self.pool.finished(batch.replica)
        except StorageUnavailableError as err:  # Ray re-raises the task's error as this type too
            raise RunError(f"storage unavailable: {short_error(err)}; committed shards are kept, run again to resume") from err
        except RayError as err:
            if isinstance(err, RayActorError):
                self.pool.died(batch.replica, alone=batch.alone)
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
        for record in failed:
            named = self.error_keys.setdefault(record.error_type, [])
            if len(named) < NAMED_KEYS:
                named.append(record.key)
        self.rasters += sum(r.georeferenced for r in records)
        if self.config.polygons:
            plain = [r.key for r in records if r.ok and not r.georeferenced and is_raster_key(r.key)]
            self.plain_tiffs += len(plain)
            self.plain_tiff_keys += plain[:NAMED_KEYS - len(self.plain_tiff_keys)]
        for record in records:
            if record.stats is not None:
                for class_id, count in zip(record.stats.class_id, record.stats.pixel_count, strict=True):
                    self.pixels_by_class[self.run.class_names[class_id]] += int(count)
        self.progress.images += len(records)
        self.progress.errors += len(failed)
        self.progress.ready_at = self.replicas.ready_at
        self.on_progress(self.progress)

    def _mark(self, open_shard: OpenShard) -> None:
        """Mark the shard underway (`OutputStore.mark_underway`) before its first mask or its
        tables are written, and not before: a run stopped as it starts (its model refused)
        leaves OUTPUT as it was."""
        if not open_shard.marked:
            self.store.mark_underway(open_shard.shard, open_shard.commit, self.run.run_id, open_shard.segmenting)
            open_shard.marked = True

    def _commit(self, open_shard: OpenShard) -> None:
        try:
            # with nothing segmented too: its tables are rewritten, and a query joining the
            # markers must not meet them half-written beside the old one
            self._mark(open_shard)
            self.store.commit_shard(open_shard.shard, open_shard.records, self.run, open_shard.kept)
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
    replicas: Replicas | None = None,
    listing: ListingUnderway | None = None,
) -> RunSummary:
    """Segment every image under config.source into config.output; see `pipeline.outputs`
    for the layout. Shards already committed with the same inputs and settings are skipped;
    when every shard is, neither Ray nor a model start. `replicas`: started for this config by
    the caller (the command line starts them before Prefect starts), who closes them.
    `listing`: SOURCE's listing for this config, which `up_to_date` began, taken over (and
    closed) here."""
    started = time.monotonic()
    if listing is not None and listing.config != config:
        listing.close()
        raise ValueError("the listing was begun for another config than the run's")
    if replicas is not None and replicas.config != config:
        if listing is not None:
            listing.close()
        raise ValueError("replicas were started for another config than the run's")
    given = replicas is not None
    replicas = replicas or Replicas(config, worker_class=worker_class)
    begun = min(started, replicas.started_at) if replicas.started_at is not None else started
    source = open_location(config.source, config.storage_options)
    counts = listing.counts if listing is not None else ListingCounts()
    shards = listing.shards if listing is not None else None
    try:
        # SOURCE is checked by its first page, and the model by its metadata, before anything
        # is written to OUTPUT
        if shards is None:
            shards = list_source(source, config.output, shard_by=config.shard_by, shard_size=config.shard_size,
                                 counts=counts)
        meta = model_meta(config)
        store = prepare_output(config, source)
        run = run_info(config, source.url, replicas.run_id, meta)
        loop = _Run(config, source, store, replicas, run, meta["palette"], on_progress)
        if listing is not None:
            loop.take_over(listing)
        try:
            loop.process(shards, counts)
            # the listing is complete and every shard of it committed: what else is committed is gone from SOURCE
            removed = store.remove_vanished_shards(loop.listed)
        except (StorageUnavailableError, OSError) as err:  # listing, commit markers, or removing vanished shards
            raise RunError(f"storage unavailable: {type(err).__name__}: {err}; committed shards are kept, "
                           "run again to resume") from err
        # every shard is committed and no batch is in flight: nothing will move what is left staged
        store.remove_staging(run.run_id)
        progress, pool = loop.progress, loop.pool
        return RunSummary(
            run_id=run.run_id, source=source.url, output=store.location.url, model=run.model, weights=run.weights,
            class_names=list(run.class_names), shards_committed=progress.shards_committed, shards_skipped=progress.shards_skipped,
            images=progress.images, errors=progress.errors, errors_by_type=dict(loop.errors_by_type),
            error_keys=loop.error_keys, rasters=loop.rasters, plain_tiffs=loop.plain_tiffs,
            plain_tiff_keys=loop.plain_tiff_keys,
            non_image_keys=counts.skipped, pixels_by_class=dict(loop.pixels_by_class), retried_batches=loop.retried,
            # from the replicas' start where the caller started them first (the command line,
            # while Prefect starts): the run's seconds are then the command's, not the flow's
            # last few; its setup lasts until both the replicas and this loop had started
            setup_seconds=max(replicas.ready_at, started) - begun if replicas.ready_at is not None else 0.0,
            ray_cluster=replicas.ray_cluster if replicas.started else NO_CLUSTER,
            replicas=_replica_entries(pool),
            seconds=time.monotonic() - begun, errors_kept=loop.errors_kept, images_kept=progress.kept,
            shards_removed=len(removed),
            similar_sources=source_hints(source, store.location, len(loop.listed), counts),
        )
    finally:
        if shards is not None:
            shards.close()
        if given:
            replicas.stop()
        else:
            replicas.close()


def _replica_entries(pool: _ReplicaPool | None) -> list[dict[str, Any]]:
    """The run summary's replicas: where each ran, in which precision, and how long its
    compiled model took to compile (the first call of each input shape; 0 for an eager model,
    None if unknown)."""
    if pool is None:
        return []
    compiled = pool.compile_seconds()
    return [{"device": p["device"], "gpu_ids": p["gpu_ids"], "threads": p["threads"], "precision": p["precision"],
             "node_id": p["node_id"],
             "batch_io": "replica" if pool.io_in_replica else "tasks",
             "compile_seconds": None if seconds is None else round(seconds, 2)}
            for p, seconds in zip(pool.placements, compiled, strict=True)]
