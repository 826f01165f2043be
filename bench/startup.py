"""Start-up: what a person at a terminal waits for, compared with the plainest script that does
the same work. One JSON object per measurement, then one summary line.

    python bench/startup.py [--repeats 2] [--command '.venv/bin/segpipe'] [--precision fp32] [--no-breakdown]

- seed_loop_one_image_seconds: a plain script in a fresh process: import torch and
  torchvision, build the run's model (lraspp_mobilenet_v3_large, weights=None, 21 classes),
  segment one image (PIL open, normalise, forward, argmax, PNG save).
- one_image_run_seconds: the whole command `segpipe segment SOURCE OUTPUT --model
  lraspp_mobilenet_v3_large --weights none --num-classes 21 --no-crf --precision fp32` over a
  folder holding that one image, into an empty OUTPUT: the same work as the script (no CRF,
  float32 without compilation). `--precision auto` measures the default instead, which on a CPU
  with native bf16 compiles the model in the replica at its first batch (seconds).
- noop_rerun_seconds: the same command again: every shard is up to date, nothing to do.
- noop_rerun_vs_seed_loop (goal: 1 or less) and one_image_run_vs_seed_loop (goal: 3 or less).
- folder_run_seconds: the same command over a folder of --folder-images copies of the image
  (one shard), into an empty OUTPUT; new_image_rerun_seconds: again once one image more is in
  the folder. new_image_rerun_vs_one_image_run: the second over one_image_run_seconds, what a
  night adding one image to a committed folder costs against a run of that image alone (the
  folder's other images keep their rows and masks).
- startup_breakdown: where a run's start-up goes, each step timed in one fresh process in the
  order and overlap of a run's driver: the interpreter, the driver's imports (no torch),
  Prefect's settings and its temporary server launched, a local Ray, the replica created, the
  flows imported while it loads, the server answering, an empty flow on it, what is left of
  the replica's loading, Ray's shutdown, the server's; and apart, what a replica's process
  imports (torch, torchvision, the stages) before it builds its model.

Each figure is the best of --repeats (the machine may be shared). The commands run with
RAY_ADDRESS=local unless it is set: a fresh local Ray, as a user without a cluster gets.
Image: a CamVid frame (480x360) from ../shared/data when present, a generated scene otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CAMVID = ROOT.parent / "shared" / "data" / "camvid" / "val" / "images"
MODEL, NUM_CLASSES = "lraspp_mobilenet_v3_large", 21

SEED_LOOP = f"""
import sys
import numpy as np
import torch
from PIL import Image
from torchvision.models.segmentation import {MODEL}

model = {MODEL}(weights=None, weights_backbone=None, num_classes={NUM_CLASSES}).eval()
pixels = np.array(Image.open(sys.argv[1]).convert("RGB"), dtype=np.float32) / 255
mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
batch = torch.from_numpy((pixels - mean) / std).permute(2, 0, 1)[None]
with torch.inference_mode():
    labels = model(batch)["out"].argmax(1)[0].to(torch.uint8).numpy()
Image.fromarray(labels).save(sys.argv[2])
"""

# each step's seconds since the previous one, in a fresh process, in the order and overlap of a
# run's driver (flows/cli.py): what it imports, Prefect's temporary server launched, Ray
# started, the replica loading while the flows are imported and the server comes up, a flow on
# that server, Ray's shutdown; then, apart, what a replica imports in its own process
BREAKDOWN = f"""
import json, os, sys, time
marks = {{}}
last = time.monotonic()
def mark(step):
    global last
    now = time.monotonic()
    marks[step] = round(now - last, 2)
    last = now
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
import threading
import pipeline.run, pipeline.runtime.replicas
from pipeline.config import SegmentConfig
from pipeline.runtime.cluster import connect_ray
from pipeline.runtime.replicas import SegmentWorker, _ReplicaPool
mark("import_driver_side")
from flows._prefect_server import TemporaryServer
server = TemporaryServer()
server.start()
mark("prefect_settings_and_temporary_server_launched")
import ray
connect_ray(None)
mark("ray_local_start")
config = SegmentConfig(source="s", output="o", model="{MODEL}", weights=None, num_classes={NUM_CLASSES}, crf=False,
                       precision="fp32")
pool = _ReplicaPool(config, SegmentWorker, "bench")
mark("replica_created")
import prefect, flows.segment
mark("import_prefect_and_flows")
@prefect.flow
def empty():
    return 1
with server.api():
    mark("temporary_server_answering")
    empty()
