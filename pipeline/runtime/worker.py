"""What runs in a model replica's process: torch, the model and its stages.

Only the replica actors import this module (`replicas.SegmentWorker`), in their own process.
The driver that creates them never does: importing torch, torchvision and the stages takes
seconds, which the driver would spend before it could start Ray, while a replica spends them
as it starts, beside the driver starting Prefect.
"""

from __future__ import annotations

import os

import torch

from ..heap import keep_freed_memory
from ..inference import Segmenter, SlidingWindow
from ..models import build_model
from ..run import replica_threads
from ..stages import RasterStage, SegmentStage
from ..storage import open_location
from ..windows import window_stride
from .cluster import node_cpus
from .spec import WorkerSpec


def worker_device(gpu_ids: list[str], cuda_available: bool) -> torch.device:
    """The torch device for the GPUs Ray assigned to this actor. Ray narrows
    CUDA_VISIBLE_DEVICES to those GPUs, so the first one is always cuda:0."""
    if not gpu_ids:
        return torch.device("cpu")
    if not cuda_available:
        raise RuntimeError(
            f"Ray assigned GPU {','.join(gpu_ids)} to this worker but torch sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); install a CUDA build of torch"
        )
    return torch.device("cuda", 0)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def set_up_process(spec: WorkerSpec, gpu_ids: list[str], cuda: bool) -> torch.device:
    """This replica's process: its heap, which keeps the buffers a batch frees for the next
    (`heap.keep_freed_memory`); its torch CPU threads (a CPU replica's share of the node);
    and the torch device of the GPUs Ray assigned."""
    keep_freed_memory()
    if not gpu_ids:
        torch.set_num_threads(spec.threads or replica_threads(node_cpus(), spec.replicas_per_node, spec.cpus_per_actor))
    device = worker_device(gpu_ids, cuda)
    if device.type == "cuda":  # this process runs one model on fixed shapes: let cuDNN pick its kernels
        torch.backends.cudnn.benchmark = True
    return device


def torch_threads() -> int:
    return torch.get_num_threads()


def set_threads(threads: int) -> int:
    """Torch's CPU threads from now on (`SegmentWorker.share_cores`); the count now set."""
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def sliding_window(spec: WorkerSpec) -> SlidingWindow | None:
    if spec.tile is None:
        return None
    stride = window_stride(spec.tile, spec.tile_stride)
    return SlidingWindow(crop=(spec.tile, spec.tile), stride=(stride, stride), batch_size=spec.batch_size)


def build_stage(spec: WorkerSpec, device: torch.device | str) -> SegmentStage:
    """A replica's model and stage, as its actor builds them."""
    model = build_model(spec.model, num_classes=spec.num_classes, weights=spec.weights, storage_options=spec.storage_options,
                        class_names=spec.class_names)
    segmenter = Segmenter(model, device=device, batch_size=spec.batch_size, sliding_window=sliding_window(spec),
                          precision=spec.precision, compile=spec.compile)
    return SegmentStage(segmenter, crf=spec.crf, confidence=spec.confidence)


def build_raster_stage(stage: SegmentStage, spec: WorkerSpec) -> RasterStage:
    options, meta = spec.storage_options, stage.segmenter.meta
    return RasterStage(
        stage, spec.raster, source=open_location(spec.source_url, options), output=open_location(spec.output_url, options),
        palette=meta.palette, class_names=meta.class_names, run_id=spec.run_id,
    )
