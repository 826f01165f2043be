"""Mistakes caught before anything starts: each refused in one line naming the option as it
is typed, exit code 2, before Prefect, Ray or torch are imported, and nothing written."""

from __future__ import annotations

import io
import json
import os
import pickle
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from flows._storage import resolve_storage_options
from pipeline.config import EvaluateConfig, SegmentConfig, TrainConfig
from pipeline.models import ModelMeta, build_model, load_checkpoint, save_checkpoint
from pipeline.preflight import (
    CHECKPOINT_FORMAT,
    IMAGENET_BACKBONES,
    LAYOUT_FORMAT,
    LAYOUT_KEY,
    PUBLISHED_WEIGHTS,
    PreflightError,
    check_evaluate,
    check_segment,
    check_serve,
    check_train,
    hub_cache_path,
    read_checkpoint,
    resume_point,
    undated_folder,
)
from pipeline.samples import synthetic_scene

ROOT = Path(__file__).resolve().parents[1]
# the command line in a fresh interpreter, which then says which of the heavy packages it imported
_RUN = ("import sys; from flows.cli import main; code = main(sys.argv[1:]); "
        "print('imported:', [m for m in ('torch', 'ray', 'prefect') if m in sys.modules]); sys.exit(code)")


def _segpipe(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[str], str]:
    """Exit code, stderr lines, and the heavy packages the command imported."""
    done = subprocess.run([sys.executable, "-c", _RUN, *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=env if env is not None else os.environ.copy())
    imported = next(line for line in done.stdout.splitlines() if line.startswith("imported:"))
    return done.returncode, done.stderr.splitlines(), imported


def _refused(args: list[str], *expected: str, env: dict[str, str] | None = None) -> str:
    """Run a command that must be refused before anything starts; its one line."""
    code, lines, imported = _segpipe(*args, env=env)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("segpipe: error: "), lines
    for text in expected:
        assert text in lines[0], lines[0]
    assert imported == "imported: []", f"{imported} before the error"
    assert "Value error" not in lines[0]
    return lines[0]


@pytest.fixture
def source(tmp_path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    Image.fromarray(synthetic_scene(20, 24, 0)[0]).save(folder / "a.png")
    return folder


def _checkpoint(path: Path, num_classes: int = 3, *, epoch: int | None = None,
                best: tuple[str, int, str] | None = None, training: dict | None = None,
                history: list[dict] | None = None) -> str:
    """A small real checkpoint, written the way segpipe train writes one (`best`: a last
    epoch's, naming its run's best file beside it, that best's epoch and its digest; `history`:
    its run's epochs)."""
    model = build_model("lraspp_mobilenet_v3_large", num_classes=num_classes)
    state = {"epoch": epoch, "optimizer": {"state": {}, "param_groups": [{"lr": 0.01}]},
             "history": history or []} if epoch else None
    if best is not None:
        state |= dict(zip(("best_checkpoint", "best_epoch", "best_digest"), best, strict=True))
    extra = {"training": {"optimizer": "sgd"} | (training or {}), "epoch": epoch} if epoch else {}
    if history is not None:
        extra["history"] = history
    save_checkpoint(model, str(path), ModelMeta.default("lraspp_mobilenet_v3_large", num_classes, extra=extra),
                    training_state=state)
    return str(path)


def _offline(monkeypatch, env: dict[str, str]) -> None:
    """This process offline as `env` (a proxy at a closed port) is: only torch.hub's cache can
    let weights pass a check then."""
    for name in {"no_proxy", "NO_PROXY", "http_proxy", "HTTP_PROXY", "https_proxy"} - set(env):
        monkeypatch.delenv(name, raising=False)
    for name in ("TORCH_HOME", "HTTPS_PROXY"):
        monkeypatch.setenv(name, env[name])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_imagenet_init_offline_fails_at_once_and_says_what_to_do(source, tmp_path, monkeypatch) -> None:
    """`train --init imagenet` downloads the backbone's ImageNet weights in each training
    worker: offline, that was a traceback and exit 1 after the cluster had started."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in {"no_proxy", "https_proxy", "http_proxy"}}
    env |= {"TORCH_HOME": str(tmp_path / "torch"), "HTTPS_PROXY": f"http://127.0.0.1:{_closed_port()}"}
    cache = tmp_path / "torch" / "hub" / "checkpoints" / "mobilenet_v3_large-5c1a4163.pth"
    output = tmp_path / "m.pt"
    line = _refused(["train", str(source), str(source), str(output), "--model", "lraspp_mobilenet_v3_large",
                     "--num-classes", "3", "--init", "imagenet"],
                    "the ImageNet weights of lraspp_mobilenet_v3_large's backbone (--init imagenet): cannot download them",
                    f"copy that file to {cache}", "or --init none (random)", env=env)
    assert IMAGENET_BACKBONES["lraspp_mobilenet_v3_large"] in line
    assert not output.exists()
    # once the file is in the cache, the check passes (and nothing is downloaded)
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"")
    _offline(monkeypatch, env)
    check_train(TrainConfig(images=str(source), labels=str(source), output=str(output), model="lraspp_mobilenet_v3_large",
                            num_classes=3, init="ImageNet"))  # the keyword in any case
    assert TrainConfig(images="i", labels="l", output="m.pt", model="fcn_resnet50", num_classes=2, init="None").init == "none"


def test_a_folder_is_looked_through_for_its_kind_up_to_a_limit(source, tmp_path, monkeypatch) -> None:
    """Past FOLDER_SCAN_LIMIT files of other kinds the check stops and lets the job list the
    rest (a mask may come later in key order); within it, a folder of none is refused."""
    import pipeline.preflight as preflight

    monkeypatch.setattr(preflight, "FOLDER_SCAN_LIMIT", 2)
    truth = tmp_path / "gt"
    truth.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(synthetic_scene(20, 24, 0)[0]).save(truth / name)
    config = EvaluateConfig(predictions=str(source), ground_truth=str(truth), output=str(tmp_path / "report"), num_classes=2)
    check_evaluate(config)
    (truth / "b.jpg").unlink()
    with pytest.raises(PreflightError, match=r"holds no masks, only 1 other file such as a.jpg: nothing to score$"):
        check_evaluate(config)
    (truth / "z.png").write_bytes((source / "a.png").read_bytes())  # a mask after it, within the limit
    check_evaluate(config)


def test_weights_none_without_num_classes(source, tmp_path) -> None:
    line = _refused(["segment", str(source), str(tmp_path / "out"), "--weights", "none"],
                    "--weights none needs --num-classes")
    assert "num_classes" not in line and "weights=none" not in line  # the options as typed, not the fields
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_whose_classes_disagree_with_num_classes_writes_nothing(source, tmp_path) -> None:
    weights = _checkpoint(tmp_path / "m.pt", 3)
    out = tmp_path / "out"
    line = _refused(["segment", str(source), str(out), "--weights", weights, "--num-classes", "5"],
                    f"--num-classes 5 but --weights {weights} has 3 classes; pass --num-classes 3")
    assert "leave it out" in line
    assert not (out / LAYOUT_KEY).exists() and not out.exists()
    # a model other than the checkpoint's, and names for other classes, are refused the same way
    _refused(["segment", str(source), str(out), "--weights", weights, "--model", "fcn_resnet50"],
             "holds a lraspp_mobilenet_v3_large model, not --model fcn_resnet50; pass --model lraspp_mobilenet_v3_large")
    _refused(["segment", str(source), str(out), "--weights", weights, "--class-names", "road", "car"],
             f"2 --class-names for the 3 classes of --weights {weights}")
    assert not out.exists()


def test_the_default_model_offline_fails_at_once_and_says_what_to_do(source, tmp_path, monkeypatch) -> None:
    # an empty torch.hub cache, and a proxy that refuses every connection: offline, wherever the test runs
    env = {k: v for k, v in os.environ.items() if k.lower() not in {"no_proxy", "https_proxy", "http_proxy"}}
    env |= {"TORCH_HOME": str(tmp_path / "torch"), "HTTPS_PROXY": f"http://127.0.0.1:{_closed_port()}"}
    cache = tmp_path / "torch" / "hub" / "checkpoints" / "deeplabv3_resnet101_coco-586e9e4e.pth"
    line = _refused(["segment", str(source), str(tmp_path / "out")],
                    "the weights of deeplabv3_resnet101 (--weights DEFAULT): cannot download them",
                    f"copy that file to {cache}", "--weights none with --num-classes", env=env)
    assert PUBLISHED_WEIGHTS["deeplabv3_resnet101"].url in line
    assert not (tmp_path / "out").exists()
    # once the file is in the cache, the weights pass (and nothing is downloaded)
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"")
    _offline(monkeypatch, env)
    check_segment(SegmentConfig(source=str(source), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_s3_without_credentials_says_how_to_give_them(s3_bucket, s3_endpoint, tmp_path) -> None:
    bucket, options = s3_bucket
    import s3fs

    s3fs.S3FileSystem(**options).pipe_file(f"{bucket[5:]}/in/a.png", b"not read")
    # no credentials anywhere: not in the environment, no ~/.aws, no instance metadata
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "SEGPIPE_STORAGE_OPTIONS"}
    env |= {"HOME": str(tmp_path), "AWS_ENDPOINT_URL": s3_endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
    line = _refused(["segment", f"{bucket}/in", f"{bucket}/out", "--weights", "none", "--num-classes", "2"],
                    f"no credentials for SOURCE {bucket}/in", "AWS_ACCESS_KEY_ID", "--storage-options",
                    "--storage-secret", '{"anon": true}', env=env)
    assert "Traceback" not in line
    # with credentials in the environment the same command passes its checks
    check_segment(SegmentConfig(source=f"{bucket}/in", output=f"{bucket}/out", weights="none", num_classes=2,
                                storage_options=options))
    assert not s3fs.S3FileSystem(**options).exists(f"{bucket[5:]}/out/{LAYOUT_KEY}")


def test_an_s3_endpoint_that_refuses_connections_is_refused_at_the_first_attempt(tmp_path) -> None:
    """A mistyped endpoint (nothing listens on port 1): one line naming the endpoint setting,
    from the first attempt, not from `retry_io`'s five with their backoff."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b", "AWS_ENDPOINT_URL": "http://127.0.0.1:1",
            "AWS_EC2_METADATA_DISABLED": "true"}
    line = _refused(["segment", "s3://survey/2026-11-20/", str(tmp_path / "out"), "--weights", "none",
                     "--num-classes", "2"], "cannot reach SOURCE s3://survey/2026-11-20", "cannot connect",
                    "EndpointConnectionError", "AWS_ENDPOINT_URL", env=env)
    assert "attempts" not in line
    assert not (tmp_path / "out").exists()


def test_remote_urls_are_left_to_the_flow_when_credentials_are_in_a_secret_block(tmp_path) -> None:
    """--storage-secret: only Prefect can read the block, so the command line leaves remote
    URLs to the flow's own check; local ones are still checked."""
    config = SegmentConfig(source="s3://nobody-has-this-bucket/in", output=str(tmp_path / "out"), weights="none",
                           num_classes=2)
    check_segment(config, remote=False)
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(PreflightError, match="cannot write to OUTPUT"):
        check_segment(config.model_copy(update={"output": str(tmp_path / "a-file" / "out")}), remote=False)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_where_nothing_can_be_made_is_refused_even_for_root(source, tmp_path) -> None:
    """/proc passes access() for root (as CI runs), but no folder can be made there: the check
    tries, so the mistake is one line before anything starts, for root and others alike."""
    _refused(["segment", str(source), "/proc/segpipe-out", "--weights", "none", "--num-classes", "2"],
             "cannot write to OUTPUT /proc/segpipe-out: /proc is not writable")
    _refused(["train", str(source), str(source), "/proc/segpipe-model.pt", "--model", "unet_resnet34", "--num-classes", "2"],
             "cannot write to OUTPUT /proc/segpipe-model.pt: /proc is not writable")
    # where it can write, the check leaves nothing behind
    out = tmp_path / "out"
    out.mkdir()
    check_segment(SegmentConfig(source=str(source), output=str(out), weights="none", num_classes=2))
    assert list(out.iterdir()) == []


def test_a_misspelled_model_names_the_closest(source, tmp_path) -> None:
    _refused(["segment", str(source), str(tmp_path / "out"), "--model", "deeplabv3_resnet10"],
             "--model: unknown model 'deeplabv3_resnet10' (did you mean deeplabv3_resnet101?)")
    _refused(["train", str(source), str(source), str(tmp_path / "m.pt"), "--model", "unet_resnet", "--num-classes", "2"],
             "--model: unknown model 'unet_resnet' (did you mean unet_resnet34?)")


def test_source_output_and_layout(source, tmp_path) -> None:
    line = _refused(["segment", str(tmp_path / "nowhere"), str(tmp_path / "out"), "--weights", "none", "--num-classes",
                     "2"], f"SOURCE {tmp_path / 'nowhere'} is not a folder that exists")
    assert line.endswith("exists")
    # a slash short of an S3 URL is a local path to fsspec: the URL meant is named
    _refused(["segment", "s3:/survey/ortho", str(tmp_path / "out"), "--weights", "none", "--num-classes", "2"],
             "s3:/survey/ortho is not a folder that exists; did you mean s3://survey/ortho?")
    (tmp_path / "a-file").write_text("not a folder")
    # a file given as SOURCE: its folder named, the path tidied
    _refused(["segment", f"{source}/../a-file", str(tmp_path / "out"), "--weights", "none", "--num-classes", "2"],
             f"SOURCE {tmp_path / 'a-file'} is a file; give the folder that holds it ({tmp_path})")
    _refused(["segment", str(source), str(tmp_path / "a-file" / "out"), "--weights", "none", "--num-classes", "2"],
             f"cannot write to OUTPUT {tmp_path / 'a-file' / 'out'}: {tmp_path / 'a-file'} is a file, not a folder")
    # an OUTPUT written from this SOURCE with other shards: refused, and its record left as it was
    out = tmp_path / "out"
    out.mkdir()
    record = {"format": LAYOUT_FORMAT, "source": str(source), "shard_by": "directory", "shard_size": 1000}
    (out / LAYOUT_KEY).write_text(json.dumps(record))
    _refused(["segment", str(source), str(out), "--weights", "none", "--num-classes", "2", "--shard-size", "50"],
             "was sharded with --shard-size 1000, not 50; pass --shard-size 1000 or use a new OUTPUT")
    assert json.loads((out / LAYOUT_KEY).read_text()) == record
    other = tmp_path / "other"
    other.mkdir()
    _refused(["segment", str(other), str(out), "--weights", "none", "--num-classes", "2"],
             f"holds the results of SOURCE {source}, not of {other}")
    check_segment(SegmentConfig(source=str(source), output=str(out), weights="none", num_classes=2))  # the same: fine
    # a local OUTPUT whose record cannot be read: said as the filesystem's error, with no advice
    # about an object store's endpoint
    broken = tmp_path / "broken"
    (broken / LAYOUT_KEY).mkdir(parents=True)
    with pytest.raises(PreflightError) as refused:
        check_segment(SegmentConfig(source=str(source), output=str(broken), weights="none", num_classes=2))
    assert str(refused.value).startswith(f"cannot read OUTPUT {broken}: IsADirectoryError: "), refused.value
    assert "AWS_ENDPOINT_URL" not in str(refused.value)


def test_an_output_segpipe_did_not_write_is_refused(source, tmp_path) -> None:
    """A folder holding tables without segpipe's layout record (another tool's work folder)
    was written into, and pyarrow's dataset of OUTPUT/images then failed on its files. Masks
    alone, from a first run stopped before it committed anything, are segpipe's own."""
    foreign = tmp_path / "work_dir"
    (foreign / "images").mkdir(parents=True)
    (foreign / "images" / "foo.txt").write_text("x")
    _refused(["segment", str(source), str(foreign), "--weights", "none", "--num-classes", "2"],
             f"OUTPUT {foreign} holds images/foo.txt, but no {LAYOUT_KEY}: segpipe did not write it (it records that "
             "before its tables); use a new OUTPUT, or an empty one")
    assert sorted(p.name for p in foreign.rglob("*")) == ["foo.txt", "images"]
    stopped = tmp_path / "stopped"
    (stopped / "masks" / "d0").mkdir(parents=True)
    (stopped / "masks" / "d0" / "a.png").write_bytes(b"mask")
    check_segment(SegmentConfig(source=str(source), output=str(stopped), weights="none", num_classes=2))


def test_evaluate_and_train_are_checked_before_they_start(source, tmp_path) -> None:
    _refused(["evaluate", str(source), str(tmp_path / "gt"), str(tmp_path / "report"), "--num-classes", "2"],
             f"GROUND_TRUTH {tmp_path / 'gt'} is not a folder that exists")
    (tmp_path / "gt").mkdir()  # an empty night's folder
    _refused(["evaluate", str(source), str(tmp_path / "gt"), str(tmp_path / "report"), "--num-classes", "2"],
             f"GROUND_TRUTH {tmp_path / 'gt'} holds no masks: nothing to score")
    _refused(["evaluate", str(tmp_path / "gt"), str(source), str(tmp_path / "report"), "--num-classes", "2"],
             f"PREDICTIONS {tmp_path / 'gt'} holds no masks: nothing to score")
    # the images given for the masks (the likeliest wrong folder), or masks for the images: no pair could be made
    (tmp_path / "jpegs" / "day1").mkdir(parents=True)
    for name in ("b.jpg", "day1/a.jpg"):
        Image.fromarray(synthetic_scene(20, 24, 0)[0]).save(tmp_path / "jpegs" / name)
    _refused(["evaluate", str(source), str(tmp_path / "jpegs"), str(tmp_path / "report"), "--num-classes", "2"],
             f"GROUND_TRUTH {tmp_path / 'jpegs'} holds no masks, only 2 other files such as b.jpg: nothing to score")
    (tmp_path / "no-images").mkdir()
    (tmp_path / "no-images" / "notes.txt").write_text("")
    _refused(["train", str(tmp_path / "no-images"), str(source), str(tmp_path / "m.pt"), "--model",
              "lraspp_mobilenet_v3_large", "--num-classes", "2"],
             f"IMAGES {tmp_path / 'no-images'} holds no images, only 1 other file such as notes.txt: nothing to train on")
    _refused(["train", str(source), str(tmp_path / "jpegs"), str(tmp_path / "m.pt"), "--model",
              "lraspp_mobilenet_v3_large", "--num-classes", "2"],
             f"LABELS {tmp_path / 'jpegs'} holds no label masks, only 2 other files such as b.jpg: nothing to train on")
    # the masks of a segpipe OUTPUT with fewer classes than its model's: every pair holding a
    # class past them would be left out (exit 0, a report of the rest)
    segmented = tmp_path / "segmented"
    (segmented / "masks").mkdir(parents=True)
    (segmented / "_runs").mkdir()
    (segmented / "_segpipe.json").write_text("{}")
    (segmented / "_runs" / "20261122T040000Z-1a2b3c.json").write_text(json.dumps({"class_names": ["sky", "road", "car"]}))
    (segmented / "masks" / "a.png").write_bytes((source / "a.png").read_bytes())
    _refused(["evaluate", str(segmented / "masks"), str(source), str(tmp_path / "report"), "--num-classes", "2"],
             f"--num-classes 2: PREDICTIONS {segmented / 'masks'} are the masks of a model of 3 classes (its OUTPUT's "
             "newest run record); pass --num-classes 3, or more where the ground truth has classes it lacks")
    for enough in (3, 4):
        check_evaluate(EvaluateConfig(predictions=str(segmented / "masks"), ground_truth=str(source),
                                      output=str(tmp_path / "report"), num_classes=enough))
    # a report inside the masks it scores: the next evaluation would list its files as masks
    _refused(["evaluate", str(source), str(source), str(source / "report"), "--num-classes", "2"],
             f"OUTPUT {source / 'report'} is inside PREDICTIONS {source}", "write OUTPUT outside PREDICTIONS")
    _refused(["evaluate", str(source), str(tmp_path / "gt"), str(tmp_path / "gt"), "--num-classes", "2"],
             f"OUTPUT {tmp_path / 'gt'} is GROUND_TRUTH")
    assert not (source / "report").exists()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(PreflightError, match="cannot write to OUTPUT"):
        check_evaluate(EvaluateConfig(predictions=str(source), ground_truth=str(source),
                                      output=str(tmp_path / "a-file" / "report"), num_classes=2))
    train = ["train", str(source), str(source), str(tmp_path / "m.pt"), "--model", "lraspp_mobilenet_v3_large"]
    _refused([*train[:2], str(tmp_path / "labels"), *train[3:], "--num-classes", "2"],
             f"LABELS {tmp_path / 'labels'} is not a folder that exists")
    resumed = _checkpoint(tmp_path / "resume.pt", 3, epoch=4)
    _refused([*train, "--num-classes", "5", "--resume", resumed],
             f"--resume {resumed} trains a lraspp_mobilenet_v3_large model of 3 classes; pass --model "
             "lraspp_mobilenet_v3_large --num-classes 3")
    _refused([*train, "--num-classes", "3", "--resume", resumed, "--epochs", "4"], "already trained 4 epochs")
    _refused([*train, "--num-classes", "3", "--resume", resumed, "--epochs", "6", "--optimizer", "adamw"],
             f"--resume {resumed} was trained with --optimizer sgd, whose state it goes on from; pass --optimizer sgd")
    _refused([*train, "--num-classes", "3", "--init", "fcn_resnet50.pt"], "--init fcn_resnet50.pt: no such file")
    _refused([*train, "--num-classes", "3", "--init", "imagenett"],  # a typo: the values --init takes besides are named
             "unknown --init imagenett for --model lraspp_mobilenet_v3_large", "or --init none (random) or imagenet")
    _refused([*train[:-1], "pspnet_resnet50", "--num-classes", "3", "--init", "COCO_WITH_VOC_LABELS_V1"],
             "--model pspnet_resnet50 has no published weights to load as --init COCO_WITH_VOC_LABELS_V1")
    check_train(TrainConfig(images=str(source), labels=str(source), output=str(tmp_path / "m.pt"),
                            model="lraspp_mobilenet_v3_large", num_classes=3, resume=resumed, epochs=6))
    # a best chosen by validation mIoU is not compared with training mIoU on resume: left out,
    # the validation set is the checkpoint's; given otherwise, refused
    validated = _checkpoint(tmp_path / "validated.pt", 3, epoch=4, training={"val_last": 2})
    check_train(TrainConfig(images=str(source), labels=str(source), output=str(tmp_path / "v.pt"),
                            model="lraspp_mobilenet_v3_large", num_classes=3, resume=validated, epochs=6))
    _refused([*train, "--num-classes", "3", "--resume", validated, "--epochs", "6", "--val-last", "0"],
             f"--resume {validated} chose its best epoch by validation mIoU; resume with its --val-last 2, so that "
             "epochs are compared by the same score")
    folders = _checkpoint(tmp_path / "folders.pt", 3, epoch=4, training={"val_images": str(source), "val_labels": str(source)})
    _refused([*train, "--num-classes", "3", "--resume", folders, "--epochs", "6", "--val-last", "0"],
             f"resume with its --val-images {source} --val-labels {source}, so that")
    # the validation set taken from the checkpoint is checked as one given: here, it is gone
    gone = _checkpoint(tmp_path / "gone.pt", 3, epoch=4, training={"val_images": str(tmp_path / "gone"),
                                                                  "val_labels": str(source)})
    _refused([*train, "--num-classes", "3", "--resume", gone, "--epochs", "6"],
             f"--val-images {tmp_path / 'gone'} is not a folder that exists")
    unvalidated = _checkpoint(tmp_path / "unvalidated.pt", 3, epoch=4, training={"val_last": 0})
    _refused([*train, "--num-classes", "3", "--resume", unvalidated, "--epochs", "6", "--val-last", "1"],
             "chose its best epoch by training mIoU; resume without a validation set")

    # a new run replaces no checkpoint, the best's or the last epoch's, unless told to
    # (--resume named only where there is a last epoch's checkpoint to resume)
    new_run = TrainConfig(images=str(source), labels=str(source), output=str(tmp_path / "m.pt"),
                          model="lraspp_mobilenet_v3_large", num_classes=3)
    for existing, go_on in (("m.pt", ""), ("m.last.pt", f"--resume {tmp_path / 'm.last.pt'} to go on training it, ")):
        (tmp_path / existing).write_bytes(b"the weights a nightly segment reads")
        _refused([*train, "--num-classes", "3"],
                 f"{tmp_path / existing} exists, and this run would replace it: pass {go_on}--overwrite to replace it, "
                 "or another OUTPUT")
        check_train(new_run.model_copy(update={"overwrite": True}))
        (tmp_path / existing).unlink()
    # nor does a resumed run write over a checkpoint of another run (its best is copied to OUTPUT first)
    (tmp_path / "m.pt").write_bytes(b"the weights a nightly segment reads")
    _refused([*train, "--num-classes", "3", "--resume", resumed, "--epochs", "6"],
             f"{tmp_path / 'm.pt'} exists, and this run would replace it: pass --overwrite to replace it")
    check_train(new_run.model_copy(update={"resume": resumed, "epochs": 6, "overwrite": True}))
    (tmp_path / "m.pt").unlink()

    # a last epoch's checkpoint goes on with its run's best, which must still be there and be it
    (tmp_path / "runs").mkdir()
    best = tmp_path / "runs" / "m.pt"
    _checkpoint(best, 3, epoch=3)
    written = best.read_bytes()
    last = _checkpoint(tmp_path / "runs" / "m.last.pt", 3, epoch=4, best=("m.pt", 3, read_checkpoint(str(best), {}, "x").digest))
    best.unlink()

    def resuming(output: Path) -> list[str]:
        return [*train[:3], str(output), *train[4:], "--num-classes", "3", "--resume", last, "--epochs", "6"]

    _refused(resuming(tmp_path / "other.pt"), f"--resume {last} goes on with its run's best epoch (3) in {best}, "
             "which cannot be read; put it back, or resume from another checkpoint")
    _refused(resuming(best), "which cannot be read")  # into its own OUTPUT too: a best that is gone is lost
    _checkpoint(best, 3, epoch=3)  # written over by another run since, at the same epoch
    _refused(resuming(best), f"{best}, which was written over since (it now holds epoch 3); pass --resume {best} to go "
             "on from that one instead")
    # written over by that run's next epoch, which a run stopped between its two writes leaves:
    # gone on from (its history goes on from the last epoch's); any other run's is refused
    (tmp_path / "stopped").mkdir()
    epochs = [{"epoch": epoch, "val_miou": epoch / 10} for epoch in range(1, 6)]
    stopped_best = _checkpoint(tmp_path / "stopped" / "m.pt", 3, epoch=3, history=epochs[:3])
    stopped = _checkpoint(tmp_path / "stopped" / "m.last.pt", 3, epoch=4, history=epochs[:4],
                          best=("m.pt", 3, read_checkpoint(stopped_best, {}, "x").digest))
    _checkpoint(Path(stopped_best), 3, epoch=5, history=epochs)
    going_on = TrainConfig(images=str(source), labels=str(source), output=stopped_best,
                           model="lraspp_mobilenet_v3_large", num_classes=3, resume=stopped, epochs=6)
    assert resume_point(going_on) == (going_on.model_copy(update={"resume": stopped_best}), (
        f"--resume {stopped}: its run went on to epoch 5 (its best, in {stopped_best}) and was stopped before writing it "
        f"to {stopped}; going on from {stopped_best}"))
    check_train(going_on)
    _refused([*train[:3], stopped_best, *train[4:], "--num-classes", "3", "--resume", stopped, "--epochs", "5"],
             f"--resume {stopped_best} already trained 5 epochs")
    _checkpoint(Path(stopped_best), 3, epoch=5, history=[{"epoch": 1, "val_miou": 0.9}, *epochs[1:]])
    assert resume_point(going_on) == (going_on, None)
    with pytest.raises(PreflightError, match="which was written over since"):
        check_train(going_on)
    # more than one epoch on (a .last put back from a backup): no stop leaves that, refused
    _checkpoint(Path(stopped_best), 3, epoch=6, history=[*epochs, {"epoch": 6, "val_miou": 0.6}])
    assert resume_point(going_on.model_copy(update={"epochs": 8})) == (going_on.model_copy(update={"epochs": 8}), None)
    best.write_bytes(written)
    _refused(resuming(tmp_path / "runs" / "m.last.pt"),
             f"OUTPUT {last} is the --resume checkpoint, the last epoch's of a run whose best is {best}; pass that as OUTPUT")
    for output in (best, tmp_path / "other.pt"):  # its own OUTPUT, or another one the best is copied to
        check_train(TrainConfig(images=str(source), labels=str(source), output=str(output),
                                model="lraspp_mobilenet_v3_large", num_classes=3, resume=last, epochs=6))


def test_checkpoint_metadata_is_read_without_its_tensors_or_running_code(tmp_path) -> None:
    weights = _checkpoint(tmp_path / "m.pt", 3, epoch=2)
    summary = read_checkpoint(weights, {}, "--weights")
    assert (summary.architecture, summary.num_classes, summary.trained_epochs) == ("lraspp_mobilenet_v3_large", 3, 2)
    assert summary.class_names == ("class_0", "class_1", "class_2")
    # saved without the digest, which describes the file it is read from
    assert summary.meta == ModelMeta.default("lraspp_mobilenet_v3_large", 3, extra={"training": {"optimizer": "sgd"}, "epoch": 2}
                                             ).model_dump(mode="json", exclude={"weights_digest"})
    assert len(summary.digest) == 16 and summary.digest != read_checkpoint(_checkpoint(tmp_path / "n.pt", 4), {}, "x").digest
    # without its CRC-32s a checkpoint's weights could change unseen: refused, by torch's reading too
    torch.serialization.set_crc32_options(False)
    try:
        unchecked = _checkpoint(tmp_path / "unchecked.pt", 3)
    finally:
        torch.serialization.set_crc32_options(True)
    with pytest.raises(PreflightError, match=r"--weights .*unchecked.pt: it was saved without CRC-32 checksums"):
        read_checkpoint(unchecked, {}, "--weights")
    with pytest.raises(ValueError, match="saved without CRC-32 checksums"):
        load_checkpoint(unchecked)
    # a pickle that would run a command is refused, and the command never runs
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"format": CHECKPOINT_FORMAT, "meta": Payload()}))
    with pytest.raises(PreflightError, match="is not a plain tensor checkpoint"):
        read_checkpoint(str(evil), {}, "--weights")
    assert not marker.exists()
    (tmp_path / "plain.pt").write_bytes(pickle.dumps({"format": CHECKPOINT_FORMAT}))
    with pytest.raises(PreflightError, match="is not a segpipe checkpoint"):
        read_checkpoint(str(tmp_path / "plain.pt"), {}, "--weights")


