"""The distributed run end to end: real local Ray (2 CPUs), a real S3 API over HTTP (moto's
server), Parquet read back by DuckDB."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pytest
import rasterio
import ray
import s3fs
import torch
from PIL import Image

from pipeline.config import RunError, SegmentConfig
from pipeline.masks import decode_mask
from pipeline.models import build_model, save_checkpoint
from pipeline.runtime.driver import run_segmentation
from pipeline.runtime.replicas import SegmentWorker
from pipeline.samples import synthetic_scene

# test worker classes below are shipped to Ray workers by value, not imported there by name
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

# fp32: runs compare with fp32 references, and a bf16 replica would compile its model in every test
MODEL = {"model": "lraspp_mobilenet_v3_large", "weights": None, "num_classes": 4, "precision": "fp32"}


def _jpeg(seed: int, h: int = 40, w: int = 56) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(synthetic_scene(h, w, seed)[0]).save(buffer, format="JPEG")
    return buffer.getvalue()


def _duckdb(fs: s3fs.S3FileSystem | None = None) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    if fs is not None:
        con.register_filesystem(fs)  # DuckDB reads s3:// through fsspec: no extension download
    return con


def _check_outputs(con, output: str, fs, expected_ids: set[str]) -> list[tuple]:
    """Every input exactly once; pixel counts add up to width x height; masks match the stats."""
    images = con.sql(f"select image_id, status, width, height, mask_uri, run_id from read_parquet('{output}/images/**/*.parquet', hive_partitioning=true)").fetchall()
    assert sorted(r[0] for r in images) == sorted(expected_ids)
    sums = dict(con.sql(f"""
        select image_id, sum(pixel_count) from read_parquet('{output}/class_stats/**/*.parquet', hive_partitioning=true)
        group by image_id""").fetchall())
    for image_id, status, width, height, mask_uri, _ in images:
        if status != "ok":
            assert image_id not in sums and mask_uri is None
            continue
        assert sums[image_id] == width * height
        mask = decode_mask(fs.cat_file(mask_uri))
        assert mask.shape == (height, width) and mask.max() < 4
    return images


def test_s3_to_s3_idempotent_and_incremental(ray_cpu, s3_bucket):
    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    root = bucket[5:]
    inputs = {f"{root}/src/2026-11-19/{i}.jpg": _jpeg(i) for i in range(3)}
    inputs |= {f"{root}/src/2026-11-20/{i}.JPG": _jpeg(10 + i, 33, 47) for i in range(2)}
    inputs[f"{root}/src/2026-11-20/corrupt.jpg"] = _jpeg(5)[:300]  # truncated
    inputs[f"{root}/src/2026-11-20/notes.txt"] = b"not an image"
    fs.pipe(inputs)
    config = SegmentConfig(source=f"{bucket}/src", output=f"{bucket}/out", storage_options=options, batch_size=2, **MODEL)

    first = run_segmentation(config)
    assert (first.images, first.errors, first.shards_committed, first.non_image_keys) == (6, 1, 2, 1)
    assert {r["batch_io"] for r in first.replicas} == {"tasks"}  # an object store: its round trips overlap the model
    assert first.errors_by_type == {"corrupt": 1}
    expected = {k.split("/src/", 1)[1] for k in inputs if not k.endswith(".txt")}
    con = _duckdb(s3fs.S3FileSystem(**options))
    rows = _check_outputs(con, f"{bucket}/out", fs, expected)
    error = con.sql(f"select error_type, error, image_uri from read_parquet('{bucket}/out/images/*/*.parquet') where status = 'error'").fetchall()
    assert error == [("corrupt", error[0][1], f"{bucket}/src/2026-11-20/corrupt.jpg")]

    again = run_segmentation(config)  # nothing changed: nothing to do, nothing duplicated
    assert (again.images, again.shards_skipped, again.shards_committed) == (0, 2, 0)
    assert sorted(_check_outputs(con, f"{bucket}/out", fs, expected)) == sorted(rows)

    fs.pipe({f"{root}/src/2026-11-21/0.jpg": _jpeg(20), f"{root}/src/2026-11-20/0.JPG": _jpeg(21, 30, 30)})
    s3fs.S3FileSystem.clear_instance_cache()
    incremental = run_segmentation(config)
    # the new image and the rewritten one are segmented; the changed shard's other two keep their rows
    assert (incremental.shards_committed, incremental.shards_skipped, incremental.images) == (2, 1, 2)
    assert (incremental.images_kept, incremental.errors_kept) == (2, 1)
    expected |= {"2026-11-21/0.jpg"}
    con = _duckdb(s3fs.S3FileSystem(**options))  # a fresh fsspec listing: files were replaced
    rows = _check_outputs(con, f"{bucket}/out", fs, expected)
    run_of = {image_id: run_id for image_id, *_, run_id in rows}
    assert run_of["2026-11-19/0.jpg"] == first.run_id  # untouched shard keeps its rows
    assert run_of["2026-11-20/1.JPG"] == run_of["2026-11-20/corrupt.jpg"] == first.run_id  # unchanged in a changed shard
    assert run_of["2026-11-20/0.JPG"] == run_of["2026-11-21/0.jpg"] == incremental.run_id
    size = con.sql(f"select width, height from read_parquet('{bucket}/out/images/*/*.parquet') where image_id = '2026-11-20/0.JPG'").fetchall()[0]
    assert size == (30, 30)  # the rewritten image's row and mask were replaced


class _Stopped(Exception):
    """Stands for a kill or a signal: raised from the run's progress callback."""


def _run_stopped_after(config: SegmentConfig, images: int) -> None:
    """A run stopped once `images` images are back from the replicas (their masks written),
    before their shard commits."""
    def stop(progress) -> None:
        if progress.images >= images:
            raise _Stopped
    with pytest.raises(_Stopped):
        run_segmentation(config, on_progress=stop)


def _local_source(tmp_path, count: int, per_dir: int = 4):
    for i in range(count):
        path = tmp_path / "src" / f"d{i // per_dir}" / f"{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg(i, 24, 24))
    return str(tmp_path / "src"), str(tmp_path / "out")