mark("empty_flow_on_it")
pool.wait_ready(config, threading.Event())
mark("replica_loaded_after_that")
pool.shutdown()
ray.shutdown()
mark("ray_shutdown")
server.stop()
mark("temporary_server_stop")
print(json.dumps(marks))
"""

# what a replica's process imports before it can build its model
REPLICA_IMPORTS = "import pipeline.runtime.worker"


def timed(command: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.monotonic()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"{shlex.join(command)} exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return seconds


def write_image(folder: Path) -> Path:
    folder.mkdir(parents=True)
    frames = sorted(CAMVID.glob("*.jpg")) if CAMVID.is_dir() else []
    if frames:
        return Path(shutil.copy(frames[0], folder / frames[0].name))
    sys.path.insert(0, str(ROOT))
    from PIL import Image

    from pipeline.samples import synthetic_scene

    path = folder / "scene.png"
    Image.fromarray(synthetic_scene(360, 480, 0)[0]).save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="best of this many of each (default: %(default)s)")
    parser.add_argument("--command", default=str(ROOT / ".venv" / "bin" / "segpipe"),
                        help="how to run segpipe (default: %(default)s)")
    parser.add_argument("--precision", default="fp32", help="the runs' --precision (default: %(default)s, as the "
                        "script; '' leaves the option out, for versions without it)")
    parser.add_argument("--folder-images", type=int, default=64,
                        help="images in the folder one image is added to (default: %(default)s)")
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false", help="skip the start-up breakdown")
    args = parser.parse_args()
    segpipe = shlex.split(args.command)
    env = {**os.environ, "RAY_ADDRESS": os.environ.get("RAY_ADDRESS", "local")}
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="segpipe-bench-startup-") as tmp:
        work = Path(tmp)
        image = write_image(work / "src")
        seed = min(timed([sys.executable, "-c", SEED_LOOP, str(image), str(work / f"seed-{i}.png")], env, ROOT)
                   for i in range(args.repeats))
        results["seed_loop_one_image_seconds"] = round(seed, 2)
        print(json.dumps({"benchmark": "seed_loop", "model": MODEL, "seconds": round(seed, 2)}), flush=True)

        options = ["--model", MODEL, "--weights", "none", "--num-classes", str(NUM_CLASSES), "--no-crf",
                   *(["--precision", args.precision] if args.precision else [])]
        runs, noops = [], []
        for i in range(args.repeats):
            output = work / f"out-{i}"
            runs.append(timed([*segpipe, "segment", str(work / "src"), str(output), *options], env, ROOT))
            noops.append(timed([*segpipe, "segment", str(work / "src"), str(output), *options], env, ROOT))
        results["one_image_run_seconds"] = round(min(runs), 2)
        results["noop_rerun_seconds"] = round(min(noops), 2)
        results["one_image_run_vs_seed_loop"] = round(min(runs) / seed, 2)
        results["noop_rerun_vs_seed_loop"] = round(min(noops) / seed, 2)
        print(json.dumps({"benchmark": "segment", "command": shlex.join(segpipe), "one_image_run_seconds": results[
            "one_image_run_seconds"], "noop_rerun_seconds": results["noop_rerun_seconds"]}), flush=True)

        folders, reruns = [], []
        for i in range(args.repeats):
            folder, output = work / f"folder-{i}", work / f"folder-out-{i}"
            folder.mkdir()
            for n in range(args.folder_images):
                shutil.copyfile(image, folder / f"{n:05d}{image.suffix}")
            folders.append(timed([*segpipe, "segment", str(folder), str(output), *options], env, ROOT))
            shutil.copyfile(image, folder / f"new{image.suffix}")
            reruns.append(timed([*segpipe, "segment", str(folder), str(output), *options], env, ROOT))
        results["folder_run_seconds"] = round(min(folders), 2)
        results["new_image_rerun_seconds"] = round(min(reruns), 2)
        results["new_image_rerun_vs_one_image_run"] = round(min(reruns) / min(runs), 2)
        print(json.dumps({"benchmark": "new_image_in_a_folder", "folder_images": args.folder_images,
                          "folder_run_seconds": results["folder_run_seconds"],
                          "new_image_rerun_seconds": results["new_image_rerun_seconds"]}), flush=True)

    if args.breakdown:
        done = subprocess.run([sys.executable, "-c", BREAKDOWN], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=900)
        if done.returncode != 0:
            sys.exit(f"the start-up breakdown failed:\n{done.stderr[-3000:]}")
        interpreter = min(timed([sys.executable, "-c", "pass"], env, ROOT) for _ in range(3))
        replica = min(timed([sys.executable, "-c", REPLICA_IMPORTS], env, ROOT) for _ in range(2))
        steps = {"python_interpreter": round(interpreter, 2), **json.loads(done.stdout.strip().splitlines()[-1]),
                 "replica_imports_torch_and_stages_alone": round(replica - interpreter, 2)}
        print(json.dumps({"benchmark": "startup_breakdown", "seconds": steps}), flush=True)
    print(json.dumps({"summary": results, "repeats": args.repeats, "command": shlex.join(segpipe),
                      "precision": args.precision}))


if __name__ == "__main__":
    main()
