"""How long the command line takes to refuse a mistake, and to answer `--help` and `models`.

    python bench/cli_errors.py              # each case 3 times, the median
    python bench/cli_errors.py --repeat 5

Each case is the installed `segpipe` run as a subprocess, as a user runs it, timed from start
to exit: the mistakes of issue 16 (each must exit 2 with one line on stderr and write
nothing), a misspelled model, `evaluate` and `train` with a missing input, `train` offline
with `--init imagenet`, over an existing checkpoint or without images, `evaluate` writing
into its masks or given images for its masks, and the two commands that only print. Prints one JSON line per case (median seconds over the repeats)
and a summary with the worst; the goal is under 3 s for each on a 2-core machine. The S3
case runs against moto's server on 127.0.0.1 with every credential removed from the
environment; the offline case points torch.hub at an empty cache and HTTPS at a closed port.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import s3fs
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SEGPIPE = str(Path(sys.executable).parent / "segpipe")
GOAL_S = 3.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return server, endpoint
        except OSError:
            if time.monotonic() > deadline:
                server.terminate()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)


def _cases(work: Path, endpoint: str) -> dict[str, tuple[list[str], dict[str, str], int, str]]:
    """name -> (arguments, environment, expected exit code, what its one line must say)."""
    from pipeline.models import ModelMeta, build_model, save_checkpoint

    source = work / "src"
    source.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(source / "a.png")
    images = work / "jpegs"  # what is often given for the ground truth: the images it labels
    images.mkdir()
    for i in range(20):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / f"{i:02d}.jpg")
    empty = work / "empty"
    empty.mkdir()
    checkpoint = str(work / "m.pt")
    save_checkpoint(build_model("lraspp_mobilenet_v3_large", num_classes=3), checkpoint,
                    ModelMeta.default("lraspp_mobilenet_v3_large", 3))
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing")
    fs.mkdir("bench-bucket")
    fs.pipe_file("bench-bucket/in/a.png", (source / "a.png").read_bytes())

    plain = {k: v for k, v in os.environ.items() if k.lower() not in {"https_proxy", "http_proxy", "no_proxy"}}
    offline = plain | {"TORCH_HOME": str(work / "torch"), "HTTPS_PROXY": f"http://127.0.0.1:{_free_port()}"}
    no_credentials = {k: v for k, v in plain.items() if not k.startswith("AWS_") and k != "SEGPIPE_STORAGE_OPTIONS"}
    no_credentials |= {"HOME": str(work), "AWS_ENDPOINT_URL": endpoint}
    out = str(work / "out")
    return {
        "weights_none_without_num_classes": (["segment", str(source), out, "--weights", "none"], plain, 2,
                                             "--weights none needs --num-classes"),
        "checkpoint_classes_disagree": (["segment", str(source), out, "--weights", checkpoint, "--num-classes", "5"],
                                        plain, 2, "--num-classes 5 but --weights"),
        "default_model_offline": (["segment", str(source), out], offline, 2, "cannot download them"),
        "s3_without_credentials": (["segment", "s3://bench-bucket/in", "s3://bench-bucket/out", "--weights", "none",
                                    "--num-classes", "2"], no_credentials, 2, "no credentials for SOURCE"),
        "misspelled_model": (["segment", str(source), out, "--model", "deeplabv3_resnet10"], plain, 2,
                             "did you mean deeplabv3_resnet101"),
        "evaluate_missing_ground_truth": (["evaluate", str(source), str(work / "gt"), str(work / "report"),
                                           "--num-classes", "2"], plain, 2, "is not a folder that exists"),
        "train_resume_without_training_state": (["train", str(source), str(source), str(work / "t.pt"), "--model",
                                                 "lraspp_mobilenet_v3_large", "--num-classes", "5", "--resume",
                                                 checkpoint], plain, 2, "holds no training state"),
        "train_imagenet_offline": (["train", str(source), str(source), str(work / "t.pt"), "--model",
                                    "lraspp_mobilenet_v3_large", "--num-classes", "3", "--init", "imagenet"], offline, 2,
                                   "the ImageNet weights of lraspp_mobilenet_v3_large's backbone"),
        "train_over_an_existing_checkpoint": (["train", str(source), str(source), checkpoint, "--model",
                                               "lraspp_mobilenet_v3_large", "--num-classes", "3"], plain, 2,
                                              "exists, and this run would replace it"),
        "evaluate_output_inside_predictions": (["evaluate", str(source), str(source), str(source / "report"),
                                                "--num-classes", "2"], plain, 2, "is inside PREDICTIONS"),
        "evaluate_images_as_ground_truth": (["evaluate", str(source), str(images), str(work / "report"),
                                             "--num-classes", "2"], plain, 2, "holds no masks, only 20 other files"),
        "train_without_images": (["train", str(empty), str(source), str(work / "t.pt"), "--model",
                                  "lraspp_mobilenet_v3_large", "--num-classes", "3"], plain, 2, "holds no images"),
        "models": (["models"], plain, 0, ""),
        "help": (["--help"], plain, 0, ""),
    }


def _time(args: list[str], env: dict[str, str], expected: int, says: str, out: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run([SEGPIPE, *args], capture_output=True, text=True, env=env, timeout=300)
    seconds = time.perf_counter() - started
    lines = done.stderr.splitlines()
    # a case refused for another reason than its own would time the wrong check
    if done.returncode != expected or (expected == 2 and (len(lines) != 1 or says not in lines[0])):
        raise RuntimeError(f"segpipe {' '.join(args)}: exit {done.returncode}, stderr {done.stderr[-2000:]!r}")
    if out.exists():
        raise RuntimeError(f"segpipe {' '.join(args)} wrote {out}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case; the median is reported (default: 3)")
    repeat = parser.parse_args().repeat
    server, endpoint = _moto()
    try:
        with tempfile.TemporaryDirectory(prefix="segpipe-cli-bench-") as folder:
            work = Path(folder)
            results = {}
            for name, (args, env, expected, says) in _cases(work, endpoint).items():
                runs = [_time(args, env, expected, says, work / "out") for _ in range(repeat)]
                results[name] = round(statistics.median(runs), 3)
                print(json.dumps({"case": name, "seconds": results[name], "runs": [round(r, 3) for r in runs]}),
                      flush=True)
    finally:
        server.terminate()
        server.wait(timeout=10)
    worst = max(results, key=results.get)
    print(json.dumps({"summary": {"worst_case": worst, "worst_seconds": results[worst], "goal_seconds": GOAL_S,
                                  "all_under_goal": results[worst] < GOAL_S}}))


if __name__ == "__main__":
    main()
