"""Per-image class statistics and mask files."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from pipeline.masks import (
    confidence_levels,
    decode_mask,
    default_palette,
    encode_confidence,
    encode_mask,
)
from pipeline.stats import class_statistics, labels_and_confidence


def test_class_statistics_by_hand() -> None:
    labels = np.array([[0, 0, 2, 2], [0, 0, 0, 0], [2, 0, 0, 2], [2, 0, 0, 2]])
    confidence = np.full((4, 4), 0.5, dtype=np.float32)
    confidence[0, 2] = 1.0
    stats = class_statistics(labels, confidence, num_classes=3)
    np.testing.assert_array_equal(stats.class_id, [0, 2])  # class 1 absent: no row
    np.testing.assert_array_equal(stats.pixel_count, [10, 6])
    np.testing.assert_allclose(stats.fraction, [10 / 16, 6 / 16])
    np.testing.assert_allclose(stats.mean_confidence, [0.5, (1.0 + 5 * 0.5) / 6])
    # class 2: the top pair, the left column pair, the right column pair (8-connectivity)
    np.testing.assert_array_equal(stats.components, [1, 3])


def test_diagonal_pixels_are_one_component() -> None:
    labels = np.eye(5, dtype=np.int64)
    stats = class_statistics(labels, np.ones((5, 5)), 2)
    np.testing.assert_array_equal(stats.components, [1, 1])


def _components_on_whole_map(labels: np.ndarray, class_ids: np.ndarray) -> list[int]:
    """Each class's 8-connected regions, counted on the whole map: what `class_statistics`
    counts within each class's bounding box."""
    return [ndimage.label(labels == c, structure=np.ones((3, 3), dtype=bool))[1] for c in class_ids]


@pytest.mark.parametrize("seed", range(3))
def test_components_within_bounding_boxes_equal_whole_map(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # blocky regions of 6 classes with speckle: classes that touch the edges, nest and cross
    labels = np.kron(rng.integers(0, 6, (9, 12)), np.ones((7, 5), dtype=np.int64))
    speckle = rng.random(labels.shape) < 0.03
    labels[speckle] = rng.integers(0, 6, int(speckle.sum()))
    labels[:3, :4] = 7  # a class in one corner only; class 6 absent
    stats = class_statistics(labels, np.ones(labels.shape), 8)
    np.testing.assert_array_equal(stats.components, _components_on_whole_map(labels, stats.class_id))
    # uint16 maps of many classes, class 0 absent
    wide = (labels * 50 + 1).astype(np.uint16)
    stats = class_statistics(wide, np.ones(wide.shape), 400, host_labels=wide)
    assert 0 not in stats.class_id and stats.class_id.max() > 255
    np.testing.assert_array_equal(stats.components, _components_on_whole_map(wide, stats.class_id))


def test_statistics_of_an_empty_map_are_empty() -> None:
    stats = class_statistics(np.zeros((0, 7), dtype=np.uint8), np.zeros((0, 7), dtype=np.float32), 3)
    assert stats.class_id.size == stats.components.size == 0


def test_components_on_camvid_ground_truth(shared_data) -> None:
    root = shared_data / "camvid" / "val" / "labels"
    for path in sorted(root.iterdir())[:4]:
        labels = np.array(Image.open(path))
        stats = class_statistics(labels, np.ones(labels.shape, dtype=np.float32), int(labels.max()) + 1)
        assert len(stats.class_id) > 5  # many classes, large and small
        np.testing.assert_array_equal(stats.components, _components_on_whole_map(labels, stats.class_id))


def test_statistics_from_probabilities_add_up() -> None:
    probs = torch.randn(5, 30, 40).softmax(0)
    labels, confidence = labels_and_confidence(probs)
    stats = class_statistics(labels, confidence, 5)
    assert stats.pixel_count.sum() == 30 * 40
    assert stats.fraction.sum() == pytest.approx(1.0)
    for c, mean in zip(stats.class_id, stats.mean_confidence, strict=True):
        assert mean == pytest.approx(float(probs.max(0).values[labels == c].mean()), rel=1e-6)
    with pytest.raises(ValueError, match="labels must lie in"):
        class_statistics(labels, confidence, 2)


def test_palette_png_round_trip_with_model_colours() -> None:
    labels = np.random.default_rng(0).integers(0, 6, (17, 23)).astype(np.uint8)
    palette = [(10 * i, 20 * i, 30 * i) for i in range(6)]
    data = encode_mask(labels, palette)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "P" and image.size == (23, 17)
        assert image.getpalette()[:18] == [v for colour in palette for v in colour]
    np.testing.assert_array_equal(decode_mask(data), labels)


def test_more_than_256_classes_use_uint16_png() -> None:
    labels = np.array([[0, 300], [65535, 7]], dtype=np.int64)
    data = encode_mask(labels)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode.startswith("I")
    np.testing.assert_array_equal(decode_mask(data), labels)


def test_a_32_bit_mask_keeps_its_values() -> None:
    """Signed and wide class ids come back as they are, for the range checks to refuse: a
    nodata value of -2147483648 or a label of 65537 must not wrap onto classes 0 and 1."""
    labels = np.array([[-2147483648, -1], [65537, 3]], dtype=np.int32)
    buffer = io.BytesIO()
    Image.fromarray(labels).save(buffer, format="TIFF")
    decoded = decode_mask(buffer.getvalue())
    assert decoded.dtype == np.int64
    np.testing.assert_array_equal(decoded, labels)


def test_default_palette_is_pascal_voc() -> None:
    palette = default_palette(21)
    assert palette[0] == (0, 0, 0) and palette[1] == (128, 0, 0) and palette[15] == (192, 128, 128)
    assert len(set(default_palette(256))) == 256


def test_confidence_map_png() -> None:
    confidence = torch.tensor([[0.0, 0.5], [1.0, 0.25]])
    with Image.open(io.BytesIO(encode_confidence(confidence_levels(confidence).numpy()))) as image:
        assert image.mode == "L"
        np.testing.assert_array_equal(np.array(image), [[0, 128], [255, 64]])


def test_a_mask_that_cannot_be_encoded_is_its_images_inference_error(tmp_path) -> None:
    """Labels no mask holds are the image's `inference` row, named as such; an unsafe key is an
    `unsafe_key` row. Both were `unsafe_key`."""
    from pipeline.io_stages import write_masks
    from pipeline.records import ImageRecord
    from pipeline.storage import open_location

    records = [ImageRecord("a.jpg", labels=np.zeros((2, 4, 4), np.uint8)),
               ImageRecord("../b.jpg", labels=np.zeros((4, 4), np.uint8)),
               ImageRecord("c.jpg", labels=np.zeros((4, 4), np.uint8))]
    written = write_masks(open_location(str(tmp_path)), records, [(0, 0, 0)])
    assert [(r.error_type, r.mask_key) for r in written] == [("inference", None), ("unsafe_key", None),
                                                            (None, "masks/c.png")]
    assert written[0].error == "cannot encode its mask: labels must be (H, W), got shape (2, 4, 4)"
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["c.png"]


@pytest.mark.parametrize("data, reason", [(b"", "the file is empty (0 bytes)"),
                                          (b"not a png", "not an image file (Pillow recognises no format in it)")])
def test_a_mask_that_is_no_image_says_what_it_is(data: bytes, reason: str) -> None:
    """Said of the file, not of Pillow's in-memory buffer (`<_io.BytesIO object at 0x...>`)."""
    with pytest.raises(ValueError) as refused:
        decode_mask(data)
    assert str(refused.value) == reason
