"""Faults: the driver killed with SIGKILL mid-run, then run again."""

from __future__ import annotations

import io
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
    from pipeline.ray_runner import run_segmentation
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    summary = run_segmentation(SegmentConfig(source=sys.argv[1], output=sys.argv[2], model="lraspp_mobilenet_v3_large",
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
