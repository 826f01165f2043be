"""What a run is, apart from Ray: its identity, its model's metadata, sizing rules and
progress. No Ray here: these rules are plain functions, tested as such."""

from __future__ import annotations

import datetime as dt
import os
import time

import pytest

from pipeline.config import RunError, SegmentConfig
from pipeline.run import (
    LARGE_FILE_BYTES,
    LARGE_TIFF_BYTES,
    RESULT_SETTINGS,
    Progress,
    batches,
    batches_in_flight,
    fingerprint,
    io_in_replica,
    model_meta,
    new_run_id,
    place_cpu_replicas,
    replica_threads,
)
from pipeline.storage import SourceFile

META = {"architecture": "deeplabv3_resnet101", "weights": "DEFAULT", "num_classes": 21, "class_names": ["a"] * 21,
        "preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3}, "model_kwargs": {}}


def test_batches_in_flight_follow_the_spare_cpus() -> None:
    assert batches_in_flight(None, 1, 1) == 3  # a 2-CPU machine: the three stages still overlap
    assert batches_in_flight(None, 15, 1) == 8  # a 16-CPU GPU node: more, but bounded
    assert batches_in_flight(None, 12, 2) == 6
    assert batches_in_flight(2, 15, 1) == 2  # as configured


def test_cpu_replicas_beside_their_files_read_and_write_them_themselves() -> None:
    local = {"source_url": "/data/frames", "output_url": "file:///data/out"}
    assert io_in_replica("auto", gpu=False, **local)
    assert not io_in_replica("auto", gpu=True, **local)  # the GPU would wait for its CPU's decoding
    for remote in ({"source_url": "s3://b/frames", "output_url": "/out"}, {"source_url": "/in", "output_url": "gs://b/out"}):
        assert not io_in_replica("auto", gpu=False, **remote)  # round trips overlap the model in tasks
    assert io_in_replica("replica", gpu=True, source_url="s3://b/f", output_url="s3://b/o")  # as asked
    assert not io_in_replica("tasks", gpu=False, **local)


def test_replica_threads_share_the_node() -> None:
    assert replica_threads(2, 1, 1.0) == 2  # one replica: every core, though it reserves one
    assert replica_threads(16, 4, 1.0) == 4
    assert replica_threads(2, 3, 0.5) == 1  # never fewer than one
    assert replica_threads(8, 2, 6.0) == 6  # never fewer than it reserved


def test_run_ids_sort_by_start_time_and_do_not_collide() -> None:
    early = new_run_id(dt.datetime(2026, 11, 20, 2, 0, tzinfo=dt.UTC))
    late = new_run_id(dt.datetime(2026, 11, 21, 2, 0, tzinfo=dt.UTC))
    assert early.startswith("20261120T020000Z-") and early < late
    assert len({new_run_id() for _ in range(100)}) == 100


def test_the_fingerprint_changes_with_every_setting_that_shapes_results() -> None:
    base_config = SegmentConfig(source="s3://a", output="s3://b")
    base = fingerprint(META, base_config)
    assert base == fingerprint(dict(META), base_config.model_copy())  # a function of the settings only
    changed = [
        fingerprint(META | {"weights": "COCO_WITH_VOC_LABELS_V1"}, base_config),
        fingerprint(META | {"num_classes": 19}, base_config),
        fingerprint(META | {"preprocessing": {"mean": [0.4] * 3, "std": [0.5] * 3}}, base_config),
        fingerprint(META | {"preprocessing": META["preprocessing"] | {"bands": [4, 3, 2]}}, base_config),
    ]
    # a model's preprocessing read before it had bands, and with none: the outputs written
    # before the field came stay up to date
    assert fingerprint(META | {"preprocessing": META["preprocessing"] | {"bands": None}}, base_config) == base
    changes = {"precision": "fp32", "crf": False, "tile": 512, "tile_stride": 256, "bands": (4, 3, 2), "confidence": True, "polygons": True,
               "min_polygon_area": 20.0, "simplify": 0.5}
    assert set(changes) == set(RESULT_SETTINGS)
    changed += [fingerprint(META, base_config.model_copy(update={name: value})) for name, value in changes.items()]
    assert base not in changed and len(set(changed)) == len(changed)
    # how fast results are made does not change them: those shards stay committed
    for name, value in {"batch_size": 2, "block": 1024, "actors": 3, "shard_size": 10}.items():
        assert fingerprint(META, base_config.model_copy(update={name: value})) == base


def test_batches_keep_order_and_the_remainder_and_put_large_files_alone() -> None:
    small = [SourceFile(f"f{i}.jpg", 100_000, "v") for i in range(7)]
    assert [[f.key for f in b] for b in batches(small, 3)] == [["f0.jpg", "f1.jpg", "f2.jpg"], ["f3.jpg", "f4.jpg", "f5.jpg"], ["f6.jpg"]]
    large = [SourceFile(f"r{i}.tif", LARGE_FILE_BYTES + 1, "v") for i in range(2)]
    files = [small[0], large[0], small[1], small[2], large[1], small[3]]
    # each large file goes to a replica of its own; the small ones still fill batches of 3
    assert [[f.key for f in b] for b in batches(files, 3)] == [["r0.tif"], ["f0.jpg", "f1.jpg", "f2.jpg"], ["r1.tif"], ["f3.jpg"]]
    exactly = SourceFile("edge.png", LARGE_FILE_BYTES, "v")  # a 4K PNG frame: still batched
    assert list(batches([exactly, small[0]], 3)) == [[exactly, small[0]]]


def test_tiffs_over_a_few_megabytes_go_alone_however_well_compressed() -> None:
    # a JPEG-compressed COG is far under LARGE_FILE_BYTES, but segmented alone all the same
    cogs = [SourceFile(f"scene{i}.TIF", LARGE_TIFF_BYTES + 1, "v") for i in range(2)]
    tile = SourceFile("tile.tiff", LARGE_TIFF_BYTES, "v")  # a small tile: batched with the frames
    frame = SourceFile("frame.jpg", LARGE_TIFF_BYTES + 1, "v")  # not a TIFF: batched
    files = [frame, cogs[0], tile, cogs[1]]
    assert [[f.key for f in b] for b in batches(files, 8)] == [["scene0.TIF"], ["scene1.TIF"], ["frame.jpg", "tile.tiff"]]


def test_cpu_replicas_go_one_to_a_node_or_in_turn_within_each_nodes_room() -> None:
    head, small, large = ("head", 1.0), ("small", 2.0), ("large", 16.0)
    # by default one on each node with a CPU to spare beside it: not on a 1-CPU head
    assert place_cpu_replicas([head, small, large], None, 1.0, "head") == [("large", 1), ("small", 1)]
    # a laptop: one replica with its cores
    assert place_cpu_replicas([("laptop", 2.0)], None, 1.0, "laptop") == [("laptop", 1)]
    # in turn, largest first, each node up to its room (the small one has room for one)
    assert place_cpu_replicas([small, large], 5, 1.0) == [("large", 4), ("small", 1), ("large", 4), ("large", 4), ("large", 4)]
    # one per core at half a CPU each, as the README suggests
    assert place_cpu_replicas([head, ("a", 2.0), ("b", 2.0)], 4, 0.5, "head") == [("a", 2), ("b", 2)] * 2
    # the driver's node is taken last
    assert place_cpu_replicas([("head", 4.0), large], 1, 1.0, "head") == [("large", 1)]
    # no node with room: Ray places the replicas, counted as spread over the nodes
    assert place_cpu_replicas([head], None, 1.0, "head") == [(None, 1)]
    assert place_cpu_replicas([("a", 2.0)], 3, 1.0) == [("a", 1), (None, 3), (None, 3)]


def test_progress_says_found_so_far_until_the_listing_ends() -> None:
    progress = Progress(listed=10, images=4)
    assert "4 images of 10+ found so far" in progress.describe()
    progress.listing_done = True
    assert "4 images of 10," in progress.describe()
    one = Progress(listed=1, images=1, errors=1, shards_committed=1, listing_done=True)
    assert "1 image of 1," in one.describe() and "1 error, 1 shard committed" in one.describe()


def test_progress_rate_counts_from_the_replicas_being_ready() -> None:
    """As the run summary's does: the seconds Ray and the model took to start are not the
    rate's, or the bar and the summary would disagree."""
    now = time.monotonic()
    progress = Progress(images=10, started=now - 100.0)
    assert progress.images_per_second == pytest.approx(0.1, rel=0.05)
    progress.ready_at = now - 5.0
    assert progress.images_per_second == pytest.approx(2.0, rel=0.05)
    assert "2.0 img/s" in progress.describe()


def test_model_meta_is_what_the_loaded_model_carries(tmp_path) -> None:
    """The run knows its model's metadata (and so which shards are up to date) before any model
    loads: it must be what the replicas' model reports once built."""
    from pipeline.models import build_model, save_checkpoint

    untrained = SegmentConfig(source="s", output="o", model="lraspp_mobilenet_v3_large", weights="none", num_classes=3)
    assert model_meta(untrained) == build_model(untrained.model, num_classes=3).meta.model_dump(mode="json")
    named = untrained.model_copy(update={"class_names": ("sky", "road", "car")})
    assert model_meta(named)["class_names"] == ["sky", "road", "car"]
    assert model_meta(named) == build_model(named.model, num_classes=3, class_names=named.class_names).meta.model_dump(mode="json")

    model = build_model("lraspp_mobilenet_v3_large", num_classes=3, class_names=("sky", "road", "car"))
    save_checkpoint(model, str(tmp_path / "m.pt"), model.meta)
    checkpoint = SegmentConfig(source="s", output="o", weights=str(tmp_path / "m.pt"))
    loaded = build_model(None, weights=str(tmp_path / "m.pt")).meta.model_dump(mode="json")
    assert model_meta(checkpoint) == loaded and loaded["weights"] == str(tmp_path / "m.pt")
    assert loaded["weights_digest"] and model_meta(untrained)["weights_digest"] is None
    # given from the working folder, recorded from anywhere: the run record's provenance
    relative = checkpoint.model_copy(update={"weights": os.path.relpath(tmp_path / "m.pt")})
    assert model_meta(relative)["weights"] == str(tmp_path / "m.pt")

    # published weights: described by torchvision's enum, nothing downloaded
    published = model_meta(SegmentConfig(source="s", output="o", model="lraspp_mobilenet_v3_large", weights="DEFAULT"))
    assert (published["weights"], published["num_classes"], published["class_names"][15]) == (
        "COCO_WITH_VOC_LABELS_V1", 21, "person")
    assert published["preprocessing"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                          "resize": "short_side", "size": [520], "bands": None}


def test_model_meta_refuses_what_the_replicas_would_refuse(tmp_path) -> None:
    with pytest.raises(RunError, match="num_classes is required"):
        model_meta(SegmentConfig.model_construct(source="s", output="o", model="lraspp_mobilenet_v3_large", weights=None,
                                                 num_classes=None, class_names=None, storage_options={}))
    with pytest.raises(RunError, match="num_classes=5 but weights DEFAULT have 21 classes"):
        model_meta(SegmentConfig(source="s", output="o", model="lraspp_mobilenet_v3_large", num_classes=5))
    with pytest.raises(RunError, match="cannot read checkpoint"):
        model_meta(SegmentConfig(source="s", output="o", weights=str(tmp_path / "missing.pt")))
