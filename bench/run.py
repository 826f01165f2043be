"""segpipe's benchmarks. Every figure compares two things measured in this run, on the same
images, model and device; one JSON object per benchmark, then one summary line.

    python bench/run.py [--quick] [--device cpu|cuda] [--model deeplabv3_mobilenet_v3_large]
                        [--only throughput tile crf eval memory peak precision] [--models M ...]

Precision: the model-only and end-to-end figures run at Segmenter's defaults (precision "auto":
bf16 where the device computes it natively, `pipeline.inference.native_bf16`, else float32; on
CPU, bf16 compiled as Segmenter compiles it), and say which precision they used.

- pipeline_efficiency: end-to-end images/s of a segpipe run (local source and output, CRF
  on, masks and tables written) / images/s of the bare model forward on preprocessed batches
  (the better of two passes). The timed run follows a short warm-up run in the same Ray
  session, as on a cluster that stays up: Ray's task workers are started. Model loading
  (RunSummary.setup_seconds) and the replica's compilation (bf16 on CPU: the model's and its
  labelling kernels', at the first batch; compile_seconds) are excluded: each is paid once per
  replica and image size, not per image. The same figure without the CRF is reported too
  (pipeline_efficiency_no_crf), to separate the CRF's share. On CPU, the same run with one
  replica per core (`actors` = the cores, each reserving half a CPU, so one torch thread
  each) instead of one replica with every core's threads: pipeline_efficiency_per_core.
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
- machine_peak_gflops (peak): this machine's measured fp32 and bf16 rates, GFLOP/s, for a 3x3
  convolution (256 channels in and out, batch 4, 90x120, channels_last) and a square GEMM
  (4096, or 2048 with --quick); each dtype's peak is its fastest kernel, named in
  peak_kernel. bf16 convolutions are run three ways (autocast, a bf16 module on bf16 input,
  and, outside --quick on CPU, compiled with inductor's freezing under autocast), as the
  fastest is the machine's real rate. On CUDA, fp32 convolutions use TF32 (PyTorch's default
  for cuDNN).
- bf16_speedup (precision): model-only images/s with precision="bf16" (compiled where
  Segmenter compiles it by default; its compilation, at the first batch, is excluded and
  reported as compile_seconds) / with precision="fp32", per model (--models).
- model_flops_utilisation (precision): the model's FLOPs per image (FlopCounterMode, one fp32
  eager forward at the benchmark's input size, without the convolution taps that fall on
  padding: see model_flops_per_image) x model-only images/s / machine_peak_gflops of the same
  dtype, for fp32 and bf16: the share of the machine's measured peak the forward reaches.

Images: CamVid frames from ../shared/data when present (repeated to the counts needed),
generated scenes otherwise. Weights are random (weights=None, 21 classes): speed does not
depend on them, and nothing is downloaded.
"""

from __future__ import annotations

import argparse
import io
import json
import math
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
sys.path.insert(0, str(ROOT / "bench"))

from bare import AsGiven  # noqa: E402

from pipeline.crf import dense_crf  # noqa: E402
from pipeline.heap import keep_freed_memory  # noqa: E402
from pipeline.inference import Segmenter, native_bf16  # noqa: E402
from pipeline.metrics import confusion_matrix, scores  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.samples import synthetic_scene  # noqa: E402

CAMVID = ROOT.parent / "shared" / "data" / "camvid" / "val"
NUM_CLASSES = 21
results: dict[str, object] = {}


def emit(name: str, **figures) -> None:
    print(json.dumps({"benchmark": name, **figures}), flush=True)
    results.update({k: v for k, v in figures.items() if k in SUMMARY_KEYS})
    for key in PER_MODEL_KEYS & figures.keys():
        results.setdefault(key, {})[figures["model"]] = figures[key]


SUMMARY_KEYS = (
    "pipeline_efficiency", "pipeline_efficiency_no_crf", "pipeline_efficiency_per_core", "tile_pipeline_efficiency", "speedup_vs_seed_loop", "speedup_vs_ray_data_baseline", "crf_speedup_vs_pydensecrf",
    "crf_argmax_agreement", "eval_speedup_vs_torchmetrics", "eval_max_abs_diff", "memory_growth", "machine_peak_gflops",
)
# figures of one model each, gathered in the summary as {model: figure}
PER_MODEL_KEYS = {"bf16_speedup", "model_flops_utilisation"}


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


