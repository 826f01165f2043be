"""Model replicas as Ray actors: one model per GPU (or CPU replicas), built once, fed batches;
and the pool that tracks which replicas are busy, restarting or gone.

The decode and write stages run as Ray tasks beside them (`decode`, `write`), so the replica
only ever runs the model.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayError

from ..config import RunError, SegmentConfig
from ..inference import Segmenter, SlidingWindow
from ..models import build_model
from ..records import ImageRecord
from ..run import batches_in_flight, replica_threads
from ..stages import RasterSettings, RasterStage, SegmentStage, read_and_decode, write_masks
from ..storage import Location, SourceFile, open_location
from .cluster import node_cpus, nodes_with_cpus, short_error

log = logging.getLogger(__name__)


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
    confidence: bool = False
    # georeferenced rasters: how they are segmented, where from and where to (a replica
    # reads their blocks and writes their masks itself)
    raster: RasterSettings = field(default_factory=RasterSettings)
    source_url: str = ""
    output_url: str = ""

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
    return SegmentStage(segmenter, crf=spec.crf, confidence=spec.confidence)


class SegmentWorker:
    """One model replica: built once when the actor starts, then fed batches."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.gpu_ids = [str(i) for i in ray.get_gpu_ids()]
        self.spec = spec
        self.raster_stage: RasterStage | None = None
        self.setup_error: str | None = None
        try:
            if not self.gpu_ids:
                torch.set_num_threads(spec.threads or replica_threads(node_cpus(), spec.replicas_per_node, spec.cpus_per_actor))
            self.device = worker_device(self.gpu_ids, self._cuda_available())
            if self.device.type == "cuda":  # this process runs one model on fixed shapes: let cuDNN pick its kernels
                torch.backends.cudnn.benchmark = True
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
        records = self.stage(records)
        for record in records:
            if record.ok and record.georeferenced:
                self._rasters()(record)
        return records

    def _rasters(self) -> RasterStage:
        """Built at the first georeferenced raster: most runs have none."""
        if self.raster_stage is None:
            options = self.spec.storage_options
            meta = self.stage.segmenter.meta
            self.raster_stage = RasterStage(
                self.stage, self.spec.raster, source=open_location(self.spec.source_url, options),
                output=open_location(self.spec.output_url, options), palette=meta.palette, class_names=meta.class_names,
            )
        return self.raster_stage


# no Ray-level retries: a decode that crashed or hung its worker is the driver's to retry,
# image by image (see _Run._finish), not Ray's to repeat whole
@ray.remote(max_retries=0)
def decode(source: Location, files: list[SourceFile], max_pixels: int, max_raster_pixels: int, time_limit_s: float,
           jpeg_on_device: bool) -> list[ImageRecord]:
    return read_and_decode(source, files, max_pixels=max_pixels, max_raster_pixels=max_raster_pixels,
                           time_limit_s=time_limit_s, hard_stop=True, jpeg_on_device=jpeg_on_device)


@ray.remote
def warm_up() -> None:
    """Nothing: running it imports this module (torch, Pillow, pyarrow) in a task worker."""


@ray.remote
def write(output: Location, records: list[ImageRecord], palette: list[list[int]]) -> list[ImageRecord]:
    return write_masks(output, records, palette)


class _ReplicaPool:
    """The model actors: how busy each is, and which are restarting or gone.

    Ray restarts a dead actor (up to max_restarts) and rebuilds its model. Calls made while it
    restarts fail at once, so a replica whose call failed is set aside and pinged until it
    answers again (or until Ray declares it dead for good); meanwhile batches go elsewhere or
    wait, instead of burning their attempts on a replica that cannot take them. A replica not
    set aside counts as alive (it may be busy with a long batch); when every one is set aside,
    `down_for` says for how long, since with its node gone a restart waits for a new node and
    its pings may never answer.
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
            cpus_per_actor=config.cpus_per_actor, compile=config.compile, replicas_per_node=-(-count // nodes_with_cpus()),
            confidence=config.confidence, raster=RasterSettings.of(config), source_url=config.source,
            output_url=config.output,
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
        self.down_since: float | None = None  # when the last replica that could take work was set aside
        # while the replicas load their model, the CPUs left over start the processes that
        # will decode and write, so the first batches do not wait for Python to import torch
        spare = cpus - count * config.cpus_per_actor
        self.in_flight = batches_in_flight(config.batches_in_flight_per_actor, spare, count)
        for _ in range(min(max(int(spare), 1), 2 * self.in_flight * count)):
            warm_up.remote()
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
            raise RunError(f"model replicas failed to start: {short_error(err)}") from err
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
            if len(self._set_aside()) == len(self.actors):
                self.down_since = time.monotonic()

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
        else:
            self.down_since = None  # back: it takes work again

    def all_dead(self) -> bool:
        return len(self.dead) == len(self.actors)

    def down_for(self) -> float:
        """Seconds since no replica could take work (each restarting, unanswered or dead); 0 while one can."""
        return 0.0 if self.down_since is None else time.monotonic() - self.down_since

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
