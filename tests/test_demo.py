"""`segpipe demo` shows its work: the generated scenes stay beside their masks and ground
truth, the DuckDB query is printed with its result, and one picture puts each scene beside
its mask and its ground truth in the class palette."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.demo import write_overview
from pipeline.masks import default_palette, encode_mask
from pipeline.samples import SAMPLE_CLASSES, synthetic_scene


def _find(canvas: np.ndarray, panel: np.ndarray) -> tuple[int, int]:
    """Where `panel` lies in `canvas`, pixel for pixel (its first row matched, then all of it)."""
    h, w = panel.shape[:2]
    for y in range(canvas.shape[0] - h + 1):
        for x in np.flatnonzero((canvas[y, : canvas.shape[1] - w + 1] == panel[0, 0]).all(axis=-1)):
            if np.array_equal(canvas[y : y + h, x : x + w], panel):
                return y, int(x)
    raise AssertionError("panel not found in the picture")


def _rows(folder: Path, count: int, predicted_shift: int) -> list[tuple[str, Path, Path, Path]]:
    rows = []
    for seed in range(count):
        image, labels = synthetic_scene(48, 64, seed)
        paths = [folder / f"{kind}_{seed}.png" for kind in ("scene", "mask", "truth")]
        Image.fromarray(image).save(paths[0])
        # the "prediction": the truth with its classes shifted, in the model's palette
        paths[1].write_bytes(encode_mask((labels + predicted_shift) % 4, default_palette(4)))
        paths[2].write_bytes(encode_mask(labels))
        rows.append((f"scene_{seed}", *paths))
    return rows


@pytest.mark.parametrize("label_map", [None, {0: 0, 1: 0, 2: 0, 3: 3}])
def test_the_picture_puts_each_scene_beside_its_mask_and_its_ground_truth(tmp_path, label_map):
    rows = _rows(tmp_path, 2, predicted_shift=1)
    path = write_overview(tmp_path / "overview.png", rows, list(SAMPLE_CLASSES), label_map)
    canvas = np.array(Image.open(path).convert("RGB"))
    colours = np.array(default_palette(4), dtype=np.uint8)
    mapped = np.arange(4) if label_map is None else np.array([label_map[v] for v in range(4)])
    for _, scene, mask, truth in rows:
        y, x_scene = _find(canvas, np.array(Image.open(scene).convert("RGB")))
        labels = np.array(Image.open(mask))
        y_mask, x_mask = _find(canvas, colours[labels])
        y_truth, x_truth = _find(canvas, colours[mapped[np.array(Image.open(truth))]])
        assert y == y_mask == y_truth and x_scene < x_mask < x_truth  # one row: scene, mask, ground truth
    # a legend: a swatch of each class shown, below the panels
    below = canvas[y + 48 :]
    for class_id in range(4):
        assert (below == colours[class_id]).all(axis=-1).sum() >= 100, f"no swatch for class {class_id}"


@pytest.mark.slow
def test_segpipe_demo_keeps_its_inputs_and_prints_its_query(tmp_path):
    """The whole demo, as `make demo` runs it (2 scenes, the light model): Prefect's own
    server in a PREFECT_HOME of its own, a local Ray."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in {"no_proxy", "https_proxy", "prefect_api_url"}}
    # offline wherever the test runs: an empty torch.hub cache, and HTTPS to a port nothing listens on
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    env |= {"RAY_ADDRESS": "local", "PREFECT_HOME": str(tmp_path / "prefect-home"), "TORCH_HOME": str(tmp_path / "torch"),
            "HTTPS_PROXY": f"http://127.0.0.1:{port}"}
    demo = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "demo", "--output", str(demo), "--model", "lraspp_mobilenet_v3_large",
         "--images", "2"],
        capture_output=True, text=True, timeout=900, env=env, cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [night] = [p.name for p in (demo / "scenes").iterdir()]
    for key in ("cam1/scene_000.png", "cam2/scene_001.png"):
        scene = Image.open(demo / "scenes" / night / key)
        truth = Image.open(demo / "ground_truth" / night / key)
        mask = Image.open(demo / "segmentation" / f"date={night}" / "masks" / key)
        assert scene.size == truth.size == mask.size == (320, 240) and scene.mode == "RGB"
    picture = Image.open(demo / "overview.png")
    assert picture.format == "PNG" and picture.width > 3 * 320
    # the query is printed as it runs, with its result under it
    sql = re.search(r"with this query:\n\n(.*?)\n\n", done.stdout, re.S)
    assert sql and f"read_parquet('{demo}/segmentation/*/class_stats/**/*.parquet'" in sql.group(1)
    assert "class_name" in done.stdout.split(sql.group(1))[1] and "share" in done.stdout.split(sql.group(1))[1]
    assert "Token authentication" not in done.stdout + done.stderr
    # offline: said once, where the weights file would go, without another command's options
    [line] = [line for line in done.stdout.splitlines() if "are not available here" in line]
    assert "copy that file to" in line and "--weights" not in line and "UNTRAINED" in done.stdout
    assert "Downloading" not in done.stderr
