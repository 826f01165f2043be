"""OUTPUT/_staging/<run_id>/: what runs stage is removed once they cannot still be running (a
run that has its record, or one with no sign of life for STAGING_ABANDONED_AFTER), and never
what a live run or a commit still needs. On a local folder and on S3 (moto's server)."""

from __future__ import annotations

import datetime as dt
import io
import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import outputs
from pipeline.config import SegmentConfig
from pipeline.outputs import STAGING_ABANDONED_AFTER, OutputStore, RunInfo, prepare_output
from pipeline.records import (
    ImageRecord,
    polygons_part_key,
    run_record_key,
    staged_polygons_key,
    staging_folder,
)
from pipeline.run import new_run_id
from pipeline.storage import Location, Shard, SourceFile, open_location, read_bytes, write_atomic

NOW = dt.datetime.now(dt.UTC)
LONG_AGO = NOW - STAGING_ABANDONED_AFTER - dt.timedelta(days=2)


@pytest.fixture(params=["local", "s3"])
def output(request: pytest.FixtureRequest, tmp_path) -> tuple[str, dict]:
    """(OUTPUT URL, storage options): a local folder, or a prefix of a fresh moto bucket."""
    if request.param == "local":
        return str(tmp_path / "out"), {}
    bucket, options = request.getfixturevalue("s3_bucket")
    return f"{bucket}/out", options


def _stage(location: Location, run_id: str, image_key: str) -> str:
    """Stage a raster's polygons as a replica does: a Parquet file at its staged key."""
    sink = io.BytesIO()
    pq.write_table(pa.table({"run_id": [run_id], "image_id": [image_key]}), sink)
    key = staged_polygons_key(run_id, image_key)
    write_atomic(location, key, sink.getvalue())
    return key


def _age(location: Location, key: str, when: dt.datetime) -> None:
    """Make a local file look written at `when` (S3 sets LastModified itself)."""
    os.utime(location.path(key), (when.timestamp(), when.timestamp()))


def _record(location: Location, run_id: str) -> None:
    """The record a run writes once it has committed every shard (pipeline.run.record_run)."""
    write_atomic(location, run_record_key(run_id), b'{"run_id": "%s"}' % run_id.encode())


def _commit_raster(store: OutputStore, run_id: str, image_key: str = "survey/a.tif") -> str:
    """Stage one raster's polygons and commit its shard; the committed part's key."""
    staged = _stage(store.location, run_id, image_key)
    shard = Shard("s1", (SourceFile(image_key, 10, "v1"),))
    run = RunInfo(run_id=run_id, run_date=NOW.date(), model="m", weights="none", num_classes=2,
                  class_names=("a", "b"), crf=False, source_url="/src", fingerprint="f")
    store.commit_shard(shard, [ImageRecord(key=image_key, size=10, version="v1", polygons_key=staged)], run)
    return polygons_part_key("s1", image_key)


def _staged_runs(location: Location) -> set[str]:
    """The names under OUTPUT/_staging/ holding anything (folders included), asked of the
    filesystem itself."""
    root = location.path("_staging")
    location.fs.invalidate_cache()
    found = location.fs.find(root, withdirs=True)
    return {path[len(root) + 1:].split("/")[0] for path in found if path != root}


def _prepare(url: str, options: dict) -> OutputStore:
    config = SegmentConfig(source="/src", output=url, weights="none", num_classes=2, storage_options=options)
    return prepare_output(config, open_location("/src"))


