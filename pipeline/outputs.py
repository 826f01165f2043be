"""The output layout analysts rely on, and the per-shard commit that keeps it consistent.

    OUTPUT/_segpipe.json                          layout: source, sharding (fixed per OUTPUT)
    OUTPUT/masks/<image key, extension .png>      palette PNG of class ids, the image's size
    OUTPUT/masks/<raster key, extension .tif>     a georeferenced raster's mask: a COG in its CRS
    OUTPUT/confidence/<key, .png or .tif>         with --confidence: the label's probability x 255
    OUTPUT/images/shard=<id>/part-0.parquet       one row per input image (ok or error)
    OUTPUT/class_stats/shard=<id>/part-0.parquet  one row per image and class present
    OUTPUT/polygons/shard=<id>/part-<n>.parquet   with --polygons: class regions, GeoParquet, one file per raster
    OUTPUT/manifest/shard=<id>/part-0.parquet     every input of the shard: key, size, version
    OUTPUT/_commits/<id>.json                     the shard's commit marker
    OUTPUT/_underway/<id>.json                    a shard being processed: its tables' fingerprint, the images it redoes
    OUTPUT/_staging/<run_id>/polygons/            a raster's polygons from its replica until its shard commits

Each table file belongs to exactly one shard and lives at a path fixed by the shard id, so
re-processing a shard replaces its rows by overwriting one object (atomic on object stores,
rename on local disks): a reader sees the old rows or the new ones, never both, never half.
The commit marker is written last, once every input of the shard is accounted for; a shard
without a current marker is processed again on the next run. A shard processed again under the
same settings keeps the rows and masks of its images that have not changed (`KeptRows`), and
segments only the others; while it is processed it has no marker, and its `_underway` record
says what a run stopped then leaves uncertain (`OutputStore.mark_underway`).

What a run stages is removed with its folder, `_staging/<run_id>/`: by the run, once every
shard is committed (`OutputStore.remove_staging`), and else by the next run to open OUTPUT
once the run cannot still be running (`prepare_output`, `OutputStore.remove_abandoned_staging`).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import RunError, SegmentConfig
from .records import (
    STAGING,
    ImageRecord,
    confidence_key_for,
    mask_key,
    polygons_part_key,
    run_record_key,
    staging_folder,
)
from .storage import (
    Location,
    Shard,
    ShardBy,
    StorageUnavailableError,
    files_named_like,
    is_case_insensitive,
    is_image_key,
    last_modified,
    list_files,
    list_folders,
    lists_by_prefix,
    move_atomic,
    open_location,
    read_bytes,
    remove_emptied_folders,
    remove_empty_folder,
    remove_files,
    remove_folder,
    retry_io,
    write_atomic,
)
from .text import counted

log = logging.getLogger(__name__)

# OUTPUT/_underway/<shard id>.json: a shard being processed (`OutputStore.mark_underway`)
UNDERWAY = "_underway"
# 2: masks of georeferenced rasters are COGs, class_stats has `area`, images has
# `confidence_uri`, polygons/ is new; 3: polygons' `area` is their pixels', their files are named
# by raster and carry `bbox`; 4: `area` is the ground's, in m² in every CRS (`geo.GroundArea`)
LAYOUT_FORMAT = "segpipe-output/4"
# a shard is at most a few thousand images; one row group per file keeps scans simple while
# staying far below the sizes (~128 MiB) where readers would want to split it
ROW_GROUP_ROWS = 1 << 20
# Runs on one OUTPUT take no lock and leave no trace while they run: only a run that ends well
# writes its record. A run without one is taken for dead, and its staged files removed, once
# neither its start (in its id) nor any file it staged is younger than this. A live run's
# staged file waits only for the rest of its shard, so this is far longer than a shard takes,
# and short enough that a nightly run killed tonight costs storage for three nights at most.
STAGING_ABANDONED_AFTER = dt.timedelta(days=3)

IMAGES_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("run_date", pa.date32(), nullable=False),
    pa.field("shard_id", pa.string(), nullable=False),
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("image_uri", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error_type", pa.string()),
    pa.field("error", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("bytes", pa.int64(), nullable=False),
    pa.field("source_version", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("weights", pa.string(), nullable=False),
    pa.field("num_classes", pa.int32(), nullable=False),
    pa.field("crf", pa.bool_(), nullable=False),
    pa.field("mask_uri", pa.string()),
    pa.field("confidence_uri", pa.string()),
    pa.field("decode_seconds", pa.float32()),
    pa.field("inference_seconds", pa.float32()),
    pa.field("encode_seconds", pa.float32()),
    pa.field("seconds", pa.float32(), nullable=False),
])

CLASS_STATS_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("run_date", pa.date32(), nullable=False),
    pa.field("shard_id", pa.string(), nullable=False),
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("class_id", pa.int32(), nullable=False),
    pa.field("class_name", pa.string(), nullable=False),
    pa.field("pixel_count", pa.int64(), nullable=False),
    pa.field("fraction", pa.float64(), nullable=False),
    pa.field("mean_confidence", pa.float32(), nullable=False),
    pa.field("components", pa.int32(), nullable=False),
    # the class's pixels' area on the ground (`geo.GroundArea`: m², pixels for a local CRS);
    # null for images without georeferencing
    pa.field("area", pa.float64()),
])

MANIFEST_SCHEMA = pa.schema([
    pa.field("shard_id", pa.string(), nullable=False),
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("bytes", pa.int64(), nullable=False),
    pa.field("source_version", pa.string(), nullable=False),
])


class LayoutMismatchError(ValueError):
    """OUTPUT was written from another source or with other sharding."""


@dataclass(frozen=True)
class RunInfo:
    """What every row of one run shares."""

    run_id: str
    run_date: dt.date
    model: str
    weights: str
    num_classes: int
    class_names: tuple[str, ...]
    crf: bool
    source_url: str
    # changes whenever results would differ (model, weights, classes, CRF): shards committed
    # under another fingerprint are processed again
    fingerprint: str


@dataclass(frozen=True)
class KeptRows:
    """What a shard processed again under the same settings keeps of its tables: the rows
    (images, class_stats) of the images unchanged since, whose masks, confidence masks and
    polygons stay as they are (`OutputStore.kept_rows`)."""

    keys: frozenset[str]
    images: pa.Table
    class_stats: pa.Table

    @property
    def errors(self) -> int:
        return sum(status != "ok" for status in self.images.column("status").to_pylist())

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class OpenShard:
    """A shard being processed: its records so far and its batches still out. It is committed
    once every batch is queued and back, never earlier."""

    shard: Shard
    records: list[ImageRecord]
    # its marker when it was opened (None: it had none), and the keys it segments: the marker
    # gives way to its underway record before its first mask or its tables are written
    # (`OutputStore.mark_underway`)
    commit: dict[str, Any] | None = None
    segmenting: tuple[str, ...] = ()
    marked: bool = False
    kept: KeptRows | None = None
    outstanding: int = 0
    # True until every batch of the shard is queued: the first batches may come back while
    # later ones are still being queued, and the shard must not be committed then
    queueing: bool = True

    def complete(self) -> bool:
        return not self.queueing and self.outstanding == 0


def table_key(table: str, shard_id: str) -> str:
    return f"{table}/shard={shard_id}/part-0.parquet"


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS, write_statistics=True)
    return sink.getvalue()


def is_current(commit: dict[str, Any] | None, shard: Shard, run: RunInfo, *, redo_errors: bool = False) -> bool:
    """Whether a shard's commit marker (None: it has none) is of the same inputs and the same
    settings (and, with `redo_errors`, of no error rows)."""
    return (
        commit is not None
        and commit.get("manifest_sha256") == shard.manifest_digest()
        and commit.get("fingerprint") == run.fingerprint
        and not (redo_errors and commit.get("errors", 0) > 0)
    )


class OutputStore:
    """Reads and writes one OUTPUT location following the layout above."""

    def __init__(self, location: Location, source: Location | None = None) -> None:
        self.location = location
        # where an image that left a shard may still be: with the shards of a directory split
        # at --shard-size, a deletion or an addition moves images to a neighbouring shard, whose
        # commit owns their masks from then on (None: an image that left a shard was deleted)
        self.source = source
        self._case_insensitive: bool | None = None
        # the layout `check_layout` found unrecorded: recorded with the first shard committed
        self._unrecorded_layout: dict[str, Any] | None = None

    @property
    def case_insensitive(self) -> bool:
        """Whether mask paths differing only in case are one file here (asked once)."""
        if self._case_insensitive is None:
            self._case_insensitive = is_case_insensitive(self.location)
        return self._case_insensitive

    def check_layout(self, source_url: str, shard_by: ShardBy, shard_size: int) -> None:
        """Refuse a source or sharding other than the one OUTPUT records, since other shard
        boundaries would leave rows of the old shards behind as duplicates. An OUTPUT that
        records none gets this one with its first shard committed (`commit_shard`): a run
        stopped before that, or refused as it starts, leaves nothing that binds the next."""
        layout = {"format": LAYOUT_FORMAT, "source": source_url, "shard_by": shard_by, "shard_size": shard_size}
        if not self._same_layout(layout):
            self._unrecorded_layout = layout

    def _same_layout(self, layout: dict[str, Any]) -> bool:
        """Whether OUTPUT records `layout` (False: it records none); LayoutMismatchError when
        it records another."""
        existing = read_bytes(self.location, "_segpipe.json")
        if existing is None:
            return False
        found = json.loads(existing)
        for name in ("format", "source", "shard_by", "shard_size"):
            if found.get(name) != layout[name]:
                raise LayoutMismatchError(
                    f"{self.location.uri('_segpipe.json')} records {name}={found.get(name)!r} but this run has "
                    f"{name}={layout[name]!r}; use the same value or a new OUTPUT"
                )
        return True

    def read_commit(self, shard_id: str) -> dict[str, Any] | None:
        data = read_bytes(self.location, f"_commits/{shard_id}.json")
        return json.loads(data) if data is not None else None

    def current_commit(self, shard: Shard, run: RunInfo, *, redo_errors: bool = False) -> dict[str, Any] | None:
        """The shard's commit marker when the shard is committed with the same inputs and the
        same settings (and, with `redo_errors`, without error rows); else None."""
        commit = self.read_commit(shard.shard_id)
        return commit if is_current(commit, shard, run, redo_errors=redo_errors) else None

    def kept_rows(self, shard: Shard, commit: dict[str, Any] | None, run: RunInfo, *,
                  redo_errors: bool = False) -> KeptRows | None:
        """What the shard, about to be processed again, keeps of its tables: the rows of each
        image with the same key, size and version as then, whose stem's keys are all so and are
        the same keys as then (they are planned together, `run.plan_shard`), and of whose stem
        no run stopped since may have segmented an image (its underway record's `redoing`: the
        stem's mask may be of another version, or another image, now). With `redo_errors`,
        error rows are not kept. `commit`: its marker (None: it has none, and its underway
        record, if any, tells whose its tables are). None where its tables were written with
        other settings, or cannot be read as this layout's: every image is segmented."""
        underway = self.read_underway(shard.shard_id)
        fingerprint = (commit or underway or {}).get("fingerprint")
        if fingerprint != run.fingerprint:
            return None
        tables = {}
        for name, schema in (("images", IMAGES_SCHEMA), ("class_stats", CLASS_STATS_SCHEMA)):
            data = read_bytes(self.location, table_key(name, shard.shard_id))
            if data is None:
                return None
            try:
                tables[name] = pq.read_table(io.BytesIO(data)).select(schema.names).cast(schema)
            except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                log.warning("shard %s: its rows cannot be kept (%s: %s); all its images are segmented again",
                            shard.shard_id, type(err).__name__, err)
                return None
        before = {row["image_id"]: row for row in tables["images"].select(["image_id", "bytes", "source_version", "status"]).to_pylist()}
        # the mask paths a stopped run may have written: of the images it segmented, which may
        # share one with an image of their stem (a.jpg segmented where a.png had a row)
        redone = set(self._keys_by_stem((underway or {}).get("redoing", ())))
        stems_now, stems_then = self._keys_by_stem(f.key for f in shard.files), self._keys_by_stem(before)
        unchanged = {f.key for f in shard.files
                     if (row := before.get(f.key)) is not None and (row["bytes"], row["source_version"]) == (f.size, f.version)
                     and not (redo_errors and row["status"] != "ok")}
        kept = frozenset(key for stem, keys in stems_now.items()
                         if keys <= unchanged and keys == stems_then.get(stem) and stem not in redone for key in keys)
        keep = {name: table.filter(pc.is_in(table.column("image_id"), value_set=pa.array(sorted(kept), pa.string())))
                for name, table in tables.items()}
        return KeptRows(kept, keep["images"], keep["class_stats"])

    def _keys_by_stem(self, keys: Iterable[str]) -> dict[str, set[str]]:
        """Keys by the PNG mask path of their stem, folded as OUTPUT folds names; unsafe keys,
        which have no mask, are left out."""
        fold = str.casefold if self.case_insensitive else str
        by_stem: dict[str, set[str]] = {}
        for key in keys:
            try:
                by_stem.setdefault(fold(mask_key(key)), set()).add(key)
            except ValueError:
                continue
        return by_stem

    def commit_shard(self, shard: Shard, records: Sequence[ImageRecord], run: RunInfo,
                     kept: KeptRows | None = None) -> None:
        """Write the shard's tables, remove the masks its images no longer have, then write its
        manifest and, last, its marker. Every input must have a record, or rows kept from the
        last commit (`kept`).

        In that order a commit stopped at any point is finished by the next run: until the
        manifest is replaced, the old one still names the images whose masks must go, and until
        the marker is written the shard is not up to date."""
        kept_keys = kept.keys if kept is not None else frozenset()
        by_key = {r.key: r for r in records}
        missing = [f.key for f in shard.files if f.key not in by_key and f.key not in kept_keys]
        if missing or len(by_key) + len(kept_keys) != len(shard.files) or len(records) != len(by_key) or by_key.keys() & kept_keys:
            raise RuntimeError(
                f"shard {shard.shard_id}: {len(records)} records and {len(kept_keys)} kept rows for {len(shard.files)} "
                f"inputs (missing: {missing[:5]}); refusing to commit"
            )
        ordered = [by_key[f.key] for f in shard.files if f.key in by_key]
        if self._unrecorded_layout is not None:
            # asked again: another run may have recorded its own since this one checked
            if not self._same_layout(self._unrecorded_layout):
                write_atomic(self.location, "_segpipe.json", json.dumps(self._unrecorded_layout, indent=2).encode())
            self._unrecorded_layout = None
        previous_keys = self._previous_keys(shard.shard_id)
        # images first: `stored_shards` finds a new shard by it, should the commit stop here
        tables = {
            "images": self._images_table(shard.shard_id, ordered, run),
            "class_stats": self._class_stats_table(shard.shard_id, ordered, run),
        }
        if kept is not None:
            position = {f.key: i for i, f in enumerate(shard.files)}
            for name, rows in (("images", kept.images), ("class_stats", kept.class_stats)):
                table = pa.concat_tables([tables[name], rows])
                # in the shard's order, as a shard segmented whole is (a stable sort: an image's
                # classes stay in id order)
                positions = [position[key] for key in table.column("image_id").to_pylist()]
                # typed: an empty list would be an array of nulls, which `take` refuses
                tables[name] = table.take(pa.array(sorted(range(table.num_rows), key=positions.__getitem__), pa.int64()))
        for name, table in tables.items():
            write_atomic(self.location, table_key(name, shard.shard_id), _parquet_bytes(table))
        self._write_polygons(shard.shard_id, ordered, kept_keys, reprocessed=bool(previous_keys))
        # also in a shard new here, which may hold images that moved in from another (a
        # folder's chunks shifted), with masks of another kind or settings than it writes
        self._remove_stale_masks((previous_keys | {r.key for r in ordered}) - kept_keys, ordered)
        write_atomic(self.location, table_key("manifest", shard.shard_id), _parquet_bytes(self._manifest_table(shard)))
        ok = sum(r.ok for r in ordered) + (len(kept) - kept.errors if kept is not None else 0)
        marker = {
            "shard_id": shard.shard_id,
            "run_id": run.run_id,
            "committed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "manifest_sha256": shard.manifest_digest(),
            "fingerprint": run.fingerprint,
            "images": len(shard.files),
            "ok": ok,
            "errors": len(shard.files) - ok,
            "kept": len(kept_keys),
        }
        write_atomic(self.location, f"_commits/{shard.shard_id}.json", json.dumps(marker, indent=2).encode())
        # after the marker: stopped before this, the shard is committed and its record only
        # names images the next change of the shard segments again
        remove_files(self.location, [f"{UNDERWAY}/{shard.shard_id}.json"])
        remove_empty_folder(self.location, UNDERWAY)  # on a local disk, the last record gone

    def read_underway(self, shard_id: str) -> dict[str, Any] | None:
        data = read_bytes(self.location, f"{UNDERWAY}/{shard_id}.json")
        return json.loads(data) if data is not None else None

    def mark_underway(self, shard: Shard, commit: dict[str, Any] | None, run_id: str, segmenting: Iterable[str]) -> None:
        """Before any of a shard's masks or tables is written: remove its marker (`commit`;
        None: it has none), so that a run stopped halfway leaves the shard not up to date, then
        record it as underway (OUTPUT/_underway/<id>.json) with the fingerprint of its tables,
        and the images whose masks may be written before it commits again (`redoing`): those
        this run segments, those its tables hold that it no longer has (moved to another
        shard, which may segment them now), and those the record named already (a run stopped
        before committing them). The next run keeps no row of their stems (`kept_rows`: their
        masks may be of a version since reverted), and the shard's commit, or its removal,
        removes their masks if no image holds them then. Stopped between the two writes, the
        shard is left with neither: every image is segmented again."""
        underway = self.read_underway(shard.shard_id) or {}
        fingerprint = (commit or underway).get("fingerprint")  # whose the tables are
        left = self._manifest_keys(shard.shard_id) - {f.key for f in shard.files}
        redoing = sorted({*segmenting, *left, *underway.get("redoing", ())})
        if commit is not None:
            remove_files(self.location, [f"_commits/{shard.shard_id}.json"])
        record = {"shard_id": shard.shard_id, "run_id": run_id, "fingerprint": fingerprint, "redoing": redoing}
        write_atomic(self.location, f"{UNDERWAY}/{shard.shard_id}.json", json.dumps(record, indent=2).encode())

    def stored_shards(self) -> set[str]:
        """The ids of the shards stored here: committed (a marker), underway (a record, written
        before any of its masks), or with tables written by a run stopped before it committed
        them (images, the first one `commit_shard` writes; the manifest, which outlives the
        marker a run removed)."""
        committed = {name.removesuffix(".json") for folder in ("_commits", UNDERWAY)
                     for name in list_files(self.location, folder) if name.endswith(".json")}
        tables = {name.removeprefix("shard=") for table in ("images", "manifest")
                  for name in list_folders(self.location, table) if name.startswith("shard=")}
        return committed | tables

    def vanished_shards(self, listed: set[str]) -> list[str]:
        """The shards stored here that SOURCE's complete listing (`listed`, the ids of all its
        shards) no longer has. A SOURCE that lists no image at all while shards are stored
        here is refused (RunError), not taken at its word: more likely a volume not mounted,
        or a prefix emptied by mistake, than an archive deleted."""
        vanished = sorted(self.stored_shards() - listed)
        if vanished and not listed:
            raise RunError(f"SOURCE lists no images, but {self.location.url} holds {counted(len(vanished), 'shard')} of it; "
                           "nothing was removed: if SOURCE is right and its images were deleted, delete OUTPUT")
        return vanished

    def remove_vanished_shards(self, listed: set[str]) -> list[str]:
        """Remove the `vanished_shards`: a folder deleted at the source, or one whose images now
        fill fewer chunks of --shard-size. Their rows (images, class_stats, manifest, polygons)
        would otherwise stay beside the shards that now hold their images, and the masks of
        images deleted at the source would outlive them. The marker goes last, so a run
        stopped halfway leaves it for the next one to finish. The ids of the shards removed."""
        vanished = self.vanished_shards(listed)
        for shard_id in vanished:
            keys = self._previous_keys(shard_id)
            self._remove_stale_masks(keys, [])
            for table in ("images", "class_stats", "manifest", "polygons"):
                remove_folder(self.location, f"{table}/shard={shard_id}")
            remove_files(self.location, [f"_commits/{shard_id}.json", f"{UNDERWAY}/{shard_id}.json"])
            remove_empty_folder(self.location, UNDERWAY)
            # at INFO: the run's summary says how many were removed, and why
            log.info("removed shard %s, which SOURCE no longer has: its %s were deleted there or are in other "
                     "shards now", shard_id, counted(len(keys), "image"))
        return vanished

    def _write_polygons(self, shard_id: str, records: Sequence[ImageRecord], kept: frozenset[str], *,
                        reprocessed: bool) -> None:
        """OUTPUT/polygons/shard=<id>/part-<digest of the raster's key>.parquet: each raster's
        GeoParquet file (a file has one CRS, and the rasters of a shard may lie in several),
        moved from where its replica staged it over the file of the same raster a previous
        attempt committed; then that attempt's files of other rasters are removed, but for
        those of the rasters whose rows are `kept`, so the shard's rows are exactly its images'."""
        written = {polygons_part_key(shard_id, key) for key in kept}
        for record in records:
            if record.polygons_key:
                part = polygons_part_key(shard_id, record.key)
                move_atomic(self.location, record.polygons_key, part)
                written.add(part)
        if not reprocessed:
            return
        folder = f"polygons/shard={shard_id}"
        self.location.fs.invalidate_cache(self.location.path(folder))
        try:
            previous = retry_io(self.location.uri(folder), self.location.fs.ls, self.location.path(folder), detail=False)
        except FileNotFoundError:
            return
        keys = (path[len(self.location.root) + 1:] for path in previous)
        stale = [key for key in keys if key not in written]
        remove_files(self.location, stale)
        remove_emptied_folders(self.location, stale)

    def remove_staging(self, run_id: str) -> None:
        """Delete OUTPUT/_staging/<run_id>/, for a run that has committed every shard and has
        no batch in flight: what is left there belongs to no shard (the polygons of a raster
        whose batch failed for good after staging them, and became an error row; on local
        disks, the folders the commits emptied)."""
        self._remove_staging_folder(run_id, "its shards are committed")

    def remove_abandoned_staging(self, *, abandoned_after: dt.timedelta = STAGING_ABANDONED_AFTER,
                                 now: dt.datetime | None = None) -> list[str]:
        """Delete the staging folder of every run that cannot still be running; the ids of
        those runs.

        Runs on one OUTPUT do not coordinate (no lock, no lease), so a run is taken for
        finished only on evidence:
        - it has a record (OUTPUT/_runs/<run_id>.json): written once the run has committed
          every shard, so none of its staged files will be moved again; or
        - it left no record, and nothing of it is younger than `abandoned_after`: neither its
          start, in its id, nor the newest file it staged. A killed run leaves no record; a
          live one keeps staging a file with each raster, and a file waits only for the rest
          of its shard to commit.
        A folder whose name is not a run id was not made by segpipe, and is left alone.

        Housekeeping never stops a run: a folder that cannot be listed or removed is logged,
        and tried again by the next run."""
        now = now or dt.datetime.now(dt.UTC)
        removed = []
        try:
            run_ids = list_folders(self.location, STAGING)
        except (OSError, StorageUnavailableError) as err:
            log.warning("cannot list %s to remove abandoned staged files (%s: %s); the next run tries again",
                        self.location.uri(STAGING), type(err).__name__, err)
            return removed
        for run_id in run_ids:
            started = _run_started(run_id)
            if started is None:
                log.warning("%s is not named by a run id; left alone", self.location.uri(staging_folder(run_id)))
                continue
            try:
                if read_bytes(self.location, run_record_key(run_id)) is not None:
                    why = "the run has finished (it has a record)"
                else:
                    staged = last_modified(self.location, staging_folder(run_id))
                    last_sign_of_life = max(started, staged or started)
                    if now - last_sign_of_life < abandoned_after:
                        continue  # may still be running
                    why = f"the run left no record and nothing since {last_sign_of_life:%Y-%m-%d %H:%M} UTC"
            except (OSError, StorageUnavailableError) as err:
                log.warning("cannot tell whether run %s has finished (%s: %s); its staged files stay",
                            run_id, type(err).__name__, err)
                continue
            if self._remove_staging_folder(run_id, why):
                removed.append(run_id)
        return removed

    def _remove_staging_folder(self, run_id: str, why: str) -> bool:
        folder = staging_folder(run_id)
        try:
            remove_folder(self.location, folder)
        except (OSError, StorageUnavailableError) as err:
            log.warning("cannot remove %s (%s: %s); the next run tries again",
                        self.location.uri(folder), type(err).__name__, err)
            return False
        log.info("removed %s: %s", self.location.uri(folder), why)
        # the last run's folder gone, _staging/ itself would stay in OUTPUT, empty, for good
        remove_empty_folder(self.location, STAGING)
        return True

    def _previous_keys(self, shard_id: str) -> set[str]:
        """The images whose masks the shard may have left: those of its manifest, and those its
        underway record names (`mark_underway`: segmented by a run stopped before it committed
        them, or new images of a shard never committed)."""
        return self._manifest_keys(shard_id) | set((self.read_underway(shard_id) or {}).get("redoing", ()))

    def _manifest_keys(self, shard_id: str) -> set[str]:
        """Inputs of the shard's last (possibly uncommitted) commit: its manifest's, or for a
        shard whose first commit stopped before its manifest, its images table's."""
        for table in ("manifest", "images"):
            if (data := read_bytes(self.location, table_key(table, shard_id))) is not None:
                return set(pq.read_table(io.BytesIO(data), columns=["image_id"]).column("image_id").to_pylist())
        return set()

    def _remove_stale_masks(self, keys: set[str], records: Sequence[ImageRecord]) -> None:
        """Delete the mask paths (masks/ and confidence/, .png and .tif) of `keys` that no
        record of `records` (the shard's) wrote, so that no mask outlives its row: of images
        that fail now, changed kind (a TIFF that gained a CRS has a .tif mask now) or settings
        (--confidence off), or left the shard deleted at the source. A key that left the
        shard is left alone while SOURCE holds an image of its stem: itself, moved to another
        shard, or one beside it (a.tif beside a deleted a.jpg), whose shard owns the stem's
        masks (`iter_shards` keeps a stem's keys in one shard)."""
        fold = str.casefold if self.case_insensitive else str  # where A.png and a.png are one file
        written = {fold(k) for r in records for k in (r.mask_key, r.confidence_key) if k}
        current = {r.key for r in records}
        in_source = self._stems_in_source(keys - current)
        stale = []
        for key in sorted(keys):
            try:
                candidates = [make(key, extension) for make in (mask_key, confidence_key_for) for extension in (".png", ".tif")]
            except ValueError:  # an unsafe key never had a mask
                continue
            if key not in current and fold(posixpath.splitext(key)[0]) in in_source:
                continue
            stale += [candidate for candidate in candidates if fold(candidate) not in written]
        remove_files(self.location, stale)
        remove_emptied_folders(self.location, stale)

    def _stems_in_source(self, keys: set[str]) -> set[str]:
        """The stems (keys but for their extension) of `keys` that SOURCE holds an image of,
        folded as OUTPUT folds names; none without a SOURCE. On S3, one listing of the few
        keys that begin with each stem; elsewhere, and to compare names folded, one listing
        of each folder."""
        if self.source is None or not keys:
            return set()
        fold = str.casefold if self.case_insensitive else str
        stems = {posixpath.splitext(key)[0] for key in keys}
        if lists_by_prefix(self.source) and not self.case_insensitive:
            starts = {f"{stem}." for stem in stems}
        else:
            starts = {f"{stem.rpartition('/')[0]}/" if "/" in stem else "" for stem in stems}
        found = {fold(posixpath.splitext(k)[0]) for start in sorted(starts) for k in files_named_like(self.source, start)
                 if is_image_key(k)}
        return {fold(stem) for stem in stems} & found

    def _manifest_table(self, shard: Shard) -> pa.Table:
        return pa.Table.from_pylist(
            [{"shard_id": shard.shard_id, "image_id": f.key, "bytes": f.size, "source_version": f.version} for f in shard.files],
            schema=MANIFEST_SCHEMA,
        )

    def _images_table(self, shard_id: str, records: Sequence[ImageRecord], run: RunInfo) -> pa.Table:
        rows = []
        for r in records:
            seconds = r.seconds
            rows.append({
                "run_id": run.run_id, "run_date": run.run_date, "shard_id": shard_id,
                "image_id": r.key, "image_uri": f"{run.source_url}/{r.key}",
                "status": "ok" if r.ok else "error", "error_type": r.error_type, "error": r.error,
                "width": r.width, "height": r.height, "bytes": r.size, "source_version": r.version,
                "model": run.model, "weights": run.weights, "num_classes": run.num_classes, "crf": run.crf,
                "mask_uri": self.location.uri(r.mask_key) if r.mask_key else None,
                "confidence_uri": self.location.uri(r.confidence_key) if r.confidence_key else None,
                "decode_seconds": seconds.decode, "inference_seconds": seconds.inference,
                "encode_seconds": seconds.encode, "seconds": seconds.total,
            })
        return pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA)

    def _class_stats_table(self, shard_id: str, records: Sequence[ImageRecord], run: RunInfo) -> pa.Table:
        columns: dict[str, list[Any]] = {name: [] for name in CLASS_STATS_SCHEMA.names}
        for r in records:
            if r.stats is None:
                continue
            n = len(r.stats)
            columns["run_id"] += [run.run_id] * n
            columns["run_date"] += [run.run_date] * n
            columns["shard_id"] += [shard_id] * n
            columns["image_id"] += [r.key] * n
            columns["class_id"] += r.stats.class_id.tolist()
            columns["class_name"] += [run.class_names[c] for c in r.stats.class_id]
            columns["pixel_count"] += r.stats.pixel_count.tolist()
            columns["fraction"] += r.stats.fraction.tolist()
            columns["mean_confidence"] += r.stats.mean_confidence.tolist()
            columns["components"] += r.stats.components.tolist()
            columns["area"] += r.stats.area.tolist() if r.stats.area is not None else [None] * n
        return pa.table(columns, schema=CLASS_STATS_SCHEMA)