def test_a_changed_shard_segments_only_its_new_and_changed_images(ray_cpu, tmp_path):
    """A folder's shard that gains, loses and has rewritten an image keeps the rows and masks
    (files untouched) of its unchanged images, error rows included until --redo-errors; a
    shard that only lost images is committed without them by the check for nothing to do,
    with no model."""
    from conftest import needs_work

    from pipeline.run import summary_lines, up_to_date

    source, output = _local_source(tmp_path, 6, per_dir=6)
    Path(source, "d0/bad.jpg").write_bytes(_jpeg(9)[:300])  # truncated: an error row
    config = SegmentConfig(source=source, output=output, crf=False, batch_size=2, **MODEL)
    first = run_segmentation(config)
    assert (first.images, first.errors) == (7, 1)
    masks = Path(output, "masks", "d0")
    written = {p.name: p.stat().st_mtime_ns for p in masks.iterdir()}

    def rows() -> dict[str, tuple]:
        images = _duckdb().sql(f"select image_id, run_id, status, width from read_parquet('{output}/images/**/*.parquet')").fetchall()
        stats = _duckdb().sql(f"select image_id, sum(pixel_count) from read_parquet('{output}/class_stats/**/*.parquet') "
                              "group by image_id").fetchall()
        assert len(images) == len({key for key, *_ in images})  # one row each
        return {key: (*rest, dict(stats).get(key)) for key, *rest in images}

    Path(source, "d0/000.jpg").unlink()
    Path(source, "d0/001.jpg").write_bytes(_jpeg(50, 30, 36))  # rewritten, another size
    Path(source, "d0/100.jpg").write_bytes(_jpeg(51, 24, 24))  # new
    second = run_segmentation(config)
    assert (second.shards_committed, second.images, second.images_kept, second.errors_kept) == (1, 2, 5, 1)
    now = rows()
    assert sorted(now) == ["d0/001.jpg", "d0/002.jpg", "d0/003.jpg", "d0/004.jpg", "d0/005.jpg", "d0/100.jpg", "d0/bad.jpg"]
    assert {key for key, row in now.items() if row[0] == second.run_id} == {"d0/001.jpg", "d0/100.jpg"}
    assert now["d0/001.jpg"][2:] == (36, 30 * 36) and now["d0/002.jpg"][2:] == (24, 24 * 24)
    assert now["d0/bad.jpg"][1:] == ("error", None, None)
    assert not (masks / "000.png").exists() and not Path(output, "_underway").exists()  # its record gone with the commit
    for name in ("002.png", "003.png", "004.png", "005.png"):  # not written again
        assert (masks / name).stat().st_mtime_ns == written[name]
    record = second.as_record() | {"record": "r", "folders": []}
    assert ("5 unchanged images kept their rows and masks (only the new and changed images of their shards were "
            "segmented)") in summary_lines(record)
    assert "1 error row of unchanged images is kept; --redo-errors segments their images again" in summary_lines(record)

    redone = run_segmentation(config.model_copy(update={"redo_errors": True}))
    assert (redone.images, redone.errors, redone.images_kept) == (1, 1, 6)
    assert rows()["d0/bad.jpg"][0] == redone.run_id and rows()["d0/002.jpg"][0] == first.run_id

    Path(source, "d0/002.jpg").unlink()  # a retention job: no new images, one deleted
    Path(source, "d0/bad.jpg").unlink()
    trimmed = up_to_date(config)
    assert not needs_work(trimmed), trimmed
    assert (trimmed["shards_committed"], trimmed["images_kept"], trimmed["shards_skipped"]) == (1, 5, 0)
    lines = summary_lines(trimmed)
    assert lines[0].startswith(f"nothing to segment: the one shard of {source} is already up to date")
    assert lines[1] == ("5 unchanged images kept their rows and masks (their shards only lost images deleted at the "
                        "source, and were committed without them, with no model)")
    assert sorted(rows()) == ["d0/001.jpg", "d0/003.jpg", "d0/004.jpg", "d0/005.jpg", "d0/100.jpg"]
    assert sorted(p.name for p in masks.iterdir()) == ["001.png", "003.png", "004.png", "005.png", "100.png"]
    assert (masks / "003.png").stat().st_mtime_ns == written["003.png"]
    assert up_to_date(config)["shards_committed"] == 0  # and up to date since
    # such a shard before one that needs work: committed by the check, counted by the run that takes its listing over
    Path(source, "d0/003.jpg").unlink()
    Path(source, "d1").mkdir()
    Path(source, "d1/0.jpg").write_bytes(_jpeg(52, 24, 24))
    listing = up_to_date(config)
    assert needs_work(listing) and len(listing.trimmed) == 1
    night = run_segmentation(config, listing=listing)
    assert (night.shards_committed, night.images, night.images_kept) == (2, 1, 4)
    assert sorted(rows()) == ["d0/001.jpg", "d0/004.jpg", "d0/005.jpg", "d0/100.jpg", "d1/0.jpg"]


def test_a_shard_stopped_while_committed_without_its_deleted_images_is_not_up_to_date(ray_cpu, tmp_path, monkeypatch):
    """The check for nothing to do commits a shard that only lost an image; stopped after its
    tables and the image's mask went, before its manifest and marker: the image restored as
    it was must not find the old marker current beside tables without it."""
    from conftest import needs_work

    from pipeline.outputs import OutputStore
    from pipeline.run import up_to_date

    source, output = _local_source(tmp_path, 4, per_dir=4)
    config = SegmentConfig(source=source, output=output, crf=False, **MODEL)
    run_segmentation(config)
    image = Path(source, "d0/002.jpg")
    data, stat = image.read_bytes(), image.stat()
    image.unlink()
    with monkeypatch.context() as stopped:
        def stop(self, shard):
            raise OSError("stopped before the manifest")
        stopped.setattr(OutputStore, "_manifest_table", stop)
        with pytest.raises(RunError, match="stopped before the manifest"):
            up_to_date(config)
    assert not Path(output, "masks/d0/002.png").exists()
    image.write_bytes(data)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert needs_work(up_to_date(config))
    again = run_segmentation(config)
    assert (again.images, again.images_kept) == (1, 3)
    rows = _duckdb().sql(f"select image_id from read_parquet('{output}/images/**/*.parquet')").fetchall()
    assert sorted(key for key, in rows) == [f"d0/{i:03d}.jpg" for i in range(4)]
    assert Path(output, "masks/d0/002.png").exists()


def test_a_run_stopped_in_a_changed_shard_segments_again_what_it_had_begun(ray_cpu, tmp_path):
    """A run stopped after rewriting the mask of a changed image, before its shard committed:
    the image restored to its old version afterwards (same size and mtime) must not keep its
    old row beside the mask of the version between, so the next run segments it again. A
    new image it segmented, deleted before the next run, loses its mask with the commit."""
    source, output = _local_source(tmp_path, 4, per_dir=4)
    config = SegmentConfig(source=source, output=output, crf=False, batch_size=1, **MODEL)
    run_segmentation(config)
    masks = Path(output, "masks", "d0")
    image = Path(source, "d0/001.jpg")
    old_bytes, old_stat = image.read_bytes(), image.stat()
    image.write_bytes(_jpeg(70, 30, 36))
    Path(source, "d0/000a.jpg").write_bytes(_jpeg(71, 24, 24))  # sorts first: segmented first
    _run_stopped_after(config, images=2)
    assert decode_mask((masks / "001.png").read_bytes()).shape == (30, 36) and (masks / "000a.png").exists()
    image.write_bytes(old_bytes)
    os.utime(image, ns=(old_stat.st_atime_ns, old_stat.st_mtime_ns))
    Path(source, "d0/000a.jpg").unlink()
    again = run_segmentation(config)
    assert (again.images, again.images_kept) == (1, 3)
    assert decode_mask((masks / "001.png").read_bytes()).shape == (24, 24)  # the mask of its row's version
    row = _duckdb().sql(f"select run_id, width from read_parquet('{output}/images/**/*.parquet') where image_id = 'd0/001.jpg'")
    assert row.fetchall() == [(again.run_id, 24)]
    assert sorted(p.name for p in masks.iterdir()) == ["000.png", "001.png", "002.png", "003.png"]
    assert run_segmentation(config).shards_skipped == 1