def test_a_checkpoint_is_read_by_its_metadata_alone(tmp_path, monkeypatch) -> None:
    """Kilobytes of a checkpoint's megabytes: on object storage a range read, not its weights."""
    from fsspec.implementations.local import LocalFileOpener

    weights = _checkpoint(tmp_path / "m.pt", 3)
    read = []
    original = LocalFileOpener.read
    monkeypatch.setattr(LocalFileOpener, "read", lambda self, *a, **k: read.append(original(self, *a, **k)) or read[-1])
    assert read_checkpoint(weights, {}, "--weights").num_classes == 3
    assert 0 < sum(map(len, read)) < os.path.getsize(weights) / 10


def test_a_checkpoint_on_s3_is_read_by_its_metadata(s3_bucket) -> None:
    bucket, options = s3_bucket
    url = f"{bucket}/models/m.pt"
    save_checkpoint(build_model("lraspp_mobilenet_v3_large", num_classes=2), url,
                    ModelMeta.default("lraspp_mobilenet_v3_large", 2, class_names=("sea", "land")), storage_options=options)
    summary = read_checkpoint(url, options, "--weights")
    assert (summary.architecture, summary.class_names, summary.trained_epochs) == ("lraspp_mobilenet_v3_large",
                                                                                   ("sea", "land"), None)
    with pytest.raises(PreflightError, match=f"--weights {bucket}/models/other.pt: no such file"):
        read_checkpoint(f"{bucket}/models/other.pt", options, "--weights")


