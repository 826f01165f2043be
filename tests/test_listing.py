"""The archive is listed once, as the run goes: a real S3 API (moto's server) behind a proxy
that counts and slows down every LIST request, and a real local Ray."""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from urllib.parse import parse_qs, urlparse

import pytest
import s3fs
from PIL import Image

from pipeline.config import RunError, SegmentConfig
from pipeline.run import DONE, NOT_YET, Prefetched
from pipeline.runtime.driver import run_segmentation
from pipeline.samples import synthetic_scene

DIRECTORIES = 6


def _upload(bucket: str, options: dict) -> None:
    fs = s3fs.S3FileSystem(**options)
    for d in range(DIRECTORIES):
        for i in range(2):
            buffer = io.BytesIO()
            Image.fromarray(synthetic_scene(24, 32, d * 10 + i)[0]).save(buffer, format="JPEG")
            fs.pipe_file(f"{bucket[5:]}/in/d{d}/{i}.jpg", buffer.getvalue())


@pytest.mark.slow
def test_a_slow_listing_is_read_once_and_the_first_shard_commits_before_it_ends(ray_cpu, flaky_s3):
    bucket, direct, through_proxy, proxy = flaky_s3
    _upload(bucket, direct)
    proxy.list_delay_s = 2.0  # each LIST page: a huge archive's listing, slowed down
    config = SegmentConfig(precision="fp32", source=f"{bucket}/in", output=f"{bucket}/out", model="lraspp_mobilenet_v3_large",
                           weights=None, num_classes=4, crf=False, batch_size=1, storage_options=through_proxy)
    seen: list[tuple[int, int, bool]] = []
    summary = run_segmentation(config, on_progress=lambda p: seen.append((p.shards_committed, p.listed, p.listing_done)))

    assert (summary.images, summary.errors, summary.shards_committed) == (2 * DIRECTORIES, 0, DIRECTORIES)
    first_commit = next(entry for entry in seen if entry[0] >= 1)
    assert first_commit[2] is False, "the first shard waited for the whole listing"
    assert first_commit[1] < 2 * DIRECTORIES  # progress showed the images found so far ...
    assert seen[-1][1:] == (2 * DIRECTORIES, True)  # ... and the total once the listing ended
    prefixes = Counter(parse_qs(urlparse(path).query).get("prefix", [""])[0] for path in proxy.list_requests)
    source_lists = {prefix: n for prefix, n in prefixes.items() if prefix.startswith("in/")}
    # one page per directory level, each requested once: no count first, no existence check
    assert source_lists == {"in/": 1, **{f"in/d{d}/": 1 for d in range(DIRECTORIES)}}


def test_a_missing_source_stops_before_ray_starts(tmp_path):
    config = SegmentConfig(precision="fp32", source=str(tmp_path / "nothing"), output=str(tmp_path / "out"),
                           model="lraspp_mobilenet_v3_large", weights=None, num_classes=4)
    with pytest.raises(RunError, match="is not a folder that exists"):
        run_segmentation(config)  # no Ray session is open: it would have started one


def test_prefetched_stays_a_bounded_number_of_items_ahead():
    produced = []

    def items():
        for i in range(100):
            produced.append(i)
            yield i

    listing = Prefetched(items(), depth=2)
    time.sleep(0.5)
    # two queued and one more waiting to be put: never the whole iterator
    assert len(produced) <= 3
    assert list(listing.remaining()) == list(range(100))
    assert listing.get() is DONE


def test_prefetched_hands_the_producers_error_to_the_reader_and_waits_without_blocking():
    release = threading.Event()

    def items():
        yield "first"
        release.wait()
        raise OSError("listing page failed")

    listing = Prefetched(items())
    assert listing.get() == "first"
    assert listing.get(timeout=0.1) is NOT_YET  # the next page is on its way; the reader goes on
    release.set()
    with pytest.raises(OSError, match="listing page failed"):
        listing.get(timeout=5)


def test_a_closed_listing_leaves_no_thread_behind():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    listing = Prefetched(endless(), depth=2)
    assert listing.get() == 0
    listing.close()  # a run that stops early
    assert not listing._thread.is_alive()

