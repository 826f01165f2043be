"""bf16 against fp32 on real CamVid frames, with a model trained here: the labels of the bf16
path that `precision="auto"` takes on this CPU (autocast, compiled with inductor's freezing)
agree with fp32's on at least 99.5% of pixels, and the mIoU differs by less than 0.002.

An untrained model has nearly flat logits, whose argmax flips at the smallest rounding, so a
short training run on CamVid (the frames of the validation split but the last 20) gives the
model real margins first; the last 20 frames are scored. Skips where the CPU has no native
bf16 (the auto path is then fp32) or the shared data is absent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.inference import Segmenter, native_bf16
from pipeline.metrics import confusion_matrix
from pipeline.preprocess import Normalizer
from pipeline.storage import open_location
from pipeline.training import (
    build_training_model,
    load_samples,
    make_optimizer,
    miou,
    pair_training_data,
    precise_batch_norm,
    train_epoch,
)

CAMVID_CLASSES, UNLABELLED = 11, 11


@pytest.mark.slow
@pytest.mark.skipif(not native_bf16(torch.device("cpu")), reason="this CPU has no native bf16")
def test_bf16_labels_agree_with_fp32_on_camvid(shared_data, tmp_path):
    camvid = shared_data / "camvid" / "val"
    config = TrainConfig(images=str(camvid / "images"), labels=str(camvid / "labels"), output=str(tmp_path / "m.pt"),
                         model="deeplabv3_mobilenet_v3_large", num_classes=CAMVID_CLASSES, ignore_index=UNLABELLED,
                         epochs=6, batch_size=8, crop=(256, 256), scale=(0.5, 1.5), optimizer="adamw", lr=1e-3)
    images, labels = open_location(config.images), open_location(config.labels)
    pairs = pair_training_data(images, labels).pairs
    load = dict(num_classes=CAMVID_CLASSES, ignore_index=UNLABELLED)
    train, held_out = load_samples(images, labels, pairs[:-20], **load), load_samples(images, labels, pairs[-20:], **load)
    torch.manual_seed(0)
    model, meta, _ = build_training_model(config)
    steps = config.epochs * -(-len(train) // config.batch_size)
    optimizer, schedule = make_optimizer(model, config, total_steps=steps)
    normalize, rng = Normalizer(meta.preprocessing, torch.device("cpu")), np.random.default_rng(0)
    for _ in range(config.epochs):
        train_epoch(model, train, config, optimizer, schedule, normalize, rng)
    precise_batch_norm(model, train, config, normalize, rng)  # as `segpipe train` does after each epoch
    model.eval()

    fp32 = Segmenter(model, meta, device="cpu", batch_size=4, precision="fp32")
    bf16 = Segmenter(model, meta, device="cpu", batch_size=4)  # the default: auto
    assert bf16.autocast_dtype == torch.bfloat16 and bf16.compiled
    frames = [s.image for s in held_out]
    labels_fp32 = [p.argmax(0) for p in fp32.predict(frames)]
    labels_bf16 = [p.argmax(0) for p in bf16.predict(frames)]
    agreement = sum((a == b).sum().item() for a, b in zip(labels_fp32, labels_bf16, strict=True)) / sum(
        a.numel() for a in labels_fp32)

    def dataset_miou(predictions: list[torch.Tensor]) -> float:
        confusion = sum(confusion_matrix(p, torch.from_numpy(s.label), CAMVID_CLASSES, UNLABELLED)
                        for p, s in zip(predictions, held_out, strict=True))
        return miou(confusion)

    miou_fp32, miou_bf16 = dataset_miou(labels_fp32), dataset_miou(labels_bf16)
    print(f"agreement {agreement:.5f}, mIoU fp32 {miou_fp32:.4f} bf16 {miou_bf16:.4f}")
    assert miou_fp32 > 0.1  # a model that learned something: margins worth comparing
    assert agreement >= 0.995
    assert abs(miou_fp32 - miou_bf16) < 0.002
