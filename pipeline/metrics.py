"""Confusion matrices and the segmentation scores derived from them.

The confusion matrix is the state: it can be computed per image anywhere (numpy or torch,
CPU or CUDA), summed across images and workers, and scored once, which is what
MMSegmentation's IoUMetric does (dataset-wide IoU, not a mean of per-image IoUs).

Averaging rule (MMSegmentation's): a class absent from both ground truth and prediction has
undefined IoU (NaN) and is left out of mIoU/mDice; every other class counts, including a
class that was predicted but never present (its IoU is 0).
"""

from __future__ import annotations

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
        if ignore_index is not None:
            keep = target != ignore_index
            target, pred = target[keep], pred[keep]
        if target.numel():
            # one device-to-host transfer for the four bounds
            bounds = torch.stack([target.min(), target.max(), pred.min(), pred.max()]).tolist()
            _check_range(n, ignore_index, *bounds)
        return torch.bincount(n * target + pred, minlength=n * n).reshape(n, n)
    target = np.asarray(target).reshape(-1).astype(np.int64)
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    if ignore_index is not None:
        keep = target != ignore_index
        target, pred = target[keep], pred[keep]
    if target.size:
        _check_range(n, ignore_index, target.min(), target.max(), pred.min(), pred.max())
    return np.bincount(n * target + pred, minlength=n * n).reshape(n, n)


def _check_range(n: int, ignore_index: int | None, tmin: int, tmax: int, pmin: int, pmax: int) -> None:
    if tmin < 0 or tmax >= n:
        raise ValueError(
            f"ground truth holds label {tmin if tmin < 0 else tmax}, outside [0, {n}) and not "
            f"ignore_index={ignore_index}; check num_classes, ignore_index or the label map"
        )
    if pmin < 0 or pmax >= n:
        raise ValueError(f"prediction holds label {pmin if pmin < 0 else pmax}, outside [0, {n}); check num_classes")


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
