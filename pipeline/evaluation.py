"""Dataset-wide evaluation of predicted masks against ground truth, as plain functions.

Pairs are made by key relative to each root, extension and an optional suffix removed
(MMSegmentation's `img_suffix` / `seg_map_suffix`): `a/0001_pred.png` pairs with
`a/0001_gtFine_labelTrainIds.png` given suffixes `_pred` and `_gtFine_labelTrainIds`. Each
pair gives one confusion matrix; the matrices are summed and scored once, which is
dataset-wide IoU as MMSegmentation computes it (`pipeline.metrics`). A pair that cannot be
scored (size mismatch, labels out of range, unreadable mask, a mask storage refuses) is reported
by name and left out.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rasterio.enums import MaskFlags
from rasterio.io import DatasetReader
from rasterio.windows import Window

from .masks import decode_mask, map_labels
from .metrics import LabelRangeError, check_label_range, confusion_matrix, likely_unlabelled, scores
from .rasters import is_georeferenced, open_raster, read_named
from .storage import Location, is_mask_key, iter_files, read_bytes, write_atomic
from .text import counted, verb_for

# side of the windows a GeoTIFF pair is scored in: memory stays flat whatever its size
SCORE_WINDOW = 2048
# two georeferenced masks cover the same pixels when every corner of one lies within this
# share of a pixel of the other's
PLACEMENT_TOLERANCE_PIXELS = 1e-3
# pairs left out for reasons other than their labels, named in the one-line summary
EXCLUDED_EXAMPLES = 3


@dataclass(frozen=True)
class Pair:
    image_id: str  # the pairing key
    prediction: str  # key under the predictions root
    ground_truth: str  # key under the ground-truth root


@dataclass
class Pairing:
    pairs: list[Pair]
    unpaired_predictions: list[str]
    unpaired_ground_truth: list[str]
    # keys that are not PNG masks, with the reason, on either side
    rejected: list[dict[str, str]] = field(default_factory=list)
    # one line for each side whose suffix ends none of its masks' names (`unmatched_suffix`)
    unmatched_suffixes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ScoreSettings:
    num_classes: int
    ignore_index: int = 255
    # ground-truth value -> class id, applied before scoring; values not in the map are kept
    label_map: Mapping[int, int] | None = None
    # MMSegmentation's reduce_zero_label: 0 becomes ignore_index, every other label drops by 1
    reduce_zero_label: bool = False


@dataclass(frozen=True)
class StrayLabels:
    """Labels outside the classes (and not the ignore index), found in one mask of a pair."""

    image_id: str
    side: str  # "prediction" or "ground truth"
    values: tuple[int, ...]


class StrayLabelsError(ValueError):
    def __init__(self, message: str, stray: StrayLabels) -> None:
        super().__init__(message)
        self.stray = stray


class NothingToScoreError(ValueError):
    """No prediction could be paired with a ground-truth mask, or no pair could be scored."""


class RefusedMaskError(ValueError):
    """Storage refuses one mask of a pair for good (forbidden: S3's AccessDenied, which s3fs
    raises as PermissionError; a folder where a file was listed), named: the pair is left out,
    as one with a corrupt mask is. Transient errors were retried and end as
    StorageUnavailableError, a RuntimeError, which stops the run."""


@contextmanager
def _refusal_named(side: str, key: str) -> Iterator[None]:
    """Within it, a permanent storage error reading `key` raised as RefusedMaskError naming it.
    A missing object passes as it is: each reader says it its own way (`read_bytes` returns
    None, `open_raster` names the object)."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as err:  # only permanent ones get here: `retry_io` turns the others into StorageUnavailableError
        raise RefusedMaskError(f"cannot read {side} {key}: {type(err).__name__}: {err}") from err


@dataclass
class PairScore:
    image_id: str
    confusion: np.ndarray | None = None  # (C, C) int64, rows ground truth
    pixels: int = 0  # the pair's pixels, scored or not (ignore index, nodata)
    nodata_pixels: int = 0  # those not scored for being nodata in either GeoTIFF
    # of those, the ground truth's pixels of its nodata value (one outside the classes), by value
    truth_nodata: dict[int, int] = field(default_factory=dict)
    error: str | None = None
    stray: StrayLabels | None = None  # why it was left out, when labels were out of range


def pairing_key(key: str, suffix: str) -> str:
    stem = posixpath.splitext(key)[0]
    return stem[: -len(suffix)] if suffix and stem.endswith(suffix) else stem