def model_batch(model: torch.nn.Module, device: torch.device, batch_size: int) -> torch.Tensor:
    """The first `batch_size` frames at their own size (360x480 for CamVid), normalised as the
    model's weights expect, on the device: what the model-only figures feed the model."""
    from PIL import Image

    frames = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in source_images()[:batch_size]]
    pixels = torch.stack([torch.from_numpy(f.copy()).permute(2, 0, 1) for f in frames]).to(device).float()
    mean = torch.tensor(model.meta.preprocessing.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(model.meta.preprocessing.std, device=device).view(1, 3, 1, 1) * 255
    return (pixels - mean) / std


def model_only(model_name: str, device: torch.device, batch_size: int, count: int) -> dict:
    """Images/s of the model's forward alone, on batches already decoded, normalised and on
    the device, with the precision, memory format and compilation segpipe uses there."""
    model = build_model(model_name, num_classes=NUM_CLASSES, weights=None)
    return bare_forward_rate(model, device, model_batch(model, device, batch_size), count)


def bare_forward_rate(model: torch.nn.Module, device: torch.device, batch: torch.Tensor, count: int,
                      precision: str = "auto", min_seconds: float = 0.0) -> dict:
    """The model's forward on a preprocessed batch with the precision, memory format, folded
    batch norms and compilation of a Segmenter on `device` (by default, a segpipe replica's):
    items/s (`_best_rate`), the precision it resolved to, whether it is compiled, and the first
    call's extra seconds over a steady call (a compiled model's compilation)."""
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as a replica sets it
    segmenter = Segmenter(AsGiven(model), model.meta, device=device, batch_size=len(batch), precision=precision)
    if segmenter.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    dtype = segmenter.autocast_dtype

    def forward() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None), segmenter._freezing():
            segmenter.model(batch)

    rate, first_call = _best_rate(forward, len(batch), count, device, min_seconds=min_seconds)
    return {"items_per_second": rate, "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
            "compiled": segmenter.compiled, "first_call_extra_seconds": max(0.0, first_call - len(batch) / rate)}


