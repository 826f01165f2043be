"""The decode, segment and write stages and the per-shard commit, without Ray: each is a plain
function or class called on tiny images."""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import os
import time

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import pipeline.outputs
from pipeline.decode import ImageDecodeError, decode_image
from pipeline.inference import Segmenter
from pipeline.io_stages import read_and_decode, write_masks
from pipeline.masks import decode_mask
from pipeline.models import build_model
from pipeline.outputs import (
    CLASS_STATS_SCHEMA,
    IMAGES_SCHEMA,
    LayoutMismatchError,
    OutputStore,
    RunInfo,
)
from pipeline.records import ImageRecord, mask_key
from pipeline.run import plan_shard
from pipeline.samples import synthetic_scene
from pipeline.stages import SegmentStage
from pipeline.storage import Shard, SourceFile, is_case_insensitive, iter_shards, open_location


def _encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def test_decode_common_modes_to_rgb():
    rgb = synthetic_scene(12, 16, 0)[0]
    assert np.array_equal(decode_image(_encode(rgb, "PNG")), rgb)
    grey = decode_image(_encode(rgb[..., 0], "PNG"))
    assert grey.shape == (12, 16, 3) and np.array_equal(grey[..., 2], rgb[..., 0])
    rgba = np.dstack([rgb, np.full((12, 16), 7, np.uint8)])
    assert np.array_equal(decode_image(_encode(rgba, "PNG")), rgb)
    sixteen = (np.arange(12 * 16, dtype=np.uint16).reshape(12, 16) * 300)
    decoded = decode_image(_encode(sixteen, "PNG"))
    assert decoded.dtype == np.uint8 and decoded[..., 0].max() > 200  # scaled, not clipped to 255


def test_decode_multiband_uint16_tiff_in_band_planes():
    """Satellite data: 4 bands of 11-bit values in separate planes (Pillow cannot read these)."""
    import tifffile

    rng = np.random.default_rng(0)
    bands = rng.integers(100, 2048, size=(4, 20, 30), dtype=np.uint16)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, bands, planarconfig="separate", photometric="minisblack")
    rgb = decode_image(buffer.getvalue())
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8
    # stretched per band: the brightest and darkest pixels of band 0 land at the ends of 0..255
    assert rgb[..., 0].flat[np.argmax(bands[0])] == 255 and rgb[..., 0].flat[np.argmin(bands[0])] == 0
    assert np.corrcoef(rgb[..., 1].ravel(), bands[1].ravel())[0, 1] > 0.95


def test_decode_real_geotiff(shared_data):
    data = (shared_data / "aerial" / "geotiff" / "sample_geotiff.tif").read_bytes()
    rgb = decode_image(data)
    assert rgb.shape == (900, 900, 3)
    assert 40 < np.median(rgb) < 215 and rgb.std() > 30  # a visible image, not black or flat


def test_decode_applies_exif_orientation():
    tall = np.zeros((8, 4, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    data = _encode(tall, "JPEG", exif=exif.tobytes())
    assert decode_image(data).shape == (4, 8, 3)


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "empty"),
    (b"<html>not an image</html>", "not_an_image"),
])
def test_decode_errors_have_reasons(data, reason):
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data)
    assert err.value.reason == reason


def test_truncated_and_oversized_images_are_refused():
    data = _encode(synthetic_scene(64, 64, 1)[0], "JPEG")
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data[: len(data) // 2])
    # the size the file has, not the leftover of Pillow's last read ("(8 bytes not processed)")
    assert err.value.reason == "corrupt" and str(err.value).endswith(
        f"cannot decode: image file is truncated (the file ends after {len(data) // 2} bytes)")
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, max_pixels=64 * 64 - 1)
    assert err.value.reason == "too_large" and "4096 pixels" in str(err.value)


def test_mask_keys_replace_the_extension_and_refuse_escapes():
    assert mask_key("2026-11-20/cam 1/ä#1.JPG") == "masks/2026-11-20/cam 1/ä#1.png"
    for bad in ["../x.jpg", "a/../../x.jpg", "/etc/x.jpg", "a//b.jpg", "a/\x00.jpg"]:
        with pytest.raises(ValueError, match="unsafe key"):
            mask_key(bad)