def index_by_key(location: Location, suffix: str, accepts: Callable[[str], bool]) -> tuple[dict[str, list[str]], list[str]]:
    """The keys under `location` that `accepts` takes, grouped by pairing key in listing
    order, and the keys it refused. The one pairing rule of segpipe: evaluation pairs
    predictions with ground truth by it, training pairs images with label masks; each caller
    decides what a pairing key held by two files means (evaluation reports the second,
    training refuses the data)."""
    groups: dict[str, list[str]] = {}
    refused: list[str] = []
    for _, file in iter_files(location):
        if accepts(file.key):
            groups.setdefault(pairing_key(file.key, suffix), []).append(file.key)
        else:
            refused.append(file.key)
    return groups, refused


def _index(location: Location, suffix: str, side: str, rejected: list[dict[str, str]]) -> dict[str, list[str]]:
    """Masks by pairing key, in listing order; other files go to `rejected` with the reason."""
    groups, refused = index_by_key(location, suffix, is_mask_key)
    rejected += [{"key": key, "side": side, "reason": "not a mask (PNG or GeoTIFF)"} for key in refused]
    return groups


def _is_geotiff(key: str) -> bool:
    return key.lower().endswith((".tif", ".tiff"))


def _choose(keys: list[str], others: list[str]) -> str:
    """Of the masks under one pairing key, the one scored: one of the other side's kind, a
    GeoTIFF first where both sides have one, else the first listed. A raster segmented beside
    its quick-look (`a.tif`, `a.jpg`) has two masks under the key `a`, its COG and the
    quick-look's PNG: the raster is scored against GeoTIFF ground truth, the quick-look
    against PNG ground truth."""
    other_kinds = {_is_geotiff(key) for key in others}
    for geotiff in (True, False):
        if geotiff in other_kinds and (key := next((k for k in keys if _is_geotiff(k) == geotiff), None)):
            return key
    return keys[0]


def unmatched_suffix(option: str, suffix: str, masks: Sequence[str], noun: str) -> str | None:
    """The line that says a suffix given for one side ends none of its masks' names, or None.
    Such a suffix removes nothing, so the masks pair by their whole names, or (a suffix
    mistyped, `_gt` for `_gtFine`) not at all; the line names the option as typed and one
    mask, for the reader to compare."""
    if not suffix or not masks or any(pairing_key(key, suffix) != pairing_key(key, "") for key in masks):
        return None
    return f"{option} {suffix} matches none of the {counted(len(masks), noun)}, e.g. {masks[0]}"


def suggested_suffix(plain_keys: Collection[str], suffixed: Sequence[str]) -> str | None:
    """The suffix that names in `suffixed` (files' keys) carry after a pairing key of
    `plain_keys`, when most of them carry one and the same (`a_L.png` beside an image `a`:
    `_L`), for advice when nothing pairs; else None."""
    found: Counter[str] = Counter()
    for key in suffixed:
        stem = pairing_key(key, "")
        # after the longest pairing key the stem starts with: `a_b_L` beside `a_b` and `a` is `_L`
        if (suffix := next((stem[i:] for i in range(len(stem) - 1, 0, -1) if stem[:i] in plain_keys), None)):
            found[suffix] += 1
    if not found:
        return None
    suffix, count = found.most_common(1)[0]
    return suffix if count * 2 > len(suffixed) else None


def pair_masks(predictions: Location, ground_truth: Location, *, prediction_suffix: str = "",
               ground_truth_suffix: str = "") -> Pairing:
    """Predictions and ground-truth masks with the same pairing key, sorted by key. Refuses an
    empty pairing (NothingToScoreError), naming both roots and what would make them pair."""
    rejected: list[dict[str, str]] = []
    pred_groups = _index(predictions, prediction_suffix, "prediction", rejected)
    truth_groups = _index(ground_truth, ground_truth_suffix, "ground_truth", rejected)
    preds = {key: _choose(keys, truth_groups.get(key, [])) for key, keys in pred_groups.items()}
    truths = {key: _choose(keys, pred_groups.get(key, [])) for key, keys in truth_groups.items()}
    for side, groups, chosen in (("prediction", pred_groups, preds), ("ground_truth", truth_groups, truths)):
        rejected += [{"key": key, "side": side, "reason": f"pairs under the same key as {chosen[pairing]}"}
                     for pairing, keys in groups.items() for key in keys if key != chosen[pairing]]
    pred_masks = [key for keys in pred_groups.values() for key in keys]
    truth_masks = [key for keys in truth_groups.values() for key in keys]
    pairs = [Pair(key, preds[key], truths[key]) for key in sorted(preds.keys() & truths.keys())]
    unmatched = [unmatched_suffix("--prediction-suffix", prediction_suffix, pred_masks, "prediction"),
                 unmatched_suffix("--ground-truth-suffix", ground_truth_suffix, truth_masks, "ground-truth mask")]
    pairing = Pairing(
        pairs=pairs,
        unpaired_predictions=sorted(preds[k] for k in preds.keys() - truths.keys()),
        unpaired_ground_truth=sorted(truths[k] for k in truths.keys() - preds.keys()),
        rejected=rejected,
        unmatched_suffixes=[line for line in unmatched if line is not None],
    )
    if not pairs:
        raise NothingToScoreError(
            f"no prediction under {predictions.url} pairs with a ground-truth mask under {ground_truth.url} "
            f"({counted(len(pairing.unpaired_predictions), 'prediction')}, "
            f"{counted(len(pairing.unpaired_ground_truth), 'ground-truth mask')}); "
            f"{'; '.join(_pairing_advice(pairing, predictions, prediction_suffix, ground_truth_suffix))}"
        )
    return pairing