def test_opening_output_removes_the_staging_of_dead_runs_and_keeps_live_ones_local(tmp_path):
    """Every case of the rule, with file ages made up on a local folder: a killed run's old
    files go, a finished run's go at once, a run that staged a file lately stays whatever its
    start, a run just started stays with nothing staged yet; committed polygons stay."""
    url = str(tmp_path / "out")
    store = OutputStore(open_location(url))
    location = store.location

    committer = new_run_id(LONG_AGO)  # committed its shard, then was killed: no record
    part = _commit_raster(store, committer)
    committed = read_bytes(location, part)
    assert os.path.isdir(location.path(staging_folder(committer)))  # emptied, not removed, by the commit

    killed = new_run_id(LONG_AGO)
    _age(location, _stage(location, killed, "a.tif"), LONG_AGO)
    _age(location, _stage(location, killed, "b.tif"), LONG_AGO + dt.timedelta(hours=5))

    finished = new_run_id(NOW - dt.timedelta(hours=1))  # recent, but its record says it is over
    _stage(location, finished, "lost.tif")  # a raster whose batch was lost after staging
    _record(location, finished)

    long_running = new_run_id(LONG_AGO)  # started long ago, still staging
    _age(location, _stage(location, long_running, "old.tif"), LONG_AGO)
    fresh = _stage(location, long_running, "new.tif")

    just_started = new_run_id(NOW)
    os.makedirs(location.path(f"{staging_folder(just_started)}/polygons"))

    os.makedirs(location.path("_staging/not-a-run"))

    _prepare(url, {})

    assert _staged_runs(location) == {long_running, just_started, "not-a-run"}
    assert read_bytes(location, fresh) is not None
    assert len(location.fs.find(location.path(staging_folder(long_running)))) == 2
    assert read_bytes(location, part) == committed

    # the same runs, three days on: the long run has shown no sign of life since, and the
    # run that had just started never staged anything
    later = dt.datetime.now(dt.UTC) + STAGING_ABANDONED_AFTER
    assert sorted(store.remove_abandoned_staging(now=later)) == sorted([long_running, just_started])
    assert _staged_runs(location) == {"not-a-run"}
    assert read_bytes(location, part) == committed


def test_opening_output_removes_the_staging_of_dead_runs_and_keeps_live_ones_s3(s3_bucket):
    """The same rule on S3, where a staged file's age is its LastModified: a finished run's
    files go at once, a run that staged a file just now stays (however old its id) until it
    has shown no sign of life for STAGING_ABANDONED_AFTER; committed polygons stay."""
    bucket, options = s3_bucket
    url = f"{bucket}/out"
    store = OutputStore(open_location(url, options))
    location = store.location

    part = _commit_raster(store, new_run_id(NOW - dt.timedelta(hours=2)))
    committed = read_bytes(location, part)
    finished = new_run_id(NOW - dt.timedelta(hours=1))
    _stage(location, finished, "lost.tif")
    _record(location, finished)
    live = new_run_id(LONG_AGO)
    staged = _stage(location, live, "a.tif")

    _prepare(url, options)

    assert _staged_runs(location) == {live}
    assert read_bytes(location, staged) is not None
    assert read_bytes(location, part) == committed

    almost = dt.datetime.now(dt.UTC) + STAGING_ABANDONED_AFTER - dt.timedelta(minutes=10)
    assert store.remove_abandoned_staging(now=almost) == []  # its file is what keeps it: the id is old
    assert store.remove_abandoned_staging(now=almost + dt.timedelta(minutes=20)) == [live]
    assert _staged_runs(location) == set()
    assert read_bytes(location, part) == committed
    assert read_bytes(location, run_record_key(finished)) is not None  # records are not staging


def test_a_run_removes_its_own_staging_once_its_shards_are_committed(output):
    """What a finished run leaves staged (a raster whose batch was lost after staging it; on
    local disks the emptied folders) goes with its folder; a concurrent run's staging and the
    committed polygons stay."""
    url, options = output
    store = OutputStore(open_location(url, options))
    location = store.location
    run_id, other = new_run_id(NOW), new_run_id(NOW)
    part = _commit_raster(store, run_id)
    committed = read_bytes(location, part)
    _stage(location, run_id, "lost.tif")
    others = _stage(location, other, "a.tif")

    store.remove_staging(run_id)

    assert _staged_runs(location) == {other}
    assert read_bytes(location, others) is not None
    assert read_bytes(location, part) == committed
    store.remove_staging(run_id)  # nothing left: not an error
    # the last run's folder gone, no empty _staging/ stays in OUTPUT (local disks keep folders)
    store.remove_staging(other)
    location.fs.invalidate_cache()
    assert not location.fs.exists(location.path("_staging"))


