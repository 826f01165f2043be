"""`segpipe demo`: the whole product on one machine with embedded defaults.

A local S3 endpoint (moto's server on 127.0.0.1) receives generated street scenes and their
ground truth; the segmentation flow and then the evaluation flow run on Prefect's temporary
server and a local Ray; DuckDB queries the outputs. No cluster, no cloud account.

Everything stays in the demo folder, side by side:

    scenes/<date>/<camera>/scene_000.png           the generated scenes (as uploaded)
    ground_truth/<date>/<camera>/scene_000.png     their labels
    segmentation/date=<date>/masks/<camera>/...    segpipe's masks, and its tables beside them
    evaluation/                                    the scores
    overview.png                                   each scene, its mask and its ground truth
"""

from __future__ import annotations

import io
import logging
import socket
import textwrap
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import ray
import s3fs
from moto.server import ThreadedMotoServer
from PIL import Image, ImageDraw, ImageFont

from flows.evaluate import evaluate_predictions
from flows.segment import segment_archive
from pipeline.config import EvaluateConfig, SegmentConfig, yesterday_utc
from pipeline.masks import encode_mask
from pipeline.models import ModelMeta, WeightsUnavailableError, build_model, save_checkpoint
from pipeline.preflight import download_problem, published_weights
from pipeline.runtime.cluster import connect_ray
from pipeline.samples import SAMPLE_CLASSES, synthetic_scene
from pipeline.text import counted, every, verb_for

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


def _generate_samples(workdir: Path, date: str, count: int) -> list[str]:
    """Scenes and their ground truth, written to workdir/scenes/<date>/ and
    workdir/ground_truth/<date>/; their keys (<camera>/scene_<n>.png)."""
    keys = []
    for index in range(count):
        image, labels = synthetic_scene(240, 320, seed=index)
        key = f"cam{index % 2 + 1}/scene_{index:03d}.png"
        for folder, data in (("scenes", _png(image)), ("ground_truth", encode_mask(labels))):
            path = workdir / folder / date / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        keys.append(key)
    return keys