def _pairing_advice(pairing: Pairing, predictions: Location, prediction_suffix: str,
                    ground_truth_suffix: str) -> list[str]:
    """What would make masks that did not pair pair: a suffix that ends no name, the masks
    folder of a segment run's OUTPUT, or the suffix the ground truth's names carry."""
    advice = list(pairing.unmatched_suffixes)
    # the whole OUTPUT of a segment run, given for its masks: their keys start with masks/
    if any(key.startswith("masks/") for key in pairing.unpaired_predictions):
        advice.append(f"pass {predictions.url.rstrip('/')}/masks, where segment writes its masks")
    elif (suffix := suggested_suffix({pairing_key(key, prediction_suffix) for key in pairing.unpaired_predictions},
                                     pairing.unpaired_ground_truth)) and suffix != ground_truth_suffix:
        instead = f", not {ground_truth_suffix}" if ground_truth_suffix else ""
        advice.append(f"the ground-truth masks' names end with {suffix} after a prediction's: pass "
                      f"--ground-truth-suffix {suffix}{instead}")
    return advice or ["check the roots and the suffixes"]


def remap_ground_truth(labels: np.ndarray, settings: ScoreSettings) -> np.ndarray:
    """Apply the label map, then reduce-zero-label, leaving ignore_index pixels alone."""
    out = map_labels(labels, settings.label_map)
    if settings.reduce_zero_label:
        ignore = out == settings.ignore_index
        out = out - 1
        out[out == -1] = settings.ignore_index
        out[ignore] = settings.ignore_index
    return out


def _labels_confusion(pair: Pair, pred: np.ndarray, truth: np.ndarray, settings: ScoreSettings) -> np.ndarray:
    """One pair's (or one window's) confusion; StrayLabelsError naming the file for a label out of range."""
    n = settings.num_classes
    for side, labels, key, ignore in (("prediction", pred, pair.prediction, None),
                                      ("ground truth", truth, pair.ground_truth, settings.ignore_index)):
        try:
            check_label_range(labels, n, ignore, source=f"{side} {key}")
        except LabelRangeError as err:  # the values found, for the advice of `exclusion_summary`
            raise StrayLabelsError(str(err), StrayLabels(pair.image_id, side, err.values)) from None
    return confusion_matrix(pred, truth, n, ignore_index=settings.ignore_index)


def _placement_mismatch(pred_file: Any, truth_file: Any) -> str | None:
    """Why two georeferenced masks of one size do not cover the same pixels on the ground
    (another CRS, or transforms that put a corner of the raster more than
    `PLACEMENT_TOLERANCE_PIXELS` apart), or None."""
    if not (is_georeferenced(pred_file) and is_georeferenced(truth_file)):
        return None  # a PNG or plain TIFF side is placed by its pixels alone
    if pred_file.crs != truth_file.crs:
        return f"CRS {pred_file.crs.to_string()} against {truth_file.crs.to_string()}"
    # at the corners, where the transforms' differences add up: a pixel size off by a millionth
    # is 0.05 pixels at the far side of a 50,000-pixel raster
    for side, file in (("prediction", pred_file), ("ground truth", truth_file)):
        if file.transform.is_degenerate:  # it puts the raster on a line or a point, and has no inverse
            return f"the {side}'s transform {tuple(file.transform[:6])} is degenerate"
    to_prediction = ~pred_file.transform @ truth_file.transform
    for corner in ((0, 0), (pred_file.width, 0), (0, pred_file.height), (pred_file.width, pred_file.height)):
        col, row = to_prediction @ corner
        if (apart := math.hypot(col - corner[0], row - corner[1])) > PLACEMENT_TOLERANCE_PIXELS:
            return (f"transform {tuple(pred_file.transform[:6])} against {tuple(truth_file.transform[:6])} (the corner at "
                    f"pixel {corner} lies {apart:.3g} pixels apart)")
    return None