def _run_started(run_id: str) -> dt.datetime | None:
    """When a run started, from its id (`pipeline.run.new_run_id`: 20261122T040000Z-1a2b3c);
    None for a name that is not a run id."""
    stamp, dash, suffix = run_id.partition("-")
    if not dash or not suffix:
        return None
    try:
        return dt.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return None


def class_names_of_masks(url: str, storage_options: dict[str, Any] | None = None) -> tuple[str, ...] | None:
    """The class names, in id order, of the masks under `url` when it is the masks/ folder of
    a segpipe OUTPUT: those of the newest run recorded there (`RunSummary.class_names`), the
    model whose ids the masks hold. None for any other folder, for an OUTPUT whose runs were
    recorded without them (before segpipe recorded them), and where OUTPUT's records cannot
    be read (logged): the names are a convenience, never a reason to fail an evaluation."""
    head, _, last = url.rstrip("/").rpartition("/")
    if last != mask_key("x").partition("/")[0]:
        return None
    try:
        output = open_location(head or ".", storage_options)
        if read_bytes(output, "_segpipe.json") is None:
            return None
        # run ids begin with their start (20261122T040000Z-...): the newest record is the last
        for name in reversed(list_files(output, posixpath.dirname(run_record_key("x")))):
            run_id = name.removesuffix(".json")
            if not name.endswith(".json") or _run_started(run_id) is None:
                continue
            try:
                record = json.loads(read_bytes(output, run_record_key(run_id)) or b"{}")
            except ValueError:  # not a record segpipe wrote whole: the run before it may name them
                continue
            if isinstance(record, dict) and record.get("class_names"):
                return tuple(record["class_names"])
    except (OSError, StorageUnavailableError) as err:
        log.warning("cannot read the run records beside %s (%s: %s); its classes are named class_<id>",
                    url, type(err).__name__, err)
    return None


def prepare_output(config: SegmentConfig, source: Location) -> OutputStore:
    """Open OUTPUT, check the layout it records (SOURCE and sharding; recorded with the first
    shard committed), and remove what runs that were killed before their shards committed left
    staged there."""
    output = open_location(config.output, config.storage_options)
    store = OutputStore(output, source)
    try:
        store.check_layout(source.url, config.shard_by, config.shard_size)
    except (OSError, StorageUnavailableError) as err:
        raise RunError(f"cannot read output {output.url}: {type(err).__name__}: {err}") from err
    # once the OUTPUT is known to be this SOURCE's, and before this run stages anything: a
    # killed run never comes back for its staged files, so the next run to open OUTPUT does
    store.remove_abandoned_staging()
    return store