def test_a_shard_committed_again_replaces_each_rasters_polygons_by_name(output):
    """A raster's polygons are named by the raster: committed again, its new file takes the
    old one's name (a reader sees one or the other, never both), and the file of a raster that
    has no polygons any more is removed."""
    url, options = output
    store = OutputStore(open_location(url, options))
    location = store.location
    shard = Shard("s1", (SourceFile("a.tif", 10, "v1"), SourceFile("b.tif", 10, "v1")))

    def commit(run_id: str, with_polygons: tuple[str, ...]) -> None:
        run = RunInfo(run_id=run_id, run_date=NOW.date(), model="m", weights="none", num_classes=2,
                      class_names=("a", "b"), crf=False, source_url="/src", fingerprint="f")
        records = [ImageRecord(key=key, size=10, version="v1",
                               polygons_key=_stage(location, run_id, key) if key in with_polygons else None)
                   for key in ("a.tif", "b.tif")]
        store.commit_shard(shard, records, run)

    def committed() -> dict[str, str]:
        location.fs.invalidate_cache()
        files = location.fs.ls(location.path("polygons/shard=s1"), detail=False)
        return {path.rsplit("/", 1)[-1]: pq.read_table(location.fs.open(path)).column("run_id")[0].as_py()
                for path in files}

    first, second = new_run_id(NOW), new_run_id(NOW)
    commit(first, ("a.tif", "b.tif"))
    name = {key: polygons_part_key("s1", key).rsplit("/", 1)[-1] for key in ("a.tif", "b.tif")}
    assert committed() == {name["a.tif"]: first, name["b.tif"]: first}
    commit(second, ("b.tif",))  # a.tif's regions are gone: say, it failed this time
    assert committed() == {name["b.tif"]: second}
    commit(new_run_id(NOW), ())  # a run without --polygons: no folder is left for a reader to trip on
    location.fs.invalidate_cache()
    assert not location.fs.exists(location.path("polygons/shard=s1"))
    if location.is_local:  # emptied folders outlive their files only there
        assert not os.path.exists(location.path("polygons"))


def test_a_run_without_confidence_leaves_no_empty_confidence_folders(tmp_path):
    """A shard's confidence masks removed by a run without --confidence take their emptied
    folders with them, up to confidence/ itself; the masks' folders stay."""
    store = OutputStore(open_location(str(tmp_path / "out")))
    location = store.location
    shard = Shard("day1", (SourceFile("day1/cam/a.jpg", 10, "v1"),))

    def commit(confidence: bool) -> None:
        run = RunInfo(run_id=new_run_id(NOW), run_date=NOW.date(), model="m", weights="none", num_classes=2,
                      class_names=("a", "b"), crf=False, source_url="/src", fingerprint="f")
        record = ImageRecord(key="day1/cam/a.jpg", size=10, version="v1", mask_key="masks/day1/cam/a.png",
                             confidence_key="confidence/day1/cam/a.png" if confidence else None)
        for key in filter(None, (record.mask_key, record.confidence_key)):
            write_atomic(location, key, b"png")
        store.commit_shard(shard, [record], run)

    commit(confidence=True)
    assert (tmp_path / "out" / "confidence" / "day1" / "cam" / "a.png").is_file()
    commit(confidence=False)
    assert not (tmp_path / "out" / "confidence").exists()
    assert (tmp_path / "out" / "masks" / "day1" / "cam" / "a.png").is_file()


def test_staging_that_cannot_be_removed_does_not_stop_the_run(output, monkeypatch, caplog):
    """Housekeeping is logged and tried again by the next run, never a reason to refuse this one."""
    url, options = output
    location = open_location(url, options)
    finished = new_run_id(NOW)
    staged = _stage(location, finished, "a.tif")
    _record(location, finished)

    def refuse(location: Location, key: str) -> None:
        raise PermissionError(f"access denied to {key}")

    monkeypatch.setattr(outputs, "remove_folder", refuse)
    with caplog.at_level(logging.WARNING, logger="pipeline.outputs"):
        store = _prepare(url, options)
    assert store.remove_abandoned_staging() == []
    assert read_bytes(location, staged) is not None
    assert f"cannot remove {location.uri(staging_folder(finished))}" in caplog.text
