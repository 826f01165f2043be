"""Fine-tune a model on CamVid's validation frames (../shared/data/camvid/val), holding out the
last 20 frames for validation, and print one JSON line: validation mIoU, training images/s,
wall time. The figures in BENCHMARKS.md come from this script.

    python bench/train_camvid.py --model deeplabv3_mobilenet_v3_large --epochs 30
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import TrainConfig
from pipeline.runtime.training import run_training

CAMVID = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "camvid" / "val"
CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian", "bicyclist")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deeplabv3_mobilenet_v3_large")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, nargs=2, default=(256, 256))
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--init", default="none")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--data", default=str(CAMVID))
    args = parser.parse_args()
    data = Path(args.data)
    with tempfile.TemporaryDirectory() as scratch:
        config = TrainConfig(
            images=str(data / "images"), labels=str(data / "labels"), output=f"{scratch}/camvid.pt", model=args.model,
            num_classes=11, class_names=CLASSES, ignore_index=11, epochs=args.epochs, batch_size=args.batch_size,
            crop=tuple(args.crop), scale=(0.5, 1.5), optimizer=args.optimizer, lr=args.lr, init=args.init,
            val_last=20, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
        )
        ray.init(address="local", include_dashboard=False, logging_level="WARNING")
        started = time.monotonic()
        summary = run_training(config)
        wall = time.monotonic() - started
    print(json.dumps({
        "benchmark": "train_camvid", "model": args.model, "device": summary.device, "workers": summary.workers,
        "train_images": summary.train_images, "val_images": summary.val_images, "epochs": args.epochs,
        "crop": list(args.crop), "init": args.init, "best_val_miou": summary.best_score, "best_epoch": summary.best_epoch,
        "train_images_per_second": round(summary.images_per_second, 2), "wall_seconds": round(wall, 1),
        "val_miou_by_epoch": [e["val_miou"] for e in summary.epochs],
    }))


if __name__ == "__main__":
    main()