def test_images_that_move_to_another_shard_keep_their_masks_and_vanished_shards_go(ray_cpu, tmp_path, monkeypatch):
    """One folder of 12 images in shards of 5: 5, 5 and 2. Three deleted at its start move
    the others up a shard (the third one is gone); three added there move them back. Each
    time every image has one row in each table and its mask, and the masks of deleted images
    go. A shard that SOURCE no longer has at all is removed by the check for nothing to do,
    which then has nothing to segment: no Ray, no model."""
    from conftest import needs_work

    from pipeline.outputs import OutputStore
    from pipeline.run import summary_lines, up_to_date

    source, output = _local_source(tmp_path, 12, per_dir=12)
    config = SegmentConfig(source=source, output=output, crf=False, shard_size=5, **MODEL)

    def check(expected: list[str]) -> None:
        con = _duckdb()
        for table in ("images", "class_stats", "manifest"):
            rows = con.sql(f"select distinct image_id, shard_id from read_parquet('{output}/{table}/**/*.parquet')").fetchall()
            assert sorted(key for key, _ in rows) == expected, table  # once each, in one shard
        masks = sorted(str(p.relative_to(Path(output, "masks"))) for p in Path(output, "masks").rglob("*.png"))
        assert masks == [key.replace(".jpg", ".png") for key in expected]
        assert len(list(Path(output, "_commits").iterdir())) == -(-len(expected) // 5)

    assert run_segmentation(config).shards_committed == 3
    check([f"d0/{i:03d}.jpg" for i in range(12)])
    for i in range(3):
        Path(source, f"d0/{i:03d}.jpg").unlink()
    run_segmentation(config)
    check([f"d0/{i:03d}.jpg" for i in range(3, 12)])
    for i in range(3):
        Path(source, f"d0/000{i}.jpg").write_bytes(_jpeg(100 + i, 24, 24))
    run_segmentation(config)
    check(sorted([f"d0/000{i}.jpg" for i in range(3)] + [f"d0/{i:03d}.jpg" for i in range(3, 12)]))
    for i in range(10, 12):  # the third shard's two images: the first two shards are as they were
        Path(source, f"d0/{i:03d}.jpg").unlink()
    removed = up_to_date(config)
    assert not needs_work(removed), removed
    assert (removed["shards_skipped"], removed["shards_committed"], removed["shards_removed"]) == (2, 0, 1)
    assert summary_lines(removed)[0].startswith("nothing to segment: all 2 shards of")
    check(sorted([f"d0/000{i}.jpg" for i in range(3)] + [f"d0/{i:03d}.jpg" for i in range(3, 10)]))
    again = up_to_date(config)
    assert (again["shards_skipped"], again["shards_removed"]) == (2, 0)
    # a run stopped after committing its shards, before removing the one SOURCE no longer has
    # (a signal, an outage): the next night's check removes it, and the masks of its images,
    # in the other shard now, stay (they were deleted with it)
    for name in ("0000", "0001", "0002", "003", "004"):
        Path(source, f"d0/{name}.jpg").unlink()
    with monkeypatch.context() as stopped:
        stopped.setattr(OutputStore, "remove_vanished_shards", lambda self, listed: [])
        run_segmentation(config)
    assert up_to_date(config)["shards_removed"] == 1
    check([f"d0/{i:03d}.jpg" for i in range(5, 10)])


def test_an_image_beside_a_deleted_one_of_its_stem_keeps_its_mask(ray_cpu, tmp_path):
    """a.jpg keeps masks/a.png and a.png is its mask_collision row. Once a.jpg is deleted, a.png
    takes masks/a.png, in the shard before (a deletion moved the chunks' boundaries): the
    commit of the shard a.jpg left must not delete it. The emptied third shard is removed
    and said so; a SOURCE emptied altogether is refused, and nothing is removed."""
    from pipeline.run import summary_lines

    folder = tmp_path / "src" / "d"
    folder.mkdir(parents=True)
    for name in ["0.jpg", "1.jpg", "a.jpg", "a.png", "b.jpg", "c.jpg"]:
        (folder / name).write_bytes(_jpeg(len(name) + ord(name[0]), 24, 24))
    output = tmp_path / "out"
    config = SegmentConfig(source=str(tmp_path / "src"), output=str(output), crf=False, shard_size=2, **MODEL)
    first = run_segmentation(config)
    assert (first.shards_committed, first.errors) == (3, 1)
    for name in ["0.jpg", "a.jpg"]:
        (folder / name).unlink()
    summary = run_segmentation(config)
    assert (summary.shards_committed, summary.shards_removed, summary.errors) == (2, 1, 0)
    rows = _duckdb().sql(f"select image_id, status, mask_uri from read_parquet('{output}/images/**/*.parquet')").fetchall()
    assert sorted((key, status) for key, status, _ in rows) == [
        ("d/1.jpg", "ok"), ("d/a.png", "ok"), ("d/b.jpg", "ok"), ("d/c.jpg", "ok")]
    assert all(Path(mask).is_file() for _, _, mask in rows)
    assert sorted(p.name for p in (output / "masks" / "d").iterdir()) == ["1.png", "a.png", "b.png", "c.png"]
    record = vars(summary) | {"images_per_second": summary.images_per_second, "record": "r", "folders": []}
    assert f"removed 1 shard that {tmp_path / 'src'} no longer has" in "\n".join(summary_lines(record))
    for path in folder.iterdir():
        path.unlink()
    with pytest.raises(RunError, match=r"SOURCE lists no images, but .* holds 2 shards of it; nothing was removed"):
        run_segmentation(config)
    assert len(list((output / "_commits").iterdir())) == 2 and len(list((output / "masks" / "d").iterdir())) == 4


def test_an_actor_killed_mid_run_loses_and_duplicates_nothing(ray_cpu, tmp_path):
    source, output = _local_source(tmp_path, 10)
    config = SegmentConfig(source=source, output=output, batch_size=1, crf=False, **MODEL)
    killed = []

    def kill_once(progress):
        if progress.images >= 1 and not killed:
            name = f"segpipe-{progress.run_id}-0"  # the run's only replica
            ray_cpu.kill(ray_cpu.get_actor(name), no_restart=False)  # as the OOM killer would
            killed.append(name)

    summary = run_segmentation(config, on_progress=kill_once)
    assert killed and summary.retried_batches >= 1
    assert (summary.images, summary.errors) == (10, 0)
    rows = _duckdb().sql(f"select image_id, status from read_parquet('{output}/images/**/*.parquet')").fetchall()
    assert sorted(rows) == [(f"d{i // 4}/{i:03d}.jpg", "ok") for i in range(10)]


def test_a_run_stopped_with_other_settings_leaves_its_shard_to_be_done_again(ray_cpu, tmp_path):
    """A run with other settings rewrites a shard's masks before it commits it: stopped
    halfway, the shard's old marker is gone, so a run with the old settings does it again
    rather than skipping it beside masks of the other settings."""
    source, output = _local_source(tmp_path, 3)
    config = SegmentConfig(source=source, output=output, batch_size=1, crf=False, **MODEL)
    assert run_segmentation(config).shards_committed == 1
    _run_stopped_after(config.model_copy(update={"crf": True}), images=1)
    assert not list(Path(output, "_commits").iterdir())
    [underway] = [json.loads(p.read_text()) for p in Path(output, "_underway").iterdir()]
    assert len(underway["redoing"]) == 3  # every image named
    again = run_segmentation(config)
    assert (again.shards_committed, again.shards_skipped, again.images, again.images_kept) == (1, 0, 3, 0)


def test_a_replica_lost_for_good_leaves_the_others_their_own_share(ray_cpu, tmp_path, monkeypatch):
    """Batches in flight stay bounded per replica (memory, and the time limits' meaning): the
    share of a replica that is gone is not piled onto those left."""
    from pipeline.runtime.replicas import _ReplicaPool

    source, output = _local_source(tmp_path, 24, per_dir=24)
    config = SegmentConfig(source=source, output=output, batch_size=1, crf=False, actors=2, cpus_per_actor=0.5,
                           max_restarts=0, batches_in_flight_per_actor=2, batch_io="tasks", **MODEL)
    most = Counter()
    pick = _ReplicaPool.pick

    def counted_pick(self, **kwargs):
        replica = pick(self, **kwargs)
        if replica is not None:
            most[replica] = max(most[replica], self.load[replica] + 1)
        return replica
    monkeypatch.setattr(_ReplicaPool, "pick", counted_pick)
    killed = []

    def kill_one(progress):
        if progress.images >= 2 and not killed:
            ray_cpu.kill(ray_cpu.get_actor(f"segpipe-{progress.run_id}-0"), no_restart=True)
            killed.append(True)
    summary = run_segmentation(config, on_progress=kill_one)
    assert killed and summary.images == 24
    assert max(most.values()) <= 2, most


def test_a_night_whose_work_is_in_its_last_folder_lists_the_archive_once(ray_cpu, tmp_path, monkeypatch):
    """The check for nothing to do stops its listing at the first shard that needs work, and
    the run goes on with it (`ListingUnderway`): no folder is listed twice, nor the commit
    marker of a shard up to date read twice."""
    import pipeline.storage
    from pipeline.outputs import OutputStore
    from pipeline.run import ListingUnderway, up_to_date

    source, output = _local_source(tmp_path, 6, per_dir=2)
    config = SegmentConfig(source=source, output=output, batch_size=2, crf=False, **MODEL)
    assert run_segmentation(config).shards_committed == 3
    Path(source, "d3").mkdir()
    Path(source, "d3", "new.jpg").write_bytes(_jpeg(7, 24, 24))  # tonight's folder, listed last
    listed, markers = Counter(), Counter()
    entries, read_commit = pipeline.storage._entries, OutputStore.read_commit
    monkeypatch.setattr(pipeline.storage, "_entries", lambda fs, path: (listed.update([path]), entries(fs, path))[1])
    monkeypatch.setattr(OutputStore, "read_commit", lambda self, shard_id: (markers.update([shard_id]),
                                                                            read_commit(self, shard_id))[1])
    listing = up_to_date(config)
    assert isinstance(listing, ListingUnderway) and len(listing.up_to_date) == 3
    summary = run_segmentation(config, listing=listing)
    assert (summary.shards_skipped, summary.shards_committed, summary.images) == (3, 1, 1)
    of_source = Counter({path: n for path, n in listed.items() if path.startswith(source)})
    assert set(of_source) == {source, *(str(Path(source, f"d{i}")) for i in range(4))}
    assert max(of_source.values()) == 1, of_source
    assert all(markers[shard] == 1 for shard in listing.up_to_date), markers  # the one that needs work: once more


class AlwaysDyingWorker(SegmentWorker):
    """A replica that crashes on every batch (as on a poisoned input that kills the process)."""

    def segment(self, records):
        os._exit(1)


def test_batches_that_keep_killing_workers_become_error_rows(ray_cpu, tmp_path):
    source, output = _local_source(tmp_path, 3)
    config = SegmentConfig(source=source, output=output, batch_size=2, batch_attempts=2, max_restarts=10, **MODEL)
    summary = run_segmentation(config, worker_class=AlwaysDyingWorker)
    assert (summary.images, summary.errors, summary.retried_batches) == (3, 3, 2)
    rows = _duckdb().sql(f"select image_id, error_type, error from read_parquet('{output}/images/**/*.parquet')").fetchall()
    assert sorted(r[0] for r in rows) == ["d0/000.jpg", "d0/001.jpg", "d0/002.jpg"]
    assert {r[1] for r in rows} == {"worker_failed"} and all("failed 2 times" in r[2] for r in rows)
    # error rows are committed: a plain re-run leaves the shard alone (its inputs did not
    # change), and --redo-errors processes it again, replacing the error rows
    assert run_segmentation(config).shards_skipped == 1
    redone = run_segmentation(config.model_copy(update={"redo_errors": True}))
    assert (redone.shards_committed, redone.images, redone.errors) == (1, 3, 0)
    rows = _duckdb().sql(f"select status, count(*) from read_parquet('{output}/images/**/*.parquet') group by 1").fetchall()
    assert rows == [("ok", 3)]


def test_model_that_cannot_load_stops_the_run_with_its_reason(ray_cpu, tmp_path):
    source, output = _local_source(tmp_path, 1)
    config = SegmentConfig(precision="fp32", source=source, output=output, model="lraspp_mobilenet_v3_large", weights="none")
    with pytest.raises(RunError, match="num_classes is required"):
        run_segmentation(config)
    with pytest.raises(RunError, match="not a folder that exists"):
        run_segmentation(config.model_copy(update={"source": str(tmp_path / "missing")}))


def test_replicas_that_cannot_be_placed_stop_the_run(ray_cpu, tmp_path):
    """--device cuda on a cluster without GPUs (and no autoscaler to add one): a clear error
    once the startup timeout passes, not a hang."""
    source, output = _local_source(tmp_path, 1)
    config = SegmentConfig(source=source, output=output, device="cuda", startup_timeout_s=3, **MODEL)
    before = set(ray_cpu.util.list_named_actors())
    with pytest.raises(RunError, match=r"1 model replicas \(1 GPU, 1 CPU each\) were not placed .* the cluster has 0 GPUs"):
        run_segmentation(config)
    assert not set(ray_cpu.util.list_named_actors()) - before  # the pending replica was removed


class FakeCudaWorker(SegmentWorker):
    """Mocked GPU (none on this machine): reports CUDA as available so the device that Ray's
    assignment selects is used, but builds the model on the CPU. What is checked is the
    assignment and the device the worker chose from it."""

    def _cuda_available(self) -> bool:
        return True

    def _build_stage(self, spec, device):
        assert device.type == "cuda"
        return super()._build_stage(spec, "cpu")


def test_one_replica_per_declared_gpu(tmp_path, _ray_session):
    import ray

    ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        source, output = _local_source(tmp_path, 4)
        config = SegmentConfig(source=source, output=output, cpus_per_actor=0.5, batch_size=1, crf=False, **MODEL)
        summary = run_segmentation(config, worker_class=FakeCudaWorker)
        assert (summary.images, summary.errors) == (4, 0)
        assert len(summary.replicas) == 2
        assert sorted(gpu for r in summary.replicas for gpu in r["gpu_ids"]) == ["0", "1"]
        assert {r["device"] for r in summary.replicas} == {"cuda:0"}  # each sees only its own GPU
        assert {r["batch_io"] for r in summary.replicas} == {"tasks"}  # local files, but a GPU to keep fed

        actor = ray.remote(FakeCudaWorker).options(num_gpus=1, num_cpus=0.5).remote(_worker_spec(config))
        placement = ray.get(actor.ready.remote())
        assert placement["cuda_visible_devices"] == placement["gpu_ids"][0]
        ray.kill(actor)
        # fractional GPUs: two small replicas share each GPU (each run into its own OUTPUT: a
        # run with every shard up to date starts no replica)
        half = run_segmentation(config.model_copy(update={"gpus_per_actor": 0.5, "cpus_per_actor": 0.25,
                                                          "output": f"{output}-half"}), worker_class=FakeCudaWorker)
        assert len(half.replicas) == 4
        # --device cpu keeps the model off the GPUs even where there are some
        on_cpu = run_segmentation(config.model_copy(update={"device": "cpu", "output": f"{output}-cpu"}))
        # one CPU replica on a 2-CPU node runs torch on both, though it reserves one
        node = ray.get_runtime_context().get_node_id()
        assert on_cpu.replicas == [{"device": "cpu", "gpu_ids": [], "threads": 2, "precision": "fp32", "node_id": node, "batch_io": "replica",
                                   "compile_seconds": 0.0}]  # fp32: eager
        pinned = run_segmentation(config.model_copy(update={"device": "cpu", "threads_per_actor": 1,
                                                            "output": f"{output}-pinned"}))
        assert pinned.replicas == [{"device": "cpu", "gpu_ids": [], "threads": 1, "precision": "fp32", "node_id": node, "batch_io": "replica",
                                    "compile_seconds": 0.0}]
    finally:
        ray.shutdown()


def _worker_spec(config):
    from pipeline.runtime.spec import WorkerSpec

    return WorkerSpec(model=config.model, weights=config.weights, num_classes=config.num_classes, crf=False,
                      batch_size=1, storage_options={}, threads=1)


def test_worker_device_without_cuda_is_a_clear_error():
    from pipeline.runtime.worker import worker_device

    assert str(worker_device([], False)) == "cpu"
    assert str(worker_device(["3"], True)) == "cuda:0"
    with pytest.raises(RuntimeError, match="Ray assigned GPU 3"):
        worker_device(["3"], False)


def test_masks_and_stats_agree(ray_cpu, tmp_path):
    source, output = _local_source(tmp_path, 2)
    run_segmentation(SegmentConfig(source=source, output=output, **MODEL))
    con = _duckdb()
    for image_id, mask_uri in con.sql(f"select image_id, mask_uri from read_parquet('{output}/images/**/*.parquet')").fetchall():
        mask = decode_mask(Path(mask_uri).read_bytes())
        stats = dict(con.sql(f"select class_id, pixel_count from read_parquet('{output}/class_stats/**/*.parquet') where image_id = '{image_id}'").fetchall())
        counts = np.bincount(mask.ravel())
        assert stats == {c: int(n) for c, n in enumerate(counts) if n}


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_cli_joins_an_existing_cluster(ray_cpu, tmp_path, how):
    """`--ray-address` and RAY_ADDRESS join a running cluster (here: this test's own Ray)."""
    source, output = _local_source(tmp_path, 2)
    address = ray_cpu.get_runtime_context().gcs_address
    args = ["--ray-address", address] if how == "flag" else []
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    if how == "environment":
        env["RAY_ADDRESS"] = address
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "segment", source, output, "--model", "lraspp_mobilenet_v3_large",
         "--weights", "none", "--num-classes", "4", "--no-crf", *args],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert done.returncode == 0, done.stderr
    assert f"in the Ray cluster at {address}" in done.stdout
    assert "2 images, 2 segmented and 0 errors," in done.stdout


