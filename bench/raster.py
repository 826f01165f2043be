"""Georeferenced rasters at scale: peak memory against the raster's size, and end-to-end speed
against the bare sliding-window forward on the same windows.

    python bench/raster.py                          # 8192 and 16384 pixels a side
    python bench/raster.py --sizes 8192 16384 32768

Each size is a GeoTIFF mosaic of the LoveDA tiles in ../shared/data (tiled, deflate, UTM),
written block by block. `segpipe segment --tile 512 --crf --polygons` runs it in a process of
its own; the peak resident memory of that process tree (the driver, Ray's workers and the
model replica, sampled every 0.2 s) is its memory. Prints one JSON line per size and a summary:

- raster_memory_growth: peak memory at the second size / at the first (goal: 1.25 or less);
- raster_pipeline_efficiency: megapixels/s end to end (model loading and compilation excluded) / the bare
  forward's megapixels/s over the same windows (goal: 0.8 or more).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import rasterio
import torch
from PIL import Image
from rasterio.transform import from_origin
from rasterio.windows import Window

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bare import AsGiven  # bench/: the script's folder is on the path
from memory import peak_tree_rss

from pipeline.heap import keep_freed_memory
from pipeline.inference import Segmenter
from pipeline.models import build_model
from pipeline.windows import window_starts, window_stride

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "aerial" / "loveda" / "images"
MODEL, CLASSES, TILE = "lraspp_mobilenet_v3_large", 7, 512


def write_mosaic(path: Path, side: int) -> None:
    """A side x side RGB GeoTIFF of LoveDA tiles, written 1024 rows at a time (flat memory)."""
    tiles = [np.array(Image.open(p).convert("RGB")) for p in sorted(SHARED.iterdir())]
    size = tiles[0].shape[0]
    with rasterio.open(path, "w", driver="GTiff", width=side, height=side, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 5000000, 0.3, 0.3), tiled=True,
                       blockxsize=512, blockysize=512, compress="deflate", BIGTIFF="YES") as dst:
        for row in range(0, side, size):
            strip = np.concatenate([tiles[(row // size + c) % len(tiles)] for c in range(-(-side // size))], axis=1)
            height = min(size, side - row)
            dst.write(np.moveaxis(strip[:height, :side], -1, 0), window=Window(0, row, side, height))


def run(source: Path, output: Path) -> dict:
    command = [sys.executable, "-m", "flows.cli", "segment", str(source), str(output), "--model", MODEL,
               "--weights", "none", "--num-classes", str(CLASSES), "--tile", str(TILE), "--crf", "--polygons"]
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    by_process: dict[str, int] = {}
    peak = peak_tree_rss(process, by_process)
    out = process.stdout.read()
    if process.returncode != 0:
        raise SystemExit(f"segment failed:\n{out[-3000:]}")
    summary = json.loads(next((output / "_runs").iterdir()).read_text())
    compile_seconds = max((r.get("compile_seconds") or 0.0 for r in summary["replicas"]), default=0.0)
    largest = sorted(by_process.items(), key=lambda kv: -kv[1])[:4]
    return {"peak_rss_gb": peak / 2**30, "seconds": time.monotonic() - started,
            # model loading and compilation: once per replica, whatever the raster's size
            "busy_seconds": summary["seconds"] - summary["setup_seconds"] - compile_seconds,
            "compile_seconds": compile_seconds,
            "largest_processes_gb": {name: round(rss / 2**30, 2) for name, rss in largest}}


def bare_window_seconds() -> float:
    """Seconds the bare forward (`AsGiven`) takes per window, timed on batches of 4 windows:
    the best of three passes of 3 s each (three single batches moved the figure by 1.5x from
    run to run, and shared machines only ever slow a pass down). Measured once, before the
    runs: a second model compiled in the same process measured a third slower."""
    torch.set_num_threads(psutil.cpu_count(logical=True) or 1)
    keep_freed_memory()  # as a replica sets its heap
    model = build_model(MODEL, num_classes=CLASSES, weights=None)
    segmenter = Segmenter(AsGiven(model), model.meta, device="cpu", batch_size=4)
    batch = torch.randint(0, 255, (4, 3, TILE, TILE), dtype=torch.uint8)
    with torch.inference_mode():
        segmenter._forward(batch)  # warm-up: oneDNN primitives, and the compilation
        best = float("inf")
        for _ in range(3):
            start, calls = time.perf_counter(), 0
            while time.perf_counter() - start < 3.0:
                segmenter._forward(batch)
                calls += 1
            best = min(best, (time.perf_counter() - start) / calls)
    return best / 4


def windows_of(side: int) -> int:
    """The windows segpipe's grid puts on a side x side raster."""
    return len(window_starts(side, TILE, window_stride(TILE, None))) ** 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384])
    args = parser.parse_args()
    results = {}
    window_seconds = bare_window_seconds()
    with tempfile.TemporaryDirectory(prefix="segpipe-bench-raster-") as work:
        for side in args.sizes:
            source = Path(work) / f"src-{side}"
            source.mkdir()
            write_mosaic(source / "mosaic.tif", side)
            figures = run(source, Path(work) / f"out-{side}")
            megapixels = side * side / 1e6
            figures["megapixels_per_second"] = megapixels / figures["busy_seconds"]
            figures["bare_forward_megapixels_per_second"] = megapixels / (window_seconds * windows_of(side))
            figures["raster_pipeline_efficiency"] = figures["megapixels_per_second"] / figures["bare_forward_megapixels_per_second"]
            results[side] = figures
            print(json.dumps({"side": side, **{k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}}),
                  flush=True)
            for path in (source / "mosaic.tif",):
                path.unlink()
    first, second = args.sizes[0], args.sizes[1] if len(args.sizes) > 1 else args.sizes[0]
    print(json.dumps({
        "raster_memory_growth": round(results[second]["peak_rss_gb"] / results[first]["peak_rss_gb"], 3),
        "raster_pipeline_efficiency": round(results[args.sizes[-1]]["raster_pipeline_efficiency"], 3),
        "sizes": args.sizes,
    }))


if __name__ == "__main__":
    main()
