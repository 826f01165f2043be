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
    models = commands.add_parser("models", help="list the model names")
    models.set_defaults(run=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
