"""Georeferenced rasters end to end: block by block beside the model, a COG mask in the
source's CRS, polygons in GeoParquet, statistics with areas; read back by rasterio,
rio-cogeo's validator, geopandas and DuckDB. Real aerial tiles from ../shared/data, mosaicked
into rasters larger than a block."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import time
from pathlib import Path

import duckdb
import geopandas as gpd
import numpy as np
import pyproj
import pytest
import rasterio
import s3fs
import shapely
import torch
from PIL import Image
from rasterio.transform import from_origin
from rio_cogeo.cogeo import cog_validate

from pipeline.config import RasterSettings, SegmentConfig
from pipeline.evaluation import Pair, Pairing, ScoreSettings, build_report, class_table, score_pairs
from pipeline.inference import Segmenter
from pipeline.masks import encode_mask
from pipeline.models import ModelMeta, Preprocessing, build_model, save_checkpoint
from pipeline.outputs import OutputStore, RunInfo
from pipeline.rasters import band_limits, choose_bands, open_raster, plan_blocks, read_rgb
from pipeline.records import ImageRecord
from pipeline.stages import RasterStage, SegmentStage
from pipeline.storage import iter_shards, open_location
from pipeline.windows import window_starts

MODEL = "lraspp_mobilenet_v3_large"
CLASSES = 4
NODATA_BOX = (slice(40, 140), slice(60, 220))  # rows, columns of the mosaic left without data


def areal_scale(dataset) -> float:
    """How much larger an area is on the map than on the ground at a small raster's centre:
    PROJ's areal scale factor there (1/0.9996² on a UTM zone's central meridian)."""
    crs = pyproj.CRS.from_wkt(dataset.crs.to_wkt())
    lon, lat = pyproj.Transformer.from_crs(crs, crs.geodetic_crs, always_xy=True).transform(
        *(dataset.transform @ (dataset.width / 2, dataset.height / 2)))
    return pyproj.Proj(crs).get_factors(lon, lat).areal_scale


def _pixel_driven_model() -> torch.nn.Module:
    """An untrained model whose labels vary with the pixels: random weights give one class
    everywhere, so the classifier's weights are scaled up (a trained model is not needed to
    check where labels go, only labels that differ)."""
    torch.manual_seed(0)
    model = build_model(MODEL, num_classes=CLASSES, weights=None)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.startswith("classifier") and isinstance(module, torch.nn.Conv2d) and module.out_channels == CLASSES:
                module.weight.mul_(200)
                if module.bias is not None:
                    module.bias.zero_()
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "pixel-driven.pt"
    save_checkpoint(_pixel_driven_model(), str(path), ModelMeta.default(MODEL, CLASSES))
    return str(path)


def _mosaic(shared_data: Path, path: Path, *, height: int = 700, width: int = 900) -> Path:
    """LoveDA tiles mosaicked into one UTM GeoTIFF (0.3 m), with nodata 0 and a box without data."""
    tiles = [np.array(Image.open(p).convert("RGB")) for p in sorted((shared_data / "aerial/loveda/images").iterdir())]
    rows = [np.concatenate([tiles[(r + c) % len(tiles)][:350, :450] for c in range(2)], axis=1) for r in range(2)]
    pixels = np.concatenate(rows, axis=0)[:height, :width].copy()
    pixels[pixels.sum(axis=-1) == 0] = 1  # black pixels of the tiles are data, not nodata
    pixels[NODATA_BOX] = 0
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 5000000, 0.3, 0.3), nodata=0,
                       tiled=True, blockxsize=256, blockysize=256) as dst:
        dst.write(np.moveaxis(pixels, -1, 0))
    return path


def _as_geotiff(image: Path, path: Path) -> Path:
    """An ISPRS tile as the GeoTIFF a survey would deliver (UTM 32N, 5 cm)."""
    pixels = np.moveaxis(np.array(Image.open(image).convert("RGB")), -1, 0)
    with rasterio.open(path, "w", driver="GTiff", width=pixels.shape[2], height=pixels.shape[1], count=3, dtype="uint8",
                       crs="EPSG:32632", transform=from_origin(368000, 5808000, 0.05, 0.05)) as dst:
        dst.write(pixels)
    return path


def _raster_stage(folder: Path, output: Path, meta: ModelMeta | None = None, **settings) -> RasterStage:
    meta = meta or ModelMeta.default(MODEL, CLASSES)
    segmenter = Segmenter(_pixel_driven_model(), meta, device="cpu", batch_size=4, precision="fp32")
    stage = SegmentStage(segmenter, crf=settings.pop("crf", False))
    return RasterStage(stage, RasterSettings(**settings), source=open_location(str(folder)),
                       output=open_location(str(output)), palette=meta.palette, class_names=meta.class_names, run_id="run-1")


def _mask(path: Path) -> np.ndarray:
    with rasterio.open(path) as mask:
        return mask.read(1)


def test_blocks_give_exactly_the_labels_of_the_whole_raster(shared_data, tmp_path):
    """Without the CRF, a block's labels over its core are those of the whole raster slid
    with the same windows: the windows of the raster's grid fall where they would. Each
    window goes through the model once, though it reaches into up to four blocks."""
    (tmp_path / "src").mkdir()
    _mosaic(shared_data, tmp_path / "src" / "scene.tif", height=520, width=650)
    stage = _raster_stage(tmp_path / "src", tmp_path / "out", tile=128, block=256)
    cell = stage.segmenter.grid_cell()  # LR-ASPP: logits blended at 1/8, the raster padded to 520 x 656
    assert cell == 8
    windows_run = []
    hook = stage.segmenter.model.register_forward_hook(lambda _m, inputs, _o: windows_run.append(len(inputs[0])))
    record = stage(ImageRecord(key="scene.tif", georeferenced=True))
    hook.remove()
    assert record.ok, record.error
    assert len(plan_blocks(520, 650, crop=128, stride=96, block=256, margin=0, cell=cell)) == 4
    assert sum(windows_run) == len(window_starts(520, 128, 96)) * len(window_starts(656, 128, 96))
    with open_raster(open_location(str(tmp_path / "src")), "scene.tif") as dataset:
        bands = choose_bands(dataset, None)
        rgb, valid = read_rgb(dataset, rasterio.windows.Window(0, 0, dataset.width, dataset.height), bands,
                              band_limits(dataset, bands))
    whole = stage.segmenter.predict([rgb])[0].argmax(0).numpy()
    blocked = _mask(tmp_path / "out" / "masks" / "scene.tif")
    assert len(np.unique(whole[valid])) > 1  # labels that differ: a real check
    np.testing.assert_array_equal(blocked[valid], whole[valid])
    assert (blocked[~valid] == 255).all()  # nodata stays nodata


def test_the_crf_across_block_edges_matches_one_block(shared_data, tmp_path):
    (tmp_path / "src").mkdir()
    _mosaic(shared_data, tmp_path / "src" / "scene.tif", height=520, width=650)
    small = _raster_stage(tmp_path / "src", tmp_path / "small", tile=128, block=256, crf=True)
    large = _raster_stage(tmp_path / "src", tmp_path / "large", tile=128, block=1024, crf=True)
    assert small(ImageRecord(key="scene.tif", georeferenced=True)).ok
    assert large(ImageRecord(key="scene.tif", georeferenced=True)).ok
    blocked, whole = _mask(tmp_path / "small/masks/scene.tif"), _mask(tmp_path / "large/masks/scene.tif")
    # the pixels near block edges (rows and columns 256 and 512) are where seams would show
    edges = np.zeros_like(blocked, dtype=bool)
    for edge in (256, 512):
        edges[max(0, edge - 16) : edge + 16, :] = True
        edges[:, max(0, edge - 16) : edge + 16] = True
    assert (blocked[edges] == whole[edges]).mean() >= 0.99
    assert (blocked == whole).mean() >= 0.99


@pytest.mark.slow
def test_a_geotiff_on_s3_becomes_a_cog_mask_polygons_and_areas(ray_cpu, s3_bucket, shared_data, tmp_path, checkpoint):
    from pipeline.runtime.driver import run_segmentation

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    local = _mosaic(shared_data, tmp_path / "mosaic.tif")
    fs.put_file(str(local), f"{bucket[5:]}/in/survey/mosaic.tif")
    fs.put_file(str(shared_data / "aerial/geotiff/sample_geotiff.tif"), f"{bucket[5:]}/in/survey/spacenet.tif")
    vaihingen = _as_geotiff(next((shared_data / "aerial/vaihingen/images").iterdir()), tmp_path / "vaihingen.tif")
    fs.put_file(str(vaihingen), f"{bucket[5:]}/in/survey/vaihingen.tif")
    fs.put_file(str(shared_data / "aerial/potsdam/images" / next(iter(sorted(
        p.name for p in (shared_data / "aerial/potsdam/images").iterdir())))), f"{bucket[5:]}/in/plain/potsdam.png")
    config = SegmentConfig(precision="fp32", source=f"{bucket}/in", output=f"{bucket}/out", weights=checkpoint, tile=256, block=512,
                           polygons=True, confidence=True, storage_options=options)
    summary = run_segmentation(config)
    assert (summary.images, summary.errors) == (4, 0), summary.errors_by_type

    con = duckdb.connect()
    con.register_filesystem(fs)
    images = {r[0]: r[1:] for r in con.sql(f"""select image_id, mask_uri, confidence_uri, width, height
        from read_parquet('{bucket}/out/images/**/*.parquet', hive_partitioning = true)""").fetchall()}
    # a plain PNG keeps today's PNG mask; the georeferenced rasters get GeoTIFFs
    assert images["plain/potsdam.png"][0].endswith("masks/plain/potsdam.png")
    assert images["plain/potsdam.png"][1].endswith("confidence/plain/potsdam.png")
    sources = {"survey/mosaic.tif": local, "survey/spacenet.tif": shared_data / "aerial/geotiff/sample_geotiff.tif",
               "survey/vaihingen.tif": vaihingen}
    # a raster's time, split as an image's is: reading its blocks, segmenting, writing its outputs
    timings = con.sql(f"""select decode_seconds, inference_seconds, encode_seconds, seconds
        from read_parquet('{bucket}/out/images/**/*.parquet') where image_id like 'survey/%'""").fetchall()
    assert len(timings) == 3
    for decode, inference, encode, total in timings:
        assert min(decode, inference, encode) > 0 and total == pytest.approx(decode + inference + encode, rel=1e-5)
    scale = {}
    for key, source in sources.items():
        mask_uri, confidence_uri, width, height = images[key]
        assert mask_uri == f"{bucket}/out/masks/{key}" and confidence_uri == f"{bucket}/out/confidence/{key}"
        local_mask = tmp_path / key.replace("/", "_")
        fs.get_file(mask_uri, str(local_mask))
        assert cog_validate(str(local_mask))[0], cog_validate(str(local_mask))
        with rasterio.open(local_mask) as mask, rasterio.open(source) as src:
            # the mask lies exactly on the source: same CRS, transform and size
            assert (mask.crs, mask.transform, mask.width, mask.height) == (src.crs, src.transform, src.width, src.height)
            assert (mask.width, mask.height) == (width, height)
            # overviews down to one 512-pixel tile (a raster of one tile needs none)
            assert bool(mask.overviews(1)) == (max(mask.width, mask.height) > 512)
            assert mask.colormap(1)[1][:3] == tuple(ModelMeta.default(MODEL, CLASSES).palette[1])
            names = ModelMeta.default(MODEL, CLASSES).class_names
            assert [mask.tags(1)[f"CLASS_{i}"] for i in range(CLASSES)] == list(names)
            labels = mask.read(1)
            # a pixel's area on the ground: the map's (m² in these UTM rasters) over its scale
            pixel_area = abs(mask.transform.determinant) / areal_scale(mask)
            scale[key] = areal_scale(mask)
            bounds = shapely.box(*mask.bounds)
        stats = dict(con.sql(f"""select class_id, pixel_count from read_parquet('{bucket}/out/class_stats/**/*.parquet')
                                 where image_id = '{key}'""").fetchall())
        counts = np.bincount(labels[labels != 255].ravel(), minlength=CLASSES)
        assert stats == {c: int(n) for c, n in enumerate(counts) if n}  # nodata is not counted
        areas = dict(con.sql(f"""select class_id, area from read_parquet('{bucket}/out/class_stats/**/*.parquet')
                                 where image_id = '{key}'""").fetchall())
        assert areas == pytest.approx({c: int(n) * pixel_area for c, n in enumerate(counts) if n}, rel=1e-5)
        assert all(bounds.contains(g) or bounds.buffer(1e-6).contains(g) for g in _polygons(fs, bucket, tmp_path, key))
    # polygons: one GeoParquet file per raster (the mosaic is in UTM 33N, SpaceNet in 16N,
    # Vaihingen in 32N), read by geopandas with its CRS; per class, their areas add up to the
    # class's area. The replicas staged them; the commit moved them, leaving nothing staged.
    files = _polygon_files(fs, bucket, tmp_path)
    assert sorted(gpd.read_parquet(f).crs.to_epsg() for f in files) == [32616, 32632, 32633]
    assert sorted(gpd.read_parquet(f).image_id.unique().tolist()[0] for f in files) == sorted(sources)
    assert not fs.find(f"{bucket[5:]}/out/_staging")
    for file in files:
        polygons = gpd.read_parquet(file)
        for image_id, rows in polygons.groupby("image_id"):
            class_area = dict(con.sql(f"""select class_id, area from read_parquet('{bucket}/out/class_stats/**/*.parquet')
                                          where image_id = '{image_id}'""").fetchall())
            assert rows.groupby("class_id")["area"].sum().to_dict() == pytest.approx(class_area, rel=1e-12)
            assert rows.geometry.area.sum() == pytest.approx(sum(class_area.values()) * scale[image_id], rel=1e-5)
    # the README's spatial query, as written (its 'building' is class 1 of this model)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    [query] = [q for q in re.findall(r"```sql\n(.*?)```", readme, re.S) if "OUTPUT/polygons" in q]
    query = query.replace("OUTPUT", f"{bucket}/out").replace("'building'", "'class_1'")
    expected = {}
    for file in files:
        frame = gpd.read_parquet(file)
        # the column: a GeoDataFrame's .area is its geometries' area on the map
        for image_id, rows in frame[(frame.class_name == "class_1") & (frame["area"] > 200)].groupby("image_id"):
            expected[image_id] = (len(rows), rows["area"].sum())
    got = {r[0]: (r[1], r[2]) for r in con.sql(query).fetchall()}
    assert got.keys() == expected.keys()
    for image_id, (count, m2) in got.items():  # DuckDB rounds halves away from zero, Python to even
        assert count == expected[image_id][0] and abs(m2 - expected[image_id][1]) <= 0.5

    # a raster added to the folder: only it is segmented; the others keep their rows, their
    # masks (not written again) and their polygons files, and the shard's polygons are all four's
    modified = {key: fs.info(f"{bucket[5:]}/out/masks/{key}")["LastModified"] for key in sources}
    fs.put_file(str(shared_data / "aerial/geotiff/sample_geotiff.tif"), f"{bucket[5:]}/in/survey/spacenet-2.tif")
    fs.invalidate_cache()
    added = run_segmentation(config)
    assert (added.images, added.images_kept, added.shards_committed, added.shards_skipped) == (1, 3, 1, 1)
    fs.invalidate_cache()
    assert {key: fs.info(f"{bucket[5:]}/out/masks/{key}")["LastModified"] for key in sources} == modified
    shutil.rmtree(tmp_path / "polygons")  # downloaded again
    files = _polygon_files(fs, bucket, tmp_path)
    assert sorted(gpd.read_parquet(f).image_id.unique().tolist()[0] for f in files) == sorted([*sources, "survey/spacenet-2.tif"])
    rows = con.sql(f"select image_id, run_id from read_parquet('{bucket}/out/images/**/*.parquet')").fetchall()
    assert sorted(rows) == sorted([(key, summary.run_id) for key in [*sources, "plain/potsdam.png"]]
                                  + [("survey/spacenet-2.tif", added.run_id)])


def test_polygons_are_staged_by_the_replica_and_moved_by_the_commit(shared_data, tmp_path):
    """A raster's polygons leave the replica as a staged file, not in its record; the commit
    moves each to a part of its shard, and a recommit without one of the rasters leaves
    exactly the parts of the rasters it has."""
    (tmp_path / "src").mkdir()
    for name in ("a.tif", "b.tif"):
        _mosaic(shared_data, tmp_path / "src" / name, height=300, width=400)
    source, out = open_location(str(tmp_path / "src")), tmp_path / "out"
    stage = _raster_stage(tmp_path / "src", out, tile=128, block=256, polygons=True)
    store = OutputStore(open_location(str(out)))
    run = RunInfo(run_id="run-1", run_date=dt.date(2026, 11, 22), model=MODEL, weights="none", num_classes=CLASSES,
                  class_names=stage.class_names, crf=False, source_url=str(tmp_path / "src"), fingerprint="f")

    def commit() -> list[str]:
        [shard] = list(iter_shards(source))
        records = [stage(ImageRecord(key=f.key, georeferenced=True)) for f in shard.files]
        assert all(r.ok and r.polygons_key and (out / r.polygons_key).exists() for r in records)
        store.commit_shard(shard, records, run)
        assert not list((out / "_staging").rglob("*.parquet"))
        parts = (out / "polygons").rglob("*.parquet")
        return sorted(gpd.read_parquet(p).image_id.unique().tolist() for p in parts)

    assert commit() == [["a.tif"], ["b.tif"]]
    (tmp_path / "src" / "b.tif").unlink()
    assert commit() == [["a.tif"]]


def test_components_count_every_region_whatever_the_polygons_settings(shared_data, tmp_path):
    """`components` in the class statistics is the raster's regions of each class: the same
    without --polygons, and with --min-polygon-area and --simplify, which drop and reshape only
    the polygons written (those of at least the area, counted in pixels before simplifying)."""
    (tmp_path / "src").mkdir()
    _mosaic(shared_data, tmp_path / "src" / "a.tif", height=300, width=400)

    def segmented(name: str, **settings) -> tuple[dict[int, int], gpd.GeoDataFrame | None]:
        stage = _raster_stage(tmp_path / "src", tmp_path / name, tile=128, block=256, **settings)
        record = stage(ImageRecord(key="a.tif", georeferenced=True))
        assert record.ok, record.error
        components = dict(zip(record.stats.class_id.tolist(), record.stats.components.tolist(), strict=True))
        rows = gpd.read_parquet(tmp_path / name / record.polygons_key) if record.polygons_key else None
        return components, rows

    plain, _ = segmented("plain")
    every, all_rows = segmented("every", polygons=True)
    areas = all_rows["area"]  # the column: GeoDataFrame.area is the geometries' (simplified) area
    threshold = float(np.median(areas))  # about half the regions are smaller
    filtered, kept_rows = segmented("filtered", polygons=True, min_polygon_area=threshold, simplify=0.6)
    assert plain == every == filtered
    assert all_rows.groupby("class_id").size().to_dict() == every  # one row per region
    assert areas.min() < threshold and len(kept_rows) == int((areas >= threshold).sum()) < len(all_rows)
    assert sorted(kept_rows["area"]) == sorted(areas[areas >= threshold])


def _polygon_files(fs: s3fs.S3FileSystem, bucket: str, tmp_path: Path) -> list[Path]:
    local = tmp_path / "polygons"
    if not local.exists():
        fs.get(f"{bucket}/out/polygons/", str(local), recursive=True)
    return sorted(local.rglob("*.parquet"))


def _polygons(fs: s3fs.S3FileSystem, bucket: str, tmp_path: Path, image_id: str) -> list[shapely.Geometry]:
    frames = [gpd.read_parquet(f) for f in _polygon_files(fs, bucket, tmp_path)]
    return [g for frame in frames for g in frame[frame.image_id == image_id].geometry]


def test_evaluation_reads_geotiff_masks_by_window_against_png_or_geotiff_ground_truth(shared_data, tmp_path):
    """The SpaceNet footprints scored against themselves, as a GeoTIFF and as a PNG, and
    against a prediction that gets one building wrong."""
    footprints = shared_data / "aerial/geotiff/sample_fp_mask.tif"
    with rasterio.open(footprints) as gt:
        truth, profile = gt.read(1), gt.profile
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt_png").mkdir()
    (tmp_path / "gt_tif").mkdir()
    prediction = (truth > 0).astype(np.uint8)
    prediction[:100, :100] = 0  # buildings missed there
    profile.update(dtype="uint8", nodata=255, count=1)
    with rasterio.open(tmp_path / "pred" / "tile.tif", "w", **profile) as dst:
        dst.write(prediction, 1)
    (tmp_path / "gt_png" / "tile.png").write_bytes(encode_mask(truth))
    with rasterio.open(tmp_path / "gt_tif" / "tile.tif", "w", **(profile | {"nodata": None})) as dst:
        dst.write(truth, 1)
    settings = ScoreSettings(num_classes=2, label_map={255: 1})
    expected = np.bincount(2 * (truth > 0).astype(int).ravel() + prediction.ravel(), minlength=4).reshape(2, 2)
    for folder, key in [("gt_png", "tile.png"), ("gt_tif", "tile.tif")]:
        batch = score_pairs(open_location(str(tmp_path / "pred")), open_location(str(tmp_path / folder)),
                            [Pair("tile", "tile.tif", key)], settings)
        assert batch.excluded == [] and batch.image_ids == ["tile"]
        np.testing.assert_array_equal(batch.confusion, expected)


def test_evaluation_skips_ground_truth_nodata_and_refuses_masks_that_are_not_one_band_or_not_in_place(shared_data, tmp_path):
    """A GeoTIFF ground truth's nodata is unlabelled, not a class. A colour-coded ground truth
    (three bands, as ISPRS ships its labels), or one in another CRS or shifted, is named and
    left out, never scored by its first band or its pixels alone."""
    geotiff = shared_data / "aerial/geotiff"
    with rasterio.open(geotiff / "sample_fp_mask.tif") as gt, rasterio.open(geotiff / "sample_geotiff.tif") as image:
        truth, profile = (gt.read(1) > 0).astype(np.uint8), image.profile  # the footprints are the image's
    profile.update(dtype="uint8", count=1, nodata=255)
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    with rasterio.open(tmp_path / "pred" / "tile.tif", "w", **profile) as dst:
        dst.write(truth, 1)  # a perfect prediction
    unlabelled = truth.copy()
    unlabelled[:50] = 200  # nodata of the ground truth, not a class
    variants = {
        "nodata": (profile | {"nodata": 200}, unlabelled[None]),
        "nodata_a_class": (profile | {"nodata": 0}, truth[None]),  # inherited from imagery: 0 is background
        "colours": (profile | {"count": 3, "nodata": None}, np.stack([truth * 255, truth * 0, truth * 0])),
        "other_crs": (profile | {"crs": "EPSG:4326"}, truth[None]),
        "shifted": (profile | {"transform": profile["transform"] @ rasterio.Affine.translation(0, 100)}, truth[None]),
        # pixels a hundred-thousandth larger: each coefficient within a thousandth of a pixel,
        # the far corner several thousandths of a pixel away
        "scaled": (profile | {"transform": profile["transform"] @ rasterio.Affine.scale(1 + 1e-5)}, truth[None]),
        "degenerate": (profile | {"transform": rasterio.Affine(0, 0, 500000, 0, 0, 5000000)}, truth[None]),
    }
    for name, (variant, bands) in variants.items():
        (tmp_path / "gt" / name).mkdir()
        with rasterio.open(tmp_path / "gt" / name / "tile.tif", "w", **variant) as dst:
            dst.write(bands)
    settings = ScoreSettings(num_classes=2)

    def scored(name):
        return score_pairs(open_location(str(tmp_path / "pred")), open_location(str(tmp_path / "gt" / name)),
                           [Pair("tile", "tile.tif", "tile.tif")], settings)

    batch = scored("nodata")
    assert batch.excluded == [] and (batch.pixels, batch.nodata_pixels) == (truth.size, truth[:50].size)
    np.testing.assert_array_equal(batch.confusion, np.diag(np.bincount(truth[50:].ravel(), minlength=2)))
    report = build_report(batch, Pairing([Pair("tile", "tile.tif", "tile.tif")], [], []), settings, None)
    assert (report["unscored_pixels"], report["nodata_pixels"]) == (truth[:50].size, truth[:50].size)
    assert f"Not scored: {truth[:50].size} of {truth.size} pixels" in class_table(report, markdown=False)
    # no ignore-index advice for nodata; the nodata value's own, since a label map could make it a class
    assert class_table(report, markdown=False).endswith(
        f": {truth[:50].size} nodata; {truth[:50].size} are the ground truth's nodata value 200: if it marks a class, "
        """map it to one with --label-map '{"200": CLASS}'.""")
    batch = scored("nodata_a_class")
    np.testing.assert_array_equal(batch.confusion, np.diag(np.bincount(truth.ravel(), minlength=2)))
    for name, reason in [("colours", "has 3 bands: a mask must be a single band"),
                         ("other_crs", "do not cover the same pixels: CRS EPSG:32616 against EPSG:4326"),
                         ("shifted", "do not cover the same pixels: transform"),
                         ("scaled", "do not cover the same pixels: transform"),
                         ("degenerate", "do not cover the same pixels: the ground truth's transform")]:
        batch = scored(name)
        assert batch.image_ids == [] and len(batch.excluded) == 1, name
        assert reason in str(batch.excluded[0]), batch.excluded


def test_a_raster_whose_header_claims_too_many_pixels_is_an_error_row_before_any_block(tmp_path):
    from pipeline.io_stages import read_and_decode
    from pipeline.storage import SourceFile

    (tmp_path / "src").mkdir()
    with rasterio.open(tmp_path / "src" / "huge.tif", "w", driver="GTiff", width=4000, height=3000, count=1,
                       dtype="uint8", crs="EPSG:32633", transform=from_origin(0, 0, 1, 1), tiled=True,
                       sparse_ok=True) as dst:
        dst.write(np.zeros((1, 256, 256), np.uint8), window=rasterio.windows.Window(0, 0, 256, 256))
    [record] = read_and_decode(open_location(str(tmp_path / "src")), [SourceFile("huge.tif", 1, "v")],
                               max_raster_pixels=4000 * 3000 - 1)
    assert (record.ok, record.error_type) == (False, "too_large") and "--max-raster-pixels" in record.error
    [record] = read_and_decode(open_location(str(tmp_path / "src")), [SourceFile("huge.tif", 1, "v")])
    assert record.ok and record.georeferenced and (record.width, record.height) == (4000, 3000)


def test_a_raster_whose_logits_are_not_finite_is_an_error_row_with_nothing_written(shared_data, tmp_path):
    """A broken checkpoint (a NaN in the classifier's bias) gives NaN logits: the raster ends
    as one `inference` row naming the reason, and no mask or polygons reach the output."""
    from pipeline.stages import NON_FINITE_LOGITS

    (tmp_path / "src").mkdir()
    _mosaic(shared_data, tmp_path / "src" / "mosaic.tif", height=300, width=400)
    stage = _raster_stage(tmp_path / "src", tmp_path / "out", tile=128, block=256, polygons=True)
    with torch.no_grad():
        for module in stage.segmenter.model.modules():
            if isinstance(module, torch.nn.Conv2d) and module.out_channels == CLASSES and module.bias is not None:
                module.bias[0] = float("nan")
    record = stage(ImageRecord(key="mosaic.tif", georeferenced=True))
    assert (record.ok, record.error_type) == (False, "inference") and NON_FINITE_LOGITS in record.error
    assert record.mask_key is None and record.polygons_key is None
    assert not (tmp_path / "out").exists() or not any(p.is_file() for p in (tmp_path / "out").rglob("*"))


def test_a_colour_mapped_raster_is_segmented_as_the_rgb_its_colour_table_shows(shared_data, tmp_path):
    """A paletted GeoTIFF and the RGB GeoTIFF of the colours its table gives are one picture:
    their masks are equal, pixel for pixel."""
    (tmp_path / "src").mkdir()
    with rasterio.open(_mosaic(shared_data, tmp_path / "rgb.tif", height=300, width=400)) as src:
        pixels, profile = np.moveaxis(src.read(), 0, -1), src.profile
    quantised = Image.fromarray(pixels).quantize(colors=64)
    colours = np.array(quantised.getpalette()[: 3 * 64], dtype=np.uint8).reshape(64, 3)
    profile.update(nodata=None)
    with rasterio.open(tmp_path / "src" / "rgb.tif", "w", **profile) as dst:
        dst.write(np.moveaxis(np.asarray(quantised.convert("RGB")), -1, 0))
    with rasterio.open(tmp_path / "src" / "paletted.tif", "w", **{**profile, "count": 1}, photometric="palette") as dst:
        dst.write(np.asarray(quantised)[None])
        dst.write_colormap(1, {i: (*map(int, colours[i]), 255) for i in range(64)})
    stage = _raster_stage(tmp_path / "src", tmp_path / "out", tile=128, block=256)
    for key in ("rgb.tif", "paletted.tif"):
        assert stage(ImageRecord(key=key, georeferenced=True)).ok
    mask = _mask(tmp_path / "out" / "masks" / "paletted.tif")
    np.testing.assert_array_equal(mask, _mask(tmp_path / "out" / "masks" / "rgb.tif"))
    assert len(np.unique(mask)) > 1


def test_a_geographic_rasters_areas_are_m2_on_the_ground(shared_data, tmp_path):
    """A raster in longitude and latitude (30 m pixels at 60° N, whose area changes by 0.5%
    from its top row to its bottom one) has its class areas in m² block by block: they add up
    to the geodesic area of its data, and its polygons to its class areas."""
    (tmp_path / "src").mkdir()
    with rasterio.open(_mosaic(shared_data, tmp_path / "utm.tif", height=520, width=650)) as src:
        pixels, profile = src.read(), src.profile
    transform = from_origin(10.0, 60.0, 5.4e-4, 2.7e-4)
    profile.update(crs="EPSG:4326", transform=transform)
    with rasterio.open(tmp_path / "src" / "lonlat.tif", "w", **profile) as dst:
        dst.write(pixels)
    stage = _raster_stage(tmp_path / "src", tmp_path / "out", tile=128, block=256, polygons=True)
    record = stage(ImageRecord(key="lonlat.tif", georeferenced=True))
    assert record.ok, record.error
    geod = pyproj.Geod(ellps="WGS84")
    row_area = [abs(geod.polygon_area_perimeter([10, 10 + 5.4e-4, 10 + 5.4e-4, 10],
                                                [60 - 2.7e-4 * r, 60 - 2.7e-4 * r, 60 - 2.7e-4 * (r + 1),
                                                 60 - 2.7e-4 * (r + 1)])[0]) for r in range(520)]
    has_data = (pixels != 0).any(axis=0)
    assert record.stats.area.sum() == pytest.approx(float(has_data.sum(axis=1) @ row_area), rel=1e-6)
    polygons = gpd.read_parquet(tmp_path / "out" / record.polygons_key)
    by_class = polygons.groupby("class_id")["area"].sum()
    assert by_class.to_dict() == pytest.approx(dict(zip(record.stats.class_id.tolist(), record.stats.area.tolist(),
                                                        strict=True)), rel=1e-9)


def test_a_model_trained_on_other_bands_reads_them_unless_told_otherwise(tmp_path):
    """A checkpoint trained with --bands carries them (`Preprocessing.bands`): a raster is read
    in those bands without --bands, in --bands' where given, and one that lacks the model's
    bands is a missing_bands row that says whose bands they were."""
    rng = np.random.default_rng(3)
    pixels = rng.integers(1, 256, size=(4, 96, 96), dtype=np.uint8)
    (tmp_path / "src").mkdir()
    for name, count in (("bgrn.tif", 4), ("rgb.tif", 3)):
        with rasterio.open(tmp_path / "src" / name, "w", driver="GTiff", width=96, height=96, count=count,
                           dtype="uint8", crs="EPSG:32633", transform=from_origin(500000, 5000000, 0.3, 0.3)) as dst:
            dst.write(pixels[:count])

    def mask(output: str, meta: ModelMeta | None = None, **settings) -> np.ndarray:
        stage = _raster_stage(tmp_path / "src", tmp_path / output, meta, tile=64, **settings)
        record = stage(ImageRecord(key="bgrn.tif", georeferenced=True))
        assert record.ok, record.error
        return _mask(tmp_path / output / record.mask_key)

    false_colour = ModelMeta.default(MODEL, CLASSES, preprocessing=Preprocessing(bands=(4, 3, 2)))
    trained = mask("trained", false_colour)
    assert np.array_equal(trained, mask("asked", bands=(4, 3, 2)))
    assert not np.array_equal(trained, mask("rgb"))  # bands 1, 2, 3: other pixels, other labels
    assert np.array_equal(mask("overridden", false_colour, bands=(1, 2, 3)), mask("rgb-again"))
    record = _raster_stage(tmp_path / "src", tmp_path / "missing", false_colour, tile=64)(
        ImageRecord(key="rgb.tif", georeferenced=True))
    assert record.error_type == "missing_bands" and record.error.startswith("the model's bands [4, 3, 2]: band(s) [4]")


def test_a_raster_without_the_bands_asked_for_is_a_missing_bands_row(shared_data, tmp_path):
    (tmp_path / "src").mkdir()
    _mosaic(shared_data, tmp_path / "src" / "rgb.tif", height=200, width=200)
    stage = _raster_stage(tmp_path / "src", tmp_path / "out", tile=128, bands=(4, 2, 1))
    record = stage(ImageRecord(key="rgb.tif", georeferenced=True))
    assert (record.ok, record.error_type) == (False, "missing_bands") and "[4] not in the raster" in record.error


@pytest.mark.parametrize("dtype", ["complex64", "complex_int16"])  # GDAL's CFloat32, and CInt16 (Sentinel-1 SLC)
def test_a_raster_of_complex_samples_is_an_unsupported_row(tmp_path, dtype):
    """Radar's complex samples show no image as they are: one row naming the raster and the
    type, where their real parts were segmented (numpy dropping the imaginary ones)."""
    (tmp_path / "src").mkdir()
    with rasterio.open(tmp_path / "src" / "slc.tif", "w", driver="GTiff", width=64, height=64, count=1,
                       dtype=dtype, crs="EPSG:32633", transform=from_origin(500000, 5000000, 1, 1)) as dst:
        if dtype == "complex64":  # rasterio writes no CInt16 from numpy (it has no such type): zeros
            dst.write((np.ones((1, 64, 64)) + 1j).astype(np.complex64))
    record = _raster_stage(tmp_path / "src", tmp_path / "out", tile=64)(ImageRecord(key="slc.tif", georeferenced=True))
    assert (record.ok, record.error_type) == (False, "unsupported")
    assert record.error.startswith(f"{tmp_path / 'src' / 'slc.tif'}: complex samples ({dtype})")
    assert not (tmp_path / "out").exists() or not any(p.is_file() for p in (tmp_path / "out").rglob("*"))


def test_a_raster_storage_refuses_is_a_read_error_row_not_a_stopped_run(s3_bucket, get_object_denied, shared_data,
                                                                       tmp_path):
    """S3's AccessDenied on one raster, from a real S3 API, is that raster's `read_error` row
    (as the decode stage makes it for an image); the next raster is segmented. It was taken
    for a failed write of the mask, which stops the run."""
    bucket, options = s3_bucket
    root = bucket.removeprefix("s3://")
    fs = s3fs.S3FileSystem(**options)
    for name in ("denied", "allowed"):
        fs.put_file(str(_mosaic(shared_data, tmp_path / f"{name}.tif", height=200, width=200)), f"{root}/src/{name}.tif")
    stage = _raster_stage(tmp_path, tmp_path / "out", tile=128)
    with get_object_denied([f"{root}/src/denied.tif"]) as denied:
        stage.source = open_location(f"{bucket}/src", denied)
        records = [stage(ImageRecord(key=f"{name}.tif", georeferenced=True)) for name in ("denied", "allowed")]
    assert [(r.ok, r.error_type) for r in records] == [(False, "read_error"), (True, None)]
    assert records[0].error == "cannot read: PermissionError: Forbidden" and records[0].mask_key is None
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["allowed.tif"]


def test_the_readmes_notebook_example_segments_a_raster_as_written(tmp_path, monkeypatch):
    """The README's RasterStage example, run as written on a small generated UTM raster."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    [example] = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "RasterStage(" in block]
    (tmp_path / "survey").mkdir()
    rng = np.random.default_rng(0)
    with rasterio.open(tmp_path / "survey" / "tile_0001.tif", "w", driver="GTiff", width=400, height=300, count=3,
                       dtype="uint8", crs="EPSG:32633", transform=from_origin(500000, 5000000, 0.5, 0.5)) as dst:
        dst.write(rng.integers(0, 256, (3, 300, 400), dtype=np.uint8))
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    exec(compile(example, "README.md", "exec"), names)
    record, polygons = names["record"], names["polygons"]
    assert record.mask_key == "masks/tile_0001.tif" and record.polygons_key.startswith("_staging/notebook/")
    assert cog_validate(tmp_path / "survey-out" / record.mask_key)[0]  # (valid, errors, warnings)
    with rasterio.open(tmp_path / "survey-out" / record.mask_key) as mask:
        assert (mask.crs.to_epsg(), mask.width, mask.height) == (32633, 400, 300)
    # every pixel, in m² on the ground: on the zone's central meridian the map's are 0.9996² of them
    assert record.stats.area.sum() == pytest.approx(300 * 400 * 0.25 / 0.9996**2, rel=1e-6)
    assert polygons.crs.to_epsg() == 32633 and (polygons.area >= 20.0).all()
    assert set(polygons.class_id) <= set(record.stats.class_id.tolist())


def test_a_raster_and_an_image_of_one_stem_each_get_their_own_mask(ray_cpu, tmp_path):
    """Masks are masks/<stem>.png for images and masks/<stem>.tif for georeferenced rasters: a
    GeoTIFF beside its quick-look JPEG gets both masks. A TIFF that turns out not georeferenced
    would write the JPEG's PNG, and is refused once read, whichever is listed first; two
    rasters of one stem keep the first. Shards of one file each still plan a stem together."""
    from pipeline.runtime.driver import run_segmentation
    from pipeline.samples import synthetic_scene

    source = tmp_path / "survey"
    source.mkdir()

    def tiff(name: str, height: int, width: int, *, georeferenced: bool = True) -> None:
        place = {"crs": "EPSG:32633", "transform": from_origin(500000, 5000000, 0.3, 0.3)} if georeferenced else {}
        with rasterio.open(source / name, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8",
                           **place) as dst:
            dst.write(np.moveaxis(synthetic_scene(height, width, len(name))[0], -1, 0))

    def jpeg(name: str, height: int, width: int) -> None:
        Image.fromarray(synthetic_scene(height, width, 1)[0]).save(source / name)

    tiff("tile.tif", 120, 160)
    jpeg("tile.jpg", 30, 40)  # its quick-look
    tiff("plain.TIF", 30, 50, georeferenced=False)  # listed before plain.jpg ('T' < 'j')
    jpeg("plain.jpg", 40, 60)
    tiff("twin.tif", 64, 64)
    tiff("twin.tiff", 64, 64)
    (source / "broken.tif").write_bytes(b"not a raster" * 20)  # beside a quick-look: its error is its own
    jpeg("broken.jpg", 30, 40)
    config = SegmentConfig(precision="fp32", source=str(source), output=str(tmp_path / "out"), model=MODEL,
                           weights=None, num_classes=CLASSES, crf=False, shard_by="count", shard_size=1)
    summary = run_segmentation(config)
    assert (summary.images, summary.errors, summary.shards_committed) == (8, 3, 4)
    rows = {key: (status, error_type, error, mask) for key, status, error_type, error, mask in duckdb.sql(
        f"select image_id, status, error_type, error, mask_uri from read_parquet('{tmp_path}/out/images/**/*.parquet')"
    ).fetchall()}
    assert {key: row[:2] for key, row in rows.items()} == {
        "tile.tif": ("ok", None), "tile.jpg": ("ok", None), "plain.jpg": ("ok", None), "twin.tif": ("ok", None),
        "plain.TIF": ("error", "mask_collision"), "twin.tiff": ("error", "mask_collision"),
        "broken.jpg": ("ok", None), "broken.tif": ("error", "not_an_image")}
    assert rows["plain.TIF"][2] == ("it is not a georeferenced raster, so its mask masks/plain.png would overwrite the "
                                    "mask of plain.jpg; rename one of them")
    assert rows["twin.tiff"][2] == ("its mask masks/twin.tif (masks/twin.png if it is not georeferenced) would overwrite "
                                    "the mask of twin.tif; rename one of them")
    out = tmp_path / "out" / "masks"
    assert rows["tile.tif"][3].endswith("masks/tile.tif") and rows["tile.jpg"][3].endswith("masks/tile.png")
    with rasterio.open(out / "tile.tif") as mask:
        assert (mask.crs.to_epsg(), mask.height, mask.width) == (32633, 120, 160)
    assert Image.open(out / "tile.png").size == (40, 30)
    assert Image.open(out / "plain.png").size == (60, 40)  # the JPEG's, not the TIFF's 50 x 30
    assert sorted(p.name for p in out.iterdir()) == ["broken.png", "plain.png", "tile.png", "tile.tif", "twin.tif"]


def test_the_summary_says_what_a_raster_run_could_not_do_as_asked(ray_cpu, tmp_path):
    """With --polygons, TIFFs without both a CRS and a transform are counted (segmented as images:
    no polygons); a --bands that no raster has is said as the setting it is, beside the
    missing_bands rows."""
    from pipeline.run import summary_lines
    from pipeline.runtime.driver import run_segmentation
    from pipeline.samples import synthetic_scene

    source = tmp_path / "survey"
    source.mkdir()
    for name, place in (("placed.tif", {"crs": "EPSG:32633", "transform": from_origin(500000, 5000000, 0.3, 0.3)}),
                        ("unplaced.tif", {})):
        with rasterio.open(source / name, "w", driver="GTiff", width=64, height=48, count=3, dtype="uint8", **place) as dst:
            dst.write(np.moveaxis(synthetic_scene(48, 64, 1)[0], -1, 0))

    def summary(output: str, **settings) -> list[str]:
        config = SegmentConfig(precision="fp32", source=str(source), output=str(tmp_path / output), model=MODEL,
                               weights=None, num_classes=CLASSES, crf=False, **settings)
        return summary_lines(run_segmentation(config).as_record() | {"record": "r", "folders": []})

    said = summary("polygons", polygons=True)
    assert ("1 TIFF (unplaced.tif) without both a CRS and a transform was segmented as a plain image: PNG masks, no "
            "polygons or "
            "areas (sidecar .tfw and .aux.xml files are not read; a raster placed by ground control points or RPCs "
            "alone takes gdalwarp first)") in said
    assert not any("TIFF" in line for line in summary("masks"))  # without --polygons, PNG masks are what was asked
    # the one raster lacks band 5 (the plain TIFF, an image, takes no --bands)
    said = summary("bands", bands=(5,))
    assert "errors by reason: missing_bands 1 (placed.tif) (details: status = 'error' rows of the images table)" in said
    assert ("no raster has the bands the run read (--bands, else those the model was trained on): give these "
            "rasters' own with --bands (1-based)") in said
    # a raster that has band 5: the others' rows are theirs, the setting no mistake
    with rasterio.open(source / "five.tif", "w", driver="GTiff", width=64, height=48, count=5, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 5000000, 0.3, 0.3)) as dst:
        dst.write(np.zeros((5, 48, 64), np.uint8))
    said = summary("bands-some", bands=(5,))
    assert "errors by reason: missing_bands 1 (placed.tif) (details: status = 'error' rows of the images table)" in said
    assert not any("no raster has the bands" in line for line in said)



