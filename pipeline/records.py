"""What travels between the stages: one record per image, from listing to its table row.

Plain data (numpy arrays, torch tensors, strings), no I/O, so the Parquet writer in
`pipeline.outputs` can read records without importing the models or the stages.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:  # annotations only: torch takes over a second to import, and a no-op night needs none
    import torch

# the `error_type` of an error row: what went wrong, in a word that can be counted
ErrorType = Literal[
    "empty", "not_an_image", "corrupt", "too_large", "timeout",  # decoding (pipeline.decode)
    "missing_bands",  # a raster without the bands --bands names
    "unsupported",  # a raster whose samples show no image as they are (complex)
    "missing", "read_error",  # reading the source
    "unsafe_key", "mask_collision",  # the key cannot become a mask path
    "inference",  # the model or the CRF failed on this image
    "worker_failed",  # its batch kept losing its replica
]


@dataclass
class StageSeconds:
    """Where one image's time went, as the images table reports it; None for a stage the
    image never reached."""

    decode: float | None = None
    inference: float | None = None
    encode: float | None = None

    @property
    def total(self) -> float:
        return sum(s for s in (self.decode, self.inference, self.encode) if s is not None)


@dataclass(frozen=True)
class ClassStats:
    """One image's class statistics (`pipeline.stats.class_statistics`): one entry per class
    present in the image, sorted by class id."""

    class_id: np.ndarray  # int64
    pixel_count: np.ndarray  # int64
    fraction: np.ndarray  # float64, pixel_count / (H * W)
    mean_confidence: np.ndarray  # float64, mean probability of the pixels assigned to the class
    components: np.ndarray  # int64, connected regions (8-connectivity)
    # float64, the class's pixels' area on the ground (`geo.GroundArea`; georeferenced rasters only)
    area: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.class_id)


@dataclass
class ImageRecord:
    """One image on its way through the stages; ends as a row of the images table."""

    key: str
    size: int = 0
    version: str = ""
    # (H, W, 3) uint8 array, or a (3, H, W) uint8 tensor once decoded on the model's device;
    # dropped once segmented
    image: np.ndarray | torch.Tensor | None = None
    # a plain JPEG's bytes, left for the model's device to decode (see SegmentStage)
    encoded: bytes | None = None
    labels: np.ndarray | None = None  # (H, W) class ids, dropped once written
    # (H, W) uint8, the label's probability x 255, when asked for; dropped once written
    confidence: np.ndarray | None = None
    # a georeferenced raster: no pixels travel; the replica reads it block by block and
    # writes its mask itself (see stages.RasterStage)
    georeferenced: bool = False
    stats: ClassStats | None = None
    # with --polygons, a georeferenced raster's polygons: a GeoParquet file staged in OUTPUT
    # by the replica (see stages.RasterStage), moved under polygons/ when its shard commits
    polygons_key: str | None = None
    width: int | None = None
    height: int | None = None
    mask_key: str | None = None
    confidence_key: str | None = None
    error: str | None = None
    error_type: ErrorType | None = None
    seconds: StageSeconds = field(default_factory=StageSeconds)

    @property
    def ok(self) -> bool:
        return self.error is None

    def fail(self, error_type: ErrorType, message: str) -> None:
        """An error row, holding nothing of a result: a mask written before the failure (a
        raster's, committed as its blocks finished) is then no row's, and the shard's commit
        removes it (`OutputStore._remove_stale_masks`)."""
        self.error, self.error_type = message, error_type
        self.image = self.encoded = self.labels = self.confidence = self.stats = self.polygons_key = None
        self.mask_key = self.confidence_key = None


def mask_key(image_key: str, extension: str = ".png") -> str:
    """OUTPUT key of an image's mask: masks/<key with its extension replaced by .png> (by
    .tif for a georeferenced raster, whose mask is a GeoTIFF).

    Keys come from listings we do not control; one that could climb out of OUTPUT is refused.
    """
    parts = image_key.split("/")
    if image_key.startswith("/") or any(part in {"", ".", ".."} for part in parts) or any(
        ord(char) < 32 or ord(char) == 127 for char in image_key
    ):
        raise ValueError(f"unsafe key {image_key!r}: empty, '.' or '..' segments, or control characters")
    return "masks/" + posixpath.splitext(image_key)[0] + extension


def confidence_key_for(image_key: str, extension: str = ".png") -> str:
    """OUTPUT key of an image's confidence mask (uint8, the label's probability x 255), in a
    folder of its own so that OUTPUT/masks/ holds only what evaluation pairs."""
    return "confidence/" + mask_key(image_key, extension).removeprefix("masks/")


# OUTPUT/_staging/<run_id>/: what a run's replicas leave in OUTPUT for its shard commits to
# move into place; one folder per run, so a run's leftovers can be removed whole
STAGING = "_staging"


def staging_folder(run_id: str) -> str:
    """OUTPUT key of the folder holding everything run `run_id` staged."""
    return f"{STAGING}/{run_id}"


def _key_digest(image_key: str) -> str:
    """A flat, safe name for any image key, however long or odd."""
    return hashlib.sha256(image_key.encode()).hexdigest()[:32]


def staged_polygons_key(run_id: str, image_key: str) -> str:
    """OUTPUT key where a replica leaves a raster's polygons until its shard commits."""
    return f"{staging_folder(run_id)}/polygons/{_key_digest(image_key)}.parquet"


def polygons_part_key(shard_id: str, image_key: str) -> str:
    """OUTPUT key of a raster's committed polygons. Named by the raster, not by its place in
    the shard: a shard committed again replaces each raster's file by its new one, so a reader
    sees one or the other, never both."""
    return f"polygons/shard={shard_id}/part-{_key_digest(image_key)}.parquet"


def run_record_key(run_id: str) -> str:
    """OUTPUT key of a run's record, written once the run has committed every shard."""
    return f"_runs/{run_id}.json"
