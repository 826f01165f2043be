"""The three stages of a batch, as plain functions and one class, so each can be called in a
test without Ray:

1. `read_and_decode` (CPU): bytes from the source, decoded to RGB by `decode.decode`, or left
   encoded for the model's device if it says so.
2. `SegmentStage` (GPU when there is one): the JPEGs left encoded decoded on the device, then
   probabilities, dense CRF, argmax, statistics. Only the label map and the statistics leave
   the device.
3. `write_masks` (CPU): palette PNGs written to OUTPUT/masks/.

Every image travels as one `ImageRecord`. A failure in any stage turns that image into an
error record that names the stage's reason; the other images of the batch go on.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from .crf import dense_crf
from .decode import DEFAULT_MAX_PIXELS, DeviceJpeg, ImageDecodeError, decode, decode_on_device
from .inference import Segmenter
from .masks import encode_mask
from .preprocess import to_chw_uint8
from .records import ImageRecord, mask_key
from .stats import class_statistics, labels_and_confidence
from .storage import Location, SourceFile, StorageUnavailableError, read_bytes, write_atomic


def read_and_decode(
    source: Location,
    files: Sequence[SourceFile],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    time_limit_s: float | None = None,
    hard_stop: bool = False,
    jpeg_on_device: bool = False,
) -> list[ImageRecord]:
    """Records with decoded images, or the reason each file could not be decoded.

    The settings are those of `decode.decode`, which decodes each file. With `jpeg_on_device`,
    the plain JPEGs it leaves undecoded keep their bytes in `encoded`, for `SegmentStage` to
    decode on the model's device; their size comes from the header.
    """
    records = []
    for file in files:
        record = ImageRecord(key=file.key, size=file.size, version=file.version)
        start = time.perf_counter()
        try:
            data = read_bytes(source, file.key)
            if data is None:
                raise FileNotFoundError(source.uri(file.key))
            decoded = decode(data, max_pixels=max_pixels, time_limit_s=time_limit_s, hard_stop=hard_stop,
                             jpeg_on_device=jpeg_on_device)
            if isinstance(decoded, DeviceJpeg):
                record.encoded, record.height, record.width = decoded.data, decoded.height, decoded.width
            else:
                record.image = decoded
                record.height, record.width = decoded.shape[:2]
        except ImageDecodeError as err:
            record.fail(err.reason, str(err))
        except FileNotFoundError:
            record.fail("missing", "the file disappeared after it was listed")
        except OSError as err:  # permanent (forbidden...): transient ones were retried, then raised
            record.fail("read_error", f"cannot read: {type(err).__name__}: {err}")
        record.seconds.decode = time.perf_counter() - start
        records.append(record)
    return records


class SegmentStage:
    """Segmenter + optional dense CRF + statistics, for one batch of decoded records."""

    def __init__(self, segmenter: Segmenter, *, crf: bool = True, refine_together: bool | None = None) -> None:
        self.segmenter = segmenter
        self.crf = crf
        # whether images of one size go through the CRF together (None: on CUDA only; see _chunks)
        self.refine_together = segmenter.device.type == "cuda" if refine_together is None else refine_together
        self.num_classes = segmenter.num_classes
        self._label_dtype = np.uint8 if self.num_classes <= 256 else np.uint16
        # torch has no general uint16: wider labels cross as int32
        self._label_device_dtype = torch.uint8 if self.num_classes <= 256 else torch.int32

    def __call__(self, records: list[ImageRecord]) -> list[ImageRecord]:
        self._decode_jpegs([r for r in records if r.ok and r.encoded is not None])
        todo = [r for r in records if r.ok]
        if not todo:
            return records
        start = time.perf_counter()
        try:
            probs = self.segmenter.predict([r.image for r in todo])
        except (RuntimeError, ValueError):
            # one bad image (or out of memory) must not cost its neighbours: retry one by one
            probs = [self._predict_one(r) for r in todo]
        share = (time.perf_counter() - start) / len(todo)
        ready = [(record, p) for record, p in zip(todo, probs, strict=True) if p is not None]
        for chunk in self._chunks(ready):
            started = time.perf_counter()
            self._refine(chunk)
            each = (time.perf_counter() - started) / len(chunk)
            for record, _ in chunk:
                record.seconds.inference = share + each
                record.image = None  # the decoded pixels need not travel further
        return records

    def _refine(self, chunk: list[tuple[ImageRecord, torch.Tensor]]) -> None:
        try:
            self._finish(chunk)
        except (RuntimeError, ValueError) as err:
            if len(chunk) == 1:
                chunk[0][0].fail("inference", f"{type(err).__name__}: {err}")
                return
            for pair in chunk:  # one by one, so that only the image at fault fails
                self._refine([pair])

    def _chunks(self, ready: list[tuple[ImageRecord, torch.Tensor]]) -> list[list[tuple[ImageRecord, torch.Tensor]]]:
        """Images refined together. On a GPU, all those of one size: a small image's CRF is
        bound by kernel launches, not arithmetic. On a CPU, one at a time: a batch's buffers
        outgrow the caches (about 30% slower per image in batches of 4, measured)."""
        if not self.refine_together:
            return [[pair] for pair in ready]
        groups: dict[tuple[int, ...], list[tuple[ImageRecord, torch.Tensor]]] = {}
        for record, p in ready:
            groups.setdefault(tuple(p.shape[-2:]), []).append((record, p))
        return list(groups.values())

    def _decode_jpegs(self, records: list[ImageRecord]) -> None:
        """Decode the JPEGs `read_and_decode` left for the model's device, all in one call (see
        `decode.decode_on_device`), so only compressed bytes cross to the GPU."""
        if not records:
            return
        start = time.perf_counter()
        jpegs = [DeviceJpeg(r.encoded, r.height, r.width) for r in records]  # type: ignore[arg-type]
        images = decode_on_device(jpegs, self.segmenter.device)
        share = (time.perf_counter() - start) / len(records)
        for record, image in zip(records, images, strict=True):
            if isinstance(image, ImageDecodeError):
                record.fail(image.reason, str(image))
                continue
            record.image, record.encoded = image, None
            record.seconds.decode = (record.seconds.decode or 0.0) + share

    def _predict_one(self, record: ImageRecord) -> torch.Tensor | None:
        try:
            return self.segmenter.predict([record.image])[0]
        except (RuntimeError, ValueError) as err:
            record.fail("inference", f"{type(err).__name__}: {err}")
            return None

    def _finish(self, chunk: list[tuple[ImageRecord, torch.Tensor]]) -> None:
        """CRF, labels and statistics for images of one size, on the model's device; only the
        label maps (a byte per pixel up to 256 classes) and the statistics reach the host."""
        probs = torch.stack([p for _, p in chunk]) if len(chunk) > 1 else chunk[0][1][None]
        if self.crf:
            pixels = torch.stack([to_chw_uint8(r.image).to(probs.device, non_blocking=True) for r, _ in chunk])
            probs = dense_crf(probs, pixels)
        labels, confidence = labels_and_confidence(probs)
        host = labels.to(self._label_device_dtype).cpu().numpy().astype(self._label_dtype, copy=False)
        for index, (record, _) in enumerate(chunk):
            record.stats = class_statistics(labels[index], confidence[index], self.num_classes, host_labels=host[index])
            record.labels = host[index]


def write_masks(output: Location, records: list[ImageRecord], palette: Sequence[Sequence[int]]) -> list[ImageRecord]:
    for record in records:
        if not record.ok:
            continue
        start = time.perf_counter()
        try:
            key = mask_key(record.key)
            write_atomic(output, key, encode_mask(record.labels, palette))
            record.mask_key = key
        except ValueError as err:
            record.fail("unsafe_key", str(err))
        except OSError as err:
            # a write fails for the output's sake (disk full, no permission), not the image's:
            # stop the run rather than commit error rows for images that are fine
            raise StorageUnavailableError(f"cannot write {output.uri(mask_key(record.key))}: {type(err).__name__}: {err}") from err
        record.labels = None
        record.seconds.encode = time.perf_counter() - start
    return records


def plan_shard(files: Sequence[SourceFile], *, fold_case: bool = False) -> tuple[list[SourceFile], list[ImageRecord]]:
    """Split a shard's inputs into those to segment and those that are errors before any work:
    keys unsafe as output paths, and keys whose mask path another key already takes (a.jpg
    and a.png both become masks/a.png; the first in listing order keeps it). With `fold_case`
    (an OUTPUT where A.png and a.png are one file), keys differing only in case collide too."""
    todo: list[SourceFile] = []
    refused: list[ImageRecord] = []
    owners: dict[str, str] = {}
    for file in files:
        record = ImageRecord(key=file.key, size=file.size, version=file.version)
        try:
            key = mask_key(file.key)
        except ValueError as err:
            record.fail("unsafe_key", str(err))
            refused.append(record)
            continue
        owner_key = key.casefold() if fold_case else key
        if owner_key in owners:
            record.fail("mask_collision", f"its mask {key} would overwrite the mask of {owners[owner_key]}; rename one of them")
            refused.append(record)
            continue
        owners[owner_key] = file.key
        todo.append(file)
    return todo, refused