def _best_rate(forward, per_call: float, count: float, device: torch.device, passes: int = 2,
               min_seconds: float = 0.0) -> tuple[float, float]:
    """Items/s of `forward` over at least `count` items and `min_seconds` a pass, the better of
    `passes` passes: shared machines only ever slow a pass down, and the better baseline makes
    our ratios the conservative ones. Also the seconds of the first call, a warm-up not timed
    in the rate (cudnn.benchmark's search on CUDA, a compiled model's compilation)."""
    rates = []
    with torch.inference_mode():
        _sync(device)
        started = time.perf_counter()
        forward()
        _sync(device)
        first_call = time.perf_counter() - started
        for _ in range(passes):
            _sync(device)
            started = time.perf_counter()
            done = 0
            while done < count or time.perf_counter() - started < min_seconds:
                forward()
                done += per_call
            _sync(device)
            rates.append(done / (time.perf_counter() - started))
    return max(rates), first_call


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def end_to_end(model_name: str, device: str, batch_size: int, source: Path, output: Path, *, crf: bool = True,
               tile: int | None = None, actors: int | None = None, cpus_per_actor: float = 1.0) -> dict:
    from pipeline.config import SegmentConfig
    from pipeline.runtime.driver import run_segmentation

    config = SegmentConfig(source=str(source), output=str(output), model=model_name, weights=None, num_classes=NUM_CLASSES,
                           crf=crf, batch_size=batch_size, device=device, shard_size=100, tile=tile, actors=actors,
                           cpus_per_actor=cpus_per_actor)
    summary = run_segmentation(config)
    if summary.errors:
        raise RuntimeError(f"the benchmark run had errors: {summary.errors_by_type}")
    # model loading and compilation are paid once per replica (and image size), not per image:
    # a night of millions of images pays them once; the first batch waits for the compilation
    # (replicas compile side by side: the slowest one's)
    compile_seconds = max((r.get("compile_seconds") or 0.0 for r in summary.replicas), default=0.0)
    steady = summary.seconds - summary.setup_seconds - compile_seconds
    # the replicas' Segmenter resolves "auto" by native_bf16 (SegmentConfig may not have a precision field)
    return {"images": summary.images, "errors": summary.errors, "images_per_second": summary.images / steady,
            "setup_seconds": summary.setup_seconds, "compile_seconds": compile_seconds, "precision": getattr(config, "precision", "auto"),
            "native_bf16": native_bf16(torch.device(device)), "compile": config.compile}


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
    from pipeline.windows import window_starts

    source = work / "tiles"
    mosaics = tile_sources()
    for i in range(count):
        (source / "t").mkdir(parents=True, exist_ok=True)
        (source / "t" / f"{i:04d}.jpg").write_bytes(mosaics[i % len(mosaics)])
    windows = len(window_starts(2048, TILE, TILE_STRIDE)) ** 2
    model = build_model(model_name, num_classes=NUM_CLASSES, weights=None)
    crops = torch.randn(batch_size, 3, TILE, TILE, device=device)
    forward = bare_forward_rate(model, device, crops, max(windows, 2 * batch_size))
    ours = end_to_end(model_name, device.type, batch_size, source, work / "tiles-out", tile=TILE)
    model_tiles = forward["items_per_second"] / windows
    return {"tile": "2048x2048", "window": TILE, "stride": TILE_STRIDE, "windows_per_tile": windows, "tiles": ours["images"],
            "model_only_precision": forward["precision"], "model_only_compiled": forward["compiled"],
            "precision": ours["precision"], "native_bf16": ours["native_bf16"],
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


CONV_SHAPE = (4, 256, 90, 120)  # batch, channels (in and out), height, width of the 3x3 convolution


def machine_peak(device: torch.device, seconds: float, gemm_side: int, compiled: bool) -> dict:
    """GFLOP/s of a 3x3 convolution and a square GEMM in fp32 and bf16, each the best of five
    passes of at least `seconds` / 2; each dtype's peak is its fastest kernel. Five short passes
    rather than two long ones: a peak caught while other work held a core would overstate
    every utilisation (2x was seen here: fp32 217 then 436 GFLOP/s). `compiled` adds the
    bf16 convolution compiled with inductor's freezing under autocast (CPU), as Segmenter runs
    its models there."""
    from torch import nn

    batch, channels, height, width = CONV_SHAPE
    conv_flops = 2 * batch * channels * channels * 9 * height * width
    x = torch.randn(CONV_SHAPE, device=device).contiguous(memory_format=torch.channels_last)
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).eval().to(device, memory_format=torch.channels_last)
    conv_bf16 = nn.Conv2d(channels, channels, 3, padding=1, bias=False).eval().to(device, torch.bfloat16, memory_format=torch.channels_last)
    x_bf16 = x.to(torch.bfloat16)
    a, b = torch.randn(2, gemm_side, gemm_side, device=device)
    a_bf16, b_bf16 = a.to(torch.bfloat16), b.to(torch.bfloat16)

    def autocast_bf16(call):
        def run() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                call()
        return run

    kernels = {  # name: (dtype, flops a call, call)
        "conv3x3_fp32_eager": ("fp32", conv_flops, lambda: conv(x)),
        "conv3x3_bf16_autocast_eager": ("bf16", conv_flops, autocast_bf16(lambda: conv(x))),
        "conv3x3_bf16_module_eager": ("bf16", conv_flops, lambda: conv_bf16(x_bf16)),
        "gemm_fp32": ("fp32", 2 * gemm_side**3, lambda: a @ b),
        "gemm_bf16": ("bf16", 2 * gemm_side**3, lambda: a_bf16 @ b_bf16),
    }
    compiled_conv = "conv3x3_bf16_autocast_compiled_freezing"
    if compiled and device.type == "cpu":
        # freezing patched around the calls, where compilation happens: Dynamo reads the global
        # flag when it traces (to keep the weights as constants), so torch.compile's
        # options={"freezing": True} alone leaves them graph inputs, cast and reordered at
        # every call (pytorch/pytorch#139272; seen in inductor's output code with torch 2.15)
        import torch._inductor.config as inductor_config

        frozen = torch.compile(conv)

        def frozen_bf16() -> None:
            with inductor_config.patch(freezing=True), torch.autocast(device.type, dtype=torch.bfloat16):
                frozen(x)

        kernels[compiled_conv] = ("bf16", conv_flops, frozen_bf16)
    gflops, first_calls = {}, {}
    for name, (_, flops, call) in kernels.items():
        rate, first_calls[name] = _best_rate(call, flops, flops, device, passes=5, min_seconds=seconds / 2)
        gflops[name] = round(rate / 1e9, 1)
    peak, peak_kernel = {}, {}
    for dtype in ("fp32", "bf16"):
        best = max((name for name, (kind, _, _) in kernels.items() if kind == dtype), key=gflops.__getitem__)
        peak[dtype], peak_kernel[dtype] = gflops[best], best
    return {"conv3x3": "x".join(map(str, CONV_SHAPE)) + " channels_last", "gemm": f"{gemm_side}x{gemm_side}",
            "threads": torch.get_num_threads(), "native_bf16": native_bf16(device), "gflops": gflops,
            "conv3x3_compile_seconds": round(first_calls[compiled_conv], 1) if compiled_conv in kernels else None,
            "machine_peak_gflops": peak, "peak_kernel": peak_kernel}