def test_class_names_name_the_classes_of_weights_without_names(tmp_path) -> None:
    weights = _checkpoint(tmp_path / "m.pt", 3)
    model = build_model(None, weights=weights, class_names=("road", "car", "tree"))
    assert model.meta.class_names == ("road", "car", "tree")
    assert build_model("unet_resnet34", num_classes=2, class_names=["sea", "land"]).meta.class_names == ("sea", "land")
    with pytest.raises(ValueError, match="2 class_names for the 3 classes"):
        build_model(None, weights=weights, class_names=("road", "car"))


def test_the_tables_kept_beside_the_checks_agree_with_their_sources(tmp_path, monkeypatch) -> None:
    """Published weights, torch.hub's cache, the checkpoint and layout formats: read here without torch."""
    import torchvision.models._api as torchvision_api
    from torchvision.models import get_model_weights

    from pipeline.models import _registry, weights
    from pipeline.outputs import LAYOUT_FORMAT as WRITTEN
    from pipeline.training import build_training_model

    published = {n: s.torchvision_name for n, s in _registry._REGISTRY.items() if s.torchvision_name}
    assert set(PUBLISHED_WEIGHTS) == set(published)
    for name, tv_name in published.items():
        enum = get_model_weights(tv_name)
        entry = PUBLISHED_WEIGHTS[name]
        assert (entry.enum, set(entry.members)) == (enum.__name__, set(enum.__members__))
        assert {(m.url, len(m.meta["categories"])) for m in enum} == {(entry.url, entry.num_classes)}
        # what a run's model is (pipeline.run.model_meta): the member every name selects, and its meaning
        for member in entry.members:
            weights_ = enum[member]
            transforms = weights_.transforms()
            assert (weights_.name, tuple(weights_.meta["categories"])) == (entry.name, entry.categories)
            assert (list(transforms.resize_size), tuple(transforms.mean), tuple(transforms.std)) == (
                [entry.resize_size], entry.mean, entry.std)
    # what --init imagenet downloads: torchvision's fetch is stopped at the URL it asks for
    asked: list[str] = []

    class Asked(Exception):
        pass

    def fetch(url: str, *args, **kwargs):
        asked.append(url)
        raise Asked

    monkeypatch.setattr(torchvision_api, "load_state_dict_from_url", fetch)
    assert set(IMAGENET_BACKBONES) == set(_registry._REGISTRY)
    for name, url in IMAGENET_BACKBONES.items():
        asked.clear()
        with pytest.raises(Asked):
            build_training_model(TrainConfig(images="i", labels="l", output="m.pt", model=name, num_classes=2, init="imagenet"))
        assert asked == [url], name
    assert LAYOUT_FORMAT == WRITTEN and weights.CHECKPOINT_FORMAT == CHECKPOINT_FORMAT
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert hub_cache_path("https://x/y/w.pth") == os.path.join(torch.hub.get_dir(), "checkpoints", "w.pth")
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT}, buffer)
    assert zipfile.is_zipfile(buffer)  # what read_checkpoint relies on


