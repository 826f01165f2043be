"""The command line and the import contract of `pipeline`."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from pipeline.cli import main
from pipeline.masks import decode_mask


def test_pipeline_imports_without_ray_or_prefect() -> None:
    code = (
        "import sys, pipeline, pipeline.models, pipeline.inference, pipeline.crf, pipeline.stats, "
        "pipeline.metrics, pipeline.masks, pipeline.samples, pipeline.cli; "
        "assert 'ray' not in sys.modules and 'prefect' not in sys.modules, 'pipeline pulled in ray or prefect'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_demo_segments_generated_images(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached weights
    assert main(["demo", "--output", str(tmp_path / "out"), "--images", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    masks = sorted((tmp_path / "out" / "masks").glob("*.png"))
    assert [m.name for m in masks] == ["scene_000.png", "scene_001.png"]
    labels = decode_mask(masks[0].read_bytes())
    assert labels.shape == (240, 320) and labels.dtype == np.uint8
    # offline it must say so plainly rather than silently run random weights
    assert "pretrained weights" in printed.lower() or "UNTRAINED" in printed
    assert "scene_001:" in printed


def test_models_command_lists_the_registry(capsys) -> None:
    assert main(["models"]) == 0
    assert "pspnet_resnet101" in capsys.readouterr().out.split()