def test_a_rasters_seconds_leave_out_the_compilation_it_paid(tmp_path):
    """As for images (`SegmentStage`): the raster that compiled the model for its windows was the
    night's slowest in the images table by the compilation, said once in the run's summary."""
    (tmp_path / "src").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (3, 96, 128), dtype=np.uint8)
    with rasterio.open(tmp_path / "src" / "a.tif", "w", driver="GTiff", width=128, height=96, count=3, dtype="uint8",
                       crs="EPSG:32632", transform=from_origin(368000, 5808000, 0.5, 0.5)) as dst:
        dst.write(pixels)
    meta = ModelMeta.default(MODEL, CLASSES)
    segmenter = Segmenter(_pixel_driven_model(), meta, device="cpu", batch_size=4, precision="fp32", compile=True)
    stage = RasterStage(SegmentStage(segmenter, crf=False), RasterSettings(tile=64, block=256),
                        source=open_location(str(tmp_path / "src")), output=open_location(str(tmp_path / "out")),
                        palette=meta.palette, class_names=meta.class_names, run_id="run-1")
    started = time.perf_counter()
    record = stage(ImageRecord(key="a.tif", georeferenced=True))
    wall = time.perf_counter() - started
    assert record.ok and stage.stage.compile_seconds > 0, record.error
    seconds = record.seconds
    assert seconds.decode + seconds.inference + seconds.encode <= wall - stage.stage.compile_seconds
