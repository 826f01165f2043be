"""The command line."""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import duckdb
import numpy as np
import pytest
import s3fs
from conftest import stop_with_signal
from PIL import Image

from flows.cli import _plain_output_when_piped, build_parser, main
from pipeline.config import EvaluateConfig, SegmentConfig, TrainConfig
from pipeline.masks import decode_mask, encode_mask
from pipeline.run import NO_CLUSTER, summary_lines
from pipeline.samples import synthetic_scene


@pytest.mark.slow
def test_demo_runs_both_flows_on_a_local_s3_endpoint(tmp_path) -> None:
    done = _segpipe("demo", "--output", str(tmp_path / "demo"), "--images", "3",
                    env={"TORCH_HOME": str(tmp_path / "torch")})  # no cached weights: offline here
    assert done.returncode == 0, done.stderr
    out = done.stdout
    # offline it must say so plainly rather than silently run random weights
    assert "Pretrained weights" in out and "UNTRAINED" in out
    assert "local S3 endpoint http://127.0.0.1:" in out
    assert "segmentation: 3 images, 0 errors" in out
    # the replica compiles its model (bf16 on this CPU): torch's warning about CUDA_HOME, which
    # it gives wherever a CUDA toolkit is installed without a GPU, is not ours to show
    assert "No CUDA runtime is found" not in out + done.stderr
    [night] = (tmp_path / "demo" / "segmentation").iterdir()
    assert night.name.startswith("date=")
    masks = sorted(p.relative_to(night / "masks").as_posix() for p in (night / "masks").rglob("*.png"))
    assert masks == ["cam1/scene_000.png", "cam1/scene_002.png", "cam2/scene_001.png"]
    assert decode_mask((night / "masks" / masks[0]).read_bytes()).shape == (240, 320)
    metrics = json.loads((tmp_path / "demo" / "evaluation" / "metrics.json").read_text())
    assert metrics["images"] == 3 and [c["name"] for c in metrics["classes"]] == ["sky", "building", "road", "car"]
    assert f"evaluation: mIoU {metrics['miou']:.3f} over 3 images" in out
    # the DuckDB query's result is printed: the class shares add up to the pixels of 3 images
    shares = duckdb.sql(f"select sum(pixel_count) from read_parquet('{night}/class_stats/**/*.parquet')").fetchall()
    assert shares == [(3 * 240 * 320,)] and "class_name" in out and "share" in out


def test_evaluate_command(tmp_path) -> None:
    for root, labels in [("pred", np.array([[0, 1], [1, 1]], np.uint8)), ("gt", np.array([[0, 1], [0, 1]], np.uint8))]:
        (tmp_path / root).mkdir()
        (tmp_path / root / "x.png").write_bytes(encode_mask(labels))
    # a ground truth with the dataset's "unlabelled" value, 2 for 2 classes: left out, and said why once
    (tmp_path / "pred" / "y.png").write_bytes(encode_mask(np.zeros((2, 2), np.uint8)))
    (tmp_path / "gt" / "y.png").write_bytes(encode_mask(np.array([[0, 2], [2, 0]], np.uint8)))
    done = _segpipe("evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), str(tmp_path / "report"),
                    "--num-classes", "2", "--class-names", "background", "road")
    assert done.returncode == 0, done.stderr
    # a terminal's table: aligned columns, none of the Markdown the Prefect artifact gets
    assert re.search(r"^ *1  road +0\.6667  ", done.stdout, re.MULTILINE), done.stdout  # IoU of road: 2 / 3
    assert done.stdout.startswith("mIoU 0.5833, ") and "|" not in done.stdout and "**" not in done.stdout
    assert ("Excluded: 1 ground-truth mask holds the label 2, outside the 2 classes: pass --ignore-index 2"
            in done.stdout)
    assert "\x1b[" not in done.stdout + done.stderr  # piped: no colour codes
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    bad = _segpipe("evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), str(tmp_path / "r2"), "--num-classes", "2",
                   "--label-map", "[1, 2]")
    assert bad.returncode == 2 and "--label-map: must be a JSON object" in bad.stderr
    # the form a user guesses first: answered with the JSON it takes
    colon = _segpipe("evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), str(tmp_path / "r2"), "--num-classes",
                     "2", "--label-map", "255:1")
    assert colon.returncode == 2 and colon.stderr.rstrip().endswith(
        """--label-map: is not valid JSON (Extra data at position 3): give a JSON object, quoted for the shell, """
        """e.g. '{"255": 1}'""")
    # nothing pairs: found inside the flow, and still one line, without Prefect's own
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "z.png").write_bytes(encode_mask(np.zeros((2, 2), np.uint8)))
    unpaired = _segpipe("evaluate", str(tmp_path / "pred"), str(tmp_path / "other"), str(tmp_path / "r3"),
                        "--num-classes", "2")
    assert unpaired.returncode == 2 and unpaired.stdout == ""
    assert unpaired.stderr.splitlines() == [
        f"segpipe: error: no prediction under {tmp_path / 'pred'} pairs with a ground-truth mask under "
        f"{tmp_path / 'other'} (2 predictions, 1 ground-truth mask); check the roots and the suffixes"]
    assert not (tmp_path / "r3").exists()
    # a segment run's whole OUTPUT given for PREDICTIONS: its masks are one folder down
    (tmp_path / "run" / "masks").mkdir(parents=True)
    (tmp_path / "run" / "masks" / "x.png").write_bytes(encode_mask(np.zeros((2, 2), np.uint8)))
    whole = _segpipe("evaluate", str(tmp_path / "run"), str(tmp_path / "gt"), str(tmp_path / "r4"), "--num-classes", "2")
    assert whole.returncode == 2
    assert whole.stderr.rstrip().endswith(f"; pass {tmp_path / 'run'}/masks, where segment writes its masks")