def nodata_rule(file: DatasetReader, labels: Callable[[int], int], num_classes: int) -> tuple[float | None, bool]:
    """How a mask raster (a side of a raster pair; a training label, `training.read_label`)
    marks its pixels without data: the nodata value to leave out (or None), and whether to read
    its mask (an internal mask or alpha band; 0 is no data). One rule for both sides:

    - only a GeoTIFF has nodata: a PNG's transparent colour, which GDAL reports as nodata, is
      scored, as in PNG pairs;
    - a nodata value that is a class id is scored as that class, never dropped (label rasters
      often inherit nodata 0 from their imagery's profile). A class id as `labels` sees it: the
      prediction's value as it is, the ground truth's after --label-map and --reduce-zero-label,
      as its labels are checked (0/255 footprints saved with nodata 255 and scored with
      --label-map '{"255": 1}' have 255 scored as class 1);
    - GDAL reports the mask of a nodata value as `nodata`: that one follows the value rule, so
      only a mask of the file's own (`per_dataset`: an internal mask) is read. An alpha band
      would be a second band, which a mask of class ids does not have."""
    if file.driver != "GTiff":
        return None, False
    value = file.nodata
    if (label := _as_label(value)) is not None and 0 <= labels(label) < num_classes:
        value = None
    flags = file.mask_flag_enums[0]
    return value, MaskFlags.per_dataset in flags


def _as_label(value: float | None) -> int | None:
    """A nodata value as the label it would be, or None for one no label takes: labels are the
    int64 pixels that `remap_ground_truth` makes (a float's 0.5 or NaN are none). A negative
    one (-1, -9999) is a label --label-map may make a class, as it does the pixels."""
    if value is None or not math.isfinite(value) or not float(value).is_integer():
        return None
    int64 = np.iinfo(np.int64)
    return int(value) if int64.min <= value <= int64.max else None


def _nodata_in(file: DatasetReader, values: np.ndarray, window: Window, rule: tuple[float | None, bool]) -> np.ndarray:
    """The pixels of `window` (whose `values` are read) without data by `nodata_rule`."""
    value, masked = rule
    if value is None:
        nodata = np.zeros(values.shape, dtype=bool)
    else:  # a float mask's NaN nodata equals no value, itself included
        nodata = np.isnan(values) if math.isnan(value) else values == value
    if masked:
        nodata |= read_named(file, f"the mask of window {window}", file.read_masks, 1, window=window) == 0
    return nodata


def score_raster_pair(pair: Pair, predictions: Location, ground_truth: Location, settings: ScoreSettings) -> PairScore:
    """A pair of which one side is a GeoTIFF, read window by window (PNG masks open through
    GDAL as well). Pixels are not scored where either GeoTIFF has no data: the prediction
    outside the raster's valid data, the ground truth unlabelled (`nodata_rule`). Each side
    must be one band of class ids, and two georeferenced sides must lie on the same pixels of
    the same CRS. As for PNG pairs, storage that fails through its retries raises
    StorageUnavailableError (the pair is not left out), and storage that refuses a mask for
    good leaves the pair out, the mask named (`RefusedMaskError`)."""
    try:
        with ExitStack() as opened:
            pred_file = _open_side(opened, "prediction", predictions, pair.prediction)
            truth_file = _open_side(opened, "ground truth", ground_truth, pair.ground_truth)
            for side, key, file in (("prediction", pair.prediction, pred_file), ("ground truth", pair.ground_truth, truth_file)):
                if file.count != 1:
                    return PairScore(pair.image_id, error=(
                        f"{side} {key} has {file.count} bands: a mask must be a single band of class ids "
                        "(convert colour-coded labels to class ids first)"))
            if (pred_file.width, pred_file.height) != (truth_file.width, truth_file.height):
                return PairScore(pair.image_id, error=(
                    f"size mismatch: prediction {pair.prediction} is {pred_file.width}x{pred_file.height}, "
                    f"ground truth {pair.ground_truth} is {truth_file.width}x{truth_file.height}"))
            mismatch = _placement_mismatch(pred_file, truth_file)
            if mismatch is not None:
                return PairScore(pair.image_id, error=(
                    f"prediction {pair.prediction} and ground truth {pair.ground_truth} do not cover the same "
                    f"pixels: {mismatch}"))
            pred_rule = nodata_rule(pred_file, lambda value: value, settings.num_classes)
            truth_rule = nodata_rule(truth_file, lambda value: int(remap_ground_truth(np.array([value]), settings)[0]),
                                     settings.num_classes)
            confusion = np.zeros((settings.num_classes,) * 2, dtype=np.int64)
            nodata_pixels = truth_nodata_pixels = 0
            # the ground truth's nodata value left out, counted for the advice to map it to a class:
            # not a negative one (GIS tools' -9999), which is rarely a class (a map still makes it one)
            truth_label = label if (label := _as_label(truth_rule[0])) is not None and label >= 0 else None
            for row in range(0, pred_file.height, SCORE_WINDOW):
                for col in range(0, pred_file.width, SCORE_WINDOW):
                    window = Window(col, row, min(SCORE_WINDOW, pred_file.width - col), min(SCORE_WINDOW, pred_file.height - row))
                    pred, pred_nodata = read_mask_window("prediction", pair.prediction, pred_file, window, pred_rule)
                    raw_truth, truth_nodata = read_mask_window("ground truth", pair.ground_truth, truth_file, window, truth_rule)
                    # nodata pixels made 0 before the cast (a float mask's NaN has no int64): a class
                    # id for the range check, never scored
                    pred = np.where(pred_nodata, 0, pred).astype(np.int64)
                    truth = remap_ground_truth(np.where(truth_nodata, 0, raw_truth), settings)
                    nodata = pred_nodata | truth_nodata
                    truth[nodata] = settings.ignore_index
                    nodata_pixels += int(nodata.sum())
                    if truth_label is not None:
                        truth_nodata_pixels += int((raw_truth == truth_label).sum())
                    confusion += _labels_confusion(pair, pred, truth, settings)
    # ImageDecodeError (a corrupt file) and RefusedMaskError are ValueErrors: named, left out
    except (ValueError, FileNotFoundError) as err:
        return PairScore(pair.image_id, error=str(err), stray=getattr(err, "stray", None))
    truth_nodata = {truth_label: truth_nodata_pixels} if truth_label is not None and truth_nodata_pixels else {}
    return PairScore(pair.image_id, confusion=confusion, pixels=pred_file.width * pred_file.height,
                     nodata_pixels=nodata_pixels, truth_nodata=truth_nodata)


