"""What a segmentation run is, apart from where it runs: its identity (id and settings
fingerprint), the model it will run (known before the model loads), the sizing rules of its
replicas, its progress, its summary and record, and the check that finds a run has nothing
to do.

Nothing here imports Ray or Prefect; `pipeline.runtime` applies these rules on a cluster.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
import json
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

from .config import DATE_PATTERN, RunError, SegmentConfig, is_checkpoint_uri
from .model_meta import ModelMeta, Preprocessing
from .outputs import LAYOUT_FORMAT, OutputStore, RunInfo, is_current
from .records import ImageRecord, mask_key, run_record_key
from .storage import (
    ListingCounts,
    Location,
    Shard,
    ShardBy,
    SourceFile,
    StorageUnavailableError,
    absolute_url,
    folder_exists,
    holds_files,
    is_local_url,
    is_raster_key,
    iter_shards,
    missing_folder,
    open_location,
    parent_folder,
    read_bytes,
    similar_folders,
    write_atomic,
)
from .text import counted, every, per_second, verb_for

T = TypeVar("T")


def new_run_id(now: dt.datetime | None = None) -> str:
    """Sortable by start time, unique across concurrent runs: 20261122T040000Z-1a2b3c."""
    now = now or dt.datetime.now(dt.UTC)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


# the settings that change what a run writes; the others (batch sizes, replicas, --block, which
# gives the same labels in other blocks) only change how fast it is written
RESULT_SETTINGS = ("precision", "crf", "tile", "tile_stride", "bands", "confidence", "polygons", "min_polygon_area", "simplify")


def fingerprint(meta: dict[str, Any], config: SegmentConfig) -> str:
    """Changes whenever results would differ (model, weights, classes, preprocessing, and the
    RESULT_SETTINGS): shards committed under another fingerprint are processed again. A
    checkpoint counts by its contents (`weights_digest`), not by the path it was given as."""
    settings = {
        "format": LAYOUT_FORMAT, "architecture": meta["architecture"],
        "weights": meta.get("weights_digest") or meta["weights"],
        "num_classes": meta["num_classes"], "class_names": meta["class_names"],
        "preprocessing": _counted_preprocessing(meta["preprocessing"]), "model_kwargs": meta["model_kwargs"],
        **{name: getattr(config, name) for name in RESULT_SETTINGS},
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# `Preprocessing` fields added after outputs were written, with the value that changes nothing
# they were written by: left out of the fingerprint at that value, so that those outputs' shards
# stay up to date (a checkpoint trained on other bands counts them)
_PREPROCESSING_ADDED = {"bands": None}


def _counted_preprocessing(preprocessing: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in preprocessing.items()
            if name not in _PREPROCESSING_ADDED or value != _PREPROCESSING_ADDED[name]}


def model_meta(config: SegmentConfig) -> dict[str, Any]:
    """The metadata of the model the run's replicas will load (`ModelMeta` as JSON, as a
    replica reports it), known without building the model or loading its weights: the
    fingerprint, and so which shards are up to date, is known before Ray or a model start.
    The driver checks that the replicas' model agrees once it has loaded.

    Known without importing torch (2 to 5 s, which the driver would spend before its first
    batch) wherever that can be: an untrained model's from the config, published weights' from
    `pipeline.preflight.PUBLISHED_WEIGHTS`, a checkpoint's from its pickled metadata (read
    without its tensors, as preflight reads it), each through `ModelMeta`. Anything else (a
    checkpoint that cannot be read that way or whose metadata `ModelMeta` refuses, unknown
    weights) is left to `_meta_with_torch`, which says what is wrong.

    A wrong model, weights or num_classes raises RunError."""
    try:
        meta = _meta_without_torch(config)
        if meta is not None:
            if (class_names := _given_class_names(config, meta.num_classes)) is not None:
                meta = meta.model_copy(update={"class_names": class_names})
            return meta.model_dump(mode="json")
    except ValueError as err:
        raise RunError(f"cannot load {config.model or config.weights!r}: {err}") from err
    return _meta_with_torch(config)


def _meta_with_torch(config: SegmentConfig) -> dict[str, Any]:
    """`model_meta` through torch: published weights described by torchvision's enum (nothing
    downloaded), a checkpoint by its own metadata as `torch.load` reads it."""
    from .models import load_checkpoint
    from .models._registry import get_spec
    from .models.weights import _torchvision_weights

    weights, name = config.weights, config.model
    try:
        if weights is None:
            if config.num_classes is None:
                raise ValueError(f"num_classes is required to build {name!r} without weights")
            meta = ModelMeta.default(get_spec(name or "").name, config.num_classes, model_kwargs={})
        elif is_checkpoint_uri(weights):
            meta = load_checkpoint(weights, storage_options=config.storage_options)[0]
            meta = meta.model_copy(update={"weights": weights})
            _same_architecture(config, meta.architecture)
        elif (enum := _torchvision_weights(get_spec(name or "").torchvision_name, weights)) is not None:
            categories, transforms = enum.meta["categories"], enum.transforms()
            preprocessing = Preprocessing(mean=tuple(transforms.mean), std=tuple(transforms.std), resize="short_side",
                                          size=(int(transforms.resize_size[0]),))
            meta = ModelMeta.default(name or "", len(categories), class_names=tuple(categories),
                                     preprocessing=preprocessing, weights=str(enum).split(".")[-1], model_kwargs={})
        else:
            raise ValueError(f"unknown weights {weights!r} for {name!r}: pass a torchvision weights name, a checkpoint "
                             "path or URL, or 'none'")
        if (class_names := _given_class_names(config, meta.num_classes)) is not None:
            meta = meta.model_copy(update={"class_names": class_names})
    except (ValueError, RuntimeError) as err:  # RuntimeError: WeightsUnavailableError
        raise RunError(f"cannot load {name or weights!r}: {err}") from err
    return meta.model_dump(mode="json")


def _same_architecture(config: SegmentConfig, architecture: str) -> None:
    """A checkpoint holds the model the config names, if it names one (ValueError if not)."""
    if config.model is not None and architecture != config.model:
        raise ValueError(f"checkpoint {config.weights} holds a {architecture!r} model, not {config.model!r}; "
                         f"pass model={architecture!r}")


def _given_class_names(config: SegmentConfig, num_classes: int) -> tuple[str, ...] | None:
    """The class names the config gives the `num_classes` classes of its weights (None: the
    weights' own); ValueError when its num_classes or class_names disagree with the weights."""
    weights = config.weights or "none"
    if config.num_classes is not None and config.num_classes != num_classes:
        raise ValueError(f"num_classes={config.num_classes} but weights {weights} have {num_classes} classes; "
                         f"pass num_classes={num_classes} (or omit it)")
    if config.class_names is None:
        return None
    if len(config.class_names) != num_classes:
        raise ValueError(f"{len(config.class_names)} class_names for the {num_classes} classes of weights {weights}")
    return tuple(config.class_names)


def _meta_without_torch(config: SegmentConfig) -> ModelMeta | None:
    """`model_meta`'s `ModelMeta`, before the config's num_classes and class_names are
    checked against it; None where only `_meta_with_torch` can tell."""
    from pydantic import ValidationError

    from .preflight import PreflightError, published_weights, read_checkpoint

    name, weights = config.model, config.weights
    if weights is None:
        if config.num_classes is None:
            raise ValueError(f"num_classes is required to build {name!r} without weights")
        return ModelMeta.default(name or "", config.num_classes, model_kwargs={})
    if is_checkpoint_uri(weights):
        try:
            checkpoint = read_checkpoint(weights, config.storage_options, "--weights")
            meta = ModelMeta.model_validate(checkpoint.meta) if checkpoint is not None else None
        except (PreflightError, ValidationError):
            return None  # not readable without torch, or not valid: model_meta says why
        if meta is not None:
            _same_architecture(config, meta.architecture)
            # recorded as a path from anywhere: a nightly job's working folder is no provenance
            meta = meta.model_copy(update={"weights": absolute_url(weights), "weights_digest": checkpoint.digest})
        return meta
    if (published := published_weights(name, weights)) is None:
        return None
    preprocessing = Preprocessing(mean=published.mean, std=published.std, resize="short_side", size=(published.resize_size,))
    return ModelMeta.default(name or "", published.num_classes, class_names=tuple(published.categories),
                             preprocessing=preprocessing, weights=published.name, model_kwargs={})


def run_info(config: SegmentConfig, source_url: str, run_id: str, meta: dict[str, Any]) -> RunInfo:
    """What every row of the run shares, from its settings and its model's metadata."""
    return RunInfo(
        run_id=run_id, run_date=dt.datetime.now(dt.UTC).date(), model=meta["architecture"], weights=meta["weights"],
        num_classes=meta["num_classes"], class_names=tuple(meta["class_names"]), crf=config.crf,
        source_url=source_url, fingerprint=fingerprint(meta, config),
    )


def list_source(source: Location, output: str, *, shard_by: ShardBy, shard_size: int,
                counts: ListingCounts) -> Prefetched[Shard]:
    """The run's one streamed listing of SOURCE, as shards. Its first shard is listed here,
    before Ray or a model starts, so a SOURCE that cannot be read stops the run at once; the
    rest is listed by a thread a few shards ahead of the run, so work starts with the first
    page and a slow listing never holds finished shards back from their commit. A symbolic
    link in a local SOURCE is not followed into OUTPUT (`iter_files`), whose masks would be
    listed as images: preflight's OUTPUT-outside-SOURCE check compares folders, not links."""
    never = (open_location(output).root,) if source.is_local and is_local_url(output) else ()
    shards = iter_shards(source, shard_by=shard_by, shard_size=shard_size, counts=counts, never=never)
    try:
        first = next(shards, None)
        # an empty listing: the folder, or the bucket, may not exist at all (asked only then, once)
        missing = first is None and counts.skipped == 0 and not folder_exists(source)
    except FileNotFoundError:
        missing = True
    except (OSError, StorageUnavailableError) as err:
        raise RunError(f"cannot read source {source.url}: {type(err).__name__}: {err}") from err
    if missing:
        raise RunError(missing_folder(source, f"source {source.url}"))
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
        self._put_back: list[T] = []
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
        if self._put_back:
            return self._put_back.pop()
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

    def put_back(self, item: T) -> None:
        """Make `item`, just taken, the next one again: for a reader that stops at it and hands
        the listing on to another."""
        self._put_back.append(item)

    def close(self) -> None:
        """Stop the producer (a run that ends early leaves no listing running behind it): it
        stops at its next item, or when the page it waits for arrives."""
        self._closed.set()
        self._thread.join(timeout=1.0)

    def remaining(self) -> Iterator[T]:
        """The items from here to the end, each waited for. A method, not `__iter__`: what
        walks into an object's attributes and iterates what it can (FastAPI's JSON encoder,
        on a Prefect flow's parameters) must not take items off the listing."""
        while (item := self.get()) is not DONE:
            yield item  # type: ignore[misc]


def plan_shard(files: Sequence[SourceFile], *, fold_case: bool = False) -> tuple[list[SourceFile], list[ImageRecord]]:
    """Split a shard's inputs into those to segment and those that are errors before any work:
    keys unsafe as output paths, and keys whose mask path another key's takes. An image's mask
    is masks/<key without extension>.png, a raster's (`is_raster_key`) .tif if it turns out
    georeferenced and .png if not; so, of the keys of one stem:
    - the first image in listing order keeps masks/<stem>.png (a.jpg and a.png: a.png is refused);
    - the first raster is segmented (a.tif and a.tiff: a.tiff is refused);
    - a raster beside an image (a.tif beside its quick-look a.jpg) is segmented too, and
      refused once read if it is not georeferenced (`SourceFile.png_mask_taken_by`).
    `iter_shards` keeps the keys of one stem in one shard. With `fold_case` (an OUTPUT where
    A.png and a.png are one file), keys differing only in case collide too, within the shard."""
    todo: list[tuple[SourceFile, str]] = []  # with its stem's PNG mask
    refused: list[ImageRecord] = []
    images: dict[str, str] = {}  # a stem's PNG mask -> the image that keeps it
    rasters: dict[str, str] = {}  # a stem's PNG mask -> the raster segmented under the stem
    for file in files:
        record = ImageRecord(key=file.key, size=file.size, version=file.version)
        try:
            png = mask_key(file.key)
        except ValueError as err:
            record.fail("unsafe_key", str(err))
            refused.append(record)
            continue
        stem = png.casefold() if fold_case else png
        owners = rasters if is_raster_key(file.key) else images
        if stem in owners:
            mask = f"{mask_key(file.key, '.tif')} ({png} if it is not georeferenced)" if owners is rasters else png
            record.fail("mask_collision", f"its mask {mask} would overwrite the mask of {owners[stem]}; rename one of them")
            refused.append(record)
            continue
        owners[stem] = file.key
        todo.append((file, stem))
    # the image may come after the raster in listing order (a.TIF before a.jpg)
    return [replace(file, png_mask_taken_by=images[stem]) if is_raster_key(file.key) and stem in images else file
            for file, stem in todo], refused


# a file this large (a georeferenced raster, an image segmented in windows) is a batch of its
# own: its work takes seconds to minutes, and a batch is one replica's, so a shard of such
# files spreads over every replica instead of queueing eight at a time on one (two 4096 x 4096
# GeoTIFFs of 40 MB and two CPU replicas: BENCHMARKS.md); frames, even 4K PNGs, stay batched
LARGE_FILE_BYTES = 32 * 2**20
# a TIFF this large is a batch of its own too, however well compressed (a JPEG-compressed COG
# of 10,000 pixels a side can be 20 MB): a georeferenced raster is segmented alone whatever
# its batch (`stages.RasterStage`), so batching it only queues the others behind it; a plain
# TIFF frame this large (over a megapixel, uncompressed) goes through the model alone
LARGE_TIFF_BYTES = 4 * 2**20


def batches(files: Sequence[SourceFile], size: int) -> Iterator[list[SourceFile]]:
    """The files in order, `size` to a batch, but each file of more than LARGE_FILE_BYTES,
    and each TIFF of more than LARGE_TIFF_BYTES, in a batch by itself (before the smaller
    files batched so far)."""
    batch: list[SourceFile] = []
    for file in files:
        if file.size > LARGE_FILE_BYTES or (file.size > LARGE_TIFF_BYTES and is_raster_key(file.key)):
            yield [file]
            continue
        batch.append(file)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def place_cpu_replicas(nodes: Sequence[tuple[str, float]], count: int | None, cpus_per_actor: float,
                       driver_node: str | None = None) -> list[tuple[str | None, int]]:
    """For each CPU replica, its node (of `nodes`, (node id, CPUs)) and how many of the run's
    replicas share that node, from which it takes its threads (`replica_threads`).

    A node has room for as many replicas as leave it a CPU for the decode and write tasks.
    Without a `count`, one replica goes on each node with room. Otherwise they are dealt out
    in turn over the nodes with room, each up to its room, the largest nodes first and the
    driver's (a cluster's head, which lists and commits) last: so they share the cores evenly,
    where Ray's default would fill one node before the next. Replicas beyond every node's
    room get no node (None), and Ray places them."""
    cpus = dict(nodes)
    room = {node: int((cpus[node] - 1) // cpus_per_actor) for node in cpus if cpus[node] >= cpus_per_actor + 1}
    order = sorted(room, key=lambda node: (node == driver_node, -cpus[node]))
    placed: list[str] = []
    for turn in range(max(room.values(), default=0)):
        placed += [node for node in order if room[node] > turn]
    placed = placed[: len(order) if count is None else count]
    shared = Counter(placed)
    unplaced = (count or 1) - len(placed)
    fallback = -(-(count or 1) // max(1, len(nodes)))  # spread as evenly as the nodes allow
    return [(node, shared[node]) for node in placed] + [(None, fallback)] * max(0, unplaced)


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


def io_in_replica(policy: str, *, gpu: bool, source_url: str, output_url: str) -> bool:
    """Whether a replica reads, decodes and writes its batches itself (`config.batch_io`).

    Three Ray calls per batch (decode task, replica, write task) overlap a batch's I/O with
    the model, which a GPU and a distant object store need: a GPU replica would otherwise
    wait for its CPU's decoding, and any replica for every request's round trip. A CPU
    replica's I/O is CPU work on the same cores either way, and with files on a filesystem
    it waits for no round trip: there the chain only adds Ray's cost of two tasks, decoded
    pixels through the object store and the records back (a light model runs 11 to 18% more
    frames a second without it: BENCHMARKS.md), so auto runs it all in the replica, as Ray
    Data fuses the operators of a pipeline that can run in one process."""
    if policy != "auto":
        return policy == "replica"
    return not gpu and is_local_url(source_url) and is_local_url(output_url)


@dataclass
class Progress:
    """A run as it goes. The archive is listed while it is segmented: `listed` counts the
    images found so far, and is the total once `listing_done`."""

    run_id: str = ""
    listed: int = 0
    listing_done: bool = False
    images: int = 0
    errors: int = 0
    # images of the shards processed again whose rows and masks were kept: unchanged since
    kept: int = 0
    shards_committed: int = 0
    shards_skipped: int = 0
    finished: bool = False
    started: float = field(default_factory=time.monotonic)
    # time.monotonic() when the replicas had loaded their model: the rate counts from there,
    # as the run summary's does (`RunSummary.images_per_second`)
    ready_at: float | None = None

    @property
    def images_per_second(self) -> float:
        since = self.ready_at if self.ready_at is not None else self.started
        return self.images / max(time.monotonic() - since, 1e-9)

    def describe(self) -> str:
        found = f"of {self.listed}" if self.listing_done else f"of {self.listed}+ found so far"
        kept = f" ({self.kept} unchanged kept)" if self.kept else ""
        return (f"{counted(self.images, 'image')} {found}{kept}, {per_second(self.images_per_second)} img/s, "
                f"{counted(self.errors, 'error')}, {counted(self.shards_committed, 'shard')} committed, "
                f"{self.shards_skipped} up to date")


@dataclass
class RunSummary:
    run_id: str
    source: str
    output: str
    model: str
    weights: str
    # the model's classes in id order, the values of its masks (what `segpipe evaluate` names them by)
    class_names: list[str]
    shards_committed: int
    shards_skipped: int
    images: int
    errors: int
    errors_by_type: dict[str, int]
    non_image_keys: int
    # pixels per class name over the images segmented in this run
    pixels_by_class: dict[str, int]
    retried_batches: int
    # from the run's start until its replicas had loaded their model (0 when none was needed);
    # Ray and the model start with the first shard that needs work, while the listing goes on
    setup_seconds: float
    # where the run happened: a local Ray, or the cluster it joined (NO_CLUSTER: nothing to do)
    ray_cluster: str
    # one entry per model replica: the device it ran on, the GPUs Ray gave it, its torch CPU threads
    replicas: list[dict[str, Any]]
    seconds: float
    # error rows kept, of the shards skipped as up to date and of the unchanged images of the
    # others: a changed setting outside the results' fingerprint (--max-raster-pixels) does not
    # make them work; --redo-errors does
    errors_kept: int = 0
    # images of the shards committed whose rows and masks were kept from their shard's last
    # commit, since they are unchanged (`OutputStore.kept_rows`): not among `images`
    images_kept: int = 0
    # shards OUTPUT held that SOURCE no longer has, removed (`OutputStore.remove_vanished_shards`)
    shards_removed: int = 0
    # of the images, the georeferenced rasters (segmented block by block, or error rows)
    rasters: int = 0
    # with --polygons, the TIFFs without both a CRS and a transform, segmented as plain images (PNG masks)
    plain_tiffs: int = 0
    # the first keys (NAMED_KEYS at most) of the error rows of each reason, and of the plain
    # TIFFs: the summary names them, so that one bad file is found without a query
    error_keys: dict[str, list[str]] = field(default_factory=dict)
    plain_tiff_keys: list[str] = field(default_factory=list)
    # an object store's SOURCE under which nothing at all is listed: the folders beside it of
    # the closest names, the one meant if it was mistyped (`source_hints`)
    similar_sources: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        """Throughput once the replicas were up (setup excluded)."""
        busy = self.seconds - self.setup_seconds
        return self.images / busy if busy > 0 else 0.0

    def as_record(self) -> dict[str, Any]:
        """The run record: every field, and the throughput."""
        return dataclasses.asdict(self) | {"images_per_second": self.images_per_second}


NO_CLUSTER = "no cluster: no shard needed the model"


def record_run(output: Location, summary: RunSummary) -> str:
    """Write OUTPUT/_runs/<run_id>.json, the run's record (overwritten whole on retry); its URI."""
    key = run_record_key(summary.run_id)
    write_atomic(output, key, json.dumps(summary.as_record(), indent=2).encode())
    return output.uri(key)


class ListingUnderway:
    """SOURCE's one listing (`list_source`), stopped by `up_to_date` at the first shard that
    needs work, for the run to go on with rather than list the archive again: the listing from
    that shard on, what it has counted so far, and the shards before it: committed and current
    (their ids, and the error rows each keeps), and committed by `up_to_date` itself, having
    only lost images (their ids, the images they kept and the error rows among those). The run
    takes it over (`run_segmentation`); whoever holds it otherwise closes it."""

    # no __dict__: a Prefect flow's parameters are JSON-encoded for its run's record, and
    # FastAPI's encoder walks an object's vars() and iterates what it finds there, which would
    # take shards off the listing; with slots it gives up, and the record says <ListingUnderway>
    __slots__ = ("config", "counts", "shards", "trimmed", "up_to_date")

    def __init__(self, config: SegmentConfig, shards: Prefetched[Shard], counts: ListingCounts,
                 up_to_date: dict[str, int], trimmed: dict[str, tuple[int, int]]) -> None:
        self.config, self.shards, self.counts, self.up_to_date = config, shards, counts, up_to_date
        self.trimmed = trimmed

    def close(self) -> None:
        self.shards.close()


def up_to_date(config: SegmentConfig) -> dict[str, Any] | ListingUnderway:
    """A run with nothing to do, found out before Ray, Prefect or a model start: when every
    shard of SOURCE is committed in OUTPUT with the same inputs and settings (as the run itself
    decides, `outputs.is_current`), once the shards whose only change is images
    deleted at SOURCE are committed without them (`OutputStore.kept_rows`: every image left
    keeps its rows) and the shards OUTPUT stores and SOURCE no longer has are removed (`OutputStore.remove_vanished_shards`, which refuses a SOURCE that lists
    nothing beside stored shards), or SOURCE has no images at all
    and OUTPUT nothing of it, the run is recorded in OUTPUT/_runs/ and its record returned,
    with `record` its URI, as the segmentation flow returns it. As soon as one shard needs work,
    the listing stopped there (`ListingUnderway`): the run itself then starts and does the
    work, going on with that listing. So a night with new images pays one page and one commit
    marker before the run starts, and the archive is listed once whichever shard needs work.

    `config` is dated, with its storage options resolved. Reads only, but for the record, the
    shards committed without their deleted images and the removal of shards SOURCE no longer has."""
    started = time.monotonic()
    source = open_location(config.source, config.storage_options)
    counts = ListingCounts()
    shards = list_source(source, config.output, shard_by=config.shard_by, shard_size=config.shard_size, counts=counts)
    current: dict[str, int] = {}  # the shards up to date so far: their error rows
    trimmed: dict[str, tuple[int, int]] = {}  # committed here, having only lost images: images and error rows kept
    handed_over = None

    def work(shard: Shard | None) -> ListingUnderway:
        nonlocal handed_over
        if shard is not None:
            shards.put_back(shard)
        handed_over = ListingUnderway(config, shards, counts, current, trimmed)
        return handed_over

    try:
        # with SOURCE: an image of a shard removed below may be in another shard now, which keeps its mask
        store = OutputStore(open_location(config.output, config.storage_options), source)
        if read_bytes(store.location, "_segpipe.json") is not None:
            store.check_layout(source.url, config.shard_by, config.shard_size)  # only reads: the layout is recorded
        elif (first := next(shards.remaining(), None)) is not None:
            return work(first)  # nothing was ever committed there, and SOURCE has a shard: all of it is work
        run = run_info(config, source.url, new_run_id(), model_meta(config))
        for shard in shards.remaining():
            commit = store.read_commit(shard.shard_id)
            if is_current(commit, shard, run, redo_errors=config.redo_errors):
                current[shard.shard_id] = commit.get("errors", 0)
                continue
            kept = store.kept_rows(shard, commit, run, redo_errors=config.redo_errors)
            if kept is None or len(kept) < len(shard.files):
                return work(shard)
            # every image it still has is unchanged (a retention job deleted some): no work for a
            # model; underway while its tables are rewritten, as in a run
            store.mark_underway(shard, commit, run.run_id, ())
            store.commit_shard(shard, [], run, kept)
            trimmed[shard.shard_id] = (len(kept), kept.errors)
        # shards SOURCE no longer has (a folder a retention job deleted), removed here: no work
        # for a model, so no Ray (refused, removing nothing, if SOURCE lists nothing at all)
        removed = store.remove_vanished_shards(set(current) | set(trimmed))
    except (StorageUnavailableError, OSError) as err:
        raise RunError(f"storage unavailable: {type(err).__name__}: {err}") from err
    finally:
        if handed_over is None:
            shards.close()
    skipped, errors_kept = len(current), sum(current.values()) + sum(errors for _, errors in trimmed.values())
    summary = RunSummary(
        run_id=run.run_id, source=source.url, output=store.location.url, model=run.model, weights=run.weights,
        class_names=list(run.class_names), shards_committed=len(trimmed), shards_skipped=skipped, images=0, errors=0,
        errors_by_type={}, images_kept=sum(images for images, _ in trimmed.values()),
        non_image_keys=counts.skipped, pixels_by_class={}, retried_batches=0, setup_seconds=0.0,
        ray_cluster=NO_CLUSTER, replicas=[], seconds=time.monotonic() - started, errors_kept=errors_kept,
        similar_sources=source_hints(source, store.location, skipped + len(trimmed), counts), shards_removed=len(removed),
    )
    return summary.as_record() | {"pixel_share": {}, "record": record_run(store.location, summary)}


def source_hints(source: Location, output: Location, shards_listed: int, counts: ListingCounts) -> list[str]:
    """`RunSummary.similar_sources`: for a SOURCE on an object store that listed no shard and no
    other key, the folders beside it of the closest names (`storage.similar_folders`: one more
    listing, on such a night only). A local SOURCE that does not exist is refused instead.
    A folder named by a date is a night's (`{date}`), which a night without uploads lacks: then
    the folder of the nights is the one that may be mistyped (s3://cams/labls/{date}), when it
    holds nothing either, and the night is named in the folder meant."""
    if source.is_local or shards_listed or counts.skipped:
        return []
    nights, night = parent_folder(source)
    if not DATE_PATTERN.search(night):
        return similar_folders(source, besides=output)
    if holds_files(nights):  # earlier nights are there: this one is not yet
        return []
    return [f"{folder}/{night}" for folder in similar_folders(nights, besides=output)]


# keys the summary names of each kind of error row, and of the plain TIFFs
NAMED_KEYS = 3


def _such_as(keys: Sequence[str], count: int) -> str:
    """The keys of `count` rows, as the summary names them: all of them, or the first few."""
    if not keys:
        return ""
    return f" ({', '.join(keys)}{', ...' if count > len(keys) else ''})"


def summary_lines(s: dict[str, Any]) -> list[str]:
    """A run's summary as the command line prints it and `segpipe serve` logs it, from the
    record the segmentation flow returns (or `up_to_date`'s)."""
    if s["ray_cluster"] == NO_CLUSTER and not s["images"]:  # no image to segment or refuse: no Ray, no model
        # up to date now: those committed without the images deleted at SOURCE are too
        current = s["shards_skipped"] + s["shards_committed"]
        what = (f"{every(current, 'shard')} of {s['source']} {verb_for(current, 'is', 'are')} already up to date "
                f"in {s['output']}" if current else f"no images under {s['source']}")
        if similar := s.get("similar_sources"):  # nothing at all there: a mistyped prefix succeeds every night
            what += f", nor any other key: did you mean {' or '.join(similar)}?"
        nothing = "nothing to segment" if s.get("shards_removed") or s["shards_committed"] else "nothing to do"
        # the record is this night's, of a run that found nothing to do, not that of the run that did the work
        return [f"{nothing}: {what} (this night recorded as run {s['run_id']} in {s['record']})", *_kept_lines(s),
                *_removed_lines(s), *_errors_kept_lines(s)]
    ok = s["images"] - s["errors"]
    lines = [
        f"run {s['run_id']}: {counted(s['images'], 'image')}, {ok} segmented and {counted(s['errors'], 'error')}, "
        f"in {s['seconds']:.1f} s ({s['setup_seconds']:.1f} s to start), {per_second(s['images_per_second'])} images/s",
        f"shards: {s['shards_committed']} committed, {s['shards_skipped']} already up to date; "
        f"{counted(s['non_image_keys'], 'non-image key')} skipped",
    ]
    if s["errors_by_type"]:
        named = s.get("error_keys", {})
        reasons = ", ".join(f"{name} {count}{_such_as(named.get(name, []), count)}"
                            for name, count in sorted(s["errors_by_type"].items(), key=lambda kv: -kv[1]))
        lines.append(f"errors by reason: {reasons} (details: status = 'error' rows of the images table)")
    # each raster is checked alone: all of them together, the setting is the likelier mistake
    if (rasters := s.get("rasters", 0)) and s["errors_by_type"].get("missing_bands") == rasters:
        lines.append("no raster has the bands the run read (--bands, else those the model was trained on): give these "
                     "rasters' own with --bands (1-based)")
    if plain := s.get("plain_tiffs", 0):
        lines.append(f"{counted(plain, 'TIFF')}{_such_as(s.get('plain_tiff_keys', []), plain)} without both a CRS and a "
                     f"transform {verb_for(plain, 'was', 'were')} "
                     f"segmented as {'a plain image' if plain == 1 else 'plain images'}: PNG masks, no polygons or areas "
                     "(sidecar .tfw and .aux.xml files are not read; a raster placed by ground control points or RPCs "
                     "alone takes gdalwarp first)")
    if s["replicas"]:  # none where every image of the run was refused before reading (unsafe keys)
        devices = Counter(r["device"] + _replica_details(r) for r in s["replicas"])
        lines.append(f"model {s['model']} ({s['weights']}) on {counted(len(s['replicas']), 'replica')} in "
                     f"{s['ray_cluster']}: " + ", ".join(f"{n} on {device}" for device, n in devices.items()))
    compiled = [r["compile_seconds"] for r in s["replicas"] if r.get("compile_seconds")]
    if compiled:  # paid inside the run, at each input shape's first batch, once per replica
        # the replicas compile side by side: the rate over the rest of the run, a long night's
        rest = s["seconds"] - s["setup_seconds"] - max(compiled)
        after = f", {per_second(s['images'] / rest)} images/s without it" if rest > 0 and s["images"] else ""
        lines.append(f"compiling the model took {max(compiled):.1f} s of the run{after} (the first batch of each input "
                     "shape, in every run; --no-compile skips it, for a few images)")
    if s["retried_batches"]:
        lines.append(f"{counted(s['retried_batches'], 'batch', 'batches')} sent again after a worker failed")
    lines += _kept_lines(s) + _removed_lines(s) + _errors_kept_lines(s)
    lines.append(f"outputs: {', '.join(s['output'] + '/' + folder for folder in s['folders'])} "
                 f"(run record {s['record']})")
    return lines


def _replica_details(replica: dict[str, Any]) -> str:
    """A replica's threads (on a CPU) and precision, as the summary shows them after its device."""
    details = ([counted(replica["threads"], "thread")] if replica["device"] == "cpu" else []) + \
        ([replica["precision"]] if replica.get("precision") else [])
    return f" ({', '.join(details)})" if details else ""


def _kept_lines(s: dict[str, Any]) -> list[str]:
    """The images of the shards committed that kept their rows and masks, unchanged since."""
    kept = s.get("images_kept", 0)
    if not kept:
        return []
    how = ("their shards only lost images deleted at the source, and were committed without them, with no model"
           if not s["images"] else "only the new and changed images of their shards were segmented")
    return [f"{counted(kept, 'unchanged image')} kept {verb_for(kept, 'its row and mask', 'their rows and masks')} ({how})"]


def _removed_lines(s: dict[str, Any]) -> list[str]:
    """The shards removed because SOURCE no longer has them."""
    removed = s.get("shards_removed", 0)
    if not removed:
        return []
    return [f"removed {counted(removed, 'shard')} that {s['source']} no longer has: "
            "the rows of images deleted there or now in other shards, and the masks of those deleted"]


def _errors_kept_lines(s: dict[str, Any]) -> list[str]:
    """The error rows the shards skipped as up to date keep, and how to retry them."""
    kept = s.get("errors_kept", 0)
    if not kept:
        return []
    return [f"{counted(kept, 'error row')} of unchanged images {verb_for(kept, 'is', 'are')} kept; "
            "--redo-errors segments their images again"]