def test_real_frames_and_a_geotiff(ray_cpu, tmp_path, shared_data):
    """Real files: CamVid JPEG frames and a single-band uint16 GeoTIFF, each segmented at its size."""
    source = tmp_path / "src"
    (source / "camvid").mkdir(parents=True)
    (source / "aerial").mkdir()
    frames = sorted((shared_data / "camvid" / "val" / "images").glob("*.jpg"))[:3]
    for frame in frames:
        (source / "camvid" / frame.name).write_bytes(frame.read_bytes())
    (source / "aerial" / "tile.tif").write_bytes((shared_data / "aerial" / "geotiff" / "sample_geotiff.tif").read_bytes())
    output = tmp_path / "out"
    summary = run_segmentation(SegmentConfig(source=str(source), output=str(output), **MODEL))
    assert (summary.images, summary.errors) == (4, 0)
    rows = dict((r[0], r[1:]) for r in _duckdb().sql(
        f"select image_id, width, height from read_parquet('{output}/images/**/*.parquet')").fetchall())
    assert rows == {**{f"camvid/{f.name}": (480, 360) for f in frames}, "aerial/tile.tif": (900, 900)}
    # the GeoTIFF is georeferenced: its mask is a GeoTIFF on the same grid (see test_raster_pipeline)
    with rasterio.open(output / "masks" / "aerial" / "tile.tif") as mask:
        assert mask.read(1).shape == (900, 900)