def test_serve_checks_the_folder_that_holds_the_nights() -> None:
    """SOURCE and OUTPUT up to their {date}: a relative one without a folder before it is the
    current folder (not the filesystem's root, which a user may not write to)."""
    assert undated_folder("s3://cams/{date}/") == "s3://cams/"
    assert undated_folder("s3://out/segpipe/date={date}/") == "s3://out/segpipe/"
    assert undated_folder("/data/cams/{date}") == "/data/cams/"
    assert undated_folder("/{date}/") == "/"
    assert undated_folder("date={date}/") == "."
    assert undated_folder("s3://cams/all/") == "s3://cams/all/"  # no {date}: the URL itself


def test_an_output_in_its_source_is_refused(source, tmp_path, monkeypatch) -> None:
    """Every run would list the masks the one before wrote as images: OUTPUT equal to SOURCE,
    or inside it (also as a relative path, and for serve's {date} folders), is one line."""
    untrained = ["--weights", "none", "--num-classes", "2"]
    _refused(["segment", str(source), str(source / "out"), *untrained], f"OUTPUT {source / 'out'} is inside SOURCE")
    _refused(["segment", f"{source}/", str(source), *untrained], f"OUTPUT {source} is SOURCE")
    monkeypatch.chdir(tmp_path)
    _refused(["segment", "src", "src/night/out", *untrained], "OUTPUT src/night/out is inside SOURCE src")
    # as the filesystem resolves it: through `..`, and through a symbolic link either way
    (tmp_path / "elsewhere").mkdir()
    dotted, link = f"{tmp_path}/elsewhere/../src/out", tmp_path / "link"
    _refused(["segment", str(source), dotted, *untrained], f"OUTPUT {dotted} is inside SOURCE {source}")
    link.symlink_to(source)
    _refused(["segment", str(source), f"{link}/out", *untrained], f"OUTPUT {link}/out is inside SOURCE {source}")
    _refused(["segment", str(link), f"{source}/out", *untrained], f"OUTPUT {source}/out is inside SOURCE {link}")
    with pytest.raises(PreflightError, match=r"OUTPUT .*/\{date\}/out is inside SOURCE"):
        check_serve(SegmentConfig(source=f"{source}/{{date}}", output=f"{source}/{{date}}/out", weights="none",
                                  num_classes=2))
    assert not (source / "out").exists() and sorted(p.name for p in source.iterdir()) == ["a.png"]
    # beside it, or a folder whose name only begins like it, is fine
    check_segment(SegmentConfig(source=str(source), output=f"{source}-out", weights="none", num_classes=2))