def _open_side(opened: ExitStack, side: str, location: Location, key: str) -> DatasetReader:
    """One side of a raster pair, open until `opened` closes."""
    with _refusal_named(side, key):
        return opened.enter_context(open_raster(location, key))


def read_mask_window(side: str, key: str, file: DatasetReader, window: Window,
                     rule: tuple[float | None, bool]) -> tuple[np.ndarray, np.ndarray]:
    """A mask's values in `window` (`side` and `key` name it in errors) and its pixels without
    data by `rule` (`nodata_rule`); ValueError for a float value that is no whole number."""
    with _refusal_named(side, key):
        # through `read_named`: a storage outage under GDAL raises its own error, not a corrupt file's
        values = read_named(file, f"window {window}", file.read, 1, window=window)
        nodata = _nodata_in(file, values, window, rule)
    if values.dtype.kind == "f":  # class ids in floats: whole numbers, or the cast to labels would cut them
        kept = values[~nodata]
        if (cut := kept[kept != np.round(kept)]).size:  # NaN too, unless it is the nodata value
            raise ValueError(f"{side} {key} holds {cut[0]:g}, which is no class id: a mask holds whole numbers "
                             "(resampled by nearest, not by averaging)")
    return values, nodata


def score_pair(pair: Pair, prediction: bytes, ground_truth: bytes, settings: ScoreSettings) -> PairScore:
    try:
        pred = decode_mask(prediction).astype(np.int64)
    except (OSError, ValueError) as err:
        return PairScore(pair.image_id, error=f"prediction {pair.prediction}: unreadable mask ({err})")
    try:
        truth = remap_ground_truth(decode_mask(ground_truth), settings)
    except (OSError, ValueError) as err:
        return PairScore(pair.image_id, error=f"ground truth {pair.ground_truth}: unreadable mask ({err})")
    if pred.shape != truth.shape:
        return PairScore(pair.image_id, error=(
            f"size mismatch: prediction {pair.prediction} is {pred.shape[1]}x{pred.shape[0]}, "
            f"ground truth {pair.ground_truth} is {truth.shape[1]}x{truth.shape[0]}"))
    try:
        return PairScore(pair.image_id, confusion=_labels_confusion(pair, pred, truth, settings), pixels=pred.size)
    except StrayLabelsError as err:
        return PairScore(pair.image_id, error=str(err), stray=err.stray)