def test_readme_queries_run_on_real_outputs(ray_cpu, tmp_path):
    """The analyst queries in the README, run as written against a run's outputs."""
    import re

    import pyarrow.dataset as ds
    import torch

    from pipeline.models import ModelMeta, build_model, save_checkpoint
    from pipeline.outputs import OutputStore
    from pipeline.storage import Shard, open_location

    source, output = _local_source(tmp_path, 5)
    (tmp_path / "src" / "d0" / "broken.jpg").write_bytes(b"<html>")
    model = build_model("lraspp_mobilenet_v3_large", num_classes=4, weights=None)
    torch.nn.init.constant_(model.classifier.low_classifier.bias, 0.0)
    with torch.no_grad():
        model.classifier.high_classifier.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))  # mostly "car"
    meta = ModelMeta.default("lraspp_mobilenet_v3_large", 4, class_names=("sky", "building", "road", "car"))
    save_checkpoint(model, str(tmp_path / "model.pt"), meta)
    config = SegmentConfig(precision="fp32", source=source, output=output, model="lraspp_mobilenet_v3_large",
                           weights=str(tmp_path / "model.pt"))
    first = run_segmentation(config)
    (tmp_path / "src" / "d0" / "new.jpg").write_bytes(_jpeg(30, 24, 24))
    assert run_segmentation(config).images_kept == 5  # the committed view holds kept rows, of the first run's id
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    # the analyst queries are the README's SQL blocks written against OUTPUT
    queries = [q.replace("OUTPUT", output) for q in re.findall(r"```sql\n(.*?)```", readme, re.S)
               # the polygons query: test_raster_pipeline; the evaluation report's join: test_flows
               if "OUTPUT" in q and "OUTPUT/polygons" not in q and "REPORT" not in q]
    assert len(queries) == 4
    con = _duckdb()
    _, shares, cars, errors = (con.sql(q).fetchall() for q in queries)
    stats = ds.dataset(f"{output}/class_stats", format="parquet", partitioning="hive").to_table().to_pylist()
    total = sum(r["pixel_count"] for r in stats)
    expected_shares = {r["class_name"]: 0 for r in stats}
    for r in stats:
        expected_shares[r["class_name"]] += r["pixel_count"] / total
    assert {name: round(share, 9) for _, name, share in shares} == {k: round(v, 9) for k, v in expected_shares.items()}
    assert sorted(image_id for image_id, *_ in cars) == sorted(
        r["image_id"] for r in stats if r["class_name"] == "car" and r["fraction"] > 0.05)
    assert len(cars) > 0
    assert errors == [("not_an_image", 1, "d0/broken.jpg")]

    def committed_view() -> dict[str, str]:
        return dict(con.sql(f"select image_id, run_id from ({queries[0].rstrip().rstrip(';')})").fetchall())
    committed = committed_view()
    assert len(committed) == 7  # every row: every shard is committed
    assert committed["d0/000.jpg"] == first.run_id != committed["d0/new.jpg"]
    markers = sorted(Path(output, "_commits").glob("*.json"))

    def rows_of(marker: Path) -> set[str]:
        return {r[0] for r in con.sql(f"select image_id from read_parquet('{output}/images/shard={marker.stem}/*.parquet')").fetchall()}
    # a shard being segmented again has no marker: its rows leave the committed view
    store = OutputStore(open_location(output))
    store.mark_underway(Shard(markers[0].stem, ()), json.loads(markers[0].read_text()), "r", ["x"])
    assert rows_of(markers[0]) and committed_view().keys() == committed.keys() - rows_of(markers[0])


def test_tile_option_segments_large_images_with_sliding_windows(ray_cpu, tmp_path):
    from pipeline.inference import Segmenter, SlidingWindow
    from pipeline.models import build_model, save_checkpoint

    # an untrained FCN's labels vary with what each window sees (LR-ASPP's barely do)
    model = build_model("fcn_resnet50", num_classes=4, weights=None)
    save_checkpoint(model, str(tmp_path / "m.pt"), model.meta)
    image = synthetic_scene(96, 130, 3)[0]
    (tmp_path / "src").mkdir()
    Image.fromarray(image).save(tmp_path / "src" / "tile.png")
    config = SegmentConfig(precision="fp32", source=str(tmp_path / "src"), output=str(tmp_path / "out"), model="fcn_resnet50",
                           weights=str(tmp_path / "m.pt"), crf=False, tile=64, tile_stride=48)
    assert run_segmentation(config).errors == 0
    mask = decode_mask((tmp_path / "out" / "masks" / "tile.png").read_bytes())
    loaded = build_model("fcn_resnet50", weights=str(tmp_path / "m.pt"))
    windowed = Segmenter(loaded, device="cpu", sliding_window=SlidingWindow((64, 64), (48, 48)),
                         precision="fp32").predict([image])[0]
    whole = Segmenter(loaded, device="cpu", precision="fp32").predict([image])[0]
    assert (mask == windowed.argmax(0).numpy()).mean() > 0.999
    assert (mask == whole.argmax(0).numpy()).mean() < 0.97  # the test can tell the two apart
    with pytest.raises(ValueError, match="--tile-stride 80 is larger than --tile 64: windows would leave gaps"):
        SegmentConfig(source="a", output="b", tile=64, tile_stride=80)


