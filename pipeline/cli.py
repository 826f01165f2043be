"""The `segpipe` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    """Segment a few generated images with the core: model, CRF, statistics, mask files."""
    import numpy as np
    import torch
    from PIL import Image

    from .crf import dense_crf
    from .inference import Segmenter
    from .masks import encode_mask
    from .models import WeightsUnavailableError, build_model
    from .samples import synthetic_scene
    from .stats import class_statistics, labels_and_confidence

    output = Path(args.output)
    (output / "images").mkdir(parents=True, exist_ok=True)
    (output / "masks").mkdir(parents=True, exist_ok=True)
    try:
        model = build_model(args.model, weights="DEFAULT")
        print(f"model: {args.model} with pretrained weights {model.meta.weights}")
    except (WeightsUnavailableError, ValueError) as err:
        print(f"Pretrained weights for {args.model} are not available here: {err}")
        print("Running an UNTRAINED model instead (random weights): the masks show the pipeline working, not real classes.")
        model = build_model(args.model, num_classes=21, weights=None)
    segmenter = Segmenter(model, device=args.device)
    scenes = [synthetic_scene(240, 320, seed) for seed in range(args.images)]
    images = [torch.from_numpy(image).permute(2, 0, 1).contiguous() for image, _ in scenes]
    probs = segmenter.predict(images)
    names = model.meta.class_names
    for index, (image, p) in enumerate(zip(images, probs, strict=True)):
        refined = dense_crf(p[None], image[None].to(p.device))[0]
        labels, confidence = labels_and_confidence(refined)
        stats = class_statistics(labels, confidence, segmenter.num_classes)
        name = f"scene_{index:03d}"
        Image.fromarray(scenes[index][0]).save(output / "images" / f"{name}.png")
        (output / "masks" / f"{name}.png").write_bytes(encode_mask(labels.cpu().numpy(), model.meta.palette))
        top = np.argsort(-stats.fraction)[:3]
        summary = ", ".join(
            f"{names[stats.class_id[i]]} {stats.fraction[i]:.0%} (conf {stats.mean_confidence[i]:.2f}, {stats.components[i]} regions)"
            for i in top
        )
        print(f"{name}: {summary}")
    print(f"images and masks written under {output.resolve()}")
    return 0


def _segment(args: argparse.Namespace) -> int:
    """Run the distributed segmentation and print a summary; errors of single images do not
    change the exit code, only a run that could not happen does."""
    from collections import Counter

    from pydantic import ValidationError

    from .config import SegmentConfig

    fields = {name: getattr(args, name) for name in SegmentConfig.model_fields if getattr(args, name, None) is not None}
    try:
        config = SegmentConfig(**fields)
    except ValidationError as err:
        # pydantic's own text echoes input values, which may be credentials
        for problem in err.errors():
            where = ".".join(str(part) for part in problem["loc"])
            print(f"segpipe: error: {where.replace('_', '-')}: {problem['msg']}", file=sys.stderr)
        return 2

    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .outputs import LayoutMismatchError
    from .ray_runner import RunError, run_segmentation

    console = Console(stderr=True)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("starting Ray and loading the model")

        def show(p):
            bar.update(task, description=(
                f"{p.images} images, {p.images_per_second:.1f} img/s, {p.errors} errors, "
                f"{p.shards_committed} shards committed, {p.shards_skipped} skipped"
            ))

        try:
            summary = run_segmentation(config, on_progress=show)
        except (RunError, LayoutMismatchError, ValueError) as err:
            bar.stop()
            print(f"segpipe: error: {err}", file=sys.stderr)
            return 2
    ok = summary.images - summary.errors
    print(f"run {summary.run_id}: {summary.images} images segmented ({ok} ok, {summary.errors} errors) "
          f"in {summary.seconds:.1f} s ({summary.setup_seconds:.1f} s to start), {summary.images_per_second:.1f} images/s")
    print(f"shards: {summary.shards_committed} committed, {summary.shards_skipped} already up to date; "
          f"{summary.non_image_keys} keys that are not images skipped")
    if summary.errors_by_type:
        reasons = ", ".join(f"{name} {count}" for name, count in sorted(summary.errors_by_type.items(), key=lambda kv: -kv[1]))
        print(f"errors by reason: {reasons} (details: status = 'error' rows of the images table)")
    devices = Counter(r["device"] for r in summary.replicas)
    print(f"model {summary.model} ({summary.weights}) on {len(summary.replicas)} replicas in {summary.ray_cluster}: "
          + ", ".join(f"{n} on {device}" for device, n in devices.items()))
    if summary.retried_batches:
        print(f"{summary.retried_batches} batches were sent again after a worker failed")
    print(f"outputs: {summary.output}/images/, {summary.output}/class_stats/, {summary.output}/masks/")
    return 0


def _models(_: argparse.Namespace) -> int:
    from .models import list_models

    print("\n".join(list_models()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segpipe", description="Batch semantic segmentation of image archives.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="segment a few generated images on this machine")
    demo.add_argument("--output", default="segpipe-demo", help="folder for images and masks (default: %(default)s)")
    demo.add_argument("--model", default="deeplabv3_mobilenet_v3_large")
    demo.add_argument("--images", type=int, default=4)
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.set_defaults(run=_demo)
    segment = commands.add_parser(
        "segment", help="segment every image under SOURCE on Ray; write masks and Parquet tables to OUTPUT",
        description="Segment every image under SOURCE (any fsspec URL) into OUTPUT. Re-running skips "
        "shards already committed with the same inputs and settings.",
    )
    segment.add_argument("source", help="fsspec URL of the images (s3://bucket/prefix, a folder, gs://...)")
    segment.add_argument("output", help="fsspec URL for masks/, images/, class_stats/")
    segment.add_argument("--model", help="model name (see `segpipe models`; default deeplabv3_resnet101)")
    segment.add_argument("--weights", help="torchvision weights name (default DEFAULT), checkpoint path/URL, or none")
    segment.add_argument("--num-classes", dest="num_classes", type=int, help="classes (required with --weights none)")
    segment.add_argument("--crf", action=argparse.BooleanOptionalAction, default=None, help="dense CRF (default on)")
    segment.add_argument("--redo-errors", dest="redo_errors", action="store_true", default=None,
                         help="also re-process committed shards that have error rows")
    segment.add_argument("--batch-size", dest="batch_size", type=int)
    segment.add_argument("--shard-by", dest="shard_by", choices=["directory", "count"],
                         help="one shard per directory (split at --shard-size), or chunks of --shard-size keys")
    segment.add_argument("--shard-size", dest="shard_size", type=int, help="images per shard at most (default 1000)")
    segment.add_argument("--ray-address", dest="ray_address", help="join this Ray cluster (default: RAY_ADDRESS, or a local Ray)")
    segment.add_argument("--storage-options", dest="storage_options",
                         help="JSON object for fsspec on remote URLs, e.g. '{\"endpoint_url\": \"http://...\"}'")
    segment.add_argument("--device", choices=["auto", "cuda", "cpu"],
                         help="auto: GPU replicas when the cluster has GPUs; cuda: always (autoscaling clusters); cpu")
    segment.add_argument("--actors", type=int, help="model replicas (default: one per GPU, or 1 without GPUs)")
    segment.add_argument("--gpus-per-actor", dest="gpus_per_actor", type=float, help="fraction of a GPU per replica (default 1)")
    segment.add_argument("--cpus-per-actor", dest="cpus_per_actor", type=float, help="CPUs per replica (default 1)")
    segment.add_argument("--max-pixels", dest="max_pixels", type=int, help="refuse images with more pixels than this")
    segment.set_defaults(run=_segment)
    models = commands.add_parser("models", help="list the model names")
    models.set_defaults(run=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