def test_a_misspelled_storage_option_is_one_line(s3_bucket) -> None:
    bucket, options = s3_bucket
    with pytest.raises(PreflightError, match=r"^--storage-options: SOURCE .* cannot be opened with them: .*'ky'"):
        check_segment(SegmentConfig(source=f"{bucket}/in", output=f"{bucket}/out", weights="none", num_classes=2,
                                    storage_options={**options, "ky": "typo"}))


def test_an_object_given_as_an_s3_folder_is_refused_as_a_local_file_is(source, s3_bucket, s3_endpoint, tmp_path) -> None:
    """SOURCE naming an object, not the prefix that holds it: listed as a folder, it held
    nothing, and the run ended 'nothing to do' with exit 0 and a run record in OUTPUT."""
    import s3fs

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    mosaic = f"{bucket}/orthophotos/mosaic/loveda_mosaic.tif"
    fs.pipe_file(mosaic[5:], b"a mosaic")
    env = os.environ | {"AWS_ENDPOINT_URL": s3_endpoint}
    out = tmp_path / "out"
    _refused(["segment", mosaic, str(out), "--weights", "none", "--num-classes", "2"],
             f"SOURCE {mosaic} is a file; give the folder that holds it ({bucket}/orthophotos/mosaic)", env=env)
    assert not out.exists()
    # the same for the folders that must hold masks (no "holds no masks")
    fs.pipe_file(f"{bucket[5:]}/gt/a.png", (source / "a.png").read_bytes())
    with pytest.raises(PreflightError, match=rf"^GROUND_TRUTH {mosaic} is a file; give the folder that holds it"):
        check_evaluate(EvaluateConfig(predictions=f"{bucket}/gt", ground_truth=mosaic, output=str(tmp_path / "report"),
                                      num_classes=2, storage_options=options))
    # a key that is both an object and a prefix of others is a folder
    fs.pipe({f"{bucket[5:]}/both": b"an object", f"{bucket[5:]}/both/a.png": b"under it"})
    check_segment(SegmentConfig(source=f"{bucket}/both", output=str(out), weights="none", num_classes=2,
                                storage_options=options))
    # an empty prefix in a bucket that exists is still a folder with nothing to do, not a file
    check_segment(SegmentConfig(source=f"{bucket}/nothing-yet", output=str(out), weights="none", num_classes=2,
                                storage_options=options))
    assert not out.exists()


