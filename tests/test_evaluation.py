"""Pairing, label maps and dataset-wide scoring as plain functions (the evaluation flow's
work), on hand-made masks and on real CamVid ground truth."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import rasterio
import s3fs
from fsspec.implementations.local import LocalFileSystem
from rasterio.transform import from_origin

from pipeline.evaluation import (
    NothingToScoreError,
    Pair,
    Pairing,
    ScoreSettings,
    build_report,
    class_table,
    exclusion_summary,
    pair_masks,
    per_image_table,
    remap_ground_truth,
    score_pairs,
)
from pipeline.masks import encode_mask
from pipeline.metrics import confusion_matrix, scores
from pipeline.storage import Location, StorageUnavailableError, open_location


def test_label_map_keeps_unmapped_values_and_reduce_zero_label_shifts():
    gt = np.array([[0, 7, 8], [26, 255, 3]])
    mapped = remap_ground_truth(gt, ScoreSettings(num_classes=3, label_map={0: 255, 7: 0, 8: 1, 26: 2}))
    assert mapped.tolist() == [[255, 0, 1], [2, 255, 3]]
    # a 32-bit mask's signed nodata mapped like any value, its largest value left as it is
    # (a lookup table up to it would take 16 GiB), and every value mapped at once
    wide = np.array([[-2147483648, -1, 0], [2147483647, 255, 1]])
    mapped = remap_ground_truth(wide, ScoreSettings(num_classes=3, label_map={-2147483648: 255, 255: 1, 1: 0, 0: 1}))
    assert mapped.tolist() == [[255, -1, 1], [2147483647, 1, 0]]
    reduced = remap_ground_truth(np.array([[0, 1, 2], [255, 3, 0]]), ScoreSettings(num_classes=3, reduce_zero_label=True))
    assert reduced.tolist() == [[255, 0, 1], [255, 2, 255]]


def test_pairing_by_relative_key_with_suffixes_and_any_extension_case(tmp_path):
    for key in ["a/x_pred.png", "a/y_pred.PNG", "b/z_pred.png"]:
        (tmp_path / "p" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "p" / key).write_bytes(b"")
    for key in ["a/x_gt.png", "a/y_gt.png", "c/z_gt.png", "a/w_gt.jpg"]:
        (tmp_path / "g" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "g" / key).write_bytes(b"")
    pairing = pair_masks(open_location(str(tmp_path / "p")), open_location(str(tmp_path / "g")),
                         prediction_suffix="_pred", ground_truth_suffix="_gt")
    assert [(p.image_id, p.prediction, p.ground_truth) for p in pairing.pairs] == [
        ("a/x", "a/x_pred.png", "a/x_gt.png"), ("a/y", "a/y_pred.PNG", "a/y_gt.png")]
    assert pairing.unpaired_predictions == ["b/z_pred.png"]
    assert pairing.unpaired_ground_truth == ["c/z_gt.png"]
    assert pairing.rejected == [{"key": "a/w_gt.jpg", "side": "ground_truth", "reason": "not a mask (PNG or GeoTIFF)"}]
    # a file never paired is said in the one line, as a pair left out is (it was null with no pair left out)
    nothing = score_pairs(open_location(str(tmp_path / "p")), open_location(str(tmp_path / "g")), [], ScoreSettings(num_classes=2))
    assert exclusion_summary(nothing, ScoreSettings(num_classes=2), pairing.rejected) == (
        "1 file not paired, e.g. ground truth a/w_gt.jpg: not a mask (PNG or GeoTIFF)")
    table = class_table(build_report(nothing, pairing, ScoreSettings(num_classes=2), None), markdown=False)
    assert "Without a partner: 1 prediction and 1 ground-truth mask (see metrics.json)." in table
    assert "Excluded: 1 file not paired, e.g. ground truth a/w_gt.jpg" in table
    # only files not paired: said once, in the Excluded line
    alone = build_report(nothing, replace(pairing, unpaired_predictions=[], unpaired_ground_truth=[]),
                         ScoreSettings(num_classes=2), None)
    assert "Without a partner" not in class_table(alone, markdown=False)


def test_dataset_wide_iou_is_not_the_mean_of_per_image_iou(tmp_path):
    """Image 1 is large and right, image 2 is tiny and wrong: dataset-wide IoU weighs pixels."""
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    big = np.zeros((10, 10), np.uint8)
    big[:, 5:] = 1
    (tmp_path / "p" / "1.png").write_bytes(encode_mask(big))
    (tmp_path / "g" / "1.png").write_bytes(encode_mask(big))
    (tmp_path / "p" / "2.png").write_bytes(encode_mask(np.array([[1]], np.uint8)))
    (tmp_path / "g" / "2.png").write_bytes(encode_mask(np.array([[0]], np.uint8)))
    p, g = open_location(str(tmp_path / "p")), open_location(str(tmp_path / "g"))
    pairing = pair_masks(p, g)
    settings = ScoreSettings(num_classes=2)
    total = score_pairs(p, g, pairing.pairs, settings)
    report = build_report(total, pairing, settings, ["bg", "fg"])
    assert report["confusion_matrix"] == [[50, 1], [0, 50]]
    assert [c["iou"] for c in report["classes"]] == pytest.approx([50 / 51, 50 / 51])
    per_image = per_image_table(total, ["bg", "fg"]).to_pylist()
    assert per_image[1] == {"image_id": "2", "pixel_accuracy": 0.0, "iou_bg": 0.0, "iou_fg": 0.0}
    mean_of_images = np.mean([np.nanmean([r["iou_bg"], r["iou_fg"]]) for r in per_image])
    assert report["miou"] > 0.98 > mean_of_images + 0.4


def test_camvid_ground_truth_against_itself_and_a_degraded_copy(shared_data, tmp_path):
    labels = sorted((shared_data / "camvid" / "val" / "labels").glob("*.png"))[:6]
    truth = open_location(str(labels[0].parent))
    (tmp_path / "pred").mkdir()
    rng = np.random.default_rng(0)
    from pipeline.masks import decode_mask

    arrays = {}
    for path in labels:
        gt = decode_mask(path.read_bytes())
        noisy = gt.copy()
        flip = rng.random(gt.shape) < 0.1
        noisy[flip] = rng.integers(0, 11, flip.sum())
        noisy[noisy == 11] = 0  # predictions never contain the ignore label
        arrays[path.stem] = (gt, noisy)
        (tmp_path / "pred" / path.name).write_bytes(encode_mask(noisy))
    settings = ScoreSettings(num_classes=11, ignore_index=11)
    subset = [p for p in pair_masks(open_location(str(tmp_path / "pred")), truth).pairs]
    total = score_pairs(open_location(str(tmp_path / "pred")), truth, subset, settings)
    assert len(total.image_ids) == 6 and not total.excluded
    # the same as one confusion matrix over all pixels of all images at once
    gts = np.concatenate([a[0].ravel() for a in arrays.values()])
    preds = np.concatenate([a[1].ravel() for a in arrays.values()])
    assert np.array_equal(total.confusion, confusion_matrix(preds, gts, 11, ignore_index=11))
    assert 0.6 < scores(total.confusion)["miou"] < 0.95
    # the ground truth itself as prediction (its ignore pixels, which a model never predicts,
    # set to 0: they are not scored anyway) gives exactly 1
    (tmp_path / "exact").mkdir()
    for name, (gt, _) in arrays.items():
        (tmp_path / "exact" / f"{name}.png").write_bytes(encode_mask(np.where(gt == 11, 0, gt)))
    exact = open_location(str(tmp_path / "exact"))
    perfect = score_pairs(exact, truth, pair_masks(exact, truth).pairs, settings)
    assert len(perfect.image_ids) == 6 and scores(perfect.confusion)["miou"] == 1.0


def test_a_raster_beside_its_quick_look_is_scored_against_geotiff_ground_truth(tmp_path):
    """`segment` writes masks/a.tif for a raster and masks/a.png for its quick-look a.jpg:
    GeoTIFF ground truth pairs with the raster's COG, PNG ground truth with the PNG."""
    for folder in ("p", "g_tif", "g_png"):
        (tmp_path / folder).mkdir()
    truth = np.random.default_rng(0).integers(0, 3, (40, 50)).astype(np.uint8)
    profile = dict(driver="GTiff", width=50, height=40, count=1, dtype="uint8", crs="EPSG:32633",
                   transform=from_origin(500000, 5000000, 0.5, 0.5))
    for path in (tmp_path / "p" / "a.tif", tmp_path / "g_tif" / "a.tif"):
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(truth[None])
    (tmp_path / "p" / "a.png").write_bytes(encode_mask(truth[::4, ::4]))  # the quick-look's, a tenth the size
    (tmp_path / "g_png" / "a.png").write_bytes(encode_mask(truth[::4, ::4]))
    p = open_location(str(tmp_path / "p"))
    for folder, expected, other in (("g_tif", "a.tif", "a.png"), ("g_png", "a.png", "a.tif")):
        g = open_location(str(tmp_path / folder))
        pairing = pair_masks(p, g)
        assert [(x.prediction, x.ground_truth) for x in pairing.pairs] == [(expected, expected)]
        assert pairing.rejected == [{"key": other, "side": "prediction", "reason": f"pairs under the same key as {expected}"}]
        total = score_pairs(p, g, pairing.pairs, ScoreSettings(num_classes=3))
        assert total.excluded == [] and total.pixels == (truth if expected == "a.tif" else truth[::4, ::4]).size
    # ground truth of both kinds too: the raster's pair, whichever is listed first
    (tmp_path / "g_tif" / "a.png").write_bytes(encode_mask(truth[::4, ::4]))
    pairing = pair_masks(p, open_location(str(tmp_path / "g_tif")))
    assert [(x.prediction, x.ground_truth) for x in pairing.pairs] == [("a.tif", "a.tif")]


