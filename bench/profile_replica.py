"""Where one image's time goes on a replica: each step of the three stages timed apart, on
the same frames, model and device as bench/run.py, and optionally torch's profiler.

    python bench/profile_replica.py [--device cpu|cuda] [--model M] [--batch-size 4] [--torch-profiler]

Prints one JSON line: milliseconds per image for decode (Pillow, in the decode tasks or the replica), the
forward with preprocessing (`Segmenter.predict_logits`: logits on the model's output grid),
the dense CRF on that grid (`stages.crf_refine`), the labels and confidence of the image's
pixels from the refined logits (`labels.PixelLabeler`, the replica's: one compiled kernel on
CPU), class statistics (and those of the frames' ground-truth label maps, with a trained
model's dozen classes), and mask encoding (in the write tasks or the replica); with --device cuda,
also the JPEG decode on the GPU. The device is synchronised between steps, so the figures
add up to the replica's work per image, not to its throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import CAMVID, NUM_CLASSES, source_images  # noqa: E402

from pipeline.decode import decode_image, plain_jpeg_shape  # noqa: E402
from pipeline.heap import keep_freed_memory  # noqa: E402
from pipeline.inference import Segmenter  # noqa: E402
from pipeline.masks import encode_mask  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.preprocess import to_chw_uint8  # noqa: E402
from pipeline.records import ImageRecord  # noqa: E402
from pipeline.stages import SegmentStage, crf_refine  # noqa: E402
from pipeline.stats import class_statistics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="deeplabv3_mobilenet_v3_large")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--torch-profiler", action="store_true", help="also print torch's profiler table for one round")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(os.cpu_count() or 1)
    keep_freed_memory()  # as a replica sets its heap
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as a replica sets it
    segmenter = Segmenter(build_model(args.model, num_classes=NUM_CLASSES, weights=None), device=device, batch_size=args.batch_size)
    stage = SegmentStage(segmenter)
    palette = segmenter.meta.palette
    data = source_images()[: args.batch_size]
    # an untrained model's labels hold one or two classes; the frames' ground truth holds the
    # dozen a trained model finds, each with its connected regions to count
    truths = [np.array(Image.open(p)) for p in sorted((CAMVID / "labels").glob("*.png"))[: args.batch_size]] if CAMVID.is_dir() else []
    totals: dict[str, float] = defaultdict(float)

    def timed(name: str, work):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = work()
        if device.type == "cuda":
            torch.cuda.synchronize()
        totals[name] += time.perf_counter() - started
        return result

    def one_round() -> None:
        images = timed("decode_pillow", lambda: [decode_image(d) for d in data])
        if device.type == "cuda":
            records = [ImageRecord(str(i), encoded=d) for i, d in enumerate(data)]
            for record in records:
                record.height, record.width = plain_jpeg_shape(record.encoded)
            timed("decode_on_device", lambda: stage._decode_jpegs(records))
        grids = timed("forward", lambda: segmenter.predict_logits(images))
        for image, grid in zip(images, grids, strict=True):
            pixels = to_chw_uint8(image).to(device)[None]
            size = grid.size
            refined = timed("crf", lambda grid=grid, pixels=pixels, size=size: crf_refine([grid], pixels, (0, size[0]), (0, size[1]))[0])
            labels, confidence = timed("labels_and_confidence", lambda refined=refined, size=size: stage.labeler(refined, (0, size[0]), (0, size[1])))
            timed("statistics", lambda labels=labels, confidence=confidence: class_statistics(labels, confidence, NUM_CLASSES))
            mask = labels.to(torch.int32).cpu().numpy().astype(np.uint8)
            timed("encode_mask", lambda mask=mask: encode_mask(mask, palette))
        for truth in truths:
            ones = np.ones(truth.shape, dtype=np.float32)
            timed("statistics_of_ground_truth", lambda truth=truth, ones=ones: class_statistics(truth, ones, int(truth.max()) + 1))

    one_round()  # warm-up: allocator, oneDNN primitives, cudnn.benchmark
    totals.clear()
    for _ in range(args.rounds):
        one_round()
    per_image = {name: round(seconds / (args.rounds * len(data)) * 1000, 2) for name, seconds in totals.items()}
    print(json.dumps({"profile": "replica", "model": args.model, "device": args.device, "batch_size": args.batch_size,
                      "ms_per_image": per_image}))
    if args.torch_profiler:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as profile:
            one_round()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(profile.key_averages().table(sort_by=sort, row_limit=20))


if __name__ == "__main__":
    main()