def test_plan_shard_refuses_collisions_and_unsafe_keys():
    files = [SourceFile(k, 1, "v") for k in ["a.jpg", "a.png", "b.jpg", "../c.jpg"]]
    todo, refused = plan_shard(files)
    assert [f.key for f in todo] == ["a.jpg", "b.jpg"]
    assert {r.key: r.error_type for r in refused} == {"a.png": "mask_collision", "../c.jpg": "unsafe_key"}
    assert "a.jpg" in next(r.error for r in refused if r.key == "a.png")


def test_plan_shard_gives_a_raster_and_an_image_of_one_stem_a_mask_each():
    """An image keeps masks/<stem>.png; a raster of the stem is segmented (its mask .tif if it
    is georeferenced), and carries the image that keeps the PNG, for when it is not; a second
    raster of the stem is refused."""
    files = [SourceFile(k, 1, "v") for k in ["a.TIF", "a.jpg", "a.png", "a.tiff", "b.tif"]]
    todo, refused = plan_shard(files)
    assert [(f.key, f.png_mask_taken_by) for f in todo] == [("a.TIF", "a.jpg"), ("a.jpg", None), ("b.tif", None)]
    assert {r.key: r.error for r in refused} == {
        "a.png": "its mask masks/a.png would overwrite the mask of a.jpg; rename one of them",
        "a.tiff": "its mask masks/a.tif (masks/a.png if it is not georeferenced) would overwrite the mask of a.TIF; "
                  "rename one of them"}
    assert todo[0].size == 1 and todo[0].version == "v"  # the manifest's fields, unchanged


def test_stale_masks_are_compared_as_the_output_folds_case(tmp_path, monkeypatch):
    """Where A.png and a.png are one file (macOS, Windows), the mask_collision row a.jpg must
    not take down masks/A.png, which A.jpg wrote: stale paths are compared folded there."""
    output = tmp_path / "out"
    (output / "masks").mkdir(parents=True)
    (output / "masks" / "A.png").write_bytes(b"A.jpg's mask")
    (output / "masks" / "A.tif").write_bytes(b"stale")
    store = OutputStore(open_location(str(output)))
    store._case_insensitive = True  # as `is_case_insensitive` finds it on such a folder
    owner = ImageRecord("A.jpg", mask_key="masks/A.png")
    refused = ImageRecord("a.jpg")
    refused.fail("mask_collision", "its mask masks/a.png would overwrite the mask of A.jpg")
    # this folder is case-sensitive, so what is asked to be removed is what tells: the real
    # removal runs, and records what it was given
    removed = []
    real_remove = pipeline.outputs.remove_files
    monkeypatch.setattr(pipeline.outputs, "remove_files", lambda location, keys: removed.extend(keys) or real_remove(location, keys))
    store._remove_stale_masks({"A.jpg", "a.jpg"}, [owner, refused])
    assert "masks/a.png" not in removed and "masks/A.png" not in removed
    assert "masks/A.tif" in removed and (output / "masks" / "A.png").exists() and not (output / "masks" / "A.tif").exists()


def test_a_mask_written_before_its_image_failed_is_no_rows_and_is_removed(tmp_path):
    """A raster's mask is committed as its blocks finish; should the raster fail after that,
    its error row names no mask, and the shard's commit removes the file, so that no mask
    outlives its row."""
    output = tmp_path / "out"
    (output / "masks").mkdir(parents=True)
    (output / "masks" / "a.tif").write_bytes(b"a mask written before the failure")
    (output / "confidence").mkdir()
    (output / "confidence" / "a.tif").write_bytes(b"its confidence")
    record = ImageRecord("a.tif", mask_key="masks/a.tif", confidence_key="confidence/a.tif")
    record.fail("inference", "ValueError: failed after the mask was written")
    assert (record.mask_key, record.confidence_key) == (None, None)
    OutputStore(open_location(str(output)))._remove_stale_masks({"a.tif"}, [record])
    assert not (output / "masks" / "a.tif").exists() and not (output / "confidence" / "a.tif").exists()


