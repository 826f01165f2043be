"""Confusion matrix and scores, checked against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.metrics import check_label_range, confusion_matrix, scores

# A 4x4 example, done on paper:
TARGET = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 2, 2]])
PRED = np.array([[0, 1, 1, 1], [0, 0, 1, 1], [2, 0, 2, 2], [2, 2, 2, 1]])
# rows gt, cols pred: class 0: 3 right, 1 as class 1; class 1: 4 right;
# class 2: 4 right, 1 as 0, 1 as 1; two ignored pixels.
EXPECTED_CM = np.array([[3, 1, 0], [0, 4, 0], [1, 1, 4]])


def test_confusion_matrix_by_hand_numpy_and_torch() -> None:
    cm = confusion_matrix(PRED, TARGET, 3)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, EXPECTED_CM)
    cm_t = confusion_matrix(torch.from_numpy(PRED), torch.from_numpy(TARGET), 3)
    assert cm_t.dtype == torch.int64
    np.testing.assert_array_equal(cm_t.numpy(), EXPECTED_CM)


def test_scores_by_hand() -> None:
    s = scores(EXPECTED_CM)
    # iou_c = tp / (gt + pred - tp): 3/(4+4-3), 4/(4+6-4), 4/(6+4-4)
    np.testing.assert_allclose(s["iou"], [3 / 5, 4 / 6, 4 / 6])
    np.testing.assert_allclose(s["dice"], [6 / 8, 8 / 10, 8 / 10])
    np.testing.assert_allclose(s["precision"], [3 / 4, 4 / 6, 4 / 4])
    np.testing.assert_allclose(s["recall"], [3 / 4, 4 / 4, 4 / 6])
    assert s["miou"] == pytest.approx((3 / 5 + 4 / 6 + 4 / 6) / 3)
    assert s["pixel_accuracy"] == pytest.approx(11 / 14)
    assert s["fw_iou"] == pytest.approx(4 / 14 * 3 / 5 + 4 / 14 * 4 / 6 + 6 / 14 * 4 / 6)


def test_absent_class_is_nan_and_skipped_but_false_positive_class_counts() -> None:
    target = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 1, 2])  # class 2 predicted once, never in ground truth; class 3 nowhere
    s = scores(confusion_matrix(pred, target, 4))
    assert math.isnan(s["iou"][3])
    assert s["iou"][2] == 0.0
    assert s["miou"] == pytest.approx((1 + 0.5 + 0) / 3)


def test_summed_matrices_score_like_all_data_at_once() -> None:
    rng = np.random.default_rng(0)
    targets = [rng.integers(0, 5, (13, 17)) for _ in range(4)]
    preds = [rng.integers(0, 5, (13, 17)) for _ in range(4)]
    for t in targets:
        t[rng.random(t.shape) < 0.1] = 255
    summed = sum(confusion_matrix(p, t, 5) for p, t in zip(preds, targets, strict=True))
    at_once = confusion_matrix(np.concatenate([p.ravel() for p in preds]), np.concatenate([t.ravel() for t in targets]), 5)
    np.testing.assert_array_equal(summed, at_once)
    assert scores(summed)["miou"] == scores(at_once)["miou"]
    # and differs from the mean of per-image mIoU, which is not what we report
    per_image = np.mean([scores(confusion_matrix(p, t, 5))["miou"] for p, t in zip(preds, targets, strict=True)])
    assert per_image != pytest.approx(scores(summed)["miou"], abs=1e-12)


def test_labels_out_of_range_are_errors() -> None:
    with pytest.raises(ValueError, match=r"ground truth holds labels \[7\] outside \[0, 3\) that are not ignore_index=255"):
        confusion_matrix(np.array([0, 1]), np.array([0, 7]), 3)
    with pytest.raises(ValueError, match=r"prediction holds labels \[3\] outside \[0, 3\);"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match=r"ground truth holds labels \[-1\] outside \[0, 3\);"):
        confusion_matrix(np.array([0, 1]), np.array([0, -1]), 3, ignore_index=None)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 3)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_label_range_check_names_the_source_and_the_values_found(as_tensor: bool) -> None:
    labels = np.array([[0, 1, 255], [9, 4, 4], [-2, 7, 8], [5, 6, 2]])
    labels = torch.from_numpy(labels) if as_tensor else labels
    check_label_range(labels[:1], 3, 255, source="a.png")  # 0, 1 and the ignore index: fine
    with pytest.raises(ValueError) as caught:
        check_label_range(labels, 3, 255, source="day1/a_L.png")
    assert str(caught.value).startswith(
        "day1/a_L.png holds labels [-2, 4, 5, 6, 7] and 2 more outside [0, 3) that are not ignore_index=255;")
    with pytest.raises(ValueError, match=r"holds labels \[255\] outside \[0, 3\); pass"):
        check_label_range(labels[:1], 3, None, source="prediction")


def test_empty_matrix_scores_nan() -> None:
    s = scores(np.zeros((3, 3), dtype=np.int64))
    assert math.isnan(s["miou"]) and math.isnan(s["pixel_accuracy"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_confusion_matrix_on_cuda() -> None:
    cm = confusion_matrix(torch.from_numpy(PRED).cuda(), torch.from_numpy(TARGET).cuda(), 3)
    assert cm.device.type == "cuda"
    np.testing.assert_array_equal(cm.cpu().numpy(), EXPECTED_CM)
