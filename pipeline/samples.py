"""Synthetic street-like scenes with exact ground truth, for the demo and for tests that must
run without any dataset: sky, buildings, road and cars as flat-shaded regions with noise."""

from __future__ import annotations

import numpy as np

SAMPLE_CLASSES = ("sky", "building", "road", "car")
_COLOURS = {0: (135, 190, 235), 1: (150, 80, 60), 2: (90, 90, 95), 3: (200, 30, 40)}


def synthetic_scene(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An (H, W, 3) uint8 RGB image and its (H, W) uint8 labels in SAMPLE_CLASSES order."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((height, width), dtype=np.uint8)
    horizon = int(height * rng.uniform(0.35, 0.55))
    x = 0
    while x < width:  # a skyline of buildings of random widths and heights
        w = int(rng.integers(max(4, width // 10), max(5, width // 4)))
        top = int(rng.uniform(0.1, 0.9) * horizon)
        labels[top:horizon, x : x + w] = 1
        x += w + int(rng.integers(0, max(1, width // 20)))
    labels[horizon:] = 2
    for _ in range(int(rng.integers(1, 4))):  # cars on the road
        ch, cw = max(2, height // 8), max(3, width // 6)
        y0 = int(rng.integers(horizon, max(horizon + 1, height - ch)))
        x0 = int(rng.integers(0, max(1, width - cw)))
        labels[y0 : y0 + ch, x0 : x0 + cw] = 3
    palette = np.array([_COLOURS[c] for c in range(len(SAMPLE_CLASSES))], dtype=np.float32)
    image = palette[labels] + rng.normal(0, 8, size=(height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8), labels