def test_a_shard_is_committed_only_after_all_its_batches(ray_cpu, tmp_path):
    """With one batch in flight, a shard's first batch returns while the rest are still being
    queued; committing then would lose them (the commit refuses, so the run would fail)."""
    source, output = _local_source(tmp_path, 3, per_dir=3)
    config = SegmentConfig(source=source, output=output, batch_size=1, batches_in_flight_per_actor=1, crf=False, **MODEL)
    summary = run_segmentation(config)
    assert (summary.images, summary.errors, summary.shards_committed) == (3, 0, 1)
    rows = _duckdb().sql(f"select count(*) from read_parquet('{output}/images/**/*.parquet')").fetchall()
    assert rows == [(3,)]


class PoisonedWorker(SegmentWorker):
    """A replica whose process dies on one particular image, as on a file that crashes a
    decoder or a kernel: it takes down whichever batch holds it."""

    def segment(self, records):
        if any("poison" in r.key for r in records):
            os._exit(1)
        return super().segment(records)


class DecoderCrashWorker(SegmentWorker):
    """A replica that reads its own batches and dies decoding one particular image, as on a
    file that crashes a decoder."""

    def read_segment_write(self, source, files, *args):
        if any("poison" in f.key for f in files):
            os._exit(1)
        return super().read_segment_write(source, files, *args)


def test_a_decoder_crash_in_a_replica_is_retried_through_the_tasks(ray_cpu, tmp_path):
    """The replica dies once; the batch's images go again one by one through the decode task,
    where the same crash would cost a task worker, not the replica: here the image decodes
    (the crash is the test replica's), so every image ends ok after one retry."""
    source, output = _local_source(tmp_path, 4)
    os.rename(f"{source}/d0/002.jpg", f"{source}/d0/002-poison.jpg")
    config = SegmentConfig(source=source, output=output, batch_size=4, crf=False, max_restarts=10, **MODEL)
    summary = run_segmentation(config, worker_class=DecoderCrashWorker)
    assert {r["batch_io"] for r in summary.replicas} == {"replica"}
    assert (summary.images, summary.errors, summary.retried_batches) == (4, 0, 1)


def test_images_that_crash_the_replica_cost_only_themselves_however_many_a_night_holds(ray_cpu, tmp_path):
    """With the default --max-restarts (3): each crashing image kills its replica up to
    --batch-attempts times while the driver finds it, more than 3 for these two together, and
    Ray's own max_restarts, which counts an actor's whole life, stopped the run at them every
    night. Only deaths in a row without a batch finished count, and not those of an image sent
    alone."""
    source, output = _local_source(tmp_path, 8, per_dir=8)
    for name in ("001", "002", "005"):
        os.rename(f"{source}/d0/{name}.jpg", f"{source}/d0/{name}-poison.jpg")
    config = SegmentConfig(source=source, output=output, batch_size=4, crf=False, batch_io="tasks", **MODEL)
    summary = run_segmentation(config, worker_class=PoisonedWorker)
    assert (summary.images, summary.errors, summary.errors_by_type) == (8, 3, {"worker_failed": 3})


def test_deaths_apart_do_not_add_up_to_the_restarts_allowed(ray_cpu, tmp_path):
    """With --max-restarts 1, three batches that each hold a crashing image, the clean images
    of each finished between them: no two deaths in a row, so the replica goes on."""
    source, output = _local_source(tmp_path, 8, per_dir=8)
    for name in ("000", "002", "004"):
        os.rename(f"{source}/d0/{name}.jpg", f"{source}/d0/{name}-poison.jpg")
    # one batch at a time, so that each death is one batch's (one death fails all a replica holds)
    config = SegmentConfig(source=source, output=output, batch_size=2, batch_attempts=2, max_restarts=1, crf=False,
                           batches_in_flight_per_actor=1, batch_io="tasks", **MODEL)
    summary = run_segmentation(config, worker_class=PoisonedWorker)
    assert (summary.images, summary.errors, summary.errors_by_type) == (8, 3, {"worker_failed": 3})


def test_a_replica_that_finishes_nothing_is_not_restarted_forever(ray_cpu, tmp_path):
    """Every batch kills it: after --max-restarts deaths in a row the run stops with one line,
    rather than restarting and reloading the model for every batch of the night."""
    source, output = _local_source(tmp_path, 16, per_dir=16)
    config = SegmentConfig(source=source, output=output, batch_size=2, batch_attempts=1, max_restarts=1,
                           batch_io="tasks", **MODEL)
    with pytest.raises(RunError, match=r"every model replica is gone, the last one because it died 2 times in a row "
                                       r"without finishing a batch \(--max-restarts 1\); it is not restarted again; "
                                       r"committed shards are kept"):
        run_segmentation(config, worker_class=AlwaysDyingWorker)


class RestartsDyingWorker(SegmentWorker):
    """A replica that dies on its first batch, then at every restart as it loads its model
    (a crash, or the memory killer, at each load): no batch of it is ever sent again to fail."""

    def __init__(self, spec):
        if Path(f"{spec.output_url}-died").exists():
            os._exit(1)
        super().__init__(spec)

    def segment(self, records):
        Path(f"{self.spec.output_url}-died").touch()
        os._exit(1)


def test_a_replica_that_dies_at_every_restart_is_given_up_on(ray_cpu, tmp_path):
    """Ray restarts it as often as asked (restarts are counted by batches, which it never
    gets again): after --startup-timeout-s set aside it is gone, and the run stops in one line
    rather than waiting on it all night."""
    source, output = _local_source(tmp_path, 4)
    config = SegmentConfig(source=source, output=output, batch_size=4, crf=False, batch_io="tasks",
                           startup_timeout_s=20, **MODEL)
    started = time.monotonic()
    with pytest.raises(RunError, match=r"every model replica is gone, the last one because it did not come back "
                                       r"within 20 s of dying \(--startup-timeout-s\)"):
        run_segmentation(config, worker_class=RestartsDyingWorker)
    assert time.monotonic() - started < 120


@pytest.mark.parametrize("batch_io", ["tasks", "replica"])
def test_a_crashing_image_costs_only_itself(ray_cpu, tmp_path, batch_io):
    source, output = _local_source(tmp_path, 4)
    os.rename(f"{source}/d0/002.jpg", f"{source}/d0/002-poison.jpg")
    config = SegmentConfig(source=source, output=output, batch_size=4, crf=False, max_restarts=10, batch_io=batch_io,
                           **MODEL)
    summary = run_segmentation(config, worker_class=PoisonedWorker)
    assert (summary.images, summary.errors) == (4, 1)
    rows = _duckdb().sql(f"select image_id, status, error_type from read_parquet('{output}/images/**/*.parquet')").fetchall()
    assert sorted(rows) == [("d0/000.jpg", "ok", None), ("d0/001.jpg", "ok", None),
                            ("d0/002-poison.jpg", "error", "worker_failed"), ("d0/003.jpg", "ok", None)]


class CallsCountedWorker(SegmentWorker):
    """A replica that leaves a file beside the run's output for each call of `segment` and of
    `read_segment_write`, so a test sees which path its batches took."""

    def _count(self, method: str) -> None:
        folder = Path(f"{self.spec.output_url}-calls")
        folder.mkdir(exist_ok=True)
        (folder / f"{method}-{time.monotonic_ns()}").touch()

    def segment(self, records):
        self._count("segment")
        return super().segment(records)

    def read_segment_write(self, *args):
        self._count("read_segment_write")
        return super().read_segment_write(*args)