def _segpipe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=600,
        env={**os.environ, **(env or {})},
    )


NAMES = ("sky", "building", "road", "car")


def test_segment_command_on_s3_configured_from_the_environment(s3_bucket, s3_endpoint, tmp_path) -> None:
    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    for i in range(3):
        buffer = io.BytesIO()
        Image.fromarray(synthetic_scene(30, 40, i)[0]).save(buffer, format="PNG")
        fs.pipe_file(f"{bucket[5:]}/in/night/{i}.png", buffer.getvalue())
    fs.pipe_file(f"{bucket[5:]}/in/night/broken.png", buffer.getvalue()[:200])  # truncated
    # the endpoint comes from AWS_ENDPOINT_URL, as a user of an S3-compatible store would set it
    done = _segpipe(
        "segment", f"{bucket}/in", f"{bucket}/out", "--model", "lraspp_mobilenet_v3_large", "--weights", "none",
        "--num-classes", "4", "--no-crf", "--batch-size", "2", "--class-names", *NAMES, "--precision", "fp32",
        # COLUMNS: what rich would cut the progress line at, written to a file
        env={"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "COLUMNS": "40"},
    )
    assert done.returncode == 0, done.stderr
    assert "\x1b[" not in done.stdout + done.stderr  # piped: no colour codes
    assert not re.search("[\u2800-\u28ff]", done.stderr), done.stderr  # nor a spinner's frozen frame
    assert re.search(r"^4 images of 4, .* 0 up to date \d+:\d\d:\d\d$", done.stderr, re.MULTILINE), done.stderr
    assert "4 images, 3 segmented and 1 error," in done.stdout
    # the run's seconds are counted from the replicas' start, which the command line begins
    # while Prefect starts: Ray and the model take seconds, not the "0.0 s to start" of the
    # flow's own share
    seconds, to_start = map(float, re.search(r"segmented .* in ([\d.]+) s \(([\d.]+) s to start\)", done.stdout).groups())
    assert 1.0 <= to_start < seconds, done.stdout
    assert "errors by reason: corrupt 1 (night/broken.png) (details:" in done.stdout
    assert "4 images of 4," in done.stderr and "1 error, 1 shard committed" in done.stderr  # the progress line
    con = duckdb.connect()
    con.register_filesystem(s3fs.S3FileSystem(**options))
    rows = con.sql(f"select status, count(*) from read_parquet('{bucket}/out/images/**/*.parquet', hive_partitioning=true) group by 1 order by 1").fetchall()
    assert rows == [("error", 1), ("ok", 3)]
    # an untrained model's classes, named on the command line, are named in the class statistics
    stats = con.sql(f"select distinct class_name from read_parquet('{bucket}/out/class_stats/**/*.parquet')").fetchall()
    assert stats and {name for (name,) in stats} <= set(NAMES)
    # a second run, after a new night's image, does only that night's shard; its
    # --storage-options (credentials) reach the run but not Prefect's database, where flow-run
    # parameters are kept
    fs.pipe_file(f"{bucket[5:]}/in/night2/0.png", fs.cat_file(f"{bucket[5:]}/in/night/0.png"))
    marker = "s3cr3t-ON-THE-COMMAND-LINE"
    prefect_home = tmp_path / "prefect-home"
    command = ("segment", f"{bucket}/in", f"{bucket}/out", "--model", "lraspp_mobilenet_v3_large", "--weights", "none",
               "--num-classes", "4", "--no-crf", "--batch-size", "2", "--class-names", *NAMES, "--precision", "fp32",
               "--storage-options", f'{{"endpoint_url": "{s3_endpoint}", "key": "testing", "secret": "{marker}"}}')
    again = _segpipe(*command, env={"PREFECT_HOME": str(prefect_home)})
    assert again.returncode == 0, again.stderr
    assert "1 image, 1 segmented" in again.stdout and "1 already up to date" in again.stdout
    stored = b"".join(p.read_bytes() for p in prefect_home.rglob("*") if p.is_file())
    assert f"{bucket}/in".encode() in stored  # the run's parameters are in there...
    assert marker.encode() not in stored  # ...its credentials are not (an endpoint is no secret)
    # a third finds nothing new: it says so, without Prefect, Ray or a model
    idle = _segpipe(*command, env={"PREFECT_HOME": str(tmp_path / "idle-home")})
    assert idle.returncode == 0, idle.stderr
    assert idle.stdout.startswith("nothing to do: all 2 shards of") and "already up to date" in idle.stdout
    assert not (tmp_path / "idle-home").exists()  # Prefect never started


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "nope"], "unknown model 'nope'"),
    (["--storage-options", '{"secret": "hunter2'], "argument --storage-options: is not valid JSON (Unterminated string "
     """starting at position 11): give a JSON object, quoted for the shell, e.g. '{"endpoint_url": """),
    (["--storage-options", "[1]"], "must be a JSON object"),
    (["--batch-size", "0"], "segpipe: error: --batch-size: must be 1 or more"),
    (["--device", "gpu"], "segpipe: error: argument --device: invalid choice: 'gpu'"),
    (["--date", "2026-02-30"], "segpipe: error: --date: 2026-02-30 is no day of the calendar"),
    # tables and reports name columns by class (evaluate's iou_<name>): one would hide the other
    (["--weights", "none", "--num-classes", "3", "--class-names", "road", "road", "car"],
     "segpipe: error: --class-names: names road more than once: each class needs a name of its own"),
    # SOURCE and OUTPUT without {date}: the night asked for would not be the one segmented
    (["--date", "2026-02-20"], "segpipe: error: --date 2026-02-20 fills {date} in SOURCE and OUTPUT, and none of them "
                               "holds it"),
])
def test_segment_refuses_bad_settings_in_one_line(tmp_path, args, message) -> None:
    done = _segpipe("segment", str(tmp_path), str(tmp_path / "out"), *args)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "hunter2" not in done.stderr + done.stdout


