"""What a model replica is built from: the run's settings that its actor's process needs,
with no torch and no Ray, so that the driver (`replicas`) and the replica's own process
(`worker`) both take it from here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import RasterSettings


@dataclass(frozen=True)
class WorkerSpec:
    model: str | None  # None: the checkpoint in `weights` names it
    weights: str | None
    num_classes: int | None
    crf: bool
    batch_size: int
    storage_options: dict[str, Any]
    threads: int | None  # torch threads on CPU; None: replica_threads decides
    tile: int | None = None
    tile_stride: int | None = None
    cpus_per_actor: float = 1.0
    precision: str = "auto"  # Segmenter's: auto, fp32 or bf16
    compile: bool | None = None  # None: where it pays (bf16 on CPU)
    # the run's replicas on this replica's node (`run.place_cpu_replicas`): they share its cores
    replicas_per_node: int = 1
    confidence: bool = False
    # georeferenced rasters: how they are segmented, where from and where to (a replica
    # reads their blocks and writes their masks itself)
    raster: RasterSettings = field(default_factory=RasterSettings)
    source_url: str = ""
    output_url: str = ""
    # names for weights whose classes have none of their own (None: the weights' names)
    class_names: tuple[str, ...] | None = None
    # the run's id, which the rows a replica writes itself (a raster's polygons) carry
    run_id: str = ""