def test_an_endpoint_without_its_scheme_names_where_it_was_given(source, tmp_path, monkeypatch) -> None:
    """botocore refuses 127.0.0.1:5123 at the first request as 'Invalid endpoint', naming
    neither the option nor the variable, nor what is missing."""
    untrained = ["--weights", "none", "--num-classes", "2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    _refused(["segment", "s3://survey/in", str(tmp_path / "out"), *untrained],
             "AWS_ENDPOINT_URL=127.0.0.1:5123 has no scheme", "give it as http://127.0.0.1:5123",
             env=env | {"AWS_ENDPOINT_URL": "127.0.0.1:5123"})
    _refused(["segment", "s3://survey/in", str(tmp_path / "out"), *untrained, "--storage-options",
              '{"endpoint_url": "127.0.0.1:5123"}'],
             "--storage-options endpoint_url 127.0.0.1:5123 has no scheme", "give it as http://127.0.0.1:5123", env=env)
    assert not (tmp_path / "out").exists()
    # s3fs's other form, and the other commands that take storage options
    nested = {"client_kwargs": {"endpoint_url": "localhost:9000"}}
    with pytest.raises(PreflightError, match=r"^--storage-options client_kwargs.endpoint_url localhost:9000 has no "
                                             r"scheme; give it as http://localhost:9000"):
        check_evaluate(EvaluateConfig(predictions="s3://survey/masks", ground_truth=str(source),
                                      output=str(tmp_path / "report"), num_classes=2, storage_options=nested))
    with pytest.raises(PreflightError, match=r"^--storage-options client_kwargs.endpoint_url localhost:9000 has no"):
        check_train(TrainConfig(images=str(source), labels=str(source), output="s3://models/m.pt",
                                model="lraspp_mobilenet_v3_large", num_classes=2, init="none", storage_options=nested))
    # the variable is botocore's, read only for S3 and only when no option names the endpoint;
    # storage options go to remote URLs only: a local job is not refused for either
    monkeypatch.setenv("AWS_ENDPOINT_URL", "127.0.0.1:5123")
    check_segment(SegmentConfig(source=str(source), output=str(tmp_path / "out"), weights="none", num_classes=2,
                                storage_options={"endpoint_url": "127.0.0.1:5123"}))
    remote = SegmentConfig(source="s3://survey/in", output=str(tmp_path / "out"), weights="none", num_classes=2)
    with pytest.raises(PreflightError, match=r"^AWS_ENDPOINT_URL=127\.0\.0\.1:5123 has no scheme"):
        check_segment(remote)
    # with the storage options in a Secret block (checked by the flow, with them), which may
    # name the endpoint itself, the variable is not a reason to refuse
    check_segment(remote, remote=False)