def test_storage_that_stays_down_past_the_checks_is_one_line(monkeypatch, capsys) -> None:
    """Storage that fails for good once a job is under way (the checks before it passed) is
    an outage, not a setting: one line, exit 2, as for an outage the run itself meets
    (`storage unavailable: ...`, a RunError). The job raises it here in place of a store
    going down at that moment; the run's own handling of a store that is down is
    tests/test_faults.py's, over a real S3 API."""
    import flows.cli
    from pipeline.storage import StorageUnavailableError

    def outage(args):
        raise StorageUnavailableError("listing s3://survey/in/: still failing after 5 attempts (ConnectionError: reset)")
    monkeypatch.setattr(flows.cli, "_segment", outage)
    assert main(["segment", "s3://survey/in", "s3://survey/out"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "segpipe: error: storage unavailable: listing s3://survey/in/: still failing after 5 attempts "
        "(ConnectionError: reset); run the same command again once it answers"]


def test_settings_are_named_as_typed(capsys) -> None:
    assert main(["segment", "", "out", "--tile-stride", "8"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "segpipe: error: SOURCE: must not be empty",
        "segpipe: error: --tile-stride: must be 16 or more"]
    assert main(["serve", "--source", "", "--output", "o"]) == 2
    assert capsys.readouterr().err == "segpipe: error: --source: must not be empty\n"


def test_a_misspelled_option_is_named_with_the_one_meant(capsys) -> None:
    """argparse alone would say a required option is missing, not that one was misspelled."""
    assert main(["evaluate", "p", "g", "o", "--num-clases", "2"]) == 2
    assert capsys.readouterr().err == "segpipe: error: unrecognized option --num-clases (did you mean --num-classes?)\n"
    assert main(["segment", "s", "o", "--weights", "none", "--num-classes", "2", "--no-crff"]) == 2
    assert capsys.readouterr().err == "segpipe: error: unrecognized option --no-crff (did you mean --no-crf?)\n"
    assert main(["segmnt", "s", "o"]) == 2
    assert capsys.readouterr().err == "segpipe: error: unknown command segmnt (did you mean segment?)\n"
    assert main(["evalute", "preds", "train", "out"]) == 2  # a later argument that names a command is not it
    assert capsys.readouterr().err == "segpipe: error: unknown command evalute (did you mean evaluate?)\n"
    with pytest.raises(SystemExit):  # nothing close: argparse's line, which lists the commands
        main(["frobnicate"])
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err
    for unlike in ("--debug", "--version", "--help-me"):  # nothing close: argparse's own line
        with pytest.raises(SystemExit):
            main(["segment", "s", "o", unlike])
        assert "did you mean" not in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an abbreviation is argparse's, and here a valid one: --tile-stride
        main(["segment", "s", "o", "--tile-strid", "100", "--help"])
    assert main(["segment", "s", "o", "--tile-stride", "100"]) == 2
    assert capsys.readouterr().err.endswith("--tile-stride 100 needs a --tile, the side of the windows it strides\n")
    with pytest.raises(SystemExit):  # a command alone: argparse's usage, with what it needs
        main(["segment"])
    assert "the following arguments are required: SOURCE, OUTPUT" in capsys.readouterr().err
    for value in ("no", "False", "1"):  # a switch given a value: its two forms named
        assert main(["segment", "s", "o", "--crf", value]) == 2
        assert capsys.readouterr().err == (f"segpipe: error: --crf takes no value (--crf {value}): --crf turns it on, "
                                           "--no-crf turns it off\n")


def test_published_weights_that_disagree_with_num_classes_are_one_line(tmp_path) -> None:
    """The other mistakes caught before anything starts are in tests/test_preflight.py."""
    (tmp_path / "src").mkdir()
    buffer = io.BytesIO()
    Image.fromarray(synthetic_scene(20, 20, 0)[0]).save(buffer, format="PNG")
    (tmp_path / "src" / "a.png").write_bytes(buffer.getvalue())
    done = _segpipe("segment", str(tmp_path / "src"), str(tmp_path / "out"), "--model", "lraspp_mobilenet_v3_large",
                    "--weights", "DEFAULT", "--num-classes", "5")
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["segpipe: error: --num-classes 5 but --weights DEFAULT has 21 classes; pass "
                                        "--num-classes 21, or leave it out"]
    assert not (tmp_path / "out").exists()  # nothing written


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"segpipe {importlib.metadata.version('segpipe')}"


CONFIGS = {"segment": SegmentConfig, "serve": SegmentConfig, "evaluate": EvaluateConfig, "train": TrainConfig}


@pytest.mark.parametrize("command", ["segment", "evaluate", "train", "serve", "demo"])
def test_every_option_says_its_default(command: str) -> None:
    [commands] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    parser = commands.choices[command]
    assert "(default: " in parser.format_help()  # renders: no stray % in a description
    fields = CONFIGS[command].model_fields if command in CONFIGS else {}
    for action in parser._actions:
        if not action.option_strings or action.required or isinstance(action, argparse._HelpAction):
            continue
        option = action.option_strings[0]
        shown = action.help % {"default": action.default}
        assert "default: " in shown, f"segpipe {command} {option}: {shown!r} does not say its default"
        field = fields.get(action.dest)
        if field is None or "default:" in (field.description or ""):
            continue  # the description says it in words (it depends on other settings)
        default = field.get_default(call_default_factory=True)
        if isinstance(action, argparse.BooleanOptionalAction):
            assert shown.endswith(f"(default: {'on' if default else 'off'})"), option
        elif isinstance(default, int | float) or (isinstance(default, str) and default):
            assert shown.endswith(f"(default: {default})"), option
        elif isinstance(default, tuple):
            assert shown.endswith(f"(default: {' '.join(map(str, default))})"), option
        else:  # None, "", {}: nothing given
            assert shown.endswith("(default: none)"), option


def test_models_command_lists_the_registry_without_importing_torch() -> None:
    from pipeline.models import list_models

    code = ("import sys; from flows.cli import main; main(['models']); "
            "print([m for m in ('torch', 'ray', 'prefect') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    *names, imported = done.stdout.splitlines()
    assert names == list_models() and imported == "[]"


def test_ray_worker_lines_carry_no_colour_codes_when_piped(ray_cpu, capfd, monkeypatch) -> None:
    """Ray colours the prefix of the lines it forwards from its workers even into a pipe;
    the command line turns that off when its output is not a terminal."""

    @ray_cpu.remote
    def say(word: str) -> None:
        print(word)

    def forwarded(word: str) -> str:
        ray_cpu.get(say.remote(word))
        for _ in range(100):  # the driver prints forwarded lines from its own thread
            text = capfd.readouterr().out
            if word in text:
                return text
            time.sleep(0.1)
        raise AssertionError(f"{word!r} was not forwarded")

    for name in ("RAY_COLOR_PREFIX", "PREFECT_LOGGING_COLORS"):
        monkeypatch.delenv(name, raising=False)  # and removed again after the test
    assert "\x1b[" in forwarded("coloured")  # what Ray does by itself
    with monkeypatch.context() as patch:
        patch.setattr(sys, "stdout", io.StringIO())  # not a terminal
        _plain_output_when_piped()
    assert os.environ["RAY_COLOR_PREFIX"] == "0" and os.environ["PREFECT_LOGGING_COLORS"] == "false"
    line = forwarded("plain")
    assert "plain" in line and "\x1b[" not in line


def test_what_ray_colours_regardless_is_plain_when_piped(monkeypatch) -> None:
    """Ray colours its "[repeated 2x across cluster]" tag with no setting to stop it: the
    command's own streams drop the codes when they are not a terminal."""
    from ray._private.ray_logging import _color  # how Ray writes the tag

    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    _plain_output_when_piped()
    _plain_output_when_piped()  # a second command in the same process: not wrapped twice
    print("epoch 1" + _color(" [repeated 2x across cluster]"))
    print("\x1b[1;31mfailed\x1b[0m", file=sys.stderr)
    assert "\x1b[" in _color("x") and out.getvalue() == "epoch 1 [repeated 2x across cluster]\n"
    assert err.getvalue() == "failed\n" and sys.stdout.isatty() is False


@pytest.mark.parametrize("n", [1, 2])
def test_the_summary_counts_in_english(n: int) -> None:
    """'1 image', '2 images': no '1 replicas'."""
    printed = "\n".join(summary_lines({
        "run_id": "r", "record": "out/_runs/r.json", "source": "src", "output": "out", "model": "m", "weights": "none",
        "ray_cluster": "a local Ray", "shards_committed": n, "shards_skipped": 0, "images": n, "errors": n,
        "seconds": 1.0, "setup_seconds": 0.5, "images_per_second": 1.0, "non_image_keys": n, "retried_batches": n,
        "errors_by_type": {"decode": n}, "replicas": [{"device": "cpu", "threads": n, "precision": "bf16", "compile_seconds": 0.0}] * n,
        "folders": ["images/", "masks/"],
    }))
    plural = "" if n == 1 else "s"
    for words in (f"{n} image{plural}, 0 segmented and {n} error{plural},", f"{n} non-image key{plural} skipped",
                  f"on {n} replica{plural} in a local Ray: {n} on cpu ({n} thread{plural}, bf16)",
                  f"{n} {'batch' if n == 1 else 'batches'} sent again"):
        assert words in printed
    [nothing] = summary_lines({"run_id": "r", "record": "x", "source": "src", "output": "out", "shards_committed": 0,
                               "shards_skipped": n, "ray_cluster": NO_CLUSTER, "images": 0})
    every = "the one shard of src is" if n == 1 else f"all {n} shards of src are"
    assert nothing == f"nothing to do: {every} already up to date in out (this night recorded as run r in x)"


def test_a_run_whose_only_images_were_refused_before_reading_says_so_without_a_model_line() -> None:
    """Keys refused by their names (unsafe, or whose mask another's takes) need no model, so
    no Ray starts; the summary still counts them as errors, not as nothing to do."""
    printed = summary_lines({
        "run_id": "r", "record": "out/_runs/r.json", "source": "src", "output": "out", "model": "m", "weights": "w",
        "ray_cluster": NO_CLUSTER, "shards_committed": 1, "shards_skipped": 2, "images": 1, "errors": 1,
        "seconds": 0.5, "setup_seconds": 0.0, "images_per_second": 2.0, "non_image_keys": 0, "retried_batches": 0,
        "errors_by_type": {"unsafe_key": 1}, "error_keys": {"unsafe_key": ["d/bad\x01.jpg"]}, "replicas": [],
        "folders": ["images/"], "images_kept": 3,
    })
    assert printed[0].startswith("run r: 1 image, 0 segmented and 1 error")
    assert "errors by reason: unsafe_key 1 (d/bad\x01.jpg) (details: status = 'error' rows of the images table)" in printed
    assert not any(line.startswith(("model ", "nothing")) for line in printed)
    assert ("3 unchanged images kept their rows and masks (only the new and changed images of their shards were "
            "segmented)") in printed


def test_the_summary_names_the_first_files_of_each_kind_of_error() -> None:
    """One bad file among thousands is found from the summary, without a query."""
    printed = summary_lines({
        "run_id": "r", "record": "out/_runs/r.json", "source": "src", "output": "out", "model": "m", "weights": "w",
        "ray_cluster": "a local Ray", "shards_committed": 1, "shards_skipped": 0, "images": 9, "errors": 5,
        "seconds": 2.0, "setup_seconds": 1.0, "images_per_second": 9.0, "non_image_keys": 0, "retried_batches": 0,
        "errors_by_type": {"corrupt": 4, "missing": 1}, "replicas": [], "folders": [],
        "error_keys": {"corrupt": ["a.tif", "b.tif", "c.tif"], "missing": ["d.jpg"]},
    })
    assert ("errors by reason: corrupt 4 (a.tif, b.tif, c.tif, ...), missing 1 (d.jpg) (details: status = 'error' "
            "rows of the images table)") in printed


def test_the_summary_gives_the_rate_without_the_compilation() -> None:
    """A first run's rate carries its compilation (seconds, once per run): 0.84 images/s in a
    trial that ran at 14 without it. The compilation line gives the rate over the rest."""
    printed = summary_lines({
        "run_id": "r", "record": "out/_runs/r.json", "source": "src", "output": "out", "model": "m", "weights": "w",
        "ray_cluster": "a local Ray", "shards_committed": 1, "shards_skipped": 0, "images": 12, "errors": 0,
        "seconds": 20.0, "setup_seconds": 5.0, "images_per_second": 12 / 15, "non_image_keys": 0, "retried_batches": 0,
        "errors_by_type": {}, "replicas": [{"device": "cpu", "threads": 1, "compile_seconds": 14.0},
                                           {"device": "cpu", "threads": 1, "compile_seconds": 13.0}],
        "folders": ["images/"],
    })
    assert "0.8 images/s" in printed[0]
    [line] = [line for line in printed if line.startswith("compiling")]
    assert line.startswith("compiling the model took 14.0 s of the run, 12.0 images/s without it (")  # 12 in 1 s


@pytest.mark.parametrize(("args", "message"), [
    (["--weights", "none"], "segpipe: error: --weights none needs --num-classes"),
    # named as stored, absolute and normalised (a deployment's worker may run in another folder)
    (["--weights", "none", "--num-classes", "2", "--source", "{root}/camz/{{date}}/"], "segpipe: error: --source {root}/camz/{{date}}: the folder of its nights "
                                              "{root}/camz is not a folder that exists"),
    (["--weights", "{root}/nope.pt"], "segpipe: error: --weights {root}/nope.pt: no such file"),
    (["--weights", "none", "--num-classes", "2", "--cron", "0 2 * * * *"], "segpipe: error: argument --cron: '0 2 * * * *' has 6 fields; a cron schedule has 5"),
])
def test_serve_refuses_what_would_fail_every_night_in_one_line(tmp_path, args, message) -> None:
    """Before it registers a schedule, and before asking for a Prefect server: these would
    otherwise be a failed run every night (and a sixth cron field, seconds to Prefect, a run
    every second of 02:00)."""
    (tmp_path / "cams").mkdir()
    args = [a.format(root=tmp_path) for a in args]
    done = _segpipe("serve", "--source", f"{tmp_path}/cams/{{date}}/", "--output", f"{tmp_path}/out/{{date}}/", *args,
                    env={"PREFECT_API_URL": ""})
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(message.format(root=tmp_path)), line
    # the nights' folders are what is checked, not tonight's, which need not exist yet
    fine = _segpipe("serve", "--source", f"{tmp_path}/cams/{{date}}/", "--output", f"{tmp_path}/out/{{date}}/",
                    "--weights", "none", "--num-classes", "2", env={"PREFECT_API_URL": ""})
    assert fine.returncode == 2 and "needs a Prefect server" in fine.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("level", ["20", "verbose", " info"])
def test_a_prefect_log_level_prefect_does_not_take_is_one_line(tmp_path, level: str) -> None:
    """Prefect's settings take level names only; anything else failed at its import with a
    pydantic traceback."""
    (tmp_path / "cams").mkdir()
    done = _segpipe("serve", "--source", str(tmp_path / "cams"), "--output", str(tmp_path / "out"), "--weights", "none",
                    "--num-classes", "2", env={"PREFECT_LOGGING_LEVEL": level, "PREFECT_API_URL": ""})
    if level == " info":  # taken as Prefect takes it, on to the next check: no server to serve against
        assert done.returncode == 2 and "needs a Prefect server" in done.stderr and "Traceback" not in done.stderr
        return
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"segpipe: error: PREFECT_LOGGING_LEVEL={level}: Prefect takes DEBUG, INFO, "
                                        "WARNING, ERROR or CRITICAL"]


@pytest.mark.slow
@pytest.mark.parametrize("stop, group", [(signal.SIGTERM, False), (signal.SIGTERM, True), (signal.SIGINT, True)],
                         ids=["SIGTERM", "SIGTERM-to-its-group", "SIGINT-to-its-group"])
def test_a_run_stopped_by_a_signal_says_so_in_one_line_and_the_same_command_goes_on(tmp_path, stop, group) -> None:
    """SIGTERM (what systemd and Kubernetes send) or Ctrl-C once the first shard is committed:
    one line and exit 128 + the signal, no traceback; the committed shards are whole, and the
    same command does the rest, with no image twice. Sent to the command's process group too,
    as a terminal's Ctrl-C, systemd and `timeout` send it: to every process the command
    started, its Prefect server and its local Ray included."""
    source, output = tmp_path / "src", tmp_path / "out"
    source.mkdir()
    for i in range(160):
        Image.fromarray(synthetic_scene(240, 320, i)[0]).save(source / f"{i:03d}.png")
    command = [sys.executable, "-m", "flows.cli", "segment", str(source), str(output), "--model",
               "lraspp_mobilenet_v3_large", "--weights", "none", "--num-classes", "4", "--shard-size", "8",
               "--precision", "fp32", "--no-compile"]
    err = stop_with_signal(command, lambda: any((output / "_commits").glob("*.json")), stop, group=group)
    assert err.rstrip().splitlines()[-1] == (
        f"segpipe: stopped by {stop.name}: what was committed is kept; run the same command again to go on")
    committed = len(list((output / "_commits").glob("*.json")))
    assert 1 <= committed < 20
    rows = duckdb.sql(f"select count(*) from read_parquet('{output}/images/**/*.parquet')").fetchall()[0][0]
    assert rows == 8 * committed  # whole shards only
    if not group:
        again = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr
        keys = duckdb.sql(f"select image_id from read_parquet('{output}/images/**/*.parquet')").fetchall()
        assert sorted(k for (k,) in keys) == sorted(p.name for p in source.iterdir())


_HOLDS_A_TEMPORARY_SERVER = """
import sys, time
from flows._prefect_server import temporary_server
server = temporary_server()
with server.api():
    print(server.process.pid, flush=True)
    time.sleep(300)
"""


def _running(pid: int) -> bool:
    """Whether process `pid` runs (a zombie no init has reaped yet does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
@pytest.mark.parametrize("end", [signal.SIGHUP, signal.SIGKILL], ids=["terminal-closed", "killed"])
def test_the_temporary_prefect_server_ends_with_a_command_that_ends_without_its_exit_handlers(tmp_path, end) -> None:
    """The server runs in a session of its own (a signal to the command's group must not stop
    it before the command's flow ends), so nothing but the kernel's parent-death signal stops
    it when the command dies without its atexit handlers: a closed terminal's SIGHUP, SIGKILL."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(tmp_path)}
    command = subprocess.Popen([sys.executable, "-c", _HOLDS_A_TEMPORARY_SERVER], stdout=subprocess.PIPE, text=True,
                               env=env, start_new_session=True)
    try:
        server = int(command.stdout.readline())
        assert _running(server)
        os.killpg(command.pid, end)
        command.wait(timeout=30)
        deadline = time.monotonic() + 20
        while _running(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(server)
    finally:
        command.kill()


def test_a_job_stopped_before_ray_starts_says_so_in_one_line(tmp_path) -> None:
    """SIGTERM while the command still checks SOURCE (here a store that takes the connection
    and never answers, so the check waits on it): the same one line and exit 143 as once Ray
    runs, where SIGTERM's default ended the process silently with -15. Nothing is written."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # connections complete in the kernel's backlog; no request is ever read
    try:
        running = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "segment", "s3://bucket/in", str(tmp_path / "out"), "--storage-options",
             json.dumps({"endpoint_url": f"http://127.0.0.1:{silent.getsockname()[1]}", "key": "k", "secret": "s"})],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        silent.settimeout(60)
        connection, _ = silent.accept()  # the command's first request, left unanswered: it waits on the store
        try:
            assert running.poll() is None, running.communicate()
            running.send_signal(signal.SIGTERM)
            _, err = running.communicate(timeout=30)
        finally:
            connection.close()
    finally:
        silent.close()
    assert running.returncode == 143, err
    assert err.strip().splitlines() == [
        "segpipe: stopped by SIGTERM: what was committed is kept; run the same command again to go on"], err
    assert not (tmp_path / "out").exists()


def _raised_inside_ray(stop: BaseException) -> SystemError:
    """What reaches the command when a SIGTERM handler raises `stop` inside one of Ray's
    Cython calls: CPython's SystemError, caused by it."""
    try:
        try:
            raise stop
        except BaseException as raised:
            raise SystemError("<cyfunction CoreWorker.wait> returned a result with an exception set") from raised
    except SystemError as err:
        return err


def _prefects_termination_inside_ray() -> SystemError:
    """Where Prefect's flow engine raised its TerminationSignal in place of Ray's SystemExit."""
    from prefect.exceptions import TerminationSignal

    return _raised_inside_ray(TerminationSignal(signal.SIGTERM))


@pytest.mark.parametrize(("argv", "raised", "code", "after"), [
    (["train", "imgs", "labels", "model.pt", "--model", "unet", "--num-classes", "3"], KeyboardInterrupt(), 130,
     "the finished epochs' checkpoints are kept; --resume the last one"),
    (["evaluate", "masks", "gt", "report", "--num-classes", "3"], _raised_inside_ray(SystemExit(signal.SIGTERM)), 143,
     "its report is written at the end; run the same command again"),
    (["segment", "src", "out"], _prefects_termination_inside_ray(), 143,
     "what was committed is kept; run the same command again to go on"),
])
def test_each_command_stopped_by_a_signal_says_what_it_leaves(monkeypatch, capsys, argv, raised, code, after) -> None:
    import flows.cli

    handlers = []

    def stopped(args):
        handlers.append(signal.getsignal(signal.SIGTERM))
        raise raised

    monkeypatch.setattr(flows.cli, f"_{argv[0]}", stopped)
    before = signal.getsignal(signal.SIGTERM)
    assert main(argv) == code
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"segpipe: stopped by {signal.Signals(code - 128).name}: {after}"), line
    # the job ran with SIGTERM raising SystemExit, and the process's own handler is back after it
    assert signal.getsignal(signal.SIGTERM) == before
    if before == signal.SIG_DFL:
        assert callable(handlers[0])