def test_second_mask_under_a_key_and_labels_out_of_range_are_reported_by_name(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    mask = np.array([[0, 1], [1, 0]], np.uint8)
    (tmp_path / "p" / "a.png").write_bytes(encode_mask(mask))
    (tmp_path / "p" / "b.png").write_bytes(encode_mask(np.array([[0, 1], [5, 0]], np.uint8)))
    (tmp_path / "g" / "a.png").write_bytes(encode_mask(np.array([[0, 9], [255, 0]], np.uint8)))
    (tmp_path / "g" / "a_gt.png").write_bytes(encode_mask(mask))
    (tmp_path / "g" / "b_gt.png").write_bytes(encode_mask(mask))
    p, g = open_location(str(tmp_path / "p")), open_location(str(tmp_path / "g"))
    pairing = pair_masks(p, g, ground_truth_suffix="_gt")
    assert [(x.prediction, x.ground_truth) for x in pairing.pairs] == [("a.png", "a.png"), ("b.png", "b_gt.png")]
    assert pairing.rejected == [{"key": "a_gt.png", "side": "ground_truth", "reason": "pairs under the same key as a.png"}]
    total = score_pairs(p, g, pairing.pairs, ScoreSettings(num_classes=2))
    assert total.excluded == [
        {"image_id": "a", "reason": "ground truth a.png holds labels [9] outside [0, 2) that are not ignore_index=255; "
                                    "pass the right num_classes and ignore_index, or map the labels to class ids"},
        {"image_id": "b", "reason": "prediction b.png holds labels [5] outside [0, 2); pass the right num_classes "
                                    "and ignore_index, or map the labels to class ids"},
    ]


def test_camvid_scored_without_its_ignore_index_is_told_to_pass_it_once(shared_data, tmp_path):
    """CamVid's 11 ("Unlabelled") with 11 classes: the advice is --ignore-index 11, for the
    whole dataset in one line with a count of files, not a label map once per file."""
    labels = sorted((shared_data / "camvid" / "val" / "labels").glob("*.png"))[:6]
    from pipeline.masks import decode_mask

    (tmp_path / "pred").mkdir()
    with_void = 0
    for path in labels:
        gt = decode_mask(path.read_bytes())
        with_void += bool((gt == 11).any())
        (tmp_path / "pred" / path.name).write_bytes(encode_mask(np.where(gt == 11, 0, gt)))
    assert with_void >= 2
    pred, truth = open_location(str(tmp_path / "pred")), open_location(str(labels[0].parent))
    pairing = pair_masks(pred, truth)
    settings = ScoreSettings(num_classes=11)  # --ignore-index left at its default, 255: the mistake
    total = score_pairs(pred, truth, pairing.pairs, settings)
    assert len(total.excluded) == with_void
    summary = exclusion_summary(total, settings)
    assert summary.startswith(f"{with_void} ground-truth masks hold the label 11, outside the 11 classes: "
                              "pass --ignore-index 11 if it marks pixels not to score")
    assert summary.count("--ignore-index") == 1 and "0016E5" not in summary  # once, not per file
    table = class_table(build_report(total, pairing, settings, None), markdown=False)
    assert table.count("--ignore-index 11") == 1
    # an ignore index of the user's own (here 0, for the sake of it) is their unlabelled value:
    # the advice is not to pass another, but that 11 may be a class
    chosen = ScoreSettings(num_classes=11, ignore_index=0)
    advice = exclusion_summary(score_pairs(pred, truth, pairing.pairs, chosen), chosen)
    assert advice.startswith(f"{with_void} ground-truth masks hold the label 11, outside the 11 classes and not "
                             "--ignore-index 0: pass --num-classes 12 if it is a class"), advice
    fixed = score_pairs(pred, truth, pairing.pairs, ScoreSettings(num_classes=11, ignore_index=11))
    assert not fixed.excluded and exclusion_summary(fixed, settings) is None


def test_the_advice_follows_what_the_stray_labels_are(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    ok = np.array([[0, 1], [2, 0]], np.uint8)
    masks = {  # name: (prediction, ground truth)
        "void": (ok, np.array([[0, 255], [2, 0]], np.uint8)),
        "void2": (ok, np.array([[255, 1], [2, 0]], np.uint8)),
        "wide": (ok, np.array([[0, 5], [7, 0]], np.uint8)),
        "pred": (np.array([[0, 4], [2, 0]], np.uint8), ok),
        "size": (ok, np.zeros((3, 3), np.uint8)),
    }
    for name, (p, g) in masks.items():
        (tmp_path / "p" / f"{name}.png").write_bytes(encode_mask(p))
        (tmp_path / "g" / f"{name}.png").write_bytes(encode_mask(g))
    p, g = open_location(str(tmp_path / "p")), open_location(str(tmp_path / "g"))

    def summary(names: list[str], settings: ScoreSettings) -> str | None:
        pairs = [x for x in pair_masks(p, g).pairs if x.image_id in names]
        return exclusion_summary(score_pairs(p, g, pairs, settings), settings)

    # 255 with another ignore index: --ignore-index 255, never --num-classes 256
    assert summary(["void", "void2"], ScoreSettings(num_classes=3, ignore_index=11)) == (
        "2 ground-truth masks hold the label 255, outside the 3 classes: pass --ignore-index 255 if it marks pixels "
        "not to score (unlabelled, void), or --label-map to map it to a class")
    # several values: a label map first
    assert summary(["wide"], ScoreSettings(num_classes=3)) == (
        "1 ground-truth mask holds labels 5, 7, outside [0, 3) and not --ignore-index 255: map them to class ids "
        "with --label-map, or pass the right --num-classes and --ignore-index")
    # predictions beyond the classes, and other reasons, each counted once
    assert summary(["pred", "size"], ScoreSettings(num_classes=3)) == (
        "1 prediction holds labels 4, not below --num-classes 3: pass the number of classes the model predicts; "
        "1 pair left out for other reasons, e.g. size: size mismatch: prediction size.png is 2x2, ground truth "
        "size.png is 3x3")


def test_pixels_not_scored_are_counted_and_said(tmp_path):
    """Footprints of 0 and 255 (as SpaceNet's) scored with the default --ignore-index 255 lose
    every building without an error: the table says how many pixels were not scored."""
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    truth = np.zeros((20, 20), np.uint8)
    truth[5:10, 5:10] = 255
    (tmp_path / "g" / "a.png").write_bytes(encode_mask(truth))
    (tmp_path / "p" / "a.png").write_bytes(encode_mask((truth > 0).astype(np.uint8)))
    p, g = open_location(str(tmp_path / "p")), open_location(str(tmp_path / "g"))
    pairing = pair_masks(p, g)

    def report(settings):
        return build_report(score_pairs(p, g, pairing.pairs, settings), pairing, settings, None)

    unmapped = report(ScoreSettings(num_classes=2))
    assert (unmapped["unscored_pixels"], unmapped["pixels"]) == (25, 400)
    assert unmapped["nodata_pixels"] == 0
    assert ("Not scored: 25 of 400 pixels (6.2%): 25 where the ground truth is --ignore-index 255; if 255 "
            "is a class of these masks, map it to one with --label-map.") in class_table(unmapped, markdown=False)
    mapped = report(ScoreSettings(num_classes=2, label_map={255: 1}))
    assert (mapped["unscored_pixels"], mapped["miou"]) == (0, 1.0)
    assert "Not scored" not in class_table(mapped, markdown=False)
    # an ignore index chosen for the masks (CamVid's 11): counted, without the advice meant for 0/255 masks
    chosen = report(ScoreSettings(num_classes=2, label_map={255: 11}, ignore_index=11))
    assert "Not scored: 25 of 400 pixels (6.2%): 25 where the ground truth is --ignore-index 11." in class_table(
        chosen, markdown=False)


def _geotiff(path: Path, labels: np.ndarray, *, mask: np.ndarray | None = None, **profile) -> Path:
    """`labels` as a one-band uint8 GeoTIFF on a UTM grid, with `profile`'s extras (nodata)
    and, given `mask`, an internal mask (0: no data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = labels.shape
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(
            path, "w", driver="GTiff", width=width, height=height, count=1, crs="EPSG:32633",
            transform=from_origin(500000, 5000000, 1, 1), **({"dtype": "uint8"} | profile)) as dst:
        dst.write(labels, 1)
        if mask is not None:
            dst.write_mask(mask)
    return path


def _columns(*labels: int, rows: int = 4) -> np.ndarray:
    return np.tile(np.array(labels, np.uint8), (rows, 1))


def _scored(folder: Path, prediction: str, ground_truth: str, settings: ScoreSettings):
    return score_pairs(open_location(str(folder / "p")), open_location(str(folder / "g")),
                       [Pair("a", prediction, ground_truth)], settings)


def test_a_prediction_nodata_value_that_is_a_class_id_is_scored_as_that_class(tmp_path):
    """One rule for both sides of a raster pair: a GeoTIFF's nodata value is left out unless it
    is a class id (nodata 0 inherited from the imagery is background), and a PNG's transparent
    colour is never nodata, as PNG pairs score it."""
    _geotiff(tmp_path / "g" / "a.tif", _columns(0, 0, 1, 1))
    prediction = _columns(0, 1, 1, 1)
    _geotiff(tmp_path / "p" / "a.tif", prediction, nodata=0)
    with rasterio.open(tmp_path / "p" / "a.png", "w", driver="PNG", width=4, height=4, count=1, dtype="uint8") as dst:
        dst.write(prediction, 1)
        dst.write_colormap(1, {0: (0, 0, 0, 0), 1: (255, 255, 255, 255)})  # index 0 transparent
    with rasterio.open(tmp_path / "p" / "a.png") as png:
        assert png.nodata == 0  # GDAL reports the transparent entry as nodata
    for key in ("a.tif", "a.png"):
        batch = _scored(tmp_path, key, "a.tif", ScoreSettings(num_classes=2))
        assert batch.excluded == [] and batch.confusion.tolist() == [[4, 4], [0, 8]], key
        assert (batch.pixels, batch.nodata_pixels) == (16, 0), key
    # a nodata value outside the classes is still left out
    _geotiff(tmp_path / "p" / "b.tif", _columns(255, 0, 1, 1), nodata=255)
    batch = _scored(tmp_path, "b.tif", "a.tif", ScoreSettings(num_classes=2))
    assert batch.confusion.tolist() == [[4, 0], [0, 8]] and batch.nodata_pixels == 4


def test_a_float_mask_with_nan_nodata_leaves_those_pixels_out(tmp_path):
    """A float32 label raster whose nodata is NaN (as rasters out of a GIS's raster calculator
    are): its NaN pixels are nodata, not labels out of range that leave the pair out."""
    labels = _columns(0, 0, 1, 1).astype(np.float32)
    labels[0] = np.nan
    for float_side, other_side in (("p", "g"), ("g", "p")):
        _geotiff(tmp_path / other_side / f"{float_side}.tif", _columns(0, 0, 1, 1))
        path = tmp_path / float_side / f"{float_side}.tif"
        path.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(path, "w", driver="GTiff", width=4, height=4, count=1, dtype="float32", crs="EPSG:32633",
                           transform=from_origin(500000, 5000000, 1, 1), nodata=float("nan")) as dst:
            dst.write(labels, 1)
    for key in ("p.tif", "g.tif"):
        batch = _scored(tmp_path, key, key, ScoreSettings(num_classes=2))
        assert batch.excluded == [] and batch.confusion.tolist() == [[6, 0], [0, 6]], batch.excluded
        assert (batch.pixels, batch.nodata_pixels) == (16, 4)


def test_an_internal_mask_on_either_side_is_nodata(tmp_path):
    """A GeoTIFF with no nodata value but an internal mask (as GDAL writes for a raster cut to a
    footprint): its masked pixels are not scored. With a nodata value that is a class id as
    well, the mask wins and the value is scored as its class."""
    truth = _columns(0, 0, 1, 1)
    mask = np.full(truth.shape, 255, np.uint8)
    mask[0] = 0  # the first row has no data
    _geotiff(tmp_path / "g" / "plain.tif", truth)
    _geotiff(tmp_path / "p" / "plain.tif", truth)
    _geotiff(tmp_path / "g" / "masked.tif", truth, mask=mask)
    _geotiff(tmp_path / "p" / "masked.tif", truth, mask=mask)
    _geotiff(tmp_path / "g" / "masked_nodata_0.tif", truth, mask=mask, nodata=0)
    for prediction, ground_truth in [("plain.tif", "masked.tif"), ("masked.tif", "plain.tif"),
                                     ("plain.tif", "masked_nodata_0.tif")]:
        batch = _scored(tmp_path, prediction, ground_truth, ScoreSettings(num_classes=2))
        assert batch.excluded == [] and batch.confusion.tolist() == [[6, 0], [0, 6]], (prediction, ground_truth)
        assert (batch.pixels, batch.nodata_pixels) == (16, 4), (prediction, ground_truth)


def test_a_ground_truth_nodata_value_the_label_map_makes_a_class_is_scored(tmp_path):
    """0/255 footprints saved with nodata 255 and scored with --label-map '{"255": 1}': the map
    says 255 is a class, so its pixels are scored as it, not dropped as nodata. Without it,
    they are nodata, and the table says how many and the way out."""
    truth = _columns(0, 0, 255, 255)
    _geotiff(tmp_path / "g" / "a.tif", truth, nodata=255)
    _geotiff(tmp_path / "p" / "a.tif", (truth > 0).astype(np.uint8))
    mapped = ScoreSettings(num_classes=2, label_map={255: 1})
    batch = _scored(tmp_path, "a.tif", "a.tif", mapped)
    assert batch.confusion.tolist() == [[8, 0], [0, 8]] and batch.nodata_pixels == 0
    assert "Not scored" not in class_table(build_report(batch, Pairing([], [], []), mapped, None), markdown=False)
    # without the map, 255 is no class: nodata
    unmapped = ScoreSettings(num_classes=2)
    batch = _scored(tmp_path, "a.tif", "a.tif", unmapped)
    assert batch.confusion.tolist() == [[8, 0], [0, 0]] and batch.nodata_pixels == 8
    report = build_report(batch, Pairing([], [], []), unmapped, None)
    assert report["ground_truth_nodata"] == {"255": 8}
    assert ("Not scored: 8 of 16 pixels (50.0%): 8 nodata; 8 are the ground truth's nodata value 255: if it marks a "
            """class, map it to one with --label-map '{"255": CLASS}'.""") in class_table(report, markdown=False)
    # a negative value (GIS tools' -9999): counted as nodata, without the advice (rarely a
    # class); mapped to a class, scored as it (it was dropped as nodata still)
    _geotiff(tmp_path / "g" / "b.tif", np.where(truth == 255, -9999, truth.astype(np.int16)), dtype="int16",
             nodata=-9999)
    batch = _scored(tmp_path, "a.tif", "b.tif", unmapped)
    assert batch.nodata_pixels == 8 and batch.truth_nodata == {}
    assert "--label-map" not in class_table(build_report(batch, Pairing([], [], []), unmapped, None), markdown=False)
    batch = _scored(tmp_path, "a.tif", "b.tif", ScoreSettings(num_classes=2, label_map={-9999: 1}))
    assert batch.confusion.tolist() == [[8, 0], [0, 8]] and batch.nodata_pixels == 0


class _Cut:
    """A file whose reads from byte `cut` on fail as a dropped connection does."""

    def __init__(self, file, cut: int) -> None:
        self.file, self.cut = file, cut

    def read(self, size: int = -1) -> bytes:
        if self.file.tell() >= self.cut:
            raise ConnectionError("connection reset by peer")
        return self.file.read(size)

    def __getattr__(self, name: str):
        return getattr(self.file, name)


class _OutageAfterHeaderFileSystem(LocalFileSystem):
    """Local files whose header reads back and whose pixels (from the first block on) do not:
    storage lost between opening a raster and reading its windows."""

    def __init__(self, cut: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cut = cut

    def _open(self, path, mode="rb", **kwargs):
        return _Cut(super()._open(path, mode, **kwargs), self.cut)


def test_storage_lost_while_a_geotiff_pair_is_read_raises_the_storage_error(tmp_path, monkeypatch):
    """As for PNG pairs: the storage's error, which stops the run, never a pair left out as an
    unreadable mask (the dataset's scores would silently lose it)."""
    monkeypatch.setattr("pipeline.storage.time.sleep", lambda seconds: None)  # the retries' backoff
    labels = _columns(*[0, 1] * 150, rows=300)
    _geotiff(tmp_path / "g" / "a.tif", labels)
    path = _geotiff(tmp_path / "p" / "a.tif", labels)
    with rasterio.open(path) as src:
        first_block = int(src.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1))
    fs = _OutageAfterHeaderFileSystem(first_block, skip_instance_cache=True)
    predictions = Location(fs=fs, root=str(tmp_path / "p"), url=str(tmp_path / "p"))
    with pytest.raises(StorageUnavailableError, match=r"after 5 attempts.*ConnectionError"):
        score_pairs(predictions, open_location(str(tmp_path / "g")), [Pair("a", "a.tif", "a.tif")],
                    ScoreSettings(num_classes=2))
    # a file cut short is no outage: named and left out
    with open(path, "r+b") as file:
        file.truncate(first_block + 100)
    batch = _scored(tmp_path, "a.tif", "a.tif", ScoreSettings(num_classes=2))
    assert batch.image_ids == [] and "a.tif: cannot read window" in batch.excluded[0]["reason"], batch.excluded


def test_a_mask_storage_refuses_leaves_its_pair_out_named_and_the_others_are_scored(s3_bucket, get_object_denied,
                                                                                     tmp_path):
    """AccessDenied on one GeoTIFF and one PNG, from a real S3 API: each pair is left out with
    the side and key refused (s3fs's PermissionError says neither), as a corrupt mask is; the
    run goes on. It raised out of the raster pair's scoring, failing the whole evaluation."""
    bucket, options = s3_bucket
    root = bucket.removeprefix("s3://")
    fs = s3fs.S3FileSystem(**options)
    labels = _columns(0, 1, 1, 0)
    for side in ("p", "g"):
        for name in ("a", "b"):
            fs.put_file(str(_geotiff(tmp_path / side / f"{name}.tif", labels)), f"{root}/{side}/{name}.tif")
        fs.pipe_file(f"{root}/{side}/c.png", encode_mask(labels))
    settings = ScoreSettings(num_classes=2)
    with get_object_denied([f"{root}/p/a.tif", f"{root}/g/c.png"]) as denied:
        predictions, truth = open_location(f"{bucket}/p", denied), open_location(f"{bucket}/g", denied)
        pairing = pair_masks(predictions, truth)
        total = score_pairs(predictions, truth, pairing.pairs, settings)
    assert total.image_ids == ["b"] and total.confusion.tolist() == [[8, 0], [0, 8]]
    report = build_report(total, pairing, settings, None)
    assert report["excluded"] == [  # the raster's open asks for its size first: HEAD, whose 403 has no message
        {"image_id": "a", "reason": "cannot read prediction a.tif: PermissionError: Forbidden"},
        {"image_id": "c", "reason": "cannot read ground truth c.png: PermissionError: Access Denied"}]
    assert report["excluded_summary"] == (
        "2 pairs left out, e.g. a: cannot read prediction a.tif: PermissionError: Forbidden; c: cannot read ground "
        "truth c.png: PermissionError: Access Denied")


def test_a_suffix_that_ends_no_mask_name_is_said_with_the_option_and_one_mask(tmp_path):
    for key in ["city/a_gtFine.png", "city/b_gtFine.png", "city/b.png"]:
        (tmp_path / "g" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "g" / key).write_bytes(b"")
    (tmp_path / "p" / "city").mkdir(parents=True)
    (tmp_path / "p" / "city" / "a.png").write_bytes(b"")
    (tmp_path / "p" / "city" / "b.png").write_bytes(b"")
    p, g = open_location(str(tmp_path / "p")), open_location(str(tmp_path / "g"))
    # _gt for _gtFine: nothing removed, and only city/b pairs, by its whole name
    mistyped = pair_masks(p, g, prediction_suffix="_pred", ground_truth_suffix="_gt")
    assert [x.ground_truth for x in mistyped.pairs] == ["city/b.png"]
    assert mistyped.unmatched_suffixes == [
        "--prediction-suffix _pred matches none of the 2 predictions, e.g. city/a.png",
        "--ground-truth-suffix _gt matches none of the 3 ground-truth masks, e.g. city/a_gtFine.png"]
    # a suffix that ends one mask's name is taken as meant
    assert pair_masks(p, g, ground_truth_suffix="_gtFine").unmatched_suffixes == []


def test_pairing_nothing_is_refused_with_what_would_pair(tmp_path):
    """pair_masks itself refuses an empty pairing, as pair_training_data does, so every caller
    (the flow, the Python API) gets the same one line."""
    for key in ["a_gtFine.png", "b_gtFine.png"]:
        (tmp_path / "g").mkdir(exist_ok=True)
        (tmp_path / "g" / key).write_bytes(b"")
    (tmp_path / "run" / "masks").mkdir(parents=True)
    for key in ["a.png", "b.png"]:
        (tmp_path / "run" / "masks" / key).write_bytes(b"")
    g = open_location(str(tmp_path / "g"))
    with pytest.raises(NothingToScoreError, match=rf"^no prediction under {re.escape(str(tmp_path / 'run'))} pairs "
                       r"with .* \(2 predictions, 2 ground-truth masks\); pass .*/run/masks, where segment writes"):
        pair_masks(open_location(str(tmp_path / "run")), g)
    with pytest.raises(NothingToScoreError, match=r"names end with _gtFine after a prediction's: pass "
                                                  r"--ground-truth-suffix _gtFine$"):
        pair_masks(open_location(str(tmp_path / "run" / "masks")), g)
    # a suffix short of its underscore ends the names but leaves it on the keys: the one meant named
    with pytest.raises(NothingToScoreError, match=r"names end with _gtFine after a prediction's: pass "
                                                  r"--ground-truth-suffix _gtFine, not gtFine$"):
        pair_masks(open_location(str(tmp_path / "run" / "masks")), g, ground_truth_suffix="gtFine")
    assert [p.image_id for p in pair_masks(open_location(str(tmp_path / "run" / "masks")), g,
                                           ground_truth_suffix="_gtFine").pairs] == ["a", "b"]


def test_the_cli_names_a_suffix_that_matches_no_mask(tmp_path):
    """In the one-line error when nothing pairs; as a warning of the flow's log when some pairs
    were made all the same (by whole names), which the command shows at Prefect's WARNING."""
    for root, names in [("pred", ["a", "b"]), ("gt", ["a_gtFine", "b_gtFine"])]:
        (tmp_path / root).mkdir()
        for name in names:
            (tmp_path / root / f"{name}.png").write_bytes(encode_mask(np.zeros((2, 2), np.uint8)))
    mistyped = _segpipe("evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), str(tmp_path / "r1"),
                        "--num-classes", "2", "--ground-truth-suffix", "_gt")
    assert mistyped.returncode == 2 and mistyped.stdout == ""
    assert mistyped.stderr.splitlines() == [
        f"segpipe: error: no prediction under {tmp_path / 'pred'} pairs with a ground-truth mask under "
        f"{tmp_path / 'gt'} (2 predictions, 2 ground-truth masks); --ground-truth-suffix _gt matches none of "
        "the 2 ground-truth masks, e.g. a_gtFine.png; the ground-truth masks' names end with _gtFine after a "
        "prediction's: pass --ground-truth-suffix _gtFine, not _gt"]
    # a prediction suffix the masks do not have, while they pair by their whole names: under
    # the table the command prints, in metrics.json, and in the flow's log at WARNING
    paired = _segpipe("evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), str(tmp_path / "r2"),
                      "--num-classes", "2", "--prediction-suffix", "_pred", "--ground-truth-suffix", "_gtFine")
    assert paired.returncode == 0, paired.stderr
    said = "--prediction-suffix _pred matches none of the 2 predictions, e.g. a.png"
    assert f"Suffixes: {said}." in paired.stdout.splitlines(), paired.stdout
    assert json.loads((tmp_path / "r2" / "metrics.json").read_text())["unmatched_suffixes"] == [said]
    logged = _segpipe("evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), str(tmp_path / "r3"),
                      "--num-classes", "2", "--prediction-suffix", "_pred", "--ground-truth-suffix", "_gtFine",
                      env={"PREFECT_LOGGING_LEVEL": "WARNING"})
    output = logged.stdout + logged.stderr
    assert [line for line in output.splitlines() if "WARNING" in line and line.rstrip().endswith(said)], output


def _segpipe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 8-bit grey pixels, with no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


def test_a_png_mask_past_pillows_limit_is_left_out_named_and_a_one_bit_mask_is_scored(tmp_path):
    """Pillow refuses an image past its decompression-bomb limit with an error that is neither
    OSError nor ValueError: it stopped the whole evaluation with a traceback. A 1-bit PNG
    (binary footprints) was refused as "not single-channel"; its pixels are class ids 0 and 1."""
    from PIL import Image

    for side in ("p", "g"):
        (tmp_path / side).mkdir()
    (tmp_path / "p" / "a.png").write_bytes(encode_mask(_columns(0, 1, 1, 0)))
    (tmp_path / "g" / "a.png").write_bytes(_png_header_only(20000, 20000))
    batch = _scored(tmp_path, "a.png", "a.png", ScoreSettings(num_classes=2))
    assert batch.image_ids == [] and len(batch.excluded) == 1, batch.excluded
    assert "Image size (400000000 pixels) exceeds limit of" in batch.excluded[0]["reason"], batch.excluded
    Image.fromarray(_columns(0, 1, 1, 1).astype(bool)).convert("1").save(tmp_path / "g" / "a.png")
    batch = _scored(tmp_path, "a.png", "a.png", ScoreSettings(num_classes=2))
    assert batch.excluded == [] and batch.confusion.tolist() == [[4, 0], [4, 8]], batch.excluded


def test_a_float_mask_of_fractions_is_left_out_named(tmp_path):
    """Class ids in a float GeoTIFF are scored when whole; a fraction (a label raster resampled
    by averaging) was cut to the class below it without a word."""
    truth = _columns(0, 0, 1, 1).astype(np.float32)
    _geotiff(tmp_path / "g" / "a.tif", truth, dtype="float32", nodata=float("nan"))
    _geotiff(tmp_path / "p" / "a.tif", _columns(0, 1, 1, 1))
    assert _scored(tmp_path, "a.tif", "a.tif", ScoreSettings(num_classes=2)).confusion.tolist() == [[4, 4], [0, 8]]
    truth[0, 0] = np.nan  # its nodata: left out
    _geotiff(tmp_path / "g" / "a.tif", truth, dtype="float32", nodata=float("nan"))
    batch = _scored(tmp_path, "a.tif", "a.tif", ScoreSettings(num_classes=2))
    assert batch.confusion.tolist() == [[3, 4], [0, 8]] and batch.nodata_pixels == 1
    truth[1, 2] = 0.6
    _geotiff(tmp_path / "g" / "a.tif", truth, dtype="float32", nodata=float("nan"))
    batch = _scored(tmp_path, "a.tif", "a.tif", ScoreSettings(num_classes=2))
    assert batch.image_ids == [] and batch.excluded[0]["reason"] == (
        "ground truth a.tif holds 0.6, which is no class id: a mask holds whole numbers (resampled by nearest, not "
        "by averaging)"), batch.excluded


def test_names_of_masks_that_name_a_class_twice_give_way_to_class_ids():
    """A run record written before names were checked: iou_road of one class hid the other's."""
    from pipeline.evaluation import resolve_class_names

    assert resolve_class_names(None, 3, of_masks=("road", "car")) == ["road", "car", "class_2"]
    assert resolve_class_names(None, 3, of_masks=("road", "road", "car")) == ["class_0", "class_1", "class_2"]
    assert resolve_class_names(None, 3, of_masks=("road", "class_2")) == ["class_0", "class_1", "class_2"]