def test_an_aws_profile_that_is_not_configured_is_named(s3_bucket, source, tmp_path, monkeypatch) -> None:
    """botocore raises ProfileNotFound at the first request: a traceback from a listing, and a
    bucket that "does not exist" from s3fs's exists(). Refused naming where the profile was
    given, for every job and for the weights too; a profile that is configured passes."""
    bucket, options = s3_bucket
    config = tmp_path / "aws-config"
    config.write_text("[profile survey]\nregion = us-east-1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {
        "AWS_CONFIG_FILE": str(config), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_ENDPOINT_URL": options["endpoint_url"]}
    untrained = ["--weights", "none", "--num-classes", "2"]
    _refused(["segment", f"{bucket}/in", str(tmp_path / "out"), *untrained],
             f"AWS_PROFILE 'nosuch' names no AWS profile of {config} or {tmp_path / 'none'} (profiles there: survey)",
             env=env | {"AWS_PROFILE": "nosuch"})
    _refused(["segment", str(source), f"{bucket}/out", *untrained, "--storage-options", '{"profile": "nosuch"}'],
             "--storage-options profile 'nosuch' names no AWS profile", env=env)
    assert not (tmp_path / "out").exists()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_PROFILE", "nosuch")
    with pytest.raises(PreflightError, match=r"^AWS_PROFILE 'nosuch' names no AWS profile"):
        check_evaluate(EvaluateConfig(predictions=f"{bucket}/masks", ground_truth=str(source), output=str(tmp_path / "r"),
                                      num_classes=2))
    with pytest.raises(PreflightError, match=r"^AWS_PROFILE 'nosuch' names no AWS profile"):
        check_segment(SegmentConfig(source=str(source), output=str(tmp_path / "out"), weights=f"{bucket}/m.pt"))
    # with the storage options in a Secret block (which may name a profile), the variable waits for the flow's check
    check_segment(SegmentConfig(source=f"{bucket}/in", output=str(tmp_path / "out"), weights="none", num_classes=2),
                  remote=False)
    monkeypatch.setenv("AWS_PROFILE", "survey")
    check_segment(SegmentConfig(source=str(source), output=f"{bucket}/out", weights="none", num_classes=2))


def test_an_endpoint_without_its_scheme_names_the_place_it_came_from(s3_bucket, source, tmp_path, monkeypatch) -> None:
    """The command line merges SEGPIPE_STORAGE_OPTIONS with --storage-options (the latter
    winning key by key) before its checks: the line names the one the endpoint came from."""
    segment = ["segment", "s3://survey/in", str(tmp_path / "out"), "--weights", "none", "--num-classes", "2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    line = _refused(segment, "SEGPIPE_STORAGE_OPTIONS endpoint_url 127.0.0.1:5123 has no scheme",
                    "give it as http://127.0.0.1:5123",
                    env=env | {"SEGPIPE_STORAGE_OPTIONS": '{"endpoint_url": "127.0.0.1:5123", "anon": true}'})
    assert "--storage-options" not in line
    # the other options in the variable, the endpoint on the command line: the command line's
    line = _refused([*segment, "--storage-options", '{"endpoint_url": "localhost:9000"}'],
                    "--storage-options endpoint_url localhost:9000 has no scheme",
                    env=env | {"SEGPIPE_STORAGE_OPTIONS": '{"anon": true}'})
    assert "SEGPIPE_STORAGE_OPTIONS" not in line
    assert not (tmp_path / "out").exists()
    # s3fs's other form, from the variable, as a flow merges it with the config's options
    monkeypatch.setenv("SEGPIPE_STORAGE_OPTIONS", '{"client_kwargs": {"endpoint_url": "localhost:9000"}}')
    remote = SegmentConfig(source="s3://survey/in", output=str(tmp_path / "out"), weights="none", num_classes=2)
    with pytest.raises(PreflightError, match=r"^SEGPIPE_STORAGE_OPTIONS client_kwargs.endpoint_url localhost:9000 has "
                                             r"no scheme; give it as http://localhost:9000"):
        check_segment(remote.with_storage_options(resolve_storage_options(remote.storage_options, None)))
    # a config built again from the merged options (a resumed training's, say) keeps their places
    resolved = resolve_storage_options(remote.storage_options, None)
    rebuilt = SegmentConfig(source="s3://survey/in", output=str(tmp_path / "out"), weights="none", num_classes=2,
                            storage_options=resolved)
    with pytest.raises(PreflightError, match=r"^SEGPIPE_STORAGE_OPTIONS client_kwargs"):
        check_segment(rebuilt)
    # an endpoint on the command line replaces the variable's: the job is checked against it
    bucket, options = s3_bucket
    import s3fs

    s3fs.S3FileSystem(**options).pipe_file(f"{bucket[5:]}/in/a.png", (source / "a.png").read_bytes())
    monkeypatch.setenv("SEGPIPE_STORAGE_OPTIONS", '{"endpoint_url": "127.0.0.1:5123"}')
    config = SegmentConfig(source=f"{bucket}/in", output=f"{bucket}/out", weights="none", num_classes=2,
                           storage_options=options)
    check_segment(config.with_storage_options(resolve_storage_options(config.storage_options, None)))


def test_polygon_settings_without_polygons_are_one_line(source, tmp_path) -> None:
    """--simplify and --min-polygon-area shape the polygons --polygons writes: without it they
    did nothing, silently. The config refuses them (tests/test_config.py), which the command
    line says in one line naming the option as typed, for segment and for serve alike."""
    untrained = ["segment", str(source), str(tmp_path / "out"), "--weights", "none", "--num-classes", "2"]
    _refused([*untrained, "--simplify", "2"], "--simplify applies to polygons; add --polygons (or leave it out)")
    _refused([*untrained, "--min-polygon-area", "50"],
             "--min-polygon-area applies to polygons; add --polygons (or leave it out)")
    _refused(["serve", "--source", f"{source}/{{date}}", "--output", f"{tmp_path}/out/{{date}}", "--weights", "none",
              "--num-classes", "2", "--simplify", "1.5"], "--simplify applies to polygons; add --polygons (or leave it out)")
    assert not (tmp_path / "out").exists()


def test_a_ray_address_where_nothing_answers_is_refused_at_once(source, tmp_path, monkeypatch) -> None:
    """ray.init waits minutes for a cluster that is not there: one connection tells, for the
    option and for RAY_ADDRESS alike; "auto" is Ray's to find."""
    import socket

    with socket.socket() as free:  # a port nothing listens on once closed
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    untrained = ["--weights", "none", "--num-classes", "2"]
    _refused(["segment", str(source), str(tmp_path / "out"), *untrained, "--ray-address", f"127.0.0.1:{port}"],
             f"--ray-address 127.0.0.1:{port}: no Ray cluster answers there (Connection refused)")
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(PreflightError, match=rf"^RAY_ADDRESS 127\.0\.0\.1:{port}: no Ray cluster answers there"):
        check_evaluate(EvaluateConfig(predictions=str(source), ground_truth=str(source), output=str(tmp_path / "r"),
                                      num_classes=2))
    # a Ray client's URL (the option's own check refuses it) and an address list are Ray's to refuse
    for address in (f"ray://127.0.0.1:{port}", f"127.0.0.1:{port},127.0.0.1:{port}"):
        monkeypatch.setenv("RAY_ADDRESS", address)
        check_evaluate(EvaluateConfig(predictions=str(source), ground_truth=str(source), output=str(tmp_path / "r"),
                                      num_classes=2))
    with socket.socket() as listening:  # something answers: Ray's own to say if it is no cluster
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        check_segment(SegmentConfig(source=str(source), output=str(tmp_path / "out"), weights="none", num_classes=2,
                                    ray_address=f"127.0.0.1:{listening.getsockname()[1]}"))
    check_segment(SegmentConfig(source=str(source), output=str(tmp_path / "out"), weights="none", num_classes=2,
                                ray_address="auto"))


def test_a_checkpoint_that_names_a_class_twice_is_resumed_only_with_names_given(source, tmp_path) -> None:
    """Its names go on with the weights unless given; written before names were checked, it
    may name a class twice, which failed inside every Ray Train worker, after the cluster
    started."""
    model = build_model("lraspp_mobilenet_v3_large", num_classes=3)
    meta = ModelMeta.default("lraspp_mobilenet_v3_large", 3, class_names=("road", "road", "car"),
                             extra={"training": {"optimizer": "sgd"}, "epoch": 2})
    resumed = str(tmp_path / "old.pt")
    save_checkpoint(model, resumed, meta, training_state={"epoch": 2, "optimizer": {"state": {}, "param_groups": []},
                                                          "history": []})
    config = TrainConfig(images=str(source), labels=str(source), output=str(tmp_path / "m.pt"),
                         model="lraspp_mobilenet_v3_large", num_classes=3, resume=resumed, epochs=4)
    with pytest.raises(PreflightError, match=f"--resume {resumed} names road more than once among its classes; pass "
                                             "--class-names, a name of its own for each class"):
        check_train(config)
    check_train(config.model_copy(update={"class_names": ("road", "lane", "car")}))
