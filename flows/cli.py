"""The `segpipe` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter


def _demo(args: argparse.Namespace) -> int:
    """The whole product on this machine: local S3 endpoint, both flows, a DuckDB query."""
    _quiet_prefect()
    from flows.demo import run_demo

    run_demo(args.output, model=args.model, images=args.images)
    return 0


def _config_errors(err) -> int:
    # pydantic's own text echoes input values, which may be credentials: name the field only
    for problem in err.errors():
        where = ".".join(str(part) for part in problem["loc"])
        print(f"segpipe: error: {where.replace('_', '-')}: {problem['msg']}", file=sys.stderr)
    return 2


def _quiet_prefect() -> None:
    """The command prints its own progress, summary and one-line errors; Prefect's log lines
    (and its tracebacks of the same errors) would tear through them. PREFECT_LOGGING_LEVEL=INFO
    brings them back. The ephemeral server this command may start has no one to report usage
    to (offline, it logs an error for each attempt)."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _segment(args: argparse.Namespace) -> int:
    """Run the segmentation flow and print a summary; errors of single images do not change
    the exit code, only a run that could not happen does."""
    from pydantic import ValidationError

    from pipeline.config import SegmentConfig, fill_date

    fields = {name: getattr(args, name) for name in SegmentConfig.model_fields if getattr(args, name, None) is not None}
    if args.storage_secret:
        fields["storage_secret"] = args.storage_secret
    try:
        fields["source"], fields["output"] = fill_date(args.source, args.output, args.date)
        # fail here, in one line, before any server or cluster starts
        _options_to_environment(SegmentConfig(**fields).storage_options)
        fields.pop("storage_options", None)
    except ValidationError as err:
        return _config_errors(err)
    except ValueError as err:
        print(f"segpipe: error: {err}", file=sys.stderr)
        return 2

    _quiet_prefect()
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from flows.segment import progress_listeners, segment_archive
    from pipeline.config import RunError
    from pipeline.outputs import LayoutMismatchError

    console = Console(stderr=True)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("starting Prefect, Ray and the model")

        def show(p):
            bar.update(task, description=(
                f"{p.images} images, {p.images_per_second:.1f} img/s, {p.errors} errors, "
                f"{p.shards_committed} shards committed, {p.shards_skipped} skipped"
            ))

        progress_listeners.append(show)
        try:
            summary = segment_archive(**fields)
        except (RunError, LayoutMismatchError, ValueError) as err:
            bar.stop()
            print(f"segpipe: error: {err}", file=sys.stderr)
            return 2
        finally:
            progress_listeners.remove(show)
    _print_summary(summary)
    return 0


def _options_to_environment(options: dict) -> None:
    """Hand --storage-options to the flow through its environment, not as a parameter: Prefect
    stores parameters (in its database, even the ephemeral one), and these may be credentials."""
    import json
    import os

    from flows._storage import STORAGE_OPTIONS_ENV

    if options:
        inherited = json.loads(os.environ.get(STORAGE_OPTIONS_ENV) or "{}")
        os.environ[STORAGE_OPTIONS_ENV] = json.dumps(inherited | options)


def _print_summary(s: dict) -> None:
    ok = s["images"] - s["errors"]
    print(f"run {s['run_id']}: {s['images']} images segmented ({ok} ok, {s['errors']} errors) "
          f"in {s['seconds']:.1f} s ({s['setup_seconds']:.1f} s to start), {s['images_per_second']:.1f} images/s")
    print(f"shards: {s['shards_committed']} committed, {s['shards_skipped']} already up to date; "
          f"{s['non_image_keys']} keys that are not images skipped")
    if s["errors_by_type"]:
        reasons = ", ".join(f"{name} {count}" for name, count in sorted(s["errors_by_type"].items(), key=lambda kv: -kv[1]))
        print(f"errors by reason: {reasons} (details: status = 'error' rows of the images table)")
    devices = Counter(r["device"] + (f" ({r['threads']} threads)" if r["device"] == "cpu" else "") for r in s["replicas"])
    print(f"model {s['model']} ({s['weights']}) on {len(s['replicas'])} replicas in {s['ray_cluster']}: "
          + ", ".join(f"{n} on {device}" for device, n in devices.items()))
    if s["retried_batches"]:
        print(f"{s['retried_batches']} batches were sent again after a worker failed")
    print(f"outputs: {s['output']}/images/, {s['output']}/class_stats/, {s['output']}/masks/ (run record {s['record']})")


