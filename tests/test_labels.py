"""`PixelLabeler`: each pixel's label and confidence from logits on the model's grid, compiled
into one kernel per group of classes on CPU, against the tensor operations it replaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters  # dynamo's own count of the graphs it compiled

from pipeline.inference import GridLogits, Segmenter
from pipeline.labels import CLASS_GROUP, PixelLabeler
from pipeline.models import build_model
from pipeline.records import ImageRecord
from pipeline.stages import SegmentStage
from pipeline.stats import labels_and_confidence_of_logits


def _grid(classes: int, cell: int, size: tuple[int, int], *, origin: tuple[int, int] = (0, 0),
          held: tuple[int, int] | None = None, seed: int = 0) -> GridLogits:
    """Random logits of an image of `size` pixels on cells of `cell`, holding `held` cells from
    the cell at pixel `origin` (all of them by default)."""
    grid = (-(-size[0] // cell), -(-size[1] // cell))
    held = held or (grid[0] - origin[0] // cell, grid[1] - origin[1] // cell)
    values = torch.randn(classes, *held, generator=torch.Generator().manual_seed(seed)) * 3
    return GridLogits(values, cell, origin, grid, size)


def _assert_same(got: tuple[torch.Tensor, torch.Tensor], expected: tuple[torch.Tensor, torch.Tensor]) -> None:
    labels, confidence = got
    assert labels.dtype == torch.int64 and confidence.dtype == torch.float32
    assert labels.shape == expected[0].shape == confidence.shape
    # the kernel lerps rows and columns apart, so two classes equal within rounding may swap
    assert (labels == expected[0]).float().mean().item() > 0.9999
    torch.testing.assert_close(confidence, expected[1], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def compiled() -> PixelLabeler:
    return PixelLabeler(compiled=True)


@pytest.mark.slow
@pytest.mark.parametrize(("classes", "cell", "size", "rows", "cols"), [
    (21, 8, (360, 480), (0, 360), (0, 480)),  # a CamVid frame, as a replica labels it
    (21, 8, (360, 480), (13, 301), (7, 477)),  # a part starting and ending inside cells
    (7, 16, (203, 190), (0, 203), (0, 190)),  # a coarser grid; sizes not whole cells
    (CLASS_GROUP + 9, 8, (97, 120), (5, 97), (0, 113)),  # two groups of classes, the last padded
])
def test_compiled_labels_equal_the_tensor_operations(compiled: PixelLabeler, classes: int, cell: int,
                                                    size: tuple[int, int], rows: tuple[int, int],
                                                    cols: tuple[int, int]) -> None:
    grid = _grid(classes, cell, size)
    with torch.inference_mode():
        _assert_same(compiled(grid, rows, cols), labels_and_confidence_of_logits(grid.pixels(rows, cols)))


@pytest.mark.slow
def test_compiled_labels_of_a_block_of_a_larger_grid(compiled: PixelLabeler) -> None:
    """A raster block's core: the grid holds only the cells around it, from an origin inside
    the raster, and the core's pixels are counted in the whole raster's."""
    grid = _grid(7, 8, (1000, 900), origin=(400, 320), held=(40, 35), seed=3)
    rows, cols = (419, 700), (339, 590)
    with torch.inference_mode():
        _assert_same(compiled(grid, rows, cols), labels_and_confidence_of_logits(grid.pixels(rows, cols)))


@pytest.mark.slow
def test_a_tie_across_groups_goes_to_the_first_class(compiled: PixelLabeler) -> None:
    """Two classes with the same logits, leading everywhere, one in each group of classes: the
    label is the first, as torch.max gives it, and each has half the probability."""
    grid = _grid(CLASS_GROUP + 8, 8, (40, 48), seed=5)
    grid.values[3] += 20
    grid.values[CLASS_GROUP + 3] = grid.values[3]
    with torch.inference_mode():
        labels, confidence = compiled(grid, (0, 40), (0, 48))
    assert bool((labels == 3).all())
    torch.testing.assert_close(confidence, torch.full((40, 48), 0.5), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_compilation_is_paid_once_per_group_size() -> None:
    labeler = PixelLabeler(compiled=True)
    assert labeler.compile_seconds == 0.0
    graphs = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        labeler(_grid(5, 8, (64, 64)), (0, 64), (0, 64))  # square: its rows and columns are one size
        first = labeler.compile_seconds
        assert first > 0 and counters["stats"]["unique_graphs"] == graphs + 1 and labeler._compiled_for == {5}
        # parts of any other size (not square; as many rows as classes; one pixel wide) take
        # the same kernel, or none: dynamo raises rather than compile again
        with torch._dynamo.config.patch(error_on_recompile=True):
            for size, rows, cols in [((120, 40), (3, 100), (0, 40)), ((5, 300), (0, 5), (0, 300)), ((48, 48), (0, 48), (0, 48)),
                                     ((8, 8), (0, 8), (0, 8)), ((1, 30), (0, 1), (0, 30)), ((30, 9), (4, 30), (8, 9))]:
                grid = _grid(5, 8, size, seed=sum(size))
                _assert_same(labeler(grid, rows, cols), labels_and_confidence_of_logits(grid.pixels(rows, cols)))
        assert labeler.compile_seconds == first


def test_uncompiled_and_pixel_grids_take_the_tensor_operations() -> None:
    grid = _grid(6, 8, (50, 60))
    expected = labels_and_confidence_of_logits(grid.pixels((2, 50), (0, 33)))
    got = PixelLabeler(compiled=False)(grid, (2, 50), (0, 33))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    pixels = _grid(6, 1, (20, 30))  # logits already on the pixels: nothing to resize, nothing compiled
    labeler = PixelLabeler(compiled=True)
    got = labeler(pixels, (0, 20), (5, 30))
    expected = labels_and_confidence_of_logits(pixels.pixels((0, 20), (5, 30)))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]) and labeler.compile_seconds == 0.0


@pytest.mark.slow
def test_a_compiled_cpu_stage_labels_with_its_kernel() -> None:
    """A replica's stage whose model is compiled for the CPU labels with the compiled kernel,
    and its labels and statistics are those of the same model uncompiled."""
    torch.manual_seed(0)
    model = build_model("lraspp_mobilenet_v3_large", num_classes=5, weights=None)
    image = np.random.default_rng(0).integers(0, 256, (72, 96, 3), dtype=np.uint8)
    results = {}
    for compile_ in (False, True):
        stage = SegmentStage(Segmenter(model, device="cpu", precision="fp32", compile=compile_), crf=True)
        assert stage.labeler.compiled is compile_
        record = ImageRecord("a.png", image=image, height=72, width=96)
        results[compile_] = stage([record])[0]
        assert results[compile_].ok
        assert stage.labeler._compiled_for == ({5} if compile_ else set())  # the kernel labelled
    eager, fast = results[False], results[True]
    assert (eager.labels == fast.labels).mean() > 0.999
    np.testing.assert_array_equal(eager.stats.class_id, fast.stats.class_id)
    np.testing.assert_allclose(eager.stats.mean_confidence, fast.stats.mean_confidence, atol=1e-3)
