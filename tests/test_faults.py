"""Faults: the driver killed with SIGKILL mid-run, then run again."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.samples import synthetic_scene


def _source(tmp_path, shards: int, per_shard: int):
    for s in range(shards):
        for i in range(per_shard):
            path = tmp_path / "src" / f"d{s:02d}" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            Image.fromarray(synthetic_scene(32, 48, s * 10 + i)[0]).save(buffer, format="JPEG")
            path.write_bytes(buffer.getvalue())
    return tmp_path / "src", tmp_path / "out"


DRIVER = textwrap.dedent("""
    import sys, ray
    from pipeline.config import SegmentConfig
    from pipeline.runtime.driver import run_segmentation
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    summary = run_segmentation(SegmentConfig(precision="fp32", source=sys.argv[1], output=sys.argv[2], model="lraspp_mobilenet_v3_large",
                                             weights=None, num_classes=4, batch_size=1))
    print("images", summary.images, "skipped", summary.shards_skipped, "committed", summary.shards_committed)
""")


@pytest.mark.slow
def test_driver_killed_mid_run_resumes_without_duplicates(tmp_path):
    source, output = _source(tmp_path, shards=8, per_shard=3)
    # its own session, so the driver and the Ray processes it started die together
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(source), str(output)], start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not list(output.glob("_commits/*.json")):  # kill it right after its first commit
        if driver.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the driver ended before it could be killed: {driver.stdout.read()}")
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    committed = {p.stem for p in (output / "_commits").glob("*.json")}
    assert 1 <= len(committed) < 8
    # readers never see a partial table: every Parquet file there is complete
    for path in output.rglob("*.parquet"):
        pq.read_table(path)
    # a write cut short leaves at most a hidden temporary, which no *.parquet glob matches
    assert all(p.name.startswith(".") for p in output.rglob("*.tmp"))

    again = subprocess.run([sys.executable, "-c", DRIVER, str(source), str(output)], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    skipped = int(again.stdout.split("skipped")[1].split()[0])
    assert skipped >= len(committed) and "committed" in again.stdout
    rows = duckdb.sql(f"select image_id, count(*) from read_parquet('{output}/images/**/*.parquet') group by 1").fetchall()
    assert sorted(rows) == sorted((f"d{s:02d}/{i}.jpg", 1) for s in range(8) for i in range(3))
    assert len(list((output / "_commits").glob("*.json"))) == 8
    masks = sorted(output.rglob("masks/**/*.png"))
    assert len(masks) == 24 and all(np.asarray(Image.open(m)).shape == (32, 48) for m in masks)


def _upload(bucket: str, options: dict, shards: int, per_shard: int) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    for s in range(shards):
        for i in range(per_shard):
            buffer = io.BytesIO()
            Image.fromarray(synthetic_scene(24, 32, s * 10 + i)[0]).save(buffer, format="JPEG")
            fs.pipe_file(f"{bucket[5:]}/in/d{s}/{i}.jpg", buffer.getvalue())


def _config(bucket: str, options: dict):
    from pipeline.config import SegmentConfig

    return SegmentConfig(precision="fp32", source=f"{bucket}/in", output=f"{bucket}/out", model="lraspp_mobilenet_v3_large",
                         weights=None, num_classes=4, crf=False, batch_size=1, storage_options=options)


def test_storage_failing_for_a_while_is_retried_and_loses_nothing(ray_cpu, flaky_s3):
    from pipeline.runtime.driver import run_segmentation

    bucket, direct, through_proxy, proxy = flaky_s3
    _upload(bucket, direct, shards=3, per_shard=2)
    started = []

    def fail_once_started(progress):
        if progress.images >= 1 and not started:
            started.append(True)
            proxy.fail_next(3)  # reads, mask writes and commits meet 503s, then it recovers

    summary = run_segmentation(_config(bucket, through_proxy), on_progress=fail_once_started)
    assert proxy.failed == 3
    assert (summary.images, summary.errors, summary.shards_committed) == (6, 0, 3)


def test_an_object_the_store_refuses_for_good_is_its_error_row_in_seconds(flaky_s3):
    """S3 refuses a GET for good with a 400 (InvalidRequest: an object encrypted with a
    customer's key, read without it), which s3fs raises as OSError(EINVAL): that image's
    read_error row at the first attempt. Taken as an outage, it was retried for 7.5 s, then
    stopped every night's run at that object as storage unavailable. A 503 is still retried."""
    import time

    from pipeline.io_stages import read_and_decode
    from pipeline.storage import StorageUnavailableError, iter_shards, open_location

    bucket, direct, through_proxy, proxy = flaky_s3
    _upload(bucket, direct, shards=1, per_shard=2)
    source = open_location(f"{bucket}/in", through_proxy)
    [shard] = list(iter_shards(source))
    proxy.refused[f"{bucket[5:]}/in/d0/0.jpg"] = (400, "InvalidRequest")
    started = time.monotonic()
    refused, decoded = read_and_decode(source, shard.files)
    assert time.monotonic() - started < 5
    assert (refused.error_type, decoded.ok) == ("read_error", True)
    assert refused.error.startswith("cannot read: OSError: [Errno 22]")
    proxy.refused[f"{bucket[5:]}/in/d0/0.jpg"] = (503, "SlowDown")
    with pytest.raises(StorageUnavailableError):
        read_and_decode(source, shard.files[:1])


def test_storage_down_as_a_run_starts_is_one_line_and_writes_nothing(flaky_s3):
    import s3fs

    from pipeline.config import RunError
    from pipeline.runtime.driver import run_segmentation

    bucket, direct, through_proxy, proxy = flaky_s3
    _upload(bucket, direct, shards=1, per_shard=1)
    proxy.fail_next(10**9)
    with pytest.raises(RunError, match=rf"^cannot read source {bucket}/in: StorageUnavailableError: .*still failing after 5 attempts"):
        run_segmentation(_config(bucket, through_proxy))
    assert not s3fs.S3FileSystem(**direct).exists(f"{bucket[5:]}/out")


def test_storage_that_stays_down_stops_the_run_and_the_next_run_resumes(ray_cpu, flaky_s3):
    import s3fs

    from pipeline.config import RunError
    from pipeline.runtime.driver import run_segmentation

    bucket, direct, through_proxy, proxy = flaky_s3
    _upload(bucket, direct, shards=4, per_shard=2)

    def go_down_after_a_commit(progress):
        if progress.shards_committed >= 1:
            proxy.fail_next(10**9)

    with pytest.raises(RunError, match=r"storage unavailable: .*still failing after 5 attempts.*run again to resume"):
        run_segmentation(_config(bucket, through_proxy), on_progress=go_down_after_a_commit)
    fs = s3fs.S3FileSystem(**direct)
    committed = fs.ls(f"{bucket[5:]}/out/_commits")
    assert 1 <= len(committed) < 4

    proxy.fail_next(0)  # storage is back
    s3fs.S3FileSystem.clear_instance_cache()
    summary = run_segmentation(_config(bucket, through_proxy))
    assert summary.shards_skipped >= len(committed) and summary.errors == 0
    con = duckdb.connect()
    con.register_filesystem(s3fs.S3FileSystem(**direct))
    rows = con.sql(f"select image_id, count(*) from read_parquet('{bucket}/out/images/**/*.parquet') group by 1").fetchall()
    assert sorted(rows) == sorted((f"d{s}/{i}.jpg", 1) for s in range(4) for i in range(2))


DISK_FULL = textwrap.dedent("""
    import datetime as dt, json, resource, sys
    import numpy as np
    from pipeline.outputs import OutputStore, RunInfo
    from pipeline.records import ImageRecord
    from pipeline.io_stages import write_masks
    from pipeline.stats import class_statistics
    from pipeline.storage import Shard, SourceFile, StorageUnavailableError, open_location

    store = OutputStore(open_location(sys.argv[1]))
    def shard(version):
        return Shard("s1", (SourceFile("a.jpg", 1, version), SourceFile("b.jpg", 1, version)))
    def records():
        out = []
        for seed, key in enumerate(["a.jpg", "b.jpg"]):
            labels = np.random.default_rng(seed).integers(0, 4, (256, 256), dtype=np.uint8)
            out.append(ImageRecord(key, labels=labels, width=256, height=256,
                                   stats=class_statistics(labels, np.ones(labels.shape, np.float32), 4)))
        return out
    def run(run_id):
        return RunInfo(run_id, dt.date(2026, 11, 21), "m", "none", 4, ("a", "b", "c", "d"), False, "src", "f")

    store.commit_shard(shard("v1"), write_masks(store.location, records(), [(0, 0, 0)] * 4), run("r1"))
    # the disk fills up: no file may grow past 2 KiB (Python ignores SIGXFSZ, so writes fail
    # with EFBIG, as they would with ENOSPC)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
    result = {}
    try:
        write_masks(store.location, records(), [(0, 0, 0)] * 4)
    except StorageUnavailableError as err:
        result["masks"] = str(err)
    try:
        written = [ImageRecord(r.key, width=256, height=256, stats=r.stats, mask_key="masks/" + r.key[0] + ".png")
                   for r in records()]
        store.commit_shard(shard("v2"), written, run("r2"))
    except OSError as err:
        result["commit"] = str(err)
    print(json.dumps(result))
""")


def test_a_full_disk_stops_writes_and_leaves_the_last_commit_intact(tmp_path):
    """Nothing corrupt is left: no partial mask, table or temporary file, and the shard's last
    commit still reads back whole. The next run re-processes the shard (its marker does not
    match the new inputs). That the Ray run stops on such a write is tested in test_runtime_driver."""
    from pipeline.masks import decode_mask
    from pipeline.outputs import OutputStore, RunInfo
    from pipeline.storage import Shard, SourceFile, open_location

    output = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", DISK_FULL, str(output)], capture_output=True, text=True,
                          timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert "cannot write" in errors["masks"] and "masks/a.png" in errors["masks"] and "File too large" in errors["masks"]
    assert "File too large" in errors["commit"]
    assert not [p for p in output.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]
    for name in ("a", "b"):
        assert decode_mask((output / "masks" / f"{name}.png").read_bytes()).shape == (256, 256)
    rows = duckdb.sql(f"select run_id, image_id from read_parquet('{output}/images/**/*.parquet') order by 2").fetchall()
    assert rows == [("r1", "a.jpg"), ("r1", "b.jpg")]
    assert json.loads((output / "_commits" / "s1.json").read_text())["run_id"] == "r1"
    store = OutputStore(open_location(str(output)))
    run = RunInfo("r3", dt.date(2026, 11, 21), "m", "none", 4, ("a", "b", "c", "d"), False, "src", "f")
    assert store.current_commit(Shard("s1", (SourceFile("a.jpg", 1, "v1"), SourceFile("b.jpg", 1, "v1"))), run) is not None
    assert store.current_commit(Shard("s1", (SourceFile("a.jpg", 1, "v2"), SourceFile("b.jpg", 1, "v2"))), run) is None