@dataclass
class BatchScore:
    """What scoring a batch of pairs returns: the summed matrix, each scored image's own
    pixel accuracy and IoU per class (for per_image.parquet), and the pairs left out."""

    confusion: np.ndarray
    image_ids: list[str] = field(default_factory=list)
    pixel_accuracy: list[float] = field(default_factory=list)
    iou: list[np.ndarray] = field(default_factory=list)
    pixels: int = 0  # of the scored pairs, the confusion's and those not scored
    nodata_pixels: int = 0  # of those not scored, the nodata of either GeoTIFF
    # of those, the ground truth's pixels of its nodata value, by value (`PairScore.truth_nodata`)
    truth_nodata: Counter[int] = field(default_factory=Counter)
    excluded: list[dict[str, str]] = field(default_factory=list)
    # the excluded pairs whose labels were out of range, and which labels
    stray: list[StrayLabels] = field(default_factory=list)

    def add(self, other: BatchScore) -> None:
        self.confusion += other.confusion
        self.image_ids += other.image_ids
        self.pixel_accuracy += other.pixel_accuracy
        self.iou += other.iou
        self.pixels += other.pixels
        self.nodata_pixels += other.nodata_pixels
        self.truth_nodata.update(other.truth_nodata)
        self.excluded += other.excluded
        self.stray += other.stray


def score_pairs(predictions: Location, ground_truth: Location, pairs: Sequence[Pair],
                settings: ScoreSettings) -> BatchScore:
    """Read and score a batch of pairs (one Ray task's work)."""
    n = settings.num_classes
    batch = BatchScore(confusion=np.zeros((n, n), dtype=np.int64))
    for pair in pairs:
        if _is_tiff(pair.prediction) or _is_tiff(pair.ground_truth):
            _add(batch, pair, score_raster_pair(pair, predictions, ground_truth, settings))
            continue
        try:
            with _refusal_named("prediction", pair.prediction):
                pred = read_bytes(predictions, pair.prediction)
            with _refusal_named("ground truth", pair.ground_truth):
                truth = read_bytes(ground_truth, pair.ground_truth)
        except RefusedMaskError as err:
            batch.excluded.append({"image_id": pair.image_id, "reason": str(err)})
            continue
        if pred is None or truth is None:
            batch.excluded.append({"image_id": pair.image_id, "reason": "cannot read: the file disappeared after it was listed"})
            continue
        _add(batch, pair, score_pair(pair, pred, truth, settings))
    return batch


def _is_tiff(key: str) -> bool:
    return posixpath.splitext(key)[1].lower() in {".tif", ".tiff"}


def _add(batch: BatchScore, pair: Pair, result: PairScore) -> None:
    if result.confusion is None:
        batch.excluded.append({"image_id": pair.image_id, "reason": result.error or ""})
        if result.stray is not None:
            batch.stray.append(result.stray)
        return
    own = scores(result.confusion)
    batch.confusion += result.confusion
    batch.image_ids.append(pair.image_id)
    batch.pixel_accuracy.append(own["pixel_accuracy"])
    batch.iou.append(own["iou"])
    batch.pixels += result.pixels
    batch.nodata_pixels += result.nodata_pixels
    batch.truth_nodata.update(result.truth_nodata)


def exclusion_summary(total: BatchScore, settings: ScoreSettings, rejected: Sequence[dict[str, str]] = ()) -> str | None:
    """The pairs left out, in one line for the whole dataset (metrics.json lists each): labels
    out of range counted by file, with what to pass; then the other reasons, the first named;
    then the files that were never paired (`Pairing.rejected`: not masks, or a second mask
    under one key), the first named."""
    parts = [_stray_advice(side, strays, settings) for side in ("ground truth", "prediction")
             if (strays := [s for s in total.stray if s.side == side])]
    stray_ids = {s.image_id for s in total.stray}
    others = [e for e in total.excluded if e["image_id"] not in stray_ids]
    if others:
        # up to three named: when nothing could be scored, this line is all there is (no metrics.json)
        examples = "; ".join(f"{e['image_id']}: {e['reason']}" for e in others[:EXCLUDED_EXAMPLES])
        parts.append(f"{counted(len(others), 'pair')} left out{' for other reasons' if parts else ''}, e.g. {examples}")
    if rejected:
        first = rejected[0]
        parts.append(f"{counted(len(rejected), 'file')} not paired, e.g. {first['side'].replace('_', ' ')} {first['key']}: "
                     f"{first['reason']}")
    return "; ".join(parts) or None


