"""Confusion matrices and the segmentation scores derived from them.

The confusion matrix is the state: it can be computed per image anywhere (numpy or torch,
CPU or CUDA), summed across images and workers, and scored once, which is what
MMSegmentation's IoUMetric does (dataset-wide IoU, not a mean of per-image IoUs).

Averaging rule (MMSegmentation's): a class absent from both ground truth and prediction has
undefined IoU (NaN) and is left out of mIoU/mDice; every other class counts, including a
class that was predicted but never present (its IoU is 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def confusion_matrix(pred: Array, target: Array, num_classes: int, ignore_index: int | None = 255) -> Array:
    """An int64 (C, C) matrix, rows ground truth, columns prediction, from one bincount.

    Pixels whose target is `ignore_index` are dropped. Any other label outside [0, C), in
    either input, raises ValueError instead of being dropped silently.
    """
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"pred has shape {tuple(pred.shape)} but target has {tuple(target.shape)}")
    if isinstance(pred, torch.Tensor) != isinstance(target, torch.Tensor):
        raise TypeError("pred and target must both be numpy arrays or both torch tensors")
    n = num_classes
    if isinstance(target, torch.Tensor):
        target = target.reshape(-1).long()
        pred = pred.reshape(-1).long().to(target.device)
    else:
        target = np.asarray(target).reshape(-1).astype(np.int64)
        pred = np.asarray(pred).reshape(-1).astype(np.int64)
    if ignore_index is not None:
        keep = target != ignore_index
        target, pred = target[keep], pred[keep]
    check_label_range(target, n, ignore_index, source="ground truth")
    check_label_range(pred, n, None, source="prediction")
    if isinstance(target, torch.Tensor):
        return torch.bincount(n * target + pred, minlength=n * n).reshape(n, n)
    return np.bincount(n * target + pred, minlength=n * n).reshape(n, n)


class LabelRangeError(ValueError):
    """Labels outside the classes, with `values`: every one found, in order, for advice."""

    def __init__(self, message: str, values: Sequence[int]) -> None:
        super().__init__(message)
        self.values = tuple(values)


def check_label_range(labels: np.ndarray | torch.Tensor, num_classes: int, ignore_index: int | None, *,
                      source: str) -> None:
    """Refuse labels outside [0, num_classes) other than `ignore_index` (None: no exception),
    naming `source` (a file, or which side of a comparison) and the values found: a
    LabelRangeError (a ValueError) that carries them, for advice on what to pass.

    The one label check of segpipe: training masks, evaluation masks and every confusion
    matrix go through it. On a GPU tensor it costs one device-to-host transfer when the labels
    are in range.
    """
    outside = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        outside &= labels != ignore_index
    if not bool(outside.any()):
        return
    found = labels[outside]
    values = (torch.unique(found) if isinstance(found, torch.Tensor) else np.unique(found)).tolist()
    listed = f"{values[:5]}" if len(values) <= 5 else f"{values[:5]} and {len(values) - 5} more"
    allowed = f"outside [0, {num_classes})" + ("" if ignore_index is None else f" that are not ignore_index={ignore_index}")
    raise LabelRangeError(f"{source} holds labels {listed} {allowed}; pass the right num_classes and ignore_index, "
                          "or map the labels to class ids", values)


def likely_unlabelled(values: Sequence[int], num_classes: int, ignore_index: int) -> int | None:
    """The label outside the classes that is most likely a dataset's "unlabelled" value, not
    a class: a single value just above the classes (CamVid's 11 of 11 classes) or 255
    (Cityscapes'), as advice puts the ignore index first for it; None for other values. The
    value just above the classes counts only while the ignore index is the default (255): one
    the user chose is their unlabelled value, and the label above the classes then a class."""
    if len(values) != 1:
        return None
    return values[0] if values[0] == 255 or (values[0] == num_classes and ignore_index == 255) else None


def scores(cm: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """Per-class `iou`, `dice`, `precision`, `recall` (float64 arrays, NaN where undefined) and
    `miou`, `mdice`, `pixel_accuracy`, `fw_iou` (floats; NaN when the matrix is empty)."""
    if isinstance(cm, torch.Tensor):
        cm = cm.detach().cpu().numpy()
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"a confusion matrix must be square, got shape {cm.shape}")
    tp = np.diag(cm)
    gt = cm.sum(axis=1)
    pred = cm.sum(axis=0)
    total = cm.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (gt + pred - tp)
        dice = 2 * tp / (gt + pred)
        precision = tp / pred
        recall = tp / gt
        present = (gt + pred) > 0
        miou = float(iou[present].mean()) if present.any() else float("nan")
        mdice = float(dice[present].mean()) if present.any() else float("nan")
        pixel_accuracy = float(tp.sum() / total) if total else float("nan")
        fw_iou = float(np.nansum((gt / total) * iou)) if total else float("nan")
    return {
        "iou": iou,
        "dice": dice,
        "precision": precision,
        "recall": recall,
        "miou": miou,
        "mdice": mdice,
        "pixel_accuracy": pixel_accuracy,
        "fw_iou": fw_iou,
    }