def _evaluate(args: argparse.Namespace) -> int:
    _quiet_prefect()
    from flows.evaluate import evaluate_predictions
    from pipeline.evaluation import markdown_table

    try:
        label_map = {int(k): int(v) for k, v in args.label_map.items()} if args.label_map else None
    except (TypeError, ValueError):
        print("segpipe: error: --label-map maps integer labels to integer labels", file=sys.stderr)
        return 2
    _options_to_environment(args.storage_options or {})
    try:
        report = evaluate_predictions(
            predictions=args.predictions, ground_truth=args.ground_truth, output=args.output,
            num_classes=args.num_classes, ignore_index=args.ignore_index, class_names=args.class_names,
            label_map=label_map, reduce_zero_label=args.reduce_zero_label, prediction_suffix=args.prediction_suffix,
            ground_truth_suffix=args.ground_truth_suffix, storage_secret=args.storage_secret,
            ray_address=args.ray_address,
        )
    except ValueError as err:
        print(f"segpipe: error: {err}", file=sys.stderr)
        return 2
    print(markdown_table(report))
    print(f"report: {args.output.rstrip('/')}/metrics.json, per_image.parquet, confusion_matrix.png, per_class_iou.png")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from flows.deployments import serve_deployments

    parameters = {"source": args.source, "output": args.output}
    for name in ("model", "weights", "num_classes", "ray_address", "storage_options", "storage_secret"):
        if getattr(args, name) is not None:
            parameters[name] = getattr(args, name)
    serve_deployments(parameters, cron=args.cron)
    return 0


