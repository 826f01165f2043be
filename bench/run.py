"""segpipe's benchmarks. Every figure compares two things measured in this run, on the same
images, model and device; one JSON object per benchmark, then one summary line.

    python bench/run.py [--quick] [--device cpu|cuda] [--model deeplabv3_mobilenet_v3_large]

- pipeline_efficiency: end-to-end images/s of a segpipe run (local source and output, CRF
  on, masks and tables written) / images/s of the bare model forward on preprocessed batches
  (the better of two passes). The timed run follows a short warm-up run in the same Ray
  session, as on a cluster that stays up: Ray's task workers are started and have imported
  torch; model loading is excluded (RunSummary.setup_seconds). The same figure without the
  CRF is reported too (pipeline_efficiency_no_crf), to separate the CRF's share.
- tile_pipeline_efficiency: the same for large aerial tiles (2048x2048 mosaics of LoveDA
  tiles) in sliding-window mode (512x512 windows, stride 384), in tiles/s.
- speedup_vs_seed_loop: segpipe / a per-image loop (PIL open, torchvision transforms, the
  model on one image, argmax, PIL save).
- speedup_vs_ray_data_baseline: segpipe / a plain Ray Data script (read_images +
  map_batches with a callable model class, fp32, default settings, masks written), whose
  fixed costs are cancelled by timing it over all the images and over a quarter of them.
- crf_speedup_vs_pydensecrf, crf_argmax_agreement: pipeline.crf at its defaults / pydensecrf2
  (5 iterations, same parameters), 512x512, 21 classes.
- eval_speedup_vs_torchmetrics, eval_max_abs_diff: the evaluation's scoring / torchmetrics'
  multiclass Jaccard index, same masks.
- memory_growth: peak RSS (driver and Ray workers) of a run over 4N images / over N images.

Images: CamVid frames from ../shared/data when present (repeated to the counts needed),
generated scenes otherwise. Weights are random (weights=None, 21 classes): speed does not
depend on them, and nothing is downloaded.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.crf import dense_crf  # noqa: E402
from pipeline.metrics import confusion_matrix, scores  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.samples import synthetic_scene  # noqa: E402

CAMVID = ROOT.parent / "shared" / "data" / "camvid" / "val"
NUM_CLASSES = 21
results: dict[str, float] = {}


def emit(name: str, **figures) -> None:
    print(json.dumps({"benchmark": name, **figures}), flush=True)
    results.update({k: v for k, v in figures.items() if k in SUMMARY_KEYS})


SUMMARY_KEYS = (
    "pipeline_efficiency", "pipeline_efficiency_no_crf", "tile_pipeline_efficiency", "speedup_vs_seed_loop", "speedup_vs_ray_data_baseline", "crf_speedup_vs_pydensecrf",
    "crf_argmax_agreement", "eval_speedup_vs_torchmetrics", "eval_max_abs_diff", "memory_growth",
)


def source_images() -> list[bytes]:
    """JPEG bytes of the real frames, or of generated 360x480 scenes."""
    if CAMVID.is_dir():
        return [p.read_bytes() for p in sorted((CAMVID / "images").glob("*.jpg"))]
    from PIL import Image

    out = []
    for seed in range(20):
        buffer = io.BytesIO()
        Image.fromarray(synthetic_scene(360, 480, seed)[0]).save(buffer, format="JPEG", quality=92)
        out.append(buffer.getvalue())
    return out


def write_source(folder: Path, count: int) -> Path:
    frames = source_images()
    for i in range(count):
        path = folder / f"d{i // 100:03d}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(frames[i % len(frames)])
    return folder


def model_only(model_name: str, device: torch.device, batch_size: int, count: int) -> float:
    """Images/s of the model's forward alone, on batches already decoded, normalised and on
    the device, with the precision and memory format segpipe uses there."""
    from PIL import Image

    model = build_model(model_name, num_classes=NUM_CLASSES, weights=None)
    frames = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in source_images()[:batch_size]]
    pixels = torch.stack([torch.from_numpy(f.copy()).permute(2, 0, 1) for f in frames]).to(device).float()
    mean = torch.tensor(model.meta.preprocessing.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(model.meta.preprocessing.std, device=device).view(1, 3, 1, 1) * 255
    return _bare_forward_rate(model, device, (pixels - mean) / std, count)


def _bare_forward_rate(model: torch.nn.Module, device: torch.device, batch: torch.Tensor, count: int) -> float:
    """Items/s of the model's forward on a preprocessed batch, with the precision, memory format
    and folded batch norms a segpipe replica uses on `device` (its Segmenter's model)."""
    from pipeline.inference import Segmenter

    torch.backends.cudnn.benchmark = device.type == "cuda"  # as a replica sets it
    segmenter = Segmenter(model, device=device, batch_size=len(batch))
    if segmenter.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    dtype = segmenter.autocast_dtype

    def forward() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            segmenter.model(batch)["out"]

    return _best_rate(forward, len(batch), count, device)


def _best_rate(forward, per_call: int, count: int, device: torch.device, passes: int = 2) -> float:
    """Items/s of `forward` over `count` items, the better of `passes` passes: shared machines
    only ever slow a pass down, and the better baseline makes our ratios the conservative ones."""
    rates = []
    with torch.inference_mode():
        forward()  # warm-up (and cudnn.benchmark's search on CUDA)
        for _ in range(passes):
            _sync(device)
            started = time.perf_counter()
            done = 0
            while done < count:
                forward()
                done += per_call
            _sync(device)
            rates.append(done / (time.perf_counter() - started))
    return max(rates)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def end_to_end(model_name: str, device: str, batch_size: int, source: Path, output: Path, *, crf: bool = True,
               tile: int | None = None) -> dict:
    from pipeline.config import SegmentConfig
    from pipeline.runtime.driver import run_segmentation

    config = SegmentConfig(source=str(source), output=str(output), model=model_name, weights=None, num_classes=NUM_CLASSES,
                           crf=crf, batch_size=batch_size, device=device, shard_size=100, tile=tile)
    summary = run_segmentation(config)
    if summary.errors:
        raise RuntimeError(f"the benchmark run had errors: {summary.errors_by_type}")
    steady = summary.seconds - summary.setup_seconds  # model loading is paid once per run, not per image
    return {"images": summary.images, "errors": summary.errors, "images_per_second": summary.images / steady,
            "setup_seconds": summary.setup_seconds}


def warm_up(model_name: str, device: str, batch_size: int, work: Path) -> None:
    """A short run, so that the timed runs find Ray's task workers started (see the module doc)."""
    end_to_end(model_name, device, batch_size, write_source(work / "warm-src", 2 * batch_size), work / "warm-out")


def tile_sources() -> list[bytes]:
    """JPEG bytes of 2048x2048 aerial mosaics: 2x2 LoveDA tiles, or generated scenes."""
    from PIL import Image

    loveda = ROOT.parent / "shared" / "data" / "aerial" / "loveda" / "images"
    tiles = [np.asarray(Image.open(p).convert("RGB").resize((1024, 1024))) for p in sorted(loveda.glob("*"))[:4]] if loveda.is_dir() else []
    while len(tiles) < 4:
        tiles.append(synthetic_scene(1024, 1024, len(tiles))[0])
    out = []
    for shift in range(2):
        order = tiles[shift:] + tiles[:shift]
        mosaic = np.concatenate([np.concatenate(order[:2], axis=1), np.concatenate(order[2:], axis=1)], axis=0)
        buffer = io.BytesIO()
        Image.fromarray(mosaic).save(buffer, format="JPEG", quality=92)
        out.append(buffer.getvalue())
    return out


TILE, TILE_STRIDE = 512, 384


def tile_comparison(model_name: str, device: torch.device, batch_size: int, count: int, work: Path) -> dict:
    """Large tiles in sliding-window mode: end-to-end tiles/s against the bare forward of the
    tiles' windows (preprocessed, in batches of batch_size) expressed in tiles/s."""
    from pipeline.inference import window_starts

    source = work / "tiles"
    mosaics = tile_sources()
    for i in range(count):
        (source / "t").mkdir(parents=True, exist_ok=True)
        (source / "t" / f"{i:04d}.jpg").write_bytes(mosaics[i % len(mosaics)])
    windows = len(window_starts(2048, TILE, TILE_STRIDE)) ** 2
    model = build_model(model_name, num_classes=NUM_CLASSES, weights=None)
    crops = torch.randn(batch_size, 3, TILE, TILE, device=device)
    windows_per_second = _bare_forward_rate(model, device, crops, max(windows, 2 * batch_size))
    ours = end_to_end(model_name, device.type, batch_size, source, work / "tiles-out", tile=TILE)
    model_tiles = windows_per_second / windows
    return {"tile": "2048x2048", "window": TILE, "stride": TILE_STRIDE, "windows_per_tile": windows, "tiles": ours["images"],
            "model_only_tiles_per_second": round(model_tiles, 3), "tiles_per_second": round(ours["images_per_second"], 3),
            "tile_pipeline_efficiency": round(ours["images_per_second"] / model_tiles, 3)}


def seed_loop(model_name: str, device: torch.device, source: Path, output: Path) -> float:
    """The tutorial way, one image at a time."""
    from PIL import Image
    from torchvision import transforms

    model = build_model(model_name, num_classes=NUM_CLASSES, weights=None).to(device).eval()
    prepare = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    files = sorted(source.rglob("*.jpg"))
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with torch.no_grad():
        for path in files:
            image = Image.open(path).convert("RGB")
            labels = model(prepare(image)[None].to(device))["out"].argmax(1)[0].byte().cpu().numpy()
            Image.fromarray(labels).save(output / f"{path.stem}.png")
    return len(files) / (time.perf_counter() - started)


class _RayDataModel:
    def __init__(self, model_name: str, device: str, output: str) -> None:
        self.device = torch.device(device)
        self.model = build_model(model_name, num_classes=NUM_CLASSES, weights=None).to(self.device).eval()
        self.mean = torch.tensor((0.485, 0.456, 0.406), device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor((0.229, 0.224, 0.225), device=self.device).view(1, 3, 1, 1)
        self.output = output

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        pixels = torch.from_numpy(np.stack(batch["image"])).permute(0, 3, 1, 2).to(self.device).float() / 255
        with torch.no_grad():
            labels = self.model((pixels - self.mean) / self.std)["out"].argmax(1).byte().cpu().numpy()
        for path, mask in zip(batch["path"], labels, strict=True):
            Image.fromarray(mask).save(os.path.join(self.output, os.path.basename(path).replace(".jpg", ".png")))
        return {"path": batch["path"]}


def ray_data_baseline(model_name: str, device: str, batch_size: int, source: Path, output: Path) -> float:
    """Images/s at the margin: (N - n) / (T(N) - T(n)) for runs over all N images and over a
    quarter of them, which cancels what a run pays once (Ray Data's planning, its actor's
    model loading), as setup_seconds does for segpipe's run."""
    files = sorted(source.rglob("*.jpg"))
    subset = output.parent / f"{output.name}-subset-src"
    for path in files[: len(files) // 4]:
        target = subset / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    # a first run starts Ray Data's machinery in this session, as the warm-up run does for segpipe
    _ray_data_run(model_name, device, batch_size, subset, output.parent / f"{output.name}-warm-up")
    small_n, small_s = _ray_data_run(model_name, device, batch_size, subset, output.parent / f"{output.name}-subset")
    all_n, all_s = _ray_data_run(model_name, device, batch_size, source, output)
    return (all_n - small_n) / max(all_s - small_s, 1e-9)


def _ray_data_run(model_name: str, device: str, batch_size: int, source: Path, output: Path) -> tuple[int, float]:
    import ray

    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    dataset = ray.data.read_images(str(source), mode="RGB", include_paths=True)
    written = dataset.map_batches(
        _RayDataModel, fn_constructor_args=(model_name, device, str(output)), batch_size=batch_size, concurrency=1,
        num_gpus=1 if device == "cuda" else 0,
    ).count()
    return written, time.perf_counter() - started


def crf_comparison(repeats: int) -> dict:
    import pydensecrf.densecrf as dcrf
    import torch.nn.functional as F
    from PIL import Image

    frame = np.array(Image.open(io.BytesIO(source_images()[0])).convert("RGB").resize((512, 512)))
    _, labels = synthetic_scene(512, 512, 0)
    onehot = F.one_hot(torch.as_tensor(labels.astype(np.int64)) % NUM_CLASSES, NUM_CLASSES).permute(2, 0, 1)[None].float()
    noise = torch.randn(onehot.shape, generator=torch.Generator().manual_seed(0))
    probs = (torch.log(F.avg_pool2d(onehot, 21, 1, 10, count_include_pad=False) + 0.05) + noise).softmax(1)
    image = torch.from_numpy(frame).permute(2, 0, 1)[None].contiguous()
    dense_crf(probs, image)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        ours = dense_crf(probs, image)
    ours_ms = (time.perf_counter() - started) / repeats * 1000
    unary = np.ascontiguousarray(-np.log(np.clip(probs[0].numpy(), 1e-8, None)).reshape(NUM_CLASSES, -1))
    started = time.perf_counter()
    for _ in range(repeats):
        crf = dcrf.DenseCRF2D(512, 512, NUM_CLASSES)
        crf.setUnaryEnergy(unary)
        crf.addPairwiseGaussian(sxy=3, compat=3)
        crf.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(frame), compat=4)
        reference = np.array(crf.inference(5)).reshape(NUM_CLASSES, 512, 512)
    reference_ms = (time.perf_counter() - started) / repeats * 1000
    agreement = float((ours[0].argmax(0).numpy() == reference.argmax(0)).mean())
    return {"crf_ms": round(ours_ms, 1), "pydensecrf_ms": round(reference_ms, 1),
            "crf_speedup_vs_pydensecrf": round(reference_ms / ours_ms, 2), "crf_argmax_agreement": round(agreement, 4)}


def eval_comparison(pairs: int) -> dict:
    from torchmetrics.classification import MulticlassJaccardIndex

    rng = np.random.default_rng(0)
    truths, predictions = [], []
    for seed in range(pairs):
        _, labels = synthetic_scene(512, 512, seed)
        truth = labels.astype(np.int64) * 5 % NUM_CLASSES
        truth[rng.random(truth.shape) < 0.02] = 255  # some unlabelled pixels
        prediction = np.where(rng.random(truth.shape) < 0.2, rng.integers(0, NUM_CLASSES, truth.shape), truth % 255)
        truths.append(truth)
        predictions.append(np.clip(prediction, 0, NUM_CLASSES - 1))
    started = time.perf_counter()
    total = sum(confusion_matrix(p, t, NUM_CLASSES, ignore_index=255) for p, t in zip(predictions, truths, strict=True))
    ours = scores(total)["iou"]
    ours_s = time.perf_counter() - started
    metric = MulticlassJaccardIndex(num_classes=NUM_CLASSES, average=None, ignore_index=255)
    started = time.perf_counter()
    for p, t in zip(predictions, truths, strict=True):
        metric.update(torch.from_numpy(p), torch.from_numpy(t))
    reference = metric.compute().numpy()
    reference_s = time.perf_counter() - started
    present = ~np.isnan(ours)
    return {"pairs": pairs, "eval_ms": round(ours_s * 1000, 1), "torchmetrics_ms": round(reference_s * 1000, 1),
            "eval_speedup_vs_torchmetrics": round(reference_s / ours_s, 2),
            "eval_max_abs_diff": float(np.abs(ours[present] - reference[present]).max())}


PEAK_RUN = """
import sys, ray
from pipeline.config import SegmentConfig
from pipeline.runtime.driver import run_segmentation
ray.init(include_dashboard=False, logging_level="WARNING")
s = run_segmentation(SegmentConfig(source=sys.argv[1], output=sys.argv[2], model=sys.argv[3], weights=None,
                                   num_classes=21, crf=True, batch_size=int(sys.argv[4]), device=sys.argv[5], shard_size=100))
print(s.images)
"""


def peak_rss(source: Path, output: Path, model_name: str, batch_size: int, device: str) -> int:
    """Peak of the summed RSS of a run's process tree (the driver, Ray's daemons, its workers)."""
    from memory import peak_tree_rss

    process = subprocess.Popen([sys.executable, "-c", PEAK_RUN, str(source), str(output), model_name, str(batch_size), device],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    peak = peak_tree_rss(process)
    if process.returncode:
        raise RuntimeError(f"the memory run failed ({process.returncode})")
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images: a few minutes on a 2-core CPU")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="deeplabv3_mobilenet_v3_large")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--only", nargs="+", help="run only these benchmarks (throughput tile crf eval memory)")
    args = parser.parse_args()
    count = (64 if args.device == "cpu" else 512) if args.quick else (256 if args.device == "cpu" else 4096)
    tiles = (8 if args.device == "cpu" else 32) if args.quick else (16 if args.device == "cpu" else 128)
    device = torch.device(args.device)
    torch.set_num_threads(os.cpu_count() or 1)
    only = set(args.only or ["throughput", "tile", "crf", "eval", "memory"])

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        source = write_source(work / "src", count)
        if {"throughput", "tile"} & only:
            import ray

            ray.init(include_dashboard=False, logging_level="WARNING")
            warm_up(args.model, args.device, args.batch_size, work)
        if "throughput" in only:
            forward = model_only(args.model, device, args.batch_size, count)
            emit("model_only", model=args.model, device=args.device, batch_size=args.batch_size, images_per_second=round(forward, 2))
            ours = end_to_end(args.model, args.device, args.batch_size, source, work / "out")
            bare = end_to_end(args.model, args.device, args.batch_size, source, work / "out-no-crf", crf=False)
            emit("end_to_end", model=args.model, device=args.device, images=ours["images"],
                 images_per_second=round(ours["images_per_second"], 2), setup_seconds=round(ours["setup_seconds"], 1),
                 pipeline_efficiency=round(ours["images_per_second"] / forward, 3),
                 images_per_second_no_crf=round(bare["images_per_second"], 2),
                 pipeline_efficiency_no_crf=round(bare["images_per_second"] / forward, 3))
            seed = seed_loop(args.model, device, source, work / "seed")
            emit("seed_loop", images_per_second=round(seed, 2), speedup_vs_seed_loop=round(ours["images_per_second"] / seed, 2))
            baseline = ray_data_baseline(args.model, args.device, args.batch_size, source, work / "raydata")
            emit("ray_data_baseline", images_per_second=round(baseline, 2),
                 speedup_vs_ray_data_baseline=round(ours["images_per_second"] / baseline, 2))
        if "tile" in only:
            emit("tile", model=args.model, device=args.device, **tile_comparison(args.model, device, args.batch_size, tiles, work))
        if {"throughput", "tile"} & only:
            ray.shutdown()
        if "crf" in only:
            emit("crf", size="512x512", classes=NUM_CLASSES, iterations=5, **crf_comparison(2 if args.quick else 5))
        if "eval" in only:
            emit("eval", **eval_comparison(16 if args.quick else 64))
        if "memory" in only:
            small = max(4, count // 4)
            base = peak_rss(write_source(work / "mem-small", small), work / "mem-out-small", args.model, args.batch_size, args.device)
            large = peak_rss(write_source(work / "mem-large", 4 * small), work / "mem-out-large", args.model, args.batch_size, args.device)
            emit("memory", images=[small, 4 * small], peak_rss_mb=[round(base / 2**20), round(large / 2**20)],
                 memory_growth=round(large / base, 3))
    print(json.dumps({"summary": results, "device": args.device, "model": args.model, "quick": args.quick}))


if __name__ == "__main__":
    main()
