"""Where a georeferenced raster's time goes inside the replica: `RasterStage` on one mosaic,
each of its steps timed apart, against the bare forward over the same windows.

    python bench/profile_raster.py [--side 4096] [--no-crf]

The mosaic is bench/raster.py's (LoveDA tiles, 512-pixel windows, default blocks), the model
its LR-ASPP with 7 classes. Prints one JSON line: seconds per step (reading the blocks, the
model's forward on its output grid, keeping and taking back the windows blocks share, the
rest of the sliding window's blending, the CRF on the grid, the cores' labels and confidence
from their logits on the grid, statistics and polygons), the stage's total, the bare forward's (the model
as given, `bare.AsGiven`) and the grid forward's (without its final resize), and the bare
forward's over the stage's: the in-process bound on bench/raster.py's
`raster_pipeline_efficiency`. The steps are timed
by wrapping the functions `RasterStage` calls, in one process with the replica's threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bare import AsGiven  # noqa: E402
from raster import CLASSES, MODEL, TILE, write_mosaic  # noqa: E402

from pipeline import stages  # noqa: E402
from pipeline.config import RasterSettings  # noqa: E402
from pipeline.heap import keep_freed_memory  # noqa: E402
from pipeline.inference import Segmenter  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.records import ImageRecord  # noqa: E402
from pipeline.storage import open_location  # noqa: E402
from pipeline.windows import window_starts, window_stride  # noqa: E402

# the functions RasterStage calls, by the name each step is reported under
STEPS = {
    "read_blocks": (stages, "read_rgb"),
    "windows_kept": (stages.WindowFiles, "keep"),
    "windows_taken": (stages.WindowFiles, "take"),
    "crf": (stages, "crf_logits"),
    # the core's logits resized to pixels, their labels and confidence (one compiled kernel on CPU)
    "labels_and_confidence": (stages.PixelLabeler, "__call__"),
    "statistics": (stages._ClassTotals, "add"),
    "polygons": (stages.PolygonCollector, "add"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--no-crf", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    keep_freed_memory()  # as a replica sets its heap
    seconds: dict[str, float] = defaultdict(float)

    def timed(name: str, work: Callable) -> Callable:
        def run(*a, **k):
            start = time.perf_counter()
            try:
                return work(*a, **k)
            finally:
                seconds[name] += time.perf_counter() - start
        return run

    model = build_model(MODEL, num_classes=CLASSES, weights=None)
    segmenter = Segmenter(model, device="cpu", batch_size=4)
    with tempfile.TemporaryDirectory(prefix="segpipe-profile-raster-") as work:
        (Path(work) / "src").mkdir()
        write_mosaic(Path(work) / "src" / "mosaic.tif", args.side)
        stage = stages.RasterStage(stages.SegmentStage(segmenter, crf=not args.no_crf), RasterSettings(tile=TILE),
                                   source=open_location(f"{work}/src"), output=open_location(f"{work}/out"),
                                   palette=segmenter.meta.palette, class_names=segmenter.meta.class_names,
                                   run_id="profile")
        stage(ImageRecord(key="mosaic.tif", georeferenced=True))  # warm-up: oneDNN primitives, GDAL
        for name, (owner, attribute) in STEPS.items():
            setattr(owner, attribute, timed(name, getattr(owner, attribute)))
        stage.segmenter._forward = timed("forward", stage.segmenter._forward)
        stage.segmenter.region_logits = timed("sliding_window", stage.segmenter.region_logits)
        start = time.perf_counter()
        record = stage(ImageRecord(key="mosaic.tif", georeferenced=True))
        total = time.perf_counter() - start
        assert record.ok, record.error

    windows = len(window_starts(args.side, TILE, window_stride(TILE, None))) ** 2
    batch = torch.randint(0, 255, (4, 3, TILE, TILE), dtype=torch.uint8)

    def forward_seconds(of: Segmenter) -> float:
        with torch.inference_mode():
            of._forward(batch)  # warm-up (and compilation)
            start = time.perf_counter()
            for _ in range(-(-windows // 4)):
                of._forward(batch)
            return time.perf_counter() - start

    bare = forward_seconds(Segmenter(AsGiven(model), model.meta, device="cpu", batch_size=4))
    grid = forward_seconds(segmenter)
    # what the sliding window spent outside the forward and the store: on the model's grid, a few
    # milliseconds, which the timing wrappers' own cost can exceed (so never below zero)
    seconds["blending"] = max(0.0, seconds.pop("sliding_window") - seconds["forward"] - seconds["windows_kept"]
                              - seconds["windows_taken"])
    print(json.dumps({
        "side": args.side, "crf": not args.no_crf, "windows": windows,
        "seconds": {name: round(value, 3) for name, value in seconds.items()},
        "stage_seconds": round(total, 3), "bare_forward_seconds": round(bare, 3),
        "grid_forward_seconds": round(grid, 3),
        "in_process_efficiency": round(bare / total, 3),
    }))


if __name__ == "__main__":
    main()
