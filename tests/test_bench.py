"""The benchmark script runs and its comparisons mean something: the same answers as the
references it is timed against. Timings themselves are not asserted (shared, noisy machines)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def test_crf_and_evaluation_benchmarks_agree_with_their_references():
    done = subprocess.run([sys.executable, "bench/run.py", "--quick", "--only", "crf", "eval"], capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [line.get("benchmark") for line in lines[:-1]] == ["crf", "eval"]
    summary = lines[-1]["summary"]
    assert summary["crf_argmax_agreement"] > 0.9  # the same CRF as pydensecrf2's, not merely a fast one
    assert summary["eval_max_abs_diff"] < 1e-6  # the same IoU as torchmetrics'
    assert summary["crf_speedup_vs_pydensecrf"] > 0 and summary["eval_speedup_vs_torchmetrics"] > 0


@pytest.mark.slow
def test_the_raster_benchmark_runs_and_reports_its_ratios(shared_data):
    """Small rasters only: the figures in BENCHMARKS.md come from 8192 to 32768 pixels a side."""
    done = subprocess.run([sys.executable, "bench/raster.py", "--sizes", "512", "1024"], capture_output=True,
                          text=True, timeout=900, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [line["side"] for line in lines[:-1]] == [512, 1024]
    assert all(line["peak_rss_gb"] > 0 and line["raster_pipeline_efficiency"] > 0 for line in lines[:-1])
    assert lines[-1]["raster_memory_growth"] > 0 and lines[-1]["sizes"] == [512, 1024]


def test_the_raster_profile_accounts_for_the_stage(shared_data):
    """Its steps, timed apart, are parts of the stage's time: none is missing or counted twice."""
    done = subprocess.run([sys.executable, "bench/profile_raster.py", "--side", "1024"], capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.splitlines()[-1])
    steps = figures["seconds"]
    assert {"read_blocks", "forward", "blending", "crf", "statistics", "polygons"} <= set(steps)
    assert all(value >= 0 for value in steps.values()) and steps["forward"] > 0
    assert sum(steps.values()) <= figures["stage_seconds"] and figures["bare_forward_seconds"] > 0