def _train(args: argparse.Namespace) -> int:
    """Run the training flow and print its epochs and where the checkpoint is."""
    from pydantic import ValidationError

    from pipeline.config import TrainConfig

    fields = {name: getattr(args, name) for name in TrainConfig.model_fields if getattr(args, name, None) is not None}
    try:
        TrainConfig(**fields)  # fail here, in one line, before any server or cluster starts
    except ValidationError as err:
        return _config_errors(err)
    _options_to_environment(fields.pop("storage_options", {}))
    if args.storage_secret:
        fields["storage_secret"] = args.storage_secret
    _quiet_prefect()
    from flows.train import train_model
    from pipeline.runtime.training import TrainingError

    try:
        summary = train_model(**fields)
    except ValueError as err:
        print(f"segpipe: error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"segpipe: error: {err}", file=sys.stderr)
        return 1
    print(f"{'epoch':>5} {'loss':>8} {'train mIoU':>10} {'val mIoU':>8} {'images/s':>8}")
    for e in summary["epochs"]:
        print(f"{e['epoch']:>5} {e['loss']:>8.4f} {e['train_miou'] or float('nan'):>10.4f} "
              f"{e['val_miou'] if e['val_miou'] is not None else float('nan'):>8.4f} {e['images_per_second']:>8.1f}")
    print(f"{summary['train_images']} training and {summary['val_images']} validation images, {summary['workers']} "
          f"{summary['device']} workers, {summary['seconds']:.0f} s; best {summary['score']} {summary['best_score']} "
          f"at epoch {summary['best_epoch']}")
    print(f"checkpoint: {summary['output']} (run it with: segpipe segment SOURCE OUTPUT --weights {summary['output']})")
    return 0


def _models(_: argparse.Namespace) -> int:
    from pipeline.models import list_models

    print("\n".join(list_models()))
    return 0


def json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not valid JSON") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options `segment` and `serve` share (serve passes them on to the nightly runs)."""
    parser.add_argument("--model", help="model name (see `segpipe models`; default: the architecture a checkpoint given "
                        "as --weights names, else deeplabv3_resnet101)")
    parser.add_argument("--weights", help="torchvision weights name (default DEFAULT), checkpoint path/URL, or none")
    parser.add_argument("--num-classes", dest="num_classes", type=int, help="classes (required with --weights none)")
    parser.add_argument("--ray-address", dest="ray_address", help="join this Ray cluster (default: RAY_ADDRESS, or a local Ray)")


def _add_secret_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-secret", dest="storage_secret",
                        help="name of a Prefect Secret block holding storage options (credentials) as a JSON object")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segpipe", description="Batch semantic segmentation of image archives.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="run both flows on generated images through a local S3 endpoint, no cluster or cloud needed",
    )
    demo.add_argument("--output", default="segpipe-demo", help="folder for the outputs (default: %(default)s)")
    demo.add_argument("--model", default="deeplabv3_mobilenet_v3_large")
    demo.add_argument("--images", type=int, default=6)
    demo.set_defaults(run=_demo)
    segment = commands.add_parser(
        "segment", help="segment every image under SOURCE on Ray; write masks and Parquet tables to OUTPUT",
        description="Segment every image under SOURCE (any fsspec URL) into OUTPUT. Re-running skips "
        "shards already committed with the same inputs and settings.",
    )
    segment.add_argument("source", help="fsspec URL of the images (s3://bucket/prefix, a folder, gs://...)")
    segment.add_argument("output", help="fsspec URL for masks/, images/, class_stats/")
    _add_model_options(segment)
    segment.add_argument("--crf", action=argparse.BooleanOptionalAction, default=None, help="dense CRF (default on)")
    segment.add_argument("--tile", type=int, help="sliding windows of this side for larger images (aerial tiles)")
    segment.add_argument("--tile-stride", dest="tile_stride", type=int, help="window stride (default 3/4 of --tile)")
    segment.add_argument("--redo-errors", dest="redo_errors", action="store_true", default=None,
                         help="also re-process committed shards that have error rows")
    segment.add_argument("--batch-size", dest="batch_size", type=int)
    segment.add_argument("--shard-by", dest="shard_by", choices=["directory", "count"],
                         help="one shard per directory (split at --shard-size), or chunks of --shard-size keys")
    segment.add_argument("--shard-size", dest="shard_size", type=int, help="images per shard at most (default 1000)")
    segment.add_argument("--storage-options", dest="storage_options",
                         help="JSON object for fsspec on remote URLs, e.g. '{\"endpoint_url\": \"http://...\"}'")
    _add_secret_option(segment)
    segment.add_argument("--device", choices=["auto", "cuda", "cpu"],
                         help="auto: GPU replicas when the cluster has GPUs; cuda: always (autoscaling clusters); cpu")
    segment.add_argument("--actors", type=int, help="model replicas (default: one per GPU, or 1 without GPUs)")
    segment.add_argument("--gpus-per-actor", dest="gpus_per_actor", type=float, help="fraction of a GPU per replica (default 1)")
    segment.add_argument("--cpus-per-actor", dest="cpus_per_actor", type=float, help="CPUs per replica (default 1)")
    segment.add_argument("--threads-per-actor", dest="threads_per_actor", type=int,
                         help="torch threads of a CPU replica (default: its node's CPUs shared among the replicas there)")
    segment.add_argument("--compile", action="store_true", default=None,
                         help="torch.compile the model in each replica (pays on GPUs over long runs of one image size)")
    segment.add_argument("--jpeg-decode", dest="jpeg_decode", choices=["auto", "device", "cpu"],
                         help="where plain JPEGs are decoded: auto = on the replica's GPU when it has one (default), "
                              "device = always on the replica's device, cpu = in the decode tasks")
    segment.add_argument("--max-pixels", dest="max_pixels", type=int, help="refuse images with more pixels than this")
    segment.add_argument("--image-timeout", dest="image_timeout_s", type=float,
                         help="seconds one image may take to decode before it becomes an error row (default 120)")
    segment.add_argument("--date", help="YYYY-MM-DD for {date} in SOURCE and OUTPUT (default: yesterday, UTC)")
    segment.set_defaults(run=_segment)

    evaluate = commands.add_parser(
        "evaluate", help="dataset-wide IoU of predicted masks against ground truth",
        description="Pair masks by key relative to each root (extension and suffixes removed), score them on "
        "Ray, and write metrics.json, per_image.parquet and plots to OUTPUT.",
    )
    evaluate.add_argument("predictions", help="fsspec URL of predicted masks (e.g. a segment OUTPUT/masks)")
    evaluate.add_argument("ground_truth", help="fsspec URL of ground-truth masks")
    evaluate.add_argument("output", help="fsspec URL for the report")
    evaluate.add_argument("--num-classes", dest="num_classes", type=int, required=True)
    evaluate.add_argument("--ignore-index", dest="ignore_index", type=int, default=255)
    evaluate.add_argument("--class-names", dest="class_names", nargs="+")
    evaluate.add_argument("--label-map", dest="label_map", type=json_object, help='JSON object remapping ground truth, e.g. \'{"7": 0, "8": 1}\'')
    evaluate.add_argument("--reduce-zero-label", dest="reduce_zero_label", action="store_true",
                          help="ground truth 0 is ignored and the other labels shift down by one")
    evaluate.add_argument("--prediction-suffix", dest="prediction_suffix", default="")
    evaluate.add_argument("--ground-truth-suffix", dest="ground_truth_suffix", default="")
    evaluate.add_argument("--storage-options", dest="storage_options", type=json_object)
    _add_secret_option(evaluate)
    evaluate.add_argument("--ray-address", dest="ray_address")
    evaluate.set_defaults(run=_evaluate)

    serve = commands.add_parser(
        "serve", help="serve the nightly segmentation and the evaluation deployments from this process",
        description="One process, no work pool: Prefect's serve() runs both flows, the segmentation on its "
        "nightly schedule.",
    )
    serve.add_argument("--source", required=True, help="SOURCE of the nightly run; may contain {date}")
    serve.add_argument("--output", required=True, help="OUTPUT of the nightly run; contains {date} when SOURCE does")
    serve.add_argument("--cron", default="0 2 * * *", help="schedule, UTC (default: %(default)s)")
    _add_model_options(serve)
    serve.add_argument("--storage-options", dest="storage_options", type=json_object,
                       help="stored with the deployment: endpoints and regions only; credentials go in --storage-secret")
    _add_secret_option(serve)
    serve.set_defaults(run=_serve)
    train = commands.add_parser(
        "train", help="fine-tune a model on labelled images (Ray Train); write a checkpoint segment can run",
        description="Train MODEL on the images under IMAGES and the label masks under LABELS (PNG of class ids, "
        "paired by key as in evaluate) and write the best checkpoint, with its classes and palette, to "
        "OUTPUT_CHECKPOINT. `segpipe segment --weights OUTPUT_CHECKPOINT` runs it with no other flag.",
    )
    train.add_argument("images", help="fsspec URL of the training images")
    train.add_argument("labels", help="fsspec URL of their label masks")
    train.add_argument("output", metavar="output_checkpoint", help="fsspec URL of the checkpoint to write (.pt)")
    train.add_argument("--model", required=True, help="model name (see `segpipe models`)")
    train.add_argument("--num-classes", dest="num_classes", type=int, required=True)
    train.add_argument("--class-names", dest="class_names", nargs="+", help="one name per class, in id order")
    train.add_argument("--palette", type=json.loads, help='JSON list of [r, g, b], one per class (default: a fixed palette)')
    train.add_argument("--epochs", type=int, help="default 20")
    train.add_argument("--batch-size", dest="batch_size", type=int, help="per worker (default 8)")
    train.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), help="training crop (default 512 512)")
    train.add_argument("--scale", type=float, nargs=2, metavar=("LOW", "HIGH"), help="random scale range (default 0.5 2.0)")
    train.add_argument("--ignore-index", dest="ignore_index", type=int, help="label of unlabelled pixels (default 255)")
    train.add_argument("--init", help="none (default), imagenet (backbone), a torchvision weights name, or a checkpoint URL")
    train.add_argument("--optimizer", choices=["sgd", "adamw"], help="default sgd (momentum 0.9), polynomial decay")
    train.add_argument("--lr", type=float, help="default 0.01 for sgd, 1e-4 for adamw")
    train.add_argument("--weight-decay", dest="weight_decay", type=float)
    train.add_argument("--label-suffix", dest="label_suffix", help="suffix of label names, e.g. _L for x_L.png")
    train.add_argument("--val-images", dest="val_images", help="fsspec URL of validation images")
    train.add_argument("--val-labels", dest="val_labels", help="fsspec URL of their label masks")
    train.add_argument("--val-last", dest="val_last", type=int, help="without --val-images: hold out the last N pairs")
    train.add_argument("--workers", type=int, help="Ray Train workers (default: one per GPU, else 1)")
    train.add_argument("--device", choices=["auto", "cuda", "cpu"])
    train.add_argument("--cpus-per-worker", dest="cpus_per_worker", type=float)
    train.add_argument("--resume", help="a checkpoint written by segpipe train: continue after its epoch")
    train.add_argument("--seed", type=int)
    train.add_argument("--storage-options", dest="storage_options", type=json_object)
    _add_secret_option(train)
    train.add_argument("--ray-address", dest="ray_address")
    train.set_defaults(run=_train)
    models = commands.add_parser("models", help="list the model names")
    models.set_defaults(run=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