def test_keys_differing_in_case_collide_only_where_the_output_folds_case(tmp_path):
    files = [SourceFile(k, 1, "v") for k in ["Cam/A.jpg", "cam/a.JPG", "b.jpg"]]
    todo, refused = plan_shard(files)
    assert len(todo) == 3 and not refused  # S3, Linux folders: two masks
    todo, refused = plan_shard(files, fold_case=True)  # macOS, Windows: one file
    assert [f.key for f in todo] == ["Cam/A.jpg", "b.jpg"]
    assert [(r.key, r.error_type) for r in refused] == [("cam/a.JPG", "mask_collision")]
    assert "Cam/A.jpg" in refused[0].error
    # the probe asks the folder itself, and leaves nothing behind
    folder = open_location(str(tmp_path))
    expected = os.path.exists(str(tmp_path).upper()) and os.path.samefile(tmp_path, str(tmp_path).upper())
    assert is_case_insensitive(folder) == expected
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def stage() -> SegmentStage:
    model = build_model("lraspp_mobilenet_v3_large", num_classes=4, weights=None)
    return SegmentStage(Segmenter(model, device="cpu", batch_size=2, precision="fp32"), crf=True)


def _source(tmp_path):
    (tmp_path / "src" / "d").mkdir(parents=True)
    for i, (h, w) in enumerate([(40, 56), (40, 56), (33, 47)]):
        (tmp_path / "src" / "d" / f"img{i}.jpg").write_bytes(_encode(synthetic_scene(h, w, i)[0], "JPEG"))
    (tmp_path / "src" / "d" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return open_location(str(tmp_path / "src"))


def test_stages_account_for_every_image(tmp_path, stage):
    source = _source(tmp_path)
    output = open_location(str(tmp_path / "out"))
    [shard] = list(iter_shards(source))
    records = write_masks(output, stage(read_and_decode(source, shard.files)), [(0, 0, 0)] * 4)
    assert [r.key for r in records] == [f.key for f in shard.files]
    broken = next(r for r in records if r.key == "d/broken.png")
    assert not broken.ok and broken.error_type == "corrupt" and broken.mask_key is None
    for record in (r for r in records if r.ok):
        mask = decode_mask((tmp_path / "out" / record.mask_key).read_bytes())
        assert mask.shape == (record.height, record.width)
        counts = np.bincount(mask.ravel(), minlength=4)
        assert dict(zip(record.stats.class_id.tolist(), record.stats.pixel_count.tolist(), strict=True)) == {
            c: int(n) for c, n in enumerate(counts) if n
        }
        assert record.image is None and record.labels is None  # nothing heavy travels back
        assert None not in (record.seconds.decode, record.seconds.inference, record.seconds.encode)


def test_one_failing_image_does_not_fail_its_batch(stage):
    good = ImageRecord("good.jpg", image=synthetic_scene(32, 32, 0)[0], width=32, height=32)
    bad = ImageRecord("bad.jpg", image=np.zeros((0, 5, 3), np.uint8), width=5, height=0)
    records = stage([good, bad])
    assert good.ok and good.stats is not None
    assert not records[1].ok and records[1].error_type == "inference"


def test_an_image_whose_logits_are_not_finite_fails_alone(stage):
    """A model that overflows on some input gives NaN logits: that image must become an
    `inference` row, not a mask of arbitrary labels, and its batch neighbours (refined by the
    CRF together with it) must get what they get without it. The overflow is stood for by a
    forward hook on the real model that turns the logits of an all-white image into NaN."""
    import pipeline.stages as stages

    def overflow_on_white(module, inputs, output):
        white = inputs[0].flatten(1).amin(dim=1) > 2  # normalised white is about 2.2 in every channel
        return torch.where(white[:, None, None, None], torch.full_like(output, float("nan")), output)

    segmenter = Segmenter(build_model("lraspp_mobilenet_v3_large", num_classes=4, weights=None), device="cpu",
                          batch_size=4, precision="fp32")
    without = SegmentStage(segmenter, crf=True)([r for i, r in enumerate(_records([(40, 56)] * 4)) if i != 1])
    handle = segmenter.model.register_forward_hook(overflow_on_white)
    try:
        records = _records([(40, 56)] * 4)
        records[1].image = np.full((40, 56, 3), 255, np.uint8)
        SegmentStage(segmenter, crf=True)(records)
    finally:
        handle.remove()
    assert [r.ok for r in records] == [True, False, True, True]
    assert records[1].error_type == "inference" and records[1].error == stages.NON_FINITE_LOGITS
    assert records[1].labels is None and records[1].stats is None
    for record, expected in zip([records[0], records[2], records[3]], without, strict=True):
        assert record.key == expected.key and np.array_equal(record.labels, expected.labels)
        np.testing.assert_allclose(record.stats.mean_confidence, expected.stats.mean_confidence, rtol=1e-5)


def _records(sizes):
    return [ImageRecord(f"{i}.jpg", image=synthetic_scene(h, w, i)[0], height=h, width=w) for i, (h, w) in enumerate(sizes)]


def test_images_refined_together_end_as_when_refined_alone(stage, monkeypatch):
    """The CRF runs once for the images of one size (up to `refine_pixels`): it must give each
    image what one-by-one refinement gives, and an image whose refinement fails (stood for by
    a CRF that refuses one image's pixels, as an out-of-memory error would) must fail alone."""
    import pipeline.stages as stages

    sizes = [(40, 56), (33, 47), (40, 56), (40, 56)]
    together = SegmentStage(stage.segmenter, crf=True)  # on a CPU, up to CPU_REFINE_PIXELS
    assert together.refine_pixels == stages.CPU_REFINE_PIXELS
    one_by_one = SegmentStage(stage.segmenter, crf=True, refine_pixels=0)
    alone, grouped = one_by_one(_records(sizes)), together(_records(sizes))
    for one, other in zip(alone, grouped, strict=True):
        assert one.ok and other.ok
        assert np.array_equal(one.labels, other.labels) and one.labels.dtype == np.uint8
        assert np.array_equal(one.stats.pixel_count, other.stats.pixel_count)
        np.testing.assert_allclose(one.stats.mean_confidence, other.stats.mean_confidence, rtol=1e-4)

    real_crf = stages.crf_logits

    def refusing(logits, images, **kw):
        if bool((images == 7).all(dim=(1, 2, 3)).any()):
            raise RuntimeError("CUDA out of memory (stand-in)")
        return real_crf(logits, images, **kw)

    monkeypatch.setattr(stages, "crf_logits", refusing)
    records = _records(sizes)
    records[2].image = np.full((40, 56, 3), 7, np.uint8)
    together(records)
    assert [r.ok for r in records] == [True, True, False, True]
    assert records[2].error_type == "inference" and "out of memory" in records[2].error
    assert np.array_equal(records[0].labels, alone[0].labels)


def test_a_crf_call_takes_images_of_one_size_up_to_its_pixels(stage, monkeypatch):
    """How many images each CRF call gets: one size per call, never more pixels than
    `refine_pixels` but at least one image, and every image of a size on a GPU (unbounded)."""
    import pipeline.stages as stages

    calls = []
    real_crf = stages.crf_logits

    def counting(logits, images, **kw):
        calls.append((len(images), tuple(images.shape[-2:])))
        return real_crf(logits, images, **kw)

    monkeypatch.setattr(stages, "crf_logits", counting)
    sizes = [(40, 56), (33, 47), (40, 56), (40, 56)]
    for pixels, expected in [(math.inf, [3, 1]), (2 * 40 * 56, [2, 1, 1]), (0, [1, 1, 1, 1]), (10, [1, 1, 1, 1])]:
        calls.clear()
        records = SegmentStage(stage.segmenter, crf=True, refine_pixels=pixels)(_records(sizes))
        assert all(r.ok for r in records)
        assert sorted((n for n, _ in calls), reverse=True) == expected, (pixels, calls)
        assert sum(n for n, _ in calls) == len(sizes)


def _run(run_id="r1", fingerprint="f1") -> RunInfo:
    return RunInfo(
        run_id=run_id, run_date=dt.date(2026, 11, 21), model="m", weights="none", num_classes=4,
        class_names=("sky", "building", "road", "car"), crf=True, source_url="s3://b/src", fingerprint=fingerprint,
    )


def test_commit_writes_tables_marker_and_manifest(tmp_path, stage):
    source = _source(tmp_path)
    store = OutputStore(open_location(str(tmp_path / "out")))
    shard, records = _segmented(store, source, stage)
    assert store.current_commit(shard, _run()) is None
    store.commit_shard(shard, records, _run())
    assert store.current_commit(shard, _run()) is not None
    assert store.current_commit(shard, _run(fingerprint="other settings")) is None
    out = tmp_path / "out"
    images = pq.read_table(out / "images" / f"shard={shard.shard_id}" / "part-0.parquet")
    assert images.schema.equals(IMAGES_SCHEMA) and images.num_rows == 4
    meta = pq.ParquetFile(out / "images" / f"shard={shard.shard_id}" / "part-0.parquet").metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    stats = pq.read_table(out / "class_stats" / f"shard={shard.shard_id}" / "part-0.parquet")
    assert stats.schema.equals(CLASS_STATS_SCHEMA)
    check = duckdb.sql(f"""
        select i.image_id, i.width * i.height as area, sum(s.pixel_count) as pixels, sum(s.fraction) as total
        from read_parquet('{out}/images/**/*.parquet', hive_partitioning=true) i
        join read_parquet('{out}/class_stats/**/*.parquet', hive_partitioning=true) s using (image_id)
        group by all""").fetchall()
    assert len(check) == 3 and all(area == pixels and abs(total - 1) < 1e-9 for _, area, pixels, total in check)
    errors = duckdb.sql(f"select image_id, error_type, image_uri from read_parquet('{out}/images/*/*.parquet') where status = 'error'").fetchall()
    assert errors == [("d/broken.png", "corrupt", "s3://b/src/d/broken.png")]


def test_commit_refuses_a_shard_with_missing_records(tmp_path):
    store = OutputStore(open_location(str(tmp_path / "out")))
    shard = Shard("s1", (SourceFile("a.jpg", 1, "v"), SourceFile("b.jpg", 1, "v")))
    with pytest.raises(RuntimeError, match="1 records and 0 kept rows for 2 inputs"):
        store.commit_shard(shard, [ImageRecord("a.jpg")], _run())
    assert not (tmp_path / "out" / "_commits").exists()


def test_recommit_replaces_rows_and_removes_masks_of_deleted_images(tmp_path, stage):
    source = _source(tmp_path)
    store = OutputStore(open_location(str(tmp_path / "out")))
    store.commit_shard(*_segmented(store, source, stage), _run("r1"))
    assert (tmp_path / "out" / "masks" / "d" / "img1.png").exists()
    (tmp_path / "src" / "d" / "img1.jpg").unlink()
    store.commit_shard(*_segmented(store, source, stage), _run("r2"))
    rows = duckdb.sql(f"select run_id, image_id from read_parquet('{tmp_path}/out/images/**/*.parquet') order by 2").fetchall()
    assert rows == [("r2", "d/broken.png"), ("r2", "d/img0.jpg"), ("r2", "d/img2.jpg")]
    assert not (tmp_path / "out" / "masks" / "d" / "img1.png").exists()
    assert (tmp_path / "out" / "masks" / "d" / "img0.png").exists()


def _segmented(store: OutputStore, source, stage) -> tuple[Shard, list[ImageRecord]]:
    """SOURCE's one shard as it is now, and its records with their masks written to `store`."""
    [shard] = list(iter_shards(source))
    return shard, write_masks(store.location, stage(read_and_decode(source, shard.files)), [(0, 0, 0)] * 4)


def _stop_commits_at_the_manifest(monkeypatch) -> None:
    """Commits fail as a run killed just before it writes a shard's manifest."""
    write = pipeline.outputs.write_atomic

    def write_until_the_manifest(location, key, data):
        if key.startswith("manifest/"):
            raise OSError("the run was killed here")
        write(location, key, data)
    monkeypatch.setattr(pipeline.outputs, "write_atomic", write_until_the_manifest)


def test_a_commit_stopped_before_its_manifest_is_finished_by_the_next(tmp_path, stage, monkeypatch):
    """The masks of images deleted at the source go before the manifest that names them is
    replaced, and the marker after it: a commit stopped in between leaves the old manifest, so
    the next commit still knows which masks to remove, and no marker passes the shard."""
    source = _source(tmp_path)
    store = OutputStore(open_location(str(tmp_path / "out")), source)
    store.commit_shard(*_segmented(store, source, stage), _run("r1"))
    (tmp_path / "src" / "d" / "img1.jpg").unlink()
    shard, records = _segmented(store, source, stage)
    _stop_commits_at_the_manifest(monkeypatch)
    with pytest.raises(OSError, match="killed"):
        store.commit_shard(shard, records, _run("r2"))
    monkeypatch.undo()
    assert store.current_commit(shard, _run("r2")) is None  # the old marker's digest is of the old manifest
    assert not (tmp_path / "out" / "masks" / "d" / "img1.png").exists()
    # stopped after the tables, before the masks were removed: the old manifest still names img1
    (tmp_path / "out" / "masks" / "d" / "img1.png").write_bytes(b"left by the stopped commit")
    again = OutputStore(open_location(str(tmp_path / "out")), source)
    again.commit_shard(shard, records, _run("r3"))
    assert not (tmp_path / "out" / "masks" / "d" / "img1.png").exists()
    assert again.current_commit(shard, _run("r3")) is not None


def test_a_shard_processed_again_loses_its_marker_and_is_recorded_underway_with_what_may_change(tmp_path):
    """A shard's masks are rewritten before it commits: its marker goes first, and its
    underway record names the images whose masks may change meanwhile, those it segments and
    those its tables hold that it no longer has (moved to a neighbouring shard, which may
    segment them): stopped there, the next run keeps no row of those, even if each came back
    as it was (a chunk's boundaries moved back, an image reverted). The commit removes it."""
    store = OutputStore(open_location(str(tmp_path / "out")))
    files = {key: SourceFile(key, 1, "v") for key in ("b.jpg", "c.jpg", "d.jpg")}
    before = Shard("s1", (files["b.jpg"], files["c.jpg"]))
    records = [ImageRecord(key, size=1, version="v") for key in ("b.jpg", "c.jpg")]
    store.commit_shard(before, records, _run("r1"))
    commit = store.current_commit(before, _run("r1"))
    assert commit is not None and len(store.kept_rows(before, commit, _run("r1"))) == 2
    # b.jpg moved to the shard before this one; d.jpg is new here
    now = Shard("s1", (files["c.jpg"], files["d.jpg"]))
    store.mark_underway(now, commit, "r2", ["d.jpg"])
    assert store.read_commit("s1") is None and store.current_commit(before, _run("r1")) is None
    assert store.read_underway("s1") == {"shard_id": "s1", "run_id": "r2", "fingerprint": "f1", "redoing": ["b.jpg", "d.jpg"]}
    assert store.stored_shards() == {"s1"}
    # the run stopped; b.jpg comes back as it was: only c.jpg keeps its row
    assert store.kept_rows(before, None, _run("r1")).keys == {"c.jpg"}
    # stopped again: what the record named stays named
    store.mark_underway(before, None, "r3", [])
    assert store.read_underway("s1")["redoing"] == ["b.jpg", "d.jpg"]
    # other settings keep nothing of the tables
    assert store.kept_rows(before, None, _run("r4", fingerprint="f2")) is None
    store.commit_shard(before, records, _run("r3"))
    assert store.read_underway("s1") is None and store.current_commit(before, _run("r3")) is not None
    # an image segmented by a stopped run takes its stem's mask: the image of its stem with a
    # row keeps none, though unchanged (a.jpg was segmented where a.png had its row, then deleted)
    stems = Shard("s3", (SourceFile("a.png", 1, "v"),))
    store.commit_shard(stems, [ImageRecord("a.png", size=1, version="v")], _run("r6"))
    store.mark_underway(Shard("s3", (SourceFile("a.jpg", 1, "v"), SourceFile("a.png", 1, "v"))),
                        store.read_commit("s3"), "r7", ["a.jpg"])
    assert store.kept_rows(stems, None, _run("r7")).keys == frozenset()
    # a shard all of whose rows are errors, committed without an image deleted at the source
    errors = Shard("s4", (SourceFile("x.jpg", 1, "v"), SourceFile("y.jpg", 1, "v")))
    failed = [ImageRecord(key, size=1, version="v") for key in ("x.jpg", "y.jpg")]
    for record in failed:
        record.fail("corrupt", "truncated")
    store.commit_shard(errors, failed, _run("r8"))
    left = Shard("s4", (SourceFile("x.jpg", 1, "v"),))
    kept = store.kept_rows(left, store.read_commit("s4"), _run("r9"))
    assert (len(kept), kept.errors) == (1, 1)
    store.mark_underway(left, store.read_commit("s4"), "r9", [])
    store.commit_shard(left, [], _run("r9"), kept)
    assert store.read_commit("s4")["errors"] == 1 and store.current_commit(left, _run("r9")) is not None
    # a shard never committed is recorded too, its tables nobody's
    new = Shard("s2", (files["d.jpg"],))
    store.mark_underway(new, None, "r5", ["d.jpg"])
    assert store.read_underway("s2") == {"shard_id": "s2", "run_id": "r5", "fingerprint": None, "redoing": ["d.jpg"]}
    assert store.kept_rows(new, None, _run("r5")) is None and store.stored_shards() == {"s1", "s2", "s3", "s4"}


def test_a_new_shard_stopped_before_its_manifest_is_still_found_and_finished(tmp_path, stage, monkeypatch):
    """A shard's first commit stopped after its images table: the shard is still found
    (`stored_shards`, for `remove_vanished_shards`), and its images table stands for the
    manifest it lacks, so the next commit removes the masks of images deleted meanwhile."""
    source = _source(tmp_path)
    store = OutputStore(open_location(str(tmp_path / "out")), source)
    shard, records = _segmented(store, source, stage)
    _stop_commits_at_the_manifest(monkeypatch)
    with pytest.raises(OSError, match="killed"):
        store.commit_shard(shard, records, _run("r1"))
    monkeypatch.undo()
    assert not (tmp_path / "out" / "manifest").exists()
    assert store.stored_shards() == {shard.shard_id}
    (tmp_path / "src" / "d" / "img1.jpg").unlink()
    store.commit_shard(*_segmented(store, source, stage), _run("r2"))
    assert not (tmp_path / "out" / "masks" / "d" / "img1.png").exists()
    assert (tmp_path / "out" / "masks" / "d" / "img0.png").exists()


def test_the_layout_is_recorded_with_the_first_commit(tmp_path):
    """A run refused or stopped before it commits a shard leaves no layout to bind the next."""
    store = OutputStore(open_location(str(tmp_path / "out")))
    store.check_layout("s3://b/src", "directory", 1000)
    assert not (tmp_path / "out" / "_segpipe.json").exists()
    OutputStore(open_location(str(tmp_path / "out"))).check_layout("s3://b/src", "directory", 10)  # nothing recorded
    store.commit_shard(Shard("s1", (SourceFile("a.jpg", 1, "v"),)), [ImageRecord("a.jpg")], _run())
    assert json.loads((tmp_path / "out" / "_segpipe.json").read_text())["shard_size"] == 1000


def test_a_layout_another_run_recorded_first_is_refused_at_the_commit(tmp_path):
    """Two runs start on an OUTPUT that records no layout yet, with other sharding: the one
    that commits second is refused, as it would have been at its start."""
    first, second = (OutputStore(open_location(str(tmp_path / "out"))) for _ in range(2))
    first.check_layout("s3://b/src", "directory", 1000)
    second.check_layout("s3://b/src", "directory", 10)
    second.commit_shard(Shard("s1", (SourceFile("a.jpg", 1, "v"),)), [ImageRecord("a.jpg")], _run())
    with pytest.raises(LayoutMismatchError, match="shard_size=10 but this run has shard_size=1000"):
        first.commit_shard(Shard("s2", (SourceFile("b.jpg", 1, "v"),)), [ImageRecord("b.jpg")], _run())
    assert not (tmp_path / "out" / "images" / "shard=s2").exists()


def test_layout_is_fixed_per_output(tmp_path):
    store = OutputStore(open_location(str(tmp_path / "out")))
    store.check_layout("s3://b/src", "directory", 1000)
    store.commit_shard(Shard("s1", (SourceFile("a.jpg", 1, "v"),)), [ImageRecord("a.jpg")], _run())
    store.check_layout("s3://b/src", "directory", 1000)
    with pytest.raises(LayoutMismatchError, match="shard_size=1000 but this run has shard_size=10"):
        store.check_layout("s3://b/src", "directory", 10)
    with pytest.raises(LayoutMismatchError, match="source"):
        store.check_layout("s3://b/other", "directory", 1000)


def test_an_images_seconds_leave_out_the_compilation_its_batch_paid():
    """The first batch of each size compiles the model (seconds, said once in the run's summary):
    its images' `inference_seconds` made them the night's slowest in the table."""
    model = build_model("lraspp_mobilenet_v3_large", num_classes=3, weights=None)
    stage = SegmentStage(Segmenter(model, device="cpu", batch_size=2, precision="fp32", compile=True), crf=False)
    records = [ImageRecord(f"{i}.jpg", image=synthetic_scene(48, 64, i)[0], height=48, width=64) for i in range(2)]
    started = time.perf_counter()
    stage(records)
    wall = time.perf_counter() - started
    assert stage.compile_seconds > 0 and all(r.ok for r in records), [r.error for r in records]
    assert sum(r.seconds.inference for r in records) <= wall - stage.compile_seconds