def _upload_samples(fs: s3fs.S3FileSystem, workdir: Path, date: str, keys: list[str]) -> None:
    fs.mkdir(BUCKET)
    for key in keys:
        fs.pipe_file(f"{BUCKET}/cameras/{date}/{key}", (workdir / "scenes" / date / key).read_bytes())
        fs.pipe_file(f"{BUCKET}/labels/{date}/{key}", (workdir / "ground_truth" / date / key).read_bytes())


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def write_overview(path: Path, rows: list[tuple[str, Path, Path, Path]], class_names: list[str],
                   label_map: dict[int, int] | None = None) -> Path:
    """One PNG: for each (name, scene, mask, ground truth), the scene beside segpipe's mask and
    the ground truth, both in the mask's class palette, with a legend of the classes shown.
    `label_map` maps ground-truth values to the model's classes (as the evaluation does)."""
    masks = [Image.open(mask) for _, _, mask, _ in rows]
    palette = masks[0].getpalette() or []
    colours = np.array((palette + [0] * 768)[:768], dtype=np.uint8).reshape(256, 3)
    lookup = np.arange(256, dtype=np.uint8)
    for value, class_id in (label_map or {}).items():
        lookup[value] = class_id
    panels, shown = [], set()
    for (name, scene, _, truth), mask in zip(rows, masks, strict=True):
        predicted = np.array(mask)
        expected = lookup[np.array(Image.open(truth))]
        shown |= set(np.unique(predicted).tolist()) | set(np.unique(expected).tolist())
        panels.append((name, Image.open(scene).convert("RGB"), Image.fromarray(colours[predicted]),
                       Image.fromarray(colours[expected])))

    font, small = _font(16), _font(13)
    width, height = panels[0][1].size
    gap, label_height, header = 12, 20, 28
    legend = sorted(class_id for class_id in shown if class_id < len(class_names))
    legend_rows = -(-len(legend) // 3)
    canvas = Image.new("RGB", (3 * width + 4 * gap, header + len(panels) * (height + label_height + gap)
                               + gap + legend_rows * 22 + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(("scene", "segpipe's mask", "ground truth")):
        draw.text((gap + column * (width + gap), 6), title, fill="black", font=font)
    y = header
    for name, *images in panels:
        draw.text((gap, y), name, fill=(80, 80, 80), font=small)
        for column, image in enumerate(images):
            canvas.paste(image.resize((width, height)), (gap + column * (width + gap), y + label_height))
        y += label_height + height + gap
    for index, class_id in enumerate(legend):
        x, row = gap + (index % 3) * (width + gap), y + (index // 3) * 22
        draw.rectangle((x, row + 2, x + 16, row + 18), fill=tuple(int(c) for c in colours[class_id]), outline="black")
        draw.text((x + 24, row + 2), f"{class_id} {class_names[class_id]}", fill="black", font=small)
    canvas.save(path)
    return path


def _weights(model: str, workdir: Path) -> tuple[str, dict[str, Any]]:
    """Pretrained weights when they can be had; otherwise an untrained checkpoint named with the
    sample classes, said plainly. Returns the weights and the evaluation settings that fit."""
    published = published_weights(model, "DEFAULT")
    # asked first: torch's own attempt prints a download line even when it cannot start
    problem = download_problem(published.url) if published is not None else "torchvision publishes none for it"
    try:
        if problem is not None:
            raise WeightsUnavailableError(problem)
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
    started_ray = False
    try:
        endpoint = f"http://127.0.0.1:{port}"
        options = {"endpoint_url": endpoint, "key": "demo", "secret": "demo"}
        keys = _generate_samples(workdir, date, images)
        _upload_samples(s3fs.S3FileSystem(**options), workdir, date, keys)
        print(f"local S3 endpoint {endpoint}: {images} generated scenes in s3://{BUCKET}/cameras/{date}/, "
              f"ground truth in s3://{BUCKET}/labels/{date}/ (copies in {workdir}/scenes/{date}/ and "
              f"{workdir}/ground_truth/{date}/)")
        weights, evaluation = _weights(model, workdir)
        started_ray, _ = connect_ray(None)  # one Ray for both flows

        segmentation = segment_archive(SegmentConfig(
            source=f"s3://{BUCKET}/cameras/{{date}}", output=f"{workdir}/segmentation/date={{date}}", date=date,
            model=model, weights=weights, storage_options=options, batch_size=4,
        ))
        report = evaluate_predictions(EvaluateConfig(
            predictions=f"{segmentation['output']}/masks", ground_truth=f"s3://{BUCKET}/labels/{date}",
            output=f"{workdir}/evaluation", storage_options=options, **evaluation,
        ))
        output = Path(segmentation["output"])
        overview = write_overview(
            workdir / "overview.png",
            [(key, workdir / "scenes" / date / key, output / "masks" / key, workdir / "ground_truth" / date / key)
             for key in keys],
            evaluation["class_names"], evaluation.get("label_map"),
        )
        sql = textwrap.dedent(f"""\
            select class_name, sum(pixel_count) as pixels,
                   round(sum(pixel_count) / sum(sum(pixel_count)) over (), 3) as share
            from read_parquet('{workdir}/segmentation/*/class_stats/**/*.parquet', hive_partitioning = true)
            group by class_name order by pixels desc""")
        share = duckdb.sql(sql)
        print()
        skipped = segmentation["shards_skipped"]
        done = (f"{counted(segmentation['images'], 'image')}, {counted(segmentation['errors'], 'error')}"
                if segmentation["images"]
                else f"nothing new, {every(skipped, 'shard')} of the night {verb_for(skipped, 'was', 'were')} already up to date")
        print(f"segmentation: {done}; outputs in {output}/ (images/, class_stats/, masks/)")
        print(f"evaluation: mIoU {report['miou']:.3f} over {counted(report['images'], 'image')}; report in {workdir}/evaluation/ "
              "(metrics.json, per_image.parquet, confusion_matrix.png, per_class_iou.png)")
        print(f"picture: {overview} (each scene, segpipe's mask and the ground truth, in the class palette)")
        print("DuckDB: share of pixels per class over the night's images, with this query:")
        print()
        print(textwrap.indent(sql, "    "))
        print()
        print(share)
        return {"segmentation": segmentation, "evaluation": report, "class_share": share.fetchall(),
                "overview": str(overview), "sql": sql}
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
        server.stop()