def _calls(output: str) -> Counter:
    return Counter(p.name.rsplit("-", 1)[0] for p in Path(f"{output}-calls").iterdir())


def test_a_batch_read_and_written_in_the_replica_gives_what_the_tasks_give(ray_cpu, tmp_path):
    """`batch_io`: the same files, model and settings through the three-call chain and through
    the replica alone give the same rows and the same masks byte for byte; auto reads and
    writes in a CPU replica beside a local folder."""
    source, _ = _local_source(tmp_path, 6)
    Path(source, "d0", "truncated.jpg").write_bytes(_jpeg(99)[:300])
    weights = str(tmp_path / "lraspp.pt")
    model = build_model("lraspp_mobilenet_v3_large", num_classes=4)  # one set of random weights for both runs
    save_checkpoint(model, weights, model.meta)
    outputs = {}
    for batch_io in ("tasks", "replica", "auto"):
        output = str(tmp_path / f"out-{batch_io}")
        summary = run_segmentation(SegmentConfig(source=source, output=output, weights=weights, precision="fp32",
                                                 batch_size=4, batch_io=batch_io, confidence=True),
                                   worker_class=CallsCountedWorker)
        in_replica = batch_io != "tasks"  # auto: a CPU replica beside its files
        assert {r["batch_io"] for r in summary.replicas} == {"replica" if in_replica else "tasks"}
        # 3 batches: d0 holds 5 files (4 + 1), d1 2
        assert _calls(output) == ({"read_segment_write": 3, "segment": 3} if in_replica else {"segment": 3})
        assert (summary.images, summary.errors_by_type) == (7, {"corrupt": 1})
        con = _duckdb()
        rows = con.sql(f"select image_id, status, error_type, width, height from read_parquet('{output}/images/**/*.parquet') order by 1").fetchall()
        stats = con.sql(f"select image_id, class_id, pixel_count, mean_confidence from read_parquet('{output}/class_stats/**/*.parquet') order by 1, 2").fetchall()
        files = {p.relative_to(output).as_posix(): p.read_bytes() for p in Path(output).rglob("*.png")}
        outputs[batch_io] = rows, stats, files
    rows, stats, files = outputs["tasks"]
    assert len(files) == 12 and sum(1 for r in rows if r[1] == "ok") == 6  # a mask and a confidence PNG each
    assert outputs["replica"] == outputs["tasks"] == outputs["auto"]


@pytest.mark.parametrize("batch_io", ["tasks", "replica"])
def test_an_image_that_decodes_too_slowly_becomes_a_timeout_row(ray_cpu, tmp_path, batch_io):
    """The time limit holds inside Ray's decode tasks and inside a replica that decodes its
    own batches (both run on their process's main thread, where the alarm can interrupt them)."""
    source, output = _local_source(tmp_path, 3)
    buffer = io.BytesIO()
    # 140 KB that take about 1 s to decode here: ten times the limit, which the small JPEGs
    # beside it stay far inside even on a machine twice as fast or twice as slow.
    Image.new("L", (12000, 12000)).save(buffer, format="PNG")
    Path(source, "d0", "slow.png").write_bytes(buffer.getvalue())
    config = SegmentConfig(source=source, output=output, batch_size=4, crf=False, max_pixels=10**9,
                           image_timeout_s=0.1, batch_io=batch_io, **MODEL)
    summary = run_segmentation(config)
    assert (summary.images, summary.errors, summary.errors_by_type) == (4, 1, {"timeout": 1})
    rows = _duckdb().sql(f"select image_id, status, error from read_parquet('{output}/images/**/*.parquet')").fetchall()
    assert [r[0] for r in rows if r[1] == "error"] == ["d0/slow.png"]
    assert "0.1 s limit" in next(r[2] for r in rows if r[1] == "error")


@pytest.mark.parametrize("batch_io", ["tasks", "replica"])
def test_a_mask_that_cannot_be_written_stops_the_run(ray_cpu, tmp_path, batch_io):
    """A write that fails for the output's sake (disk full, a file where a folder must go)
    stops the run with a clear error instead of turning good images into error rows; the
    shard is not committed, so the next run, once the output is fixed, does it."""
    source, output = _local_source(tmp_path, 2)
    Path(output, "masks").mkdir(parents=True)
    Path(output, "masks", "d0").write_text("a file where the masks' folder must go")
    config = SegmentConfig(source=source, output=output, crf=False, batch_io=batch_io, **MODEL)
    with pytest.raises(RunError, match=r"storage unavailable: .*cannot write .*masks/d0/00\d\.png"):
        run_segmentation(config)
    assert not Path(output, "_commits").exists() or not list(Path(output, "_commits").iterdir())
    Path(output, "masks", "d0").unlink()
    assert run_segmentation(config).images == 2


def test_replicas_take_the_precision_and_compilation_asked_for() -> None:
    """--precision and --compile reach the replica's Segmenter (compilation itself is lazy:
    nothing runs here; tests/test_inference.py and tests/test_precision.py check a compiled
    model's output)."""
    import dataclasses

    from torch._dynamo.eval_frame import OptimizedModule

    from pipeline.inference import native_bf16
    from pipeline.runtime.worker import build_stage

    config = SegmentConfig(source="s", output="o", **MODEL)
    spec = dataclasses.replace(_worker_spec(config), precision="fp32", compile=True)
    assert isinstance(build_stage(spec, torch.device("cpu")).segmenter.model, OptimizedModule)
    plain = build_stage(dataclasses.replace(spec, compile=False), torch.device("cpu"))
    assert not isinstance(plain.segmenter.model, OptimizedModule) and plain.segmenter.autocast_dtype is None
    # the defaults: bf16 and compiled where this CPU has native bf16, else fp32 and eager
    auto = build_stage(_worker_spec(SegmentConfig(source="s", output="o", model=MODEL["model"], weights=None,
                                                  num_classes=4)), torch.device("cpu")).segmenter
    bf16 = native_bf16(torch.device("cpu"))
    assert (auto.autocast_dtype == torch.bfloat16) == bf16 and isinstance(auto.model, OptimizedModule) == bf16


class PidWorker(SegmentWorker):
    """A replica that says which process it runs in, so that a test can kill it with its node."""

    def pid(self) -> int:
        return os.getpid()


@pytest.mark.slow
def test_a_run_whose_worker_nodes_are_all_lost_stops_with_a_clear_error(tmp_path, _ray_session):
    """Every worker node lost and none added (a fixed cluster): the replica's restart waits for
    a node that never comes, so the run stops once no_replica_timeout_s passes instead of
    hanging; the shards committed before stay, and the next run, on a new node, resumes."""
    import signal

    from ray.cluster_utils import Cluster

    ray.shutdown()  # this test's own cluster, not the module's shared Ray
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})  # decodes and writes; too small for the replica
    try:
        worker = cluster.add_node(num_cpus=2)
        ray.init(address=cluster.address, logging_level="WARNING")
        source, output = _local_source(tmp_path, 8, per_dir=2)
        config = SegmentConfig(source=source, output=output, batch_size=1, crf=False, cpus_per_actor=2, threads_per_actor=1,
                               batches_in_flight_per_actor=1, no_replica_timeout_s=3, **MODEL)
        lost_at, last = [], []

        def lose_the_worker(progress):
            last[:] = [progress.shards_committed]
            if progress.shards_committed == 1 and not lost_at:
                replica = ray.get_actor(f"segpipe-{progress.run_id}-0")
                pid = ray.get(replica.pid.remote())
                cluster.remove_node(worker, allow_graceful=False)
                os.kill(pid, signal.SIGKILL)  # its processes go with it (they outlive a killed raylet for a while)
                lost_at.append(time.monotonic())

        with pytest.raises(RunError, match=r"no model replica has been alive for 3 s \(no_replica_timeout_s;.*run again to resume"):
            run_segmentation(config, on_progress=lose_the_worker, worker_class=PidWorker)
        assert time.monotonic() - lost_at[0] < 30
        committed = last[0]
        assert committed >= 1 and len(list(Path(output, "_commits").iterdir())) == committed

        cluster.add_node(num_cpus=2)  # a node comes back: the next run does only what is left
        summary = run_segmentation(config)
        assert (summary.shards_skipped, summary.shards_committed, summary.images) == (committed, 4 - committed, 8 - 2 * committed)
        rows = _duckdb().sql(f"select image_id from read_parquet('{output}/images/**/*.parquet')").fetchall()
        assert sorted(r[0] for r in rows) == [f"d{i // 2}/{i:03d}.jpg" for i in range(8)]
    finally:
        ray.shutdown()
        cluster.shutdown()