def model_flops_per_image(model: torch.nn.Module, image: torch.Tensor) -> dict[str, float]:
    """FLOPs of one fp32 eager forward on a (1, 3, H, W) batch, counted by FlopCounterMode
    (convolutions and matrix products, two per multiply-add; batch norms, activations and
    upsampling not counted): "counted", its default count, and "inside", the same without the
    convolution taps that fall on padding. oneDNN skips those taps, and the wide atrous
    rates of DeepLab's ASPP put most of theirs outside a small feature map (rate 36 on 23x30:
    all but the centre tap), so the default count is twice what a MobileNetV3 DeepLab
    computes at 360x480; utilisation is taken on "inside", the multiply-adds on pixels."""
    from torch.utils.flop_counter import FlopCounterMode

    def taps_inside(size_in: int, size_out: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
        # (output position, kernel tap) pairs along one axis that read a pixel, not padding
        return sum(0 <= o * stride - padding + t * dilation < size_in for t in range(kernel) for o in range(size_out))

    def conv_flops_inside(x_shape, w_shape, _bias, stride, padding, dilation, transposed, *args, out_shape=None, **kwargs) -> int:
        if transposed:  # none in segpipe's models; counted as FlopCounterMode does
            return 2 * x_shape[0] * math.prod(x_shape[2:]) * math.prod(w_shape)
        axes = zip(x_shape[2:], out_shape[2:], w_shape[2:], stride, padding, dilation, strict=True)
        return 2 * x_shape[0] * w_shape[0] * w_shape[1] * math.prod(taps_inside(*axis) for axis in axes)

    aten = torch.ops.aten
    counts = {}
    for name, mapping in (("counted", None), ("inside", {aten.convolution: conv_flops_inside, aten._convolution: conv_flops_inside})):
        counter = FlopCounterMode(display=False, custom_mapping=mapping)
        with torch.inference_mode(), counter:
            model.eval()(image)
        counts[name] = float(counter.get_total_flops())
    return counts


def precision_comparison(model_name: str, device: torch.device, batch_size: int, seconds: float, peak: dict) -> dict:
    """Model-only images/s with precision "fp32" and "bf16" (each compiled or not as Segmenter
    decides by default), their ratio, and each one's share of the machine's peak of its dtype."""
    model = build_model(model_name, num_classes=NUM_CLASSES, weights=None)
    batch = model_batch(model, device, batch_size)
    counts = model_flops_per_image(model, batch[:1].cpu())  # counted on the host, where the model is built
    flops = counts["inside"]
    runs = {precision: bare_forward_rate(model, device, batch, batch_size, precision, seconds) for precision in ("fp32", "bf16")}
    rate = {precision: run["items_per_second"] for precision, run in runs.items()}
    return {"batch_size": batch_size, "input": "x".join(map(str, batch.shape[-2:])), "gflops_per_image": round(flops / 1e9, 2),
            "gflops_per_image_with_padding": round(counts["counted"] / 1e9, 2),
            "images_per_second_fp32": round(rate["fp32"], 2), "images_per_second_bf16": round(rate["bf16"], 2),
            "compiled": {precision: run["compiled"] for precision, run in runs.items()},
            "compile_seconds": round(runs["bf16"]["first_call_extra_seconds"], 1) if runs["bf16"]["compiled"] else 0.0,
            "bf16_speedup": round(rate["bf16"] / rate["fp32"], 3),
            "model_flops_utilisation": {precision: round(flops * rate[precision] / (peak[precision] * 1e9), 4)
                                        for precision in ("fp32", "bf16")}}


PEAK_RUN = """
import sys, ray
from pipeline.config import SegmentConfig
from pipeline.runtime.driver import run_segmentation
ray.init(address="local", include_dashboard=False, logging_level="WARNING")
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


BENCHMARKS = ("throughput", "tile", "crf", "eval", "memory", "peak", "precision")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images: a few minutes on a 2-core CPU")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="deeplabv3_mobilenet_v3_large")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="BENCHMARK",
                        help=f"run only these benchmarks ({' '.join(BENCHMARKS)})")
    parser.add_argument("--models", nargs="+", help="models of the precision benchmark (default: --model)")
    args = parser.parse_args()
    count = (64 if args.device == "cpu" else 512) if args.quick else (256 if args.device == "cpu" else 4096)
    tiles = (8 if args.device == "cpu" else 32) if args.quick else (16 if args.device == "cpu" else 128)
    device = torch.device(args.device)
    torch.set_num_threads(os.cpu_count() or 1)
    keep_freed_memory()  # as a replica sets its heap: the model-only forwards run in this process
    only = set(args.only or BENCHMARKS)

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        source = write_source(work / "src", count)
        if {"peak", "precision"} & only:
            # before Ray starts its daemons: the kernels and the bare forwards have the cores to themselves
            seconds = 1.0 if args.quick else 5.0
            peak = machine_peak(device, seconds, gemm_side=2048 if args.quick else 4096, compiled=not args.quick)
            emit("machine_peak_gflops", device=args.device, **peak)
            for model_name in (args.models or [args.model]) if "precision" in only else []:
                emit("precision", model=model_name, device=args.device,
                     **precision_comparison(model_name, device, args.batch_size, seconds, peak["machine_peak_gflops"]))
        if {"throughput", "tile"} & only:
            import ray

            ray.init(address="local", include_dashboard=False, logging_level="WARNING")
            warm_up(args.model, args.device, args.batch_size, work)
        if "throughput" in only:
            bare_forward = model_only(args.model, device, args.batch_size, count)
            forward = bare_forward["items_per_second"]
            emit("model_only", model=args.model, device=args.device, batch_size=args.batch_size, images_per_second=round(forward, 2),
                 precision=bare_forward["precision"], compiled=bare_forward["compiled"],
                 compile_seconds=round(bare_forward["first_call_extra_seconds"], 1) if bare_forward["compiled"] else 0.0)
            ours = end_to_end(args.model, args.device, args.batch_size, source, work / "out")
            bare = end_to_end(args.model, args.device, args.batch_size, source, work / "out-no-crf", crf=False)
            emit("end_to_end", model=args.model, device=args.device, images=ours["images"],
                 precision=ours["precision"], native_bf16=ours["native_bf16"], compile=ours["compile"],
                 images_per_second=round(ours["images_per_second"], 2), setup_seconds=round(ours["setup_seconds"], 1),
                 compile_seconds=round(ours["compile_seconds"], 1),
                 pipeline_efficiency=round(ours["images_per_second"] / forward, 3),
                 images_per_second_no_crf=round(bare["images_per_second"], 2),
                 pipeline_efficiency_no_crf=round(bare["images_per_second"] / forward, 3))
            cores = int(ray.cluster_resources().get("CPU", 1))  # Ray's count: cgroup limits included
            if device.type == "cpu" and cores > 1:
                per_core = end_to_end(args.model, args.device, args.batch_size, source, work / "out-per-core",
                                      actors=cores, cpus_per_actor=0.5)
                emit("end_to_end_per_core", model=args.model, device=args.device, images=per_core["images"], replicas=cores,
                     images_per_second=round(per_core["images_per_second"], 2),
                     compile_seconds=round(per_core["compile_seconds"], 1),
                     pipeline_efficiency_per_core=round(per_core["images_per_second"] / forward, 3))
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
    print(json.dumps({"summary": results, "device": args.device, "model": args.model, "quick": args.quick,
                      "native_bf16": native_bf16(device)}))


if __name__ == "__main__":
    main()