def _stray_advice(side: str, strays: Sequence[StrayLabels], settings: ScoreSettings) -> str:
    """What to pass for labels out of range. A single ground-truth value just above the
    classes (11 of 11 classes) or 255 is a dataset's "unlabelled" value (CamVid's Void,
    Cityscapes' 255) far more often than a class: the ignore index comes first."""
    n = settings.num_classes
    values = sorted({v for s in strays for v in s.values})
    listed = ", ".join(map(str, values[:5])) + (f" and {len(values) - 5} more" if len(values) > 5 else "")
    hold = verb_for(len(strays), "holds", "hold")
    if side == "prediction":
        return (f"{counted(len(strays), 'prediction')} {hold} labels {listed}, not below --num-classes {n}: pass the "
                "number of classes the model predicts")
    masks = counted(len(strays), "ground-truth mask")
    if (value := likely_unlabelled(values, n, settings.ignore_index)) is not None:
        as_class = f", --num-classes {n + 1} if it is a class" if value == n else ""
        return (f"{masks} {hold} the label {value}, outside the {n} classes: pass --ignore-index {value} if it marks "
                f"pixels not to score (unlabelled, void){as_class}, or --label-map to map it to a class")
    if values == [n]:  # just above the classes, with an ignore index of the user's own: a class
        return (f"{masks} {hold} the label {n}, outside the {n} classes and not --ignore-index {settings.ignore_index}: "
                f"pass --num-classes {n + 1} if it is a class, or --label-map to map it to one")
    return (f"{masks} {hold} labels {listed}, outside [0, {n}) and not --ignore-index {settings.ignore_index}: map "
            "them to class ids with --label-map, or pass the right --num-classes and --ignore-index")


def _json_number(value: float) -> float | None:
    return None if isinstance(value, float) and math.isnan(value) else value


def build_report(total: BatchScore, pairing: Pairing, settings: ScoreSettings,
                 class_names: Sequence[str] | None) -> dict[str, Any]:
    """The metrics.json document: dataset-wide scores from the summed confusion matrix."""
    n = settings.num_classes
    names = resolve_class_names(class_names, n)
    confusion = total.confusion
    s = scores(confusion)
    classes = [
        {"id": i, "name": names[i], "iou": _json_number(float(s["iou"][i])), "dice": _json_number(float(s["dice"][i])),
         "precision": _json_number(float(s["precision"][i])), "recall": _json_number(float(s["recall"][i])),
         "gt_pixels": int(confusion[i].sum()), "pred_pixels": int(confusion[:, i].sum())}
        for i in range(n)
    ]
    return {
        "num_classes": n,
        "ignore_index": settings.ignore_index,
        "images": len(total.image_ids),
        "miou": _json_number(float(s["miou"])),
        "mdice": _json_number(float(s["mdice"])),
        "pixel_accuracy": _json_number(float(s["pixel_accuracy"])),
        "fw_iou": _json_number(float(s["fw_iou"])),
        "classes": classes,
        # pixels of the scored pairs left out: nodata of either GeoTIFF, or else ground truth
        # equal to ignore_index (after --label-map and --reduce-zero-label)
        "unscored_pixels": total.pixels - int(confusion.sum()),
        "nodata_pixels": total.nodata_pixels,
        # of those, the ground truth's of its nodata value (outside the classes), by value
        "ground_truth_nodata": {str(value): pixels for value, pixels in sorted(total.truth_nodata.items())},
        "pixels": total.pixels,
        "confusion_matrix": confusion.astype(np.int64).tolist(),
        "unpaired_predictions": pairing.unpaired_predictions,
        "unpaired_ground_truth": pairing.unpaired_ground_truth,
        "unmatched_suffixes": pairing.unmatched_suffixes,
        "excluded": total.excluded
        + [{"image_id": r["key"], "reason": f"{r['side']}: {r['reason']}"} for r in pairing.rejected],
        "excluded_summary": exclusion_summary(total, settings, pairing.rejected),
    }


def resolve_class_names(class_names: Sequence[str] | None, num_classes: int, *,
                        of_masks: Sequence[str] | None = None) -> list[str]:
    """The names given; else `of_masks`, those of the segpipe run whose masks are scored
    (`outputs.class_names_of_masks`), with class_<id> for ids past its model's classes (a
    ground-truth class the model lacks); else class_<id>, also where those would name a
    class twice (a record written before names were checked: a column would hide another)."""
    if not class_names and of_masks:
        named = [of_masks[i] if i < len(of_masks) else f"class_{i}" for i in range(num_classes)]
        class_names = named if len(set(named)) == len(named) else None
    names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names but num_classes={num_classes}")
    return names


def per_image_table(total: BatchScore, class_names: Sequence[str]) -> pa.Table:
    """One row per scored pair: pixel accuracy and the image's own IoU per class (null where
    the class is in neither mask)."""
    ious = np.stack(total.iou) if total.iou else np.zeros((0, len(class_names)))
    columns: dict[str, Any] = {
        "image_id": pa.array(total.image_ids, pa.string()),
        "pixel_accuracy": pa.array(total.pixel_accuracy, pa.float64()),
    }
    for index, name in enumerate(class_names):
        columns[f"iou_{name}"] = pa.array(ious[:, index], pa.float64(), from_pandas=True)  # NaN -> null
    return pa.table(columns)


