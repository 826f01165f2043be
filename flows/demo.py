"""`segpipe demo`: the whole product on one machine with embedded defaults.

A local S3 endpoint (moto's server on 127.0.0.1) receives generated street scenes and their
ground truth; the segmentation flow and then the evaluation flow run under Prefect's ephemeral
server and a local Ray; DuckDB queries the outputs. No cluster, no cloud account.
"""

from __future__ import annotations

import io
import logging
import socket
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import ray
import s3fs
from moto.server import ThreadedMotoServer
from PIL import Image

from flows.evaluate import evaluate_predictions
from flows.segment import segment_archive
from pipeline.config import EvaluateConfig, SegmentConfig, yesterday_utc
from pipeline.masks import encode_mask
from pipeline.models import ModelMeta, WeightsUnavailableError, build_model, save_checkpoint
from pipeline.samples import SAMPLE_CLASSES, synthetic_scene

BUCKET = "segpipe-demo"
# the VOC classes the sample classes fall into, for pretrained weights (everything but cars
# is VOC "background")
VOC_CAR = 7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _upload_samples(fs: s3fs.S3FileSystem, date: str, count: int) -> None:
    fs.mkdir(BUCKET)
    for index in range(count):
        image, labels = synthetic_scene(240, 320, seed=index)
        camera = f"cam{index % 2 + 1}"
        fs.pipe_file(f"{BUCKET}/cameras/{date}/{camera}/scene_{index:03d}.png", _png(image))
        fs.pipe_file(f"{BUCKET}/labels/{date}/{camera}/scene_{index:03d}.png", encode_mask(labels))


def _weights(model: str, workdir: Path) -> tuple[str, dict[str, Any]]:
    """Pretrained weights when they can be had; otherwise an untrained checkpoint named with the
    sample classes, said plainly. Returns the weights and the evaluation settings that fit."""
    try:
        pretrained = build_model(model, weights="DEFAULT")
    except (WeightsUnavailableError, ValueError) as err:
        print(f"Pretrained weights for {model} are not available here: {err}")
        print("Running an UNTRAINED model instead (random weights): the outputs show the pipeline working, "
              "not real classes, and the scores are those of chance.")
        meta = ModelMeta.default(model, len(SAMPLE_CLASSES), class_names=tuple(SAMPLE_CLASSES))
        path = workdir / f"untrained-{model}.pt"
        save_checkpoint(build_model(model, num_classes=len(SAMPLE_CLASSES), weights=None), str(path), meta)
        return str(path), {"num_classes": len(SAMPLE_CLASSES), "class_names": list(SAMPLE_CLASSES)}
    meta = pretrained.meta
    print(f"model: {model} with pretrained weights {meta.weights}")
    car = SAMPLE_CLASSES.index("car")
    label_map = {i: (VOC_CAR if i == car else 0) for i in range(len(SAMPLE_CLASSES))}
    return "DEFAULT", {"num_classes": meta.num_classes, "class_names": list(meta.class_names), "label_map": label_map}


def run_demo(workdir: str | Path, *, model: str = "deeplabv3_mobilenet_v3_large", images: int = 6) -> dict[str, Any]:
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    date = yesterday_utc()
    port = _free_port()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    started_ray = not ray.is_initialized()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        options = {"endpoint_url": endpoint, "key": "demo", "secret": "demo"}
        _upload_samples(s3fs.S3FileSystem(**options), date, images)
        print(f"local S3 endpoint {endpoint}: {images} generated scenes in s3://{BUCKET}/cameras/{date}/, "
              f"ground truth in s3://{BUCKET}/labels/{date}/")
        weights, evaluation = _weights(model, workdir)
        if started_ray:
            ray.init(include_dashboard=False, logging_level="WARNING")  # one local Ray for both flows

        segmentation = segment_archive(SegmentConfig(
            source=f"s3://{BUCKET}/cameras/{{date}}", output=f"{workdir}/segmentation/date={{date}}", date=date,
            model=model, weights=weights, storage_options=options, batch_size=4,
        ))
        report = evaluate_predictions(EvaluateConfig(
            predictions=f"{segmentation['output']}/masks", ground_truth=f"s3://{BUCKET}/labels/{date}",
            output=f"{workdir}/evaluation", storage_options=options, **evaluation,
        ))
        share = duckdb.sql(f"""
            select class_name, sum(pixel_count) as pixels,
                   round(sum(pixel_count) / sum(sum(pixel_count)) over (), 3) as share
            from read_parquet('{workdir}/segmentation/*/class_stats/**/*.parquet', hive_partitioning = true)
            group by class_name order by pixels desc""")
        print()
        print(f"segmentation: {segmentation['images']} images, {segmentation['errors']} errors; outputs in "
              f"{segmentation['output']}/ (images/, class_stats/, masks/)")
        print(f"evaluation: mIoU {report['miou']:.3f} over {report['images']} images; report in {workdir}/evaluation/ "
              "(metrics.json, per_image.parquet, confusion_matrix.png, per_class_iou.png)")
        print("DuckDB: share of pixels per class over the night's images")
        print(share)
        return {"segmentation": segmentation, "evaluation": report, "class_share": share.fetchall()}
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
        server.stop()
