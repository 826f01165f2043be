"""The distributed run on Ray (with `ray_evaluate`, the only modules of `pipeline` that
import ray).

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
import hashlib
import json
import logging
import os
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayError

from .config import RunError, SegmentConfig
from .inference import Segmenter, SlidingWindow
from .models import build_model
from .outputs import LAYOUT_FORMAT, OutputStore, RunInfo, prepare_locations
from .stages import ImageRecord, SegmentStage, plan_shard, read_and_decode, write_masks
from .storage import (
    ListingCounts,
    Location,
    Shard,
    SourceFile,
    StorageUnavailableError,
    iter_shards,
)

log = logging.getLogger(__name__)


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


def _node_cpus() -> float:
    """The CPUs Ray counts on the node this process runs on (cgroup limits included)."""
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return float(node["Resources"].get("CPU", 1.0))
    return float(os.cpu_count() or 1)


def worker_device(gpu_ids: list[str], cuda_available: bool) -> torch.device:
    """The torch device for the GPUs Ray assigned to this actor. Ray narrows
    CUDA_VISIBLE_DEVICES to those GPUs, so the first one is always cuda:0."""
    if not gpu_ids:
        return torch.device("cpu")
    if not cuda_available:
        raise RuntimeError(
            f"Ray assigned GPU {','.join(gpu_ids)} to this worker but torch sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); install a CUDA build of torch"
        )
    return torch.device("cuda", 0)


@dataclass(frozen=True)
class WorkerSpec:
    model: str | None  # None: the checkpoint in `weights` names it
    weights: str | None
    num_classes: int | None
    crf: bool
    batch_size: int
    storage_options: dict[str, Any]
    threads: int | None  # torch threads on CPU; None: replica_threads decides
    tile: int | None = None
    tile_stride: int | None = None
    cpus_per_actor: float = 1.0
    compile: bool = False
    # CPU replicas expected on one node: the run's CPU replicas over the nodes with CPUs
    replicas_per_node: int = 1

    def sliding_window(self) -> SlidingWindow | None:
        if self.tile is None:
            return None
        stride = self.tile_stride or self.tile * 3 // 4
        return SlidingWindow(crop=(self.tile, self.tile), stride=(stride, stride), batch_size=self.batch_size)


def build_stage(spec: WorkerSpec, device: torch.device) -> SegmentStage:
    """A replica's model and stage, as its actor builds them."""
    model = build_model(spec.model, num_classes=spec.num_classes, weights=spec.weights, storage_options=spec.storage_options)
    segmenter = Segmenter(model, device=device, batch_size=spec.batch_size, sliding_window=spec.sliding_window(),
                          compile=spec.compile)
    return SegmentStage(segmenter, crf=spec.crf)