def _plots(report: dict[str, Any]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    names = [c["name"] for c in report["classes"]]
    cm = np.asarray(report["confusion_matrix"], dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    normalised = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    size = max(5.0, 0.45 * len(names) + 2)
    figures: dict[str, bytes] = {}

    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(normalised, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title("confusion matrix (rows normalised)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    figures["confusion_matrix.png"] = buffer.getvalue()

    fig, ax = plt.subplots(figsize=(size + 1, 4))
    ious = [c["iou"] if c["iou"] is not None else 0.0 for c in report["classes"]]
    ax.bar(range(len(names)), ious, color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=90)
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU")
    miou = report["miou"]
    ax.set_title(f"per-class IoU (mIoU {miou:.3f})" if miou is not None else "per-class IoU")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    figures["per_class_iou.png"] = buffer.getvalue()
    return figures


def write_report(output: Location, report: dict[str, Any], per_image: pa.Table) -> list[str]:
    """metrics.json, per_image.parquet and the two plots; returns their URIs."""
    sink = io.BytesIO()
    pq.write_table(per_image, sink, compression="zstd")
    files = {
        "metrics.json": json.dumps(report, indent=2).encode(),
        "per_image.parquet": sink.getvalue(),
        **_plots(report),
    }
    for key, data in files.items():
        write_atomic(output, key, data)
    return [output.uri(key) for key in files]


def class_table(report: dict[str, Any], *, markdown: bool) -> str:
    """The headline and per-class table: Markdown for a Prefect artifact, or columns aligned
    in plain text for a terminal (`markdown=False`)."""
    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    headline = (f"mIoU {fmt(report['miou'])}, mDice {fmt(report['mdice'])}, pixel accuracy "
                f"{fmt(report['pixel_accuracy'])}, fwIoU {fmt(report['fw_iou'])} over {counted(report['images'], 'image')}")
    header = ["id", "class", "IoU", "Dice", "precision", "recall", "gt pixels", "predicted pixels"]
    rows = [[str(c["id"]), c["name"], fmt(c["iou"]), fmt(c["dice"]), fmt(c["precision"]), fmt(c["recall"]),
             str(c["gt_pixels"]), str(c["pred_pixels"])] for c in report["classes"]]
    if markdown:
        lines = [f"**{headline.replace(', ', '**, ', 1)}", "", "| " + " | ".join(header) + " |",
                 "|---:|---|" + "---:|" * (len(header) - 2)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    else:  # the class name left-aligned, the numbers right-aligned
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = [headline, ""] + ["  ".join(cell.ljust(width) if i == 1 else cell.rjust(width)
                                            for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()
                                  for row in [header, *rows]]
    if report.get("unscored_pixels"):
        # said, since a dataset whose masks use 255 for a class (0/255 footprints) would
        # otherwise lose that class to the default --ignore-index without a word
        unscored, index = report["unscored_pixels"], report["ignore_index"]
        nodata = report.get("nodata_pixels", 0)
        ignored = unscored - nodata
        causes = [f"{ignored} where the ground truth is --ignore-index {index}" if ignored else "",
                  f"{nodata} nodata" if nodata else ""]
        # for 255 only, the value of 0/255 masks; another ignore index was chosen for its masks
        advice = f"; if {index} is a class of these masks, map it to one with --label-map" if ignored and index == 255 else ""
        # 0/255 footprints saved with nodata 255 lose every building to nodata: said, with the way out
        for value, pixels in report.get("ground_truth_nodata", {}).items():
            advice += (f"; {pixels} are the ground truth's nodata value {value}: if it marks a class, map it to one "
                       f"""with --label-map '{{"{value}": CLASS}}'""")
        lines += ["", f"Not scored: {unscored} of {report['pixels']} pixels ({unscored / report['pixels']:.1%}): "
                  f"{', '.join(c for c in causes if c)}{advice}."]
    if report["unpaired_predictions"] or report["unpaired_ground_truth"]:
        lines += ["", f"Without a partner: {counted(len(report['unpaired_predictions']), 'prediction')} and "
                  f"{counted(len(report['unpaired_ground_truth']), 'ground-truth mask')} (see metrics.json)."]
    if report.get("unmatched_suffixes"):  # the masks paired by their whole names, maybe not all of them
        lines += ["", f"Suffixes: {'; '.join(report['unmatched_suffixes'])}."]
    if report.get("excluded_summary"):  # the pairs and files left out otherwise
        lines += ["", f"Excluded: {report['excluded_summary']}."]
    return "\n".join(lines)
