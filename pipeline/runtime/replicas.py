"""Model replicas as Ray actors: one model per GPU (or CPU replicas), built once, fed batches;
the pool that tracks which replicas are busy, restarting or gone; and `Replicas`, which starts
Ray and the pool in the background, when a run first needs them.

A batch's reading, decoding and mask writing run either as Ray tasks beside the replica
(`decode`, `write`), so a GPU replica only ever runs the model and storage round trips overlap
it, or in the replica itself (`SegmentWorker.read_segment_write`), which spares a CPU replica
Ray's cost of moving each batch through three calls (`run.io_in_replica` decides).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import ActorDiedError, RayActorError, RayError

from ..config import RasterSettings, RunError, SegmentConfig
from ..records import ImageRecord
from ..run import batches_in_flight, io_in_replica, new_run_id, place_cpu_replicas, replica_threads
from ..storage import Location, SourceFile
from ..text import counted
from .cluster import connect_ray, cpu_nodes, nodes_with_cpus, short_error
from .spec import WorkerSpec

if TYPE_CHECKING:
    import torch

    from ..stages import RasterStage, SegmentStage

log = logging.getLogger(__name__)


class SegmentWorker:
    """One model replica: built once when the actor starts, then fed batches.

    Its torch side is `worker.py`, which the actor's process imports as it starts: the driver
    creates these actors without importing torch (see there)."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.gpu_ids = [str(i) for i in ray.get_gpu_ids()]
        self.spec = spec
        self.raster_stage: RasterStage | None = None
        self.setup_error: str | None = None
        try:
            # in the actor's process only, and inside the try: a torch that fails to import is reported too
            from .worker import set_up_process

            self.device = set_up_process(spec, self.gpu_ids, self._cuda_available())
            self.stage = self._build_stage(spec, self.device)
        except Exception as err:  # reported by ready(), so the driver can say what went wrong
            self.setup_error = f"{type(err).__name__}: {err}"

    def _cuda_available(self) -> bool:
        from .worker import cuda_available

        return cuda_available()

    def _build_stage(self, spec: WorkerSpec, device: torch.device) -> SegmentStage:
        from .worker import build_stage

        return build_stage(spec, device)

    def ready(self) -> dict[str, Any]:
        if self.setup_error is not None:
            return {"error": self.setup_error}
        from .worker import torch_threads

        meta = self.stage.segmenter.meta
        return {
            "meta": meta.model_dump(mode="json"),
            "device": str(self.device),
            "gpu_ids": self.gpu_ids,
            "threads": torch_threads(),
            # what precision="auto" became on this device (`Segmenter`), for the run's summary
            "precision": "fp32" if self.stage.segmenter.autocast_dtype is None else "bf16",
            "node_id": ray.get_runtime_context().get_node_id(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def share_cores(self, threads: int) -> int:
        """Run `threads` torch threads from the next call on (the driver's `_ReplicaPool._share_cores`);
        returns the threads now set."""
        from .worker import set_threads

        return set_threads(threads)

    def compile_seconds(self) -> float:
        """Seconds this replica's compiled model spent in the first call of each input shape,
        and its compiled labelling kernels in theirs (`labels.PixelLabeler`)."""
        return self.stage.compile_seconds

    def segment(self, records: list[ImageRecord]) -> list[ImageRecord]:
        records = self.stage(records)
        for record in records:
            if record.ok and record.georeferenced:
                self._rasters()(record)
        return records

    def read_segment_write(self, source: Location, files: list[SourceFile], max_pixels: int, max_raster_pixels: int,
                           time_limit_s: float, jpeg_on_device: bool, output: Location,
                           palette: list[list[int]]) -> list[ImageRecord]:
        """A whole batch in this process, as the `decode` task, `segment` and the `write` task
        would run it. Decoding has the tasks' time limit (actor calls run on the process's
        main thread, where its alarm works) and hard stop: a decoder stuck in C ends this
        replica for Ray to restart, and the driver sends the batch's images again one by one,
        through the tasks."""
        from ..io_stages import read_and_decode, write_masks

        records = read_and_decode(source, files, max_pixels=max_pixels, max_raster_pixels=max_raster_pixels,
                                  time_limit_s=time_limit_s, hard_stop=True, jpeg_on_device=jpeg_on_device)
        return write_masks(output, self.segment(records), palette)

    def _rasters(self) -> RasterStage:
        """Built at the first georeferenced raster: most runs have none."""
        if self.raster_stage is None:
            from .worker import build_raster_stage

            self.raster_stage = build_raster_stage(self.stage, self.spec)
        return self.raster_stage


# The task bodies import the stages they run (Pillow, rasterio, pyarrow) where they land, in
# Ray's task workers; the driver that submits them does not need them.

# no Ray-level retries: a decode that crashed or hung its worker is the driver's to retry,
# image by image (see _Run._finish), not Ray's to repeat whole
@ray.remote(max_retries=0)
def decode(source: Location, files: list[SourceFile], max_pixels: int, max_raster_pixels: int, time_limit_s: float,
           jpeg_on_device: bool) -> list[ImageRecord]:
    from ..io_stages import read_and_decode

    return read_and_decode(source, files, max_pixels=max_pixels, max_raster_pixels=max_raster_pixels,
                           time_limit_s=time_limit_s, hard_stop=True, jpeg_on_device=jpeg_on_device)


@ray.remote
def warm_up() -> None:
    """Imports what the decode and write tasks run in a task worker, while the replicas load
    their model, so that the first batches do not wait for it."""
    from .. import io_stages  # noqa: F401


@ray.remote
def write(output: Location, records: list[ImageRecord], palette: list[list[int]]) -> list[ImageRecord]:
    from ..io_stages import write_masks

    return write_masks(output, records, palette)


def _on_node(node: str | None) -> Any:
    """A replica's scheduling strategy: on `node` (`run.place_cpu_replicas`) while it has room
    there, elsewhere when it has none now (taken by other work) or after the node is lost; with
    no node, Ray's default (and a placement group's, around a run inside one)."""
    if node is None:
        return None
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # soft alone would wait for the node however long it stays full
    return NodeAffinitySchedulingStrategy(node_id=node, soft=True, _spill_on_unavailable=True)


class _ReplicaPool:
    """The model actors: how busy each is, and which are restarting or gone.

    Ray restarts a dead actor and rebuilds its model. Calls made while it restarts fail at
    once, so a replica whose call failed is set aside and pinged until it answers again (or
    until it is gone for good); meanwhile batches go elsewhere or wait, instead of burning their
    attempts on a replica that cannot take them.

    A replica's restarts are counted here, not by Ray, whose max_restarts counts an actor's
    whole life: over a night of millions of images, a few that crash the replica (each costs
    up to `batch_attempts` deaths while the driver finds it) would use that up and stop every
    night at the same images. What `max_restarts` bounds is deaths in a row, with no batch
    finished between them (`died`, `finished`): a replica that cannot finish anything. A
    death on a batch of one image sent alone is that image's, which becomes an error row after
    its attempts; it does not count against the replica. A replica not
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
            # Ray places GPU replicas where it finds GPUs
            places: list[tuple[str | None, int]] = [(None, -(-count // nodes_with_cpus()))] * count
        else:
            # unless told how many: one replica on each node with room for it, with a thread per
            # core there, so a cluster of CPU nodes is used whole
            places = place_cpu_replicas(cpu_nodes(), config.actors, config.cpus_per_actor,
                                        ray.get_runtime_context().get_node_id())
            count, num_gpus = len(places), 0.0
        if not num_gpus and count * config.cpus_per_actor > cpus - 1:
            raise RunError(
                f"{count} model replicas x {config.cpus_per_actor} CPUs leave no CPU for decoding and writing "
                f"(the cluster has {cpus:g}); lower actors or cpus_per_actor"
            )
        spec = WorkerSpec(
            model=config.model, weights=config.weights, num_classes=config.num_classes, crf=config.crf,
            batch_size=config.batch_size, storage_options=config.storage_options,
            threads=config.threads_per_actor, tile=config.tile, tile_stride=config.tile_stride,
            cpus_per_actor=config.cpus_per_actor, precision=config.precision, compile=config.compile,
            confidence=config.confidence, raster=RasterSettings.of(config), source_url=config.source,
            output_url=config.output, class_names=config.class_names, run_id=run_id,
        )
        actor_class = ray.remote(worker_class)
        self.actors = [
            actor_class.options(
                # none, or as many as `died` allows
                num_gpus=num_gpus, num_cpus=config.cpus_per_actor, max_restarts=-1 if config.max_restarts else 0,
                name=f"segpipe-{run_id}-{index}", scheduling_strategy=_on_node(node),
            ).remote(replace(spec, replicas_per_node=sharing))
            for index, (node, sharing) in enumerate(places)
        ]
        self.load = [0] * count
        self.max_restarts = config.max_restarts
        self.deaths_in_a_row = [0] * count  # each replica's since it last finished a batch (`died`)
        # since when each replica set aside has been so, and how long it may stay so (`ping_due`)
        self.aside_since: dict[int, float] = {}
        self.why_gone = ""  # the reason the last replica gone for good went (`_gone`)
        self.restart_timeout_s = config.startup_timeout_s
        self.dead: set[int] = set()
        self.checks: dict[ray.ObjectRef, int] = {}  # pings in flight to replicas set aside
        self.recheck_at: dict[int, float] = {}
        self.alone: set[int] = set()  # replicas running a batch that must run by itself
        self.down_since: float | None = None  # when the last replica that could take work was set aside
        self.io_in_replica = io_in_replica(config.batch_io, gpu=bool(num_gpus), source_url=config.source,
                                           output_url=config.output)
        spare = cpus - count * config.cpus_per_actor
        self.in_flight = batches_in_flight(config.batches_in_flight_per_actor, spare, count)
        if not self.io_in_replica:
            # while the replicas load their model, the CPUs left over start the processes that
            # will decode and write, so the first batches do not wait for them to start and
            # import the decode and write stages (Pillow, rasterio, pyarrow; no torch)
            for _ in range(min(max(int(spare), 1), 2 * self.in_flight * count)):
                warm_up.remote()
        # a CPU replica's threads are its node's cores shared among the replicas there, unless set
        self.shares_cores = not num_gpus and config.threads_per_actor is None
        self.cpus_per_actor = config.cpus_per_actor
        self.rethreading: dict[ray.ObjectRef, int] = {}  # share_cores calls not yet answered, and their replica
        self.description = f"{count} model replicas ({num_gpus:g} GPU, {config.cpus_per_actor:g} CPU each)"
        self.resources = f"the cluster has {gpus:g} GPUs and {cpus:g} CPUs"
        self.placements: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {}
        self.stopped = False

    def wait_ready(self, config: SegmentConfig, stop: threading.Event) -> None:
        """Wait until every replica has loaded its model (or `stop` is set: RunError), then
        know where each runs and the model's metadata. A replica that failed to load, or
        replicas not placed within config.startup_timeout_s, stop the run with the reason."""
        refs = [actor.ready.remote() for actor in self.actors]
        deadline = time.monotonic() + config.startup_timeout_s
        try:
            while len(ray.wait(refs, num_returns=len(refs), timeout=0.5)[0]) < len(refs):
                if stop.is_set():
                    raise RunError("the run stopped while its model replicas were starting")
                if time.monotonic() > deadline:
                    raise RunError(
                        f"{self.description} were not placed and loaded within {config.startup_timeout_s:g} s; "
                        f"{self.resources} (lower actors, or check that the autoscaler can add workers)"
                    )
            self.placements = ray.get(refs)
        except RayError as err:
            self.shutdown()
            raise RunError(f"model replicas failed to start: {short_error(err)}") from err
        except RunError:
            self.shutdown()
            raise
        failed = [p["error"] for p in self.placements if "error" in p]
        if failed:
            self.shutdown()
            raise RunError(f"cannot load {config.model or config.weights!r}: {failed[0]}")
        self.meta = self.placements[0]["meta"]
        self._share_cores()  # where Ray placed a replica elsewhere than planned (its node was full)

    def compile_seconds(self, timeout_s: float = 10.0) -> list[float | None]:
        """Each replica's `SegmentWorker.compile_seconds`; None for one that does not answer
        within `timeout_s` (gone, or busy): the figure is for the summary, never worth a wait."""
        refs = [actor.compile_seconds.remote() for actor in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        answers = []
        for ref in refs:
            try:
                answers.append(ray.get(ref) if ref in ready else None)
            except RayError:
                answers.append(None)
        return answers

    def decodes_jpeg(self, replica: int, policy: str) -> bool:
        """Whether plain JPEGs go to this replica undecoded, for its device to decode."""
        return policy == "device" or (policy == "auto" and self.placements[replica]["device"].startswith("cuda"))

    def _set_aside(self) -> set[int]:
        return set(self.checks.values()) | set(self.recheck_at) | self.dead

    def pick(self, *, alone: bool = False) -> int | None:
        """The least busy replica that can take work now, if any: one with fewer than
        `in_flight` batches, so that the batches of a replica lost for good do not pile onto
        the others; with `alone`, an idle one, which then takes nothing else until that batch
        is back."""
        usable = [i for i in range(len(self.actors))
                  if i not in self._set_aside() and i not in self.alone and self.load[i] < self.in_flight]
        if alone:
            usable = [i for i in usable if self.load[i] == 0]
        if not usable:
            return None
        replica = min(usable, key=lambda i: self.load[i])
        if alone:
            self.alone.add(replica)
        return replica

    def died(self, replica: int, *, alone: bool) -> None:
        """A batch on `replica` failed because it died. The replica is set aside until it
        answers again, or gone for good after `max_restarts` deaths in a row (`alone`: the
        batch was one image, sent alone to find the one that crashes it, which does not count).
        One death fails every batch the replica held: it is counted once."""
        if replica in self._set_aside():
            return
        self.deaths_in_a_row[replica] += not alone
        if self.deaths_in_a_row[replica] <= self.max_restarts:
            self.suspect(replica)
            return
        self._gone(replica, f"died {counted(self.deaths_in_a_row[replica], 'time')} in a row without finishing a "
                            f"batch (--max-restarts {self.max_restarts}); it is not restarted again")

    def finished(self, replica: int) -> None:
        """A batch on `replica` came back: its deaths are no longer in a row."""
        self.deaths_in_a_row[replica] = 0

    def suspect(self, replica: int) -> None:
        if replica not in self._set_aside():
            self.checks[self.actors[replica].ready.remote()] = replica
            self.aside_since[replica] = time.monotonic()
            self._note_all_aside()

    def _note_all_aside(self) -> None:
        if len(self._set_aside()) == len(self.actors) and self.down_since is None:
            self.down_since = time.monotonic()

    def _gone(self, replica: int, why: str) -> None:
        """`replica` taken out for good: Ray restarts it no more."""
        self.dead.add(replica)
        self.why_gone = why
        self.aside_since.pop(replica, None)
        with contextlib.suppress(RayError):
            ray.kill(self.actors[replica], no_restart=True)
        log.warning("model replica %d %s", replica, why)
        self._note_all_aside()
        self._share_cores()

    def ping_due(self) -> None:
        self._answered_share_cores()
        now = time.monotonic()
        for replica, since in list(self.aside_since.items()):
            # restarted again and again as it loads its model (a crash, the memory killer), or
            # waiting for a node that never comes: no batch of it fails to count that
            if now - since > self.restart_timeout_s:
                self._gone(replica, f"did not come back within {self.restart_timeout_s:g} s of dying "
                                    "(--startup-timeout-s); it is not restarted again")
        for replica, when in list(self.recheck_at.items()):
            if replica in self.dead:
                del self.recheck_at[replica]
            elif now >= when:
                del self.recheck_at[replica]
                self.checks[self.actors[replica].ready.remote()] = replica

    def resolve(self, ref: ray.ObjectRef) -> None:
        replica = self.checks.pop(ref)
        if replica in self.dead:
            return
        try:
            answer = ray.get(ref)
        except ActorDiedError:
            self._gone(replica, "died, and --max-restarts 0 restarts none")
            return
        except RayActorError:
            self.recheck_at[replica] = time.monotonic() + 0.5  # still restarting
            return
        if "error" in answer:
            self._gone(replica, f"could not reload its model: {answer['error']}")
            return
        self.placements[replica] = answer  # restarted, perhaps on another node
        self.aside_since.pop(replica, None)
        self.down_since = None  # back: it takes work again
        self._share_cores()

    def _share_cores(self) -> None:
        """Each live CPU replica's threads made its node's cores shared among the replicas
        there now (`run.replica_threads`): once they started, since Ray places a replica
        elsewhere than planned when its node is full, and after one restarted or was lost for
        good. Ray restarts a replica with the spec it was created with, so one that lands on a
        node it now shares would run the threads of the node it left, and the replicas there
        would oversubscribe its cores; one left alone on a node would keep part of it idle. A
        replica takes its new count after the batches already sent to it."""
        if not self.shares_cores:
            return
        live = [i for i in range(len(self.actors)) if i not in self.dead]
        sharing = Counter(self.placements[i]["node_id"] for i in live)
        cpus = dict(cpu_nodes())
        for i in live:
            node = self.placements[i]["node_id"]
            if node not in cpus:  # lost: its replica answers from another node once restarted
                continue
            threads = replica_threads(cpus[node], sharing[node], self.cpus_per_actor)
            if self.placements[i]["threads"] != threads:
                self.placements[i] = self.placements[i] | {"threads": threads}
                self.rethreading[self.actors[i].share_cores.remote(threads)] = i

    def _answered_share_cores(self) -> None:
        """Collects the answers to `share_cores`. A replica that died before it answered
        (perhaps idle, with no batch to fail) is set aside and pinged, so that once restarted
        it is shared anew (`resolve`)."""
        if not self.rethreading:
            return
        answered, _ = ray.wait(list(self.rethreading), num_returns=len(self.rethreading), timeout=0)
        for ref in answered:
            replica = self.rethreading.pop(ref)
            try:
                self.placements[replica] = self.placements[replica] | {"threads": ray.get(ref)}
            except RayError:
                self.suspect(replica)

    def gone_line(self) -> str:
        """What the run says when every replica is gone: the last one's reason."""
        return (f"every model replica is gone, the last one because it {self.why_gone}; committed shards are kept, "
                "and the next run resumes from them")

    def all_dead(self) -> bool:
        return len(self.dead) == len(self.actors)

    def down_for(self) -> float:
        """Seconds since no replica could take work (each restarting, unanswered or dead); 0 while one can."""
        return 0.0 if self.down_since is None else time.monotonic() - self.down_since

    def shutdown(self) -> None:
        if not self.stopped:
            self.stopped = True
            for actor in self.actors:
                ray.kill(actor)


class Replicas:
    """A run's Ray session and model replicas: `start()` connects to Ray (or starts a local
    one) and creates the replicas, which then load their model in the background. A run starts
    them with its first shard that needs work and goes on listing and reading commit markers
    while the model loads; a run with nothing to do never starts them. The command line starts
    them before Prefect's flow, so that the model loads while Prefect's server starts, and the
    flow's run takes them over (`run_segmentation(..., replicas=)`). The run's id names the
    replica actors (segpipe-<run id>-<n>).

    Ray starts in the calling thread, not in the background: ray.init imports modules as it
    connects (pydantic.v1 for its serializers, aiohttp, ...), and Python's imports in two threads
    at once can deadlock on a cycle, which it breaks with an ImportError ("partially initialized
    module"): it did, 1 run in 9, with ray.init in a thread beside Prefect's imports. Ray also
    ties a session to the thread that called ray.init (calls from other threads hang once it
    has ended), and the caller outlives the run.

    Whoever made the replicas closes them (`close()`: the replicas are removed, and a Ray this
    started is shut down); a run given them only `stop()`s waiting for them."""

    def __init__(self, config: SegmentConfig, *, worker_class: type = SegmentWorker, run_id: str | None = None) -> None:
        self.config, self.worker_class = config, worker_class
        self.run_id = run_id or new_run_id()
        self.ray_cluster = ""  # how Ray was found, once it was
        self.ready_at: float | None = None  # time.monotonic() when the replicas had loaded their model
        self.started_at: float | None = None  # time.monotonic() when `start` was called
        self.started = False
        self._stop_ray = False
        self._pool: _ReplicaPool | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()  # the replicas are up, or could not start
        self._stopping = threading.Event()
        self._waiting: threading.Thread | None = None

    def start(self) -> None:
        """Connect to Ray and create the replicas (once; later calls do nothing); they load
        their model in the background. A failure to connect or to place them raises here."""
        if self.started:
            return
        self.started, self.started_at = True, time.monotonic()
        try:
            self._stop_ray, self.ray_cluster = connect_ray(self.config.ray_address)
            self._pool = _ReplicaPool(self.config, self.worker_class, self.run_id)
        except BaseException as err:
            self._error = err  # and so for whoever asks for the pool later
            self._ready.set()
            self.close()
            raise
        # a daemon: a process that ends without closing the replicas does not wait for it
        self._waiting = threading.Thread(target=self._wait_ready, name="segpipe-replicas", daemon=True)
        self._waiting.start()

    def _wait_ready(self) -> None:
        try:
            self._pool.wait_ready(self.config, self._stopping)  # type: ignore[union-attr]
            self.ready_at = time.monotonic()
        except BaseException as err:  # handed to the run, which raises it where it waits
            self._error = err
        finally:
            self._ready.set()

    def pool(self, timeout: float) -> _ReplicaPool | None:
        """The replicas once they have loaded their model; None if they are still loading
        after `timeout` seconds. Raises what kept them from loading."""
        self.start()
        if not self._ready.wait(timeout):
            return None
        if self._error is not None:
            raise self._error
        return self._pool

    def stop(self) -> None:
        """Stop waiting for the replicas to load (a run that ends early)."""
        self._stopping.set()

    def close(self) -> None:
        self.stop()
        if self._waiting is not None:
            self._waiting.join()  # notices within a second
        if self._pool is not None:
            self._pool.shutdown()
        if self._stop_ray:
            ray.shutdown()
            self._stop_ray = False