class SlowWorker(PidWorker):
    """A replica that takes half a second a batch, so that a run outlasts another replica's restart."""

    def segment(self, records):
        time.sleep(0.5)
        return super().segment(records)

    def read_segment_write(self, *args):
        time.sleep(0.5)
        return super().read_segment_write(*args)


@pytest.mark.slow
def test_a_replica_restarted_on_a_node_it_shares_splits_the_cores_there(tmp_path, _ray_session):
    """Two CPU nodes of 3 cores, a replica on each running 3 threads. One node is lost, and Ray
    restarts its replica on the other, with the spec it was created with: alone on its node.
    The two replicas now sharing 3 cores run one thread each, not 3 (6 threads on 3 cores,
    which stalls OpenMP's barriers); and the run still does every image once."""
    import signal

    from ray.cluster_utils import Cluster

    ray.shutdown()  # this test's own cluster, not the module's shared Ray
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # lists and commits; hosts no replica
    try:
        kept, lost = cluster.add_node(num_cpus=3), cluster.add_node(num_cpus=3)
        ray.init(address=cluster.address, logging_level="WARNING")
        source, output = _local_source(tmp_path, 24, per_dir=2)
        config = SegmentConfig(source=source, output=output, batch_size=1, crf=False, actors=2,
                               batches_in_flight_per_actor=1, **MODEL)
        before, after = {}, {}

        def placements(run_id):
            answers = [ray.get(ray.get_actor(f"segpipe-{run_id}-{i}").ready.remote(), timeout=60) for i in range(2)]
            return {i: (a["node_id"], a["threads"]) for i, a in enumerate(answers)}

        def lose_a_node(progress):
            if progress.shards_committed == 1 and not before:
                before.update(placements(progress.run_id))
                on_lost = next(i for i, (node, _) in before.items() if node == lost.node_id)
                pid = ray.get(ray.get_actor(f"segpipe-{progress.run_id}-{on_lost}").pid.remote())
                cluster.remove_node(lost, allow_graceful=False)
                os.kill(pid, signal.SIGKILL)  # its processes go with it (they outlive a killed raylet for a while)
            elif progress.shards_committed == 12 and before and not after:
                after.update(placements(progress.run_id))

        summary = run_segmentation(config, on_progress=lose_a_node, worker_class=SlowWorker)
        assert sorted(before.values()) == sorted([(kept.node_id, 3), (lost.node_id, 3)])
        assert after == {0: (kept.node_id, 1), 1: (kept.node_id, 1)}
        assert [(r["node_id"], r["threads"]) for r in summary.replicas] == [(kept.node_id, 1)] * 2
        assert (summary.images, summary.errors) == (24, 0)
        rows = _duckdb().sql(f"select image_id from read_parquet('{output}/images/**/*.parquet')").fetchall()
        assert sorted(r[0] for r in rows) == sorted(f"d{i // 2}/{i:03d}.jpg" for i in range(24))
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_cpu_replicas_default_to_one_on_each_node_with_room(tmp_path, _ray_session):
    """A cluster of CPU nodes of two sizes and no --actors: one replica on each node with room
    for it and a CPU beside it for the decode and write tasks, running a thread per core of its
    node; the 1-CPU head hosts none. With --actors, the replicas are dealt over those nodes in
    turn, each up to its room, and share each node's cores."""
    from ray.cluster_utils import Cluster

    ray.shutdown()  # this test's own cluster, not the module's shared Ray
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        small, large = cluster.add_node(num_cpus=2), cluster.add_node(num_cpus=4)
        ray.init(address=cluster.address, logging_level="WARNING")
        source, output = _local_source(tmp_path, 8)
        config = SegmentConfig(source=source, output=output, batch_size=1, crf=False, **MODEL)
        summary = run_segmentation(config)
        assert (summary.images, summary.errors) == (8, 0)
        threads = {r["node_id"]: r["threads"] for r in summary.replicas}
        assert len(summary.replicas) == 2 and threads == {small.node_id: 2, large.node_id: 4}
        # the first run's replicas are killed as it ends, and Ray returns their CPUs a moment
        # later: a replica placed before then finds its node full and goes where there is room
        # (soft affinity), as it should on a busy cluster; this test wants the idle one
        deadline = time.monotonic() + 30
        while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
            time.sleep(0.2)
        # 4 replicas of a CPU each: the large node has room for 3, the small one for 1
        dealt = run_segmentation(config.model_copy(update={"actors": 4, "output": f"{output}-4"}))
        assert Counter(r["node_id"] for r in dealt.replicas) == {large.node_id: 3, small.node_id: 1}
        assert {r["node_id"]: r["threads"] for r in dealt.replicas} == {large.node_id: 1, small.node_id: 2}
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_replicas_started_ahead_are_taken_over_by_the_run(ray_cpu, tmp_path):
    """The command line starts Ray and the replicas while Prefect starts; the run uses them
    (their run id names its rows), and a config other than theirs is refused."""
    from pipeline.runtime.replicas import Replicas

    source, output = _local_source(tmp_path, 2)
    config = SegmentConfig(source=source, output=output, crf=False, **MODEL)
    replicas = Replicas(config)
    replicas.start()
    try:
        with pytest.raises(ValueError, match="another config"):
            run_segmentation(config.model_copy(update={"batch_size": 1}), replicas=replicas)
        summary = run_segmentation(config, replicas=replicas)
    finally:
        replicas.close()
    assert (summary.run_id, summary.images, summary.errors) == (replicas.run_id, 2, 0)
    node = ray_cpu.get_runtime_context().get_node_id()
    assert summary.replicas == [{"device": "cpu", "gpu_ids": [], "threads": 2, "precision": "fp32", "node_id": node, "batch_io": "replica",
                                 "compile_seconds": 0.0}]
    # closed: ray.kill returns at once and Ray's control store marks the actors dead a moment
    # later, while they still count as named actors (a CI run saw one listed)
    deadline = time.monotonic() + 30
    while [name for name in ray_cpu.util.list_named_actors() if replicas.run_id in name] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [name for name in ray_cpu.util.list_named_actors() if replicas.run_id in name]


class RenamingWorker(SegmentWorker):
    """A replica whose model carries other class names than the run was planned for, as if
    the checkpoint had been rewritten while the run started."""

    def ready(self):
        answer = super().ready()
        answer["meta"]["class_names"] = [f"renamed_{name}" for name in answer["meta"]["class_names"]]
        return answer


def test_replicas_that_loaded_another_model_stop_the_run(ray_cpu, tmp_path):
    source, output = _local_source(tmp_path, 1)
    config = SegmentConfig(source=source, output=output, crf=False, **MODEL)
    with pytest.raises(RunError, match="not the model the run was planned for"):
        run_segmentation(config, worker_class=RenamingWorker)
    assert not Path(output, "_commits").exists()