class SegmentWorker:
    """One model replica: built once when the actor starts, then fed batches."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.gpu_ids = [str(i) for i in ray.get_gpu_ids()]
        self.setup_error: str | None = None
        try:
            if not self.gpu_ids:
                torch.set_num_threads(spec.threads or replica_threads(_node_cpus(), spec.replicas_per_node, spec.cpus_per_actor))
            self.device = worker_device(self.gpu_ids, self._cuda_available())
            self.stage = self._build_stage(spec, self.device)
        except Exception as err:  # reported by ready(), so the driver can say what went wrong
            self.setup_error = f"{type(err).__name__}: {err}"

    def _cuda_available(self) -> bool:
        return torch.cuda.is_available()

    def _build_stage(self, spec: WorkerSpec, device: torch.device) -> SegmentStage:
        return build_stage(spec, device)

    def ready(self) -> dict[str, Any]:
        if self.setup_error is not None:
            return {"error": self.setup_error}
        meta = self.stage.segmenter.meta
        return {
            "meta": meta.model_dump(mode="json"),
            "device": str(self.device),
            "gpu_ids": self.gpu_ids,
            "threads": torch.get_num_threads(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def segment(self, records: list[ImageRecord]) -> list[ImageRecord]:
        return self.stage(records)


# no Ray-level retries: a decode that crashed or hung its worker is the driver's to retry,
# image by image (see _Run._finish), not Ray's to repeat whole
@ray.remote(max_retries=0)
def _decode(source: Location, files: list[SourceFile], max_pixels: int, time_limit_s: float,
            jpeg_on_device: bool) -> list[ImageRecord]:
    return read_and_decode(source, files, max_pixels=max_pixels, time_limit_s=time_limit_s, hard_stop=True,
                           jpeg_on_device=jpeg_on_device)


@ray.remote
def _warm_up() -> None:
    """Nothing: running it imports this module (torch, Pillow, pyarrow) in a task worker."""


@ray.remote
def _write(output: Location, records: list[ImageRecord], palette: list[list[int]]) -> list[ImageRecord]:
    return write_masks(output, records, palette)


class _ReplicaPool:
    """The model actors: how busy each is, and which are restarting or gone.

    Ray restarts a dead actor (up to max_restarts) and rebuilds its model. Calls made while it
    restarts fail at once, so a replica whose call failed is set aside and pinged until it
    answers again (or until Ray declares it dead for good); meanwhile batches go elsewhere or
    wait, instead of burning their attempts on a replica that cannot take them.
    """

    def __init__(self, config: SegmentConfig, worker_class: type, run_id: str) -> None:
        resources = ray.cluster_resources()
        gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
        if config.device == "cuda" or (config.device == "auto" and gpus):
            count = config.actors or max(1, int(gpus / config.gpus_per_actor))
            num_gpus = config.gpus_per_actor
        else:
            count, num_gpus = config.actors or 1, 0.0
        if not num_gpus and count * config.cpus_per_actor > cpus - 1:
            raise RunError(
                f"{count} model replicas x {config.cpus_per_actor} CPUs leave no CPU for decoding and writing "
                f"(the cluster has {cpus:g}); lower actors or cpus_per_actor"
            )
        spec = WorkerSpec(
            model=config.model, weights=config.weights, num_classes=config.num_classes, crf=config.crf,
            batch_size=config.batch_size, storage_options=config.storage_options,
            threads=config.threads_per_actor, tile=config.tile, tile_stride=config.tile_stride,
            cpus_per_actor=config.cpus_per_actor, compile=config.compile, replicas_per_node=-(-count // _nodes_with_cpus()),
        )
        actor_class = ray.remote(worker_class)
        self.actors = [
            actor_class.options(
                num_gpus=num_gpus, num_cpus=config.cpus_per_actor, max_restarts=config.max_restarts,
                name=f"segpipe-{run_id}-{index}",
            ).remote(spec)
            for index in range(count)
        ]
        self.load = [0] * count
        self.dead: set[int] = set()
        self.checks: dict[ray.ObjectRef, int] = {}  # pings in flight to replicas set aside
        self.recheck_at: dict[int, float] = {}
        self.alone: set[int] = set()  # replicas running a batch that must run by itself
        # while the replicas load their model, the CPUs left over start the processes that
        # will decode and write, so the first batches do not wait for Python to import torch
        spare = cpus - count * config.cpus_per_actor
        self.in_flight = batches_in_flight(config.batches_in_flight_per_actor, spare, count)
        for _ in range(min(max(int(spare), 1), 2 * self.in_flight * count)):
            _warm_up.remote()
        try:
            self.placements = ray.get([actor.ready.remote() for actor in self.actors], timeout=config.startup_timeout_s)
        except GetTimeoutError as err:
            self.shutdown()
            raise RunError(
                f"{count} model replicas ({num_gpus:g} GPU, {config.cpus_per_actor:g} CPU each) were not placed and "
                f"loaded within {config.startup_timeout_s:g} s; the cluster has {gpus:g} GPUs and {cpus:g} CPUs "
                "(lower actors, or check that the autoscaler can add workers)"
            ) from err
        except RayError as err:
            self.shutdown()
            raise RunError(f"model replicas failed to start: {_short(err)}") from err
        failed = [p["error"] for p in self.placements if "error" in p]
        if failed:
            self.shutdown()
            raise RunError(f"cannot load {config.model or config.weights!r}: {failed[0]}")
        self.meta = self.placements[0]["meta"]

    def decodes_jpeg(self, replica: int, policy: str) -> bool:
        """Whether plain JPEGs go to this replica undecoded, for its device to decode."""
        return policy == "device" or (policy == "auto" and self.placements[replica]["device"].startswith("cuda"))

    def _set_aside(self) -> set[int]:
        return set(self.checks.values()) | set(self.recheck_at) | self.dead

    def pick(self, *, alone: bool = False) -> int | None:
        """The least busy replica that can take work now, if any; with `alone`, an idle one,
        which then takes nothing else until that batch is back."""
        usable = [i for i in range(len(self.actors)) if i not in self._set_aside() and i not in self.alone]
        if alone:
            usable = [i for i in usable if self.load[i] == 0]
        if not usable:
            return None
        replica = min(usable, key=lambda i: self.load[i])
        if alone:
            self.alone.add(replica)
        return replica

    def suspect(self, replica: int) -> None:
        if replica not in self._set_aside():
            self.checks[self.actors[replica].ready.remote()] = replica

    def ping_due(self) -> None:
        now = time.monotonic()
        for replica, when in list(self.recheck_at.items()):
            if now >= when:
                del self.recheck_at[replica]
                self.checks[self.actors[replica].ready.remote()] = replica

    def resolve(self, ref: ray.ObjectRef) -> None:
        replica = self.checks.pop(ref)
        try:
            answer = ray.get(ref)
        except ActorDiedError:
            self.dead.add(replica)  # restarts used up: Ray will not bring it back
            log.warning("model replica %d is gone for good", replica)
            return
        except RayActorError:
            self.recheck_at[replica] = time.monotonic() + 0.5  # still restarting
            return
        if "error" in answer:
            self.dead.add(replica)
            log.warning("model replica %d could not reload its model: %s", replica, answer["error"])

    def all_dead(self) -> bool:
        return len(self.dead) == len(self.actors)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


@dataclass
class _OpenShard:
    shard: Shard
    records: list[ImageRecord]
    outstanding: int = 0
    # True until every batch of the shard is queued: the first batches may come back while
    # later ones are still being queued, and the shard must not be committed then
    queueing: bool = True

    def complete(self) -> bool:
        return not self.queueing and self.outstanding == 0


@dataclass
class _Batch:
    shard: _OpenShard
    files: list[SourceFile]
    replica: int = -1
    attempts: int = 0
    # split from a batch that failed: runs on an idle replica with nothing beside it, so that
    # if it kills the replica again, the blame (and the attempt) is its own
    alone: bool = False


def _nodes_with_cpus() -> int:
    return max(1, sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) > 0))


def _short(err: BaseException) -> str:
    """One line for an error row: the last line of Ray's wrapped traceback."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__)[:500]


