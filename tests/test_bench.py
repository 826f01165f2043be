"""The benchmark script runs and its comparisons mean something: the same answers as the
references it is timed against. Timings themselves are not asserted (shared, noisy machines)."""

from __future__ import annotations

import importlib.util
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


@pytest.mark.slow
def test_the_precision_benchmarks_report_peaks_speedups_and_utilisation():
    """The machine's peak rates and the model's bf16 / fp32 figures are measured and reported,
    in their own lines and in the summary (smallest quick run: one model, one compile; 35 s on
    2 cores, 80 s with inductor's caches empty)."""
    done = subprocess.run([sys.executable, "bench/run.py", "--quick", "--only", "peak", "precision",
                           "--model", "deeplabv3_mobilenet_v3_large"], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [line.get("benchmark") for line in lines[:-1]] == ["machine_peak_gflops", "precision"]
    peak, precision, summary = lines[0], lines[1], lines[-1]["summary"]
    kernels = peak["gflops"]
    assert {"conv3x3_fp32_eager", "conv3x3_bf16_module_eager", "gemm_fp32", "gemm_bf16"} <= set(kernels)
    assert all(rate > 0 for rate in kernels.values())
    for dtype in ("fp32", "bf16"):  # each dtype's peak is its fastest kernel
        best = max(rate for name, rate in kernels.items() if f"_{dtype}" in name)
        assert peak["machine_peak_gflops"][dtype] == best == kernels[peak["peak_kernel"][dtype]]
    model = "deeplabv3_mobilenet_v3_large"
    assert precision["model"] == model and 1 < precision["gflops_per_image"] < precision["gflops_per_image_with_padding"]
    assert precision["images_per_second_fp32"] > 0 and precision["images_per_second_bf16"] > 0
    # the ratio and the utilisations are computed from the figures reported beside them
    assert precision["bf16_speedup"] == pytest.approx(precision["images_per_second_bf16"] / precision["images_per_second_fp32"], rel=0.01)
    for dtype in ("fp32", "bf16"):
        utilisation = precision["model_flops_utilisation"][dtype]
        expected = precision["gflops_per_image"] * precision[f"images_per_second_{dtype}"] / peak["machine_peak_gflops"][dtype]
        assert 0 < utilisation <= 1.5 and utilisation == pytest.approx(expected, rel=0.02)
    assert summary["machine_peak_gflops"] == peak["machine_peak_gflops"]
    assert summary["bf16_speedup"] == {model: precision["bf16_speedup"]} and summary["bf16_speedup"][model] > 0
    assert summary["model_flops_utilisation"] == {model: precision["model_flops_utilisation"]}
    assert lines[-1]["native_bf16"] in (True, False)


def test_model_flops_leave_out_the_taps_on_padding():
    """A 3x3 convolution with padding 1 on a 4x4 image: along each axis the corner taps read a
    pixel at 3 of the 4 output positions and the centre one at all 4, so 10 x 10 of the 16 x 9
    (position, tap) pairs read pixels; two FLOPs each per input and output channel."""
    import torch

    spec = importlib.util.spec_from_file_location("bench_run", Path(__file__).parent.parent / "bench" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model_flops_per_image = bench.model_flops_per_image
    conv = torch.nn.Conv2d(2, 3, 3, padding=1, bias=False)
    counts = model_flops_per_image(conv, torch.zeros(1, 2, 4, 4))
    assert counts == {"counted": 2 * 2 * 3 * 16 * 9, "inside": 2 * 2 * 3 * 10 * 10}
    dilated = torch.nn.Conv2d(1, 1, 3, padding=4, dilation=4, bias=False)  # only the centre tap reads a pixel
    assert model_flops_per_image(dilated, torch.zeros(1, 1, 4, 4))["inside"] == 2 * 16
