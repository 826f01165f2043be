"""The polygons of a large label raster: what `geo.PolygonCollector` holds, and its process's
peak memory, at two sizes.

The labels are LoveDA's ground truth (`../shared/data/aerial/loveda/labels`: real regions,
roads and buildings across tile edges), mosaicked by mirroring the tiles so that regions
continue across them, and made block by block as `RasterStage` hands them over (2048-pixel
blocks, row by row, 0 as nodata); only the collector's own memory grows with the raster. Each
size runs in a process of its own, for its peak RSS. Prints, per size, the regions found,
the most pieces held at once and the peak RSS, then `polygon_memory_growth`: the larger
size's peak RSS over the smaller's. `--scene buildings` takes instead a 6-pixel building every
12 pixels on one background: a region as large as the raster, with a hole per building,
which the collector holds until its end.

    .venv/bin/python bench/polygons.py --sizes 8192 16384
    .venv/bin/python bench/polygons.py --scene buildings --sizes 4096 8192
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LABELS = Path(__file__).resolve().parents[2] / "shared" / "data" / "aerial" / "loveda" / "labels"
BLOCK = 2048
TILE = 1024


def mosaic_block(tiles: list[np.ndarray], row: int, col: int, size: int) -> np.ndarray:
    """Rows and columns [row, row + size) x [col, col + size) of the mosaic whose tile (i, j)
    is tiles[(i + j) % 3], flipped vertically in odd rows of tiles and horizontally in odd
    columns: mirrored, each tile's edge meets its neighbour's same edge, so regions go on."""
    rows, cols = np.arange(row, row + size), np.arange(col, col + size)
    out = np.empty((size, size), np.uint8)
    for i in np.unique(rows // TILE):
        for j in np.unique(cols // TILE):
            tile = tiles[(i + j) % len(tiles)]
            tile = tile[::-1] if i % 2 else tile
            tile = tile[:, ::-1] if j % 2 else tile
            in_rows, in_cols = rows // TILE == i, cols // TILE == j
            out[np.ix_(in_rows, in_cols)] = tile[np.ix_(rows[in_rows] % TILE, cols[in_cols] % TILE)]
    return out


def buildings_block(row: int, col: int, size: int) -> np.ndarray:
    """A 6 x 6 building (class 1) every 12 pixels, on one background (class 2)."""
    rows, cols = np.arange(row, row + size) % 12, np.arange(col, col + size) % 12
    inside = ((rows >= 3) & (rows < 9))[:, None] & ((cols >= 3) & (cols < 9))[None]
    return np.where(inside, 1, 2).astype(np.uint8)


def measure(side: int, scene: str) -> dict:
    from PIL import Image
    from rasterio.crs import CRS
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    from pipeline.geo import PolygonCollector

    tiles = [np.asarray(Image.open(p)) for p in sorted(LABELS.iterdir())]
    collector = PolygonCollector(from_origin(500000, 4000000, 0.3, 0.3), CRS.from_epsg(32650), width=side, height=side)
    regions = most_held = 0
    start = time.perf_counter()
    for row in range(0, side, BLOCK):
        for col in range(0, side, BLOCK):
            labels = mosaic_block(tiles, row, col, BLOCK) if scene == "loveda" else buildings_block(row, col, BLOCK)
            regions += len(collector.add(Window(col, row, BLOCK, BLOCK), labels, labels != 0))
            most_held = max(most_held, collector.held)
    regions += len(collector.finish())
    return {"side": side, "regions": regions, "most_held": most_held, "seconds": time.perf_counter() - start,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=(8192, 16384), help="two sides, multiples of 2048")
    parser.add_argument("--scene", choices=("loveda", "buildings"), default="loveda")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a size measured in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.scene)))
        return
    if not LABELS.is_dir():
        sys.exit(f"needs LoveDA's labels in {LABELS}")
    results = []
    for side in args.sizes:
        if side % BLOCK:
            sys.exit(f"--sizes: {side} is not a multiple of {BLOCK}")
        done = subprocess.run([sys.executable, __file__, "--one", str(side), "--scene", args.scene], check=True, capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1])
        result = json.loads(done.stdout.splitlines()[-1])
        results.append(result)
        print(f"{side} x {side}: {result['regions']} regions, at most {result['most_held']} pieces held, "
              f"{result['seconds']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB")
    print(json.dumps({"polygon_memory_growth": round(results[1]["peak_rss_mb"] / results[0]["peak_rss_mb"], 3),
                      "held_growth": round(results[1]["most_held"] / max(results[0]["most_held"], 1), 3)}))


if __name__ == "__main__":
    main()