def _fingerprint(meta: dict[str, Any], crf: bool, tile: tuple[int | None, int | None]) -> str:
    settings = {
        "format": LAYOUT_FORMAT, "architecture": meta["architecture"], "weights": meta["weights"],
        "num_classes": meta["num_classes"], "class_names": meta["class_names"],
        "preprocessing": meta["preprocessing"], "model_kwargs": meta["model_kwargs"], "crf": crf, "tile": tile,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _batched(items: list[SourceFile], size: int) -> Iterator[list[SourceFile]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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

    def process(self, shards: Iterable[Shard]) -> None:
        for shard in shards:  # pulled from the listing only as capacity frees up
            if self.store.is_current(shard, self.run, redo_errors=self.config.redo_errors):
                self.progress.shards_skipped += 1
                self.on_progress(self.progress)
                continue
            todo, refused = plan_shard(shard.files, fold_case=self.store.case_insensitive)
            open_shard = _OpenShard(shard, records=[])
            self._account(open_shard, refused)
            for files in _batched(todo, self.config.batch_size):
                open_shard.outstanding += 1
                self.queue.append(_Batch(open_shard, files))
                self._submit_queued()
                while self.queue or len(self.pending) >= self.limit:
                    self._wait_one()
                    self._submit_queued()
            open_shard.queueing = False
            if open_shard.complete():
                self._commit(open_shard)
        while self.queue or self.pending:
            self._wait_one()
            self._submit_queued()

    def _submit_queued(self) -> None:
        while self.queue and len(self.pending) < self.limit:
            replica = self.pool.pick(alone=self.queue[0].alone)
            if replica is None:
                return
            batch = self.queue.popleft()
            batch.replica = replica
            decoded = _decode.remote(self.source, batch.files, self.config.max_pixels, self.config.image_timeout_s,
                                     self.pool.decodes_jpeg(replica, self.config.jpeg_decode))
            segmented = self.pool.actors[replica].segment.remote(decoded)
            written = _write.remote(self.store.location, segmented, self.palette)
            self.pool.load[replica] += 1
            self.pending[written] = batch

    def _wait_one(self) -> None:
        self.pool.ping_due()
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
            raise RunError(f"storage unavailable: {_short(err)}; committed shards are kept, run again to resume") from err
        except RayError as err:
            if isinstance(err, RayActorError):
                self.pool.suspect(batch.replica)
            batch.attempts += 1
            if batch.attempts < self.config.batch_attempts:
                log.warning("batch of %d images failed (%s); sending them again one by one", len(batch.files), _short(err))
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
                record.fail("worker_failed", f"failed {batch.attempts} times: {_short(err)}")
                records.append(record)
        batch.shard.outstanding -= 1
        self._account(batch.shard, records)
        if batch.shard.complete():
            self._commit(batch.shard)

    def _account(self, open_shard: _OpenShard, records: list[ImageRecord]) -> None:
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

    def _commit(self, open_shard: _OpenShard) -> None:
        try:
            self.store.commit_shard(open_shard.shard, open_shard.records, self.run)
        except (OSError, StorageUnavailableError) as err:
            raise RunError(
                f"cannot commit shard {open_shard.shard.shard_id} to {self.store.location.url}: {type(err).__name__}: {err}; "
                "committed shards are kept, run again to resume"
            ) from err
        self.progress.shards_committed += 1
        self.on_progress(self.progress)


def connect_ray(address: str | None) -> tuple[bool, str]:
    """Join the cluster at `address` (or RAY_ADDRESS), or start a local one. Returns whether
    this call connected (and so should disconnect) and how Ray was found, for the summary."""
    if ray.is_initialized():
        return False, "the Ray session already open in this process"
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, logging_level=logging.WARNING)
        return True, f"the Ray cluster at {ray.get_runtime_context().gcs_address}"
    ray.init(include_dashboard=False, logging_level=logging.WARNING)
    return True, "a local Ray started for this run"


def run_segmentation(
    config: SegmentConfig,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    worker_class: type = SegmentWorker,
) -> RunSummary:
    """Segment every image under config.source into config.output; see `pipeline.outputs`
    for the layout. Shards already committed with the same inputs and settings are skipped."""
    started = time.monotonic()
    source, store = prepare_locations(config)
    output = store.location
    run_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    stop_ray, ray_cluster = connect_ray(config.ray_address)
    pool = None
    try:
        pool = _ReplicaPool(config, worker_class, run_id)
        meta = pool.meta
        run = RunInfo(
            run_id=run_id, run_date=dt.datetime.now(dt.UTC).date(), model=meta["architecture"], weights=meta["weights"],
            num_classes=meta["num_classes"], class_names=tuple(meta["class_names"]), crf=config.crf,
            source_url=source.url, fingerprint=_fingerprint(meta, config.crf, (config.tile, config.tile_stride)),
        )
        counts = ListingCounts()
        setup_seconds = time.monotonic() - started
        loop = _Run(config, source, store, pool, run, meta["palette"], on_progress)
        try:
            loop.process(iter_shards(source, shard_by=config.shard_by, shard_size=config.shard_size, counts=counts))
        except (StorageUnavailableError, OSError) as err:  # listing, or reading commit markers
            raise RunError(f"storage unavailable: {type(err).__name__}: {err}; committed shards are kept, "
                           "run again to resume") from err
        return RunSummary(
            run_id=run_id, source=source.url, output=output.url, model=run.model, weights=run.weights,
            shards_committed=loop.progress.shards_committed, shards_skipped=loop.progress.shards_skipped,
            images=loop.progress.images, errors=loop.progress.errors, errors_by_type=dict(loop.errors_by_type),
            non_image_keys=counts.skipped, pixels_by_class=dict(loop.pixels_by_class), retried_batches=loop.retried, setup_seconds=setup_seconds, ray_cluster=ray_cluster,
            replicas=[{"device": p["device"], "gpu_ids": p["gpu_ids"], "threads": p["threads"]} for p in pool.placements], seconds=time.monotonic() - started,
        )
    finally:
        if pool is not None:
            pool.shutdown()
        if stop_ray:
            ray.shutdown()
