"""A night with nothing new: every shard committed and current, so neither Ray nor a model
starts, and a new image costs its shard only. Real local Ray (2 CPUs), a local folder and
moto's S3 server; the command line in a fresh process."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import ray
import s3fs
from conftest import needs_work
from PIL import Image

from pipeline.config import SegmentConfig
from pipeline.run import NO_CLUSTER, summary_lines, up_to_date
from pipeline.runtime.driver import run_segmentation
from pipeline.runtime.replicas import SegmentWorker
from pipeline.samples import synthetic_scene

# the worker class below is shipped to Ray workers by value, not imported there by name
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

MODEL = {"model": "lraspp_mobilenet_v3_large", "weights": None, "num_classes": 4, "crf": False, "precision": "fp32"}


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(synthetic_scene(24, 32, seed)[0]).save(buffer, format="JPEG")
    return buffer.getvalue()


def _counting_worker(folder: Path) -> type:
    """A replica that leaves a file in `folder` when it starts: a run that loads a model at
    all leaves one there."""

    class CountingWorker(SegmentWorker):
        def __init__(self, spec):
            Path(folder, f"replica-{os.getpid()}").touch()
            super().__init__(spec)

    return CountingWorker


class _Local:
    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path
        self.source, self.output, self.options = str(tmp_path / "src"), str(tmp_path / "out"), {}

    def put(self, key: str, data: bytes) -> None:
        path = Path(self.source, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def read(self, uri: str) -> bytes:
        return Path(uri).read_bytes()


class _S3:
    def __init__(self, bucket: str, options: dict) -> None:
        self.fs = s3fs.S3FileSystem(**options)
        self.source, self.output, self.options = f"{bucket}/src", f"{bucket}/out", options

    def put(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(f"{self.source[5:]}/{key}", data)
        s3fs.S3FileSystem.clear_instance_cache()  # a new night: a fresh listing

    def read(self, uri: str) -> bytes:
        return self.fs.cat_file(uri)


@pytest.fixture(params=["local", "s3"])
def archive(request, tmp_path):
    if request.param == "local":
        return _Local(tmp_path)
    bucket, options = request.getfixturevalue("s3_bucket")
    return _S3(bucket, options)


def test_a_night_with_nothing_new_loads_no_model_and_a_new_image_costs_itself(ray_cpu, archive, tmp_path):
    for night in ("2026-11-19", "2026-11-20"):
        for i in range(2):
            archive.put(f"{night}/{i}.jpg", _jpeg(i))
    config = SegmentConfig(source=archive.source, output=archive.output, storage_options=archive.options, **MODEL)
    first = run_segmentation(config)
    assert (first.shards_committed, first.images) == (2, 4)

    replicas = tmp_path / "replicas"
    replicas.mkdir()
    again = run_segmentation(config, worker_class=_counting_worker(replicas))
    assert not list(replicas.iterdir()), "a run with nothing to do started a model replica"
    assert (again.shards_committed, again.shards_skipped, again.images, again.errors) == (0, 2, 0, 0)
    assert (again.ray_cluster, again.replicas, again.setup_seconds) == (NO_CLUSTER, [], 0.0)

    # the command line's check, before Prefect and Ray: the same answer, and the run recorded
    record = up_to_date(config)
    assert record is not None and (record["shards_skipped"], record["images"], record["shards_committed"]) == (2, 0, 0)
    assert json.loads(archive.read(record["record"]))["run_id"] == record["run_id"]

    archive.put("2026-11-20/2.jpg", _jpeg(7))  # one new image: segmented alone, its shard's others keep their rows
    assert needs_work(up_to_date(config))
    incremental = run_segmentation(config, worker_class=_counting_worker(replicas))
    assert (incremental.shards_committed, incremental.shards_skipped, incremental.images, incremental.images_kept) == (1, 1, 1, 2)
    assert len(list(replicas.iterdir())) == 1  # the counting worker does count a replica that starts


def test_nothing_to_do_says_how_many_error_rows_stay_and_how_to_retry_them(ray_cpu, tmp_path):
    archive = _Local(tmp_path)
    archive.put("a.jpg", _jpeg(0))
    archive.put("b.jpg", b"not a jpeg at all")
    config = SegmentConfig(source=archive.source, output=archive.output, **MODEL)
    assert run_segmentation(config).errors == 1
    record = up_to_date(config)
    assert record is not None and record["errors_kept"] == 1
    first, second = summary_lines(record)
    assert first.startswith("nothing to do: the one shard")
    assert second == "1 error row of unchanged images is kept; --redo-errors segments their images again"
    assert needs_work(up_to_date(config.model_copy(update={"redo_errors": True})))  # then there is work
    # a night with new images in another shard says the same of the shard it skipped
    archive.put("later/c.jpg", _jpeg(1))
    night = run_segmentation(config)
    assert (night.shards_committed, night.shards_skipped, night.errors, night.errors_kept) == (1, 1, 0, 1)
    lines = summary_lines(night.as_record() | {"record": "r", "folders": ["images/"]})
    assert "1 error row of unchanged images is kept; --redo-errors segments their images again" in lines


def test_other_settings_are_work_to_do(ray_cpu, tmp_path):
    """A shard committed under other settings is not up to date: the check reads the
    settings' fingerprint without loading the model, as the run does."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "0.jpg").write_bytes(_jpeg(0))
    config = SegmentConfig(source=str(source), output=str(tmp_path / "out"), **MODEL)
    run_segmentation(config)
    assert not needs_work(up_to_date(config))
    assert needs_work(up_to_date(config.model_copy(update={"crf": True})))
    assert needs_work(up_to_date(config.model_copy(update={"class_names": ("sky", "building", "road", "car")})))
    assert needs_work(up_to_date(SegmentConfig(source=str(source), output=str(tmp_path / "elsewhere"), **MODEL)))


def test_a_source_without_images_is_nothing_to_do_even_for_a_new_output(tmp_path):
    """An empty night's folder (or one of non-image files) into an OUTPUT never written: no
    shard, so no Ray, no model and no layout record; only the run's record is written."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "notes.txt").write_text("not an image")
    config = SegmentConfig(source=str(source), output=str(tmp_path / "out"), **MODEL)
    record = up_to_date(config)
    assert record is not None and (record["shards_skipped"], record["images"], record["non_image_keys"]) == (0, 0, 1)
    assert [p.relative_to(tmp_path / "out").parts[0] for p in (tmp_path / "out").rglob("*") if p.is_file()] == ["_runs"]
    (source / "0.jpg").write_bytes(_jpeg(0))
    assert needs_work(up_to_date(config))  # an image: work, for an OUTPUT never written


def test_a_night_nobody_uploaded_to_on_s3_is_nothing_to_do(s3_bucket, tmp_path):
    """On object storage a prefix is only the start of keys: a night without uploads has none,
    and is an empty night (exit 0), as an empty local folder is. A bucket that does not exist
    is a mistake, said in one line before anything starts."""
    from pipeline.preflight import PreflightError, check_segment
    from pipeline.run import RunError

    bucket, options = s3_bucket
    config = SegmentConfig(source=f"{bucket}/cams/{{date}}", output=f"{bucket}/out/date={{date}}",
                           storage_options=options, date="2026-11-22", **MODEL).dated()
    check_segment(config)
    record = up_to_date(config)
    assert record is not None and (record["shards_skipped"], record["images"]) == (0, 0)
    assert record["source"] == f"{bucket}/cams/2026-11-22"
    typo = config.model_copy(update={"source": "s3://no-such-bucket/cams/2026-11-22"})
    with pytest.raises(PreflightError, match="its bucket no-such-bucket does not exist"):
        check_segment(typo)
    with pytest.raises(RunError, match="its bucket no-such-bucket does not exist"):
        up_to_date(typo)


def test_a_mistyped_s3_prefix_is_nothing_to_do_with_the_folder_meant_named(s3_bucket):
    """A prefix with no key at all under it is an empty night on S3 (exit 0), so a mistyped one
    would succeed every night: the summary names the folders beside it of the closest names.
    Not for a night's folder named by its date, which a night without uploads lacks."""
    from pipeline.run import summary_lines

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    for key in ("survey/ortho/a.jpg", "survey/dsm/a.tif", "survey/2026-11-21/a.jpg", "survey/cam4/a.jpg",
                "survey/orth-out/_segpipe.json"):
        fs.pipe_file(f"{bucket.removeprefix('s3://')}/{key}", _jpeg(0))

    def said(source: str, output: str = "out") -> str:
        config = SegmentConfig(source=f"{bucket}/survey/{source}", output=f"{bucket}/{output}/{source}",
                               storage_options=options, **MODEL)
        [line] = summary_lines(up_to_date(config))
        return line

    assert said("orth").startswith(f"nothing to do: no images under {bucket}/survey/orth, nor any other key: did you "
                                   f"mean {bucket}/survey/ortho or {bucket}/survey/orth-out? (this night recorded as run ")
    # the folder that holds the run's OUTPUT is none it meant
    assert said("orth", "survey/orth-out").startswith(f"nothing to do: no images under {bucket}/survey/orth, nor any "
                                                      f"other key: did you mean {bucket}/survey/ortho? (this night recorded as run ")
    assert ", nor any other key" not in said("2026-11-22")  # a night nobody uploaded to
    # the nights' folder mistyped before the night's date: the night in the folder meant
    fs.pipe_file(f"{bucket.removeprefix('s3://')}/survey/labels/2026-11-21/a.png", _jpeg(0))
    assert said("labls/2026-11-22").startswith(f"nothing to do: no images under {bucket}/survey/labls/2026-11-22, nor "
                                               f"any other key: did you mean {bucket}/survey/labels/2026-11-22? (this night recorded as run ")
    assert ", nor any other key" not in said("labels/2026-11-22")  # the nights' folder holds earlier ones
    assert ", nor any other key" not in said("cam3")  # a camera that has uploaded nothing yet, beside cam4
    assert ", nor any other key" not in said("zzzz")  # nothing close: nothing said


def test_a_checkpoint_counts_by_its_contents_not_by_its_path(ray_cpu, tmp_path, monkeypatch):
    """Weights retrained and saved over the same checkpoint file are work to do (the path is
    the same, the model is not); the same file given by another path is not, nor a copy of it
    under another name."""
    import torch

    from pipeline.models import build_model, save_checkpoint

    source = tmp_path / "src"
    source.mkdir()
    (source / "0.jpg").write_bytes(_jpeg(0))
    model = build_model("lraspp_mobilenet_v3_large", num_classes=4)
    checkpoint = tmp_path / "models" / "night.pt"
    save_checkpoint(model, str(checkpoint), model.meta)
    config = SegmentConfig(source=str(source), output=str(tmp_path / "out"), weights=str(checkpoint), crf=False,
                           precision="fp32")
    run_segmentation(config)
    assert not needs_work(up_to_date(config))

    monkeypatch.chdir(tmp_path)
    assert not needs_work(up_to_date(config.model_copy(update={"weights": "models/../models/night.pt"})))
    shutil.copy(checkpoint, tmp_path / "copy.pt")
    assert not needs_work(up_to_date(config.model_copy(update={"weights": str(tmp_path / "copy.pt")})))

    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # a night of training later
    save_checkpoint(model, str(checkpoint), model.meta)
    assert needs_work(up_to_date(config))
    rerun = run_segmentation(config)
    assert (rerun.shards_committed, rerun.images) == (1, 1)
    assert not needs_work(up_to_date(config))


def _segment(source: str, output: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "segment", source, output, "--model", "lraspp_mobilenet_v3_large",
         "--weights", "none", "--num-classes", "4", "--no-crf", "--precision", "fp32"],
        capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).resolve().parents[1],
    )


def test_the_command_line_says_nothing_to_do_without_starting_ray(tmp_path):
    """Two `segpipe segment` in fresh processes. Ray keeps each local session it starts under
    RAY_TMPDIR: the first run makes one there, the rerun none. Neither prints Ray's warning
    about token authentication (segpipe chooses it for the local Ray it starts). A folder
    deleted from SOURCE meanwhile is said once, in the summary, not as a log line too."""
    source = tmp_path / "src"
    (source / "gone").mkdir(parents=True)
    (source / "0.jpg").write_bytes(_jpeg(0))
    (source / "gone" / "1.jpg").write_bytes(_jpeg(1))
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
    env = {name: value for name, value in os.environ.items() if name not in {"RAY_AUTH_MODE", "PREFECT_API_URL"}}
    env |= {"RAY_ADDRESS": "local", "RAY_TMPDIR": ray_tmp, "PREFECT_HOME": str(tmp_path / "prefect-home")}

    def sessions() -> list[Path]:
        return list(Path(ray_tmp, "ray").glob("session_2*"))

    try:
        first = _segment(str(source), str(tmp_path / "out"), env)
        assert first.returncode == 0, first.stderr[-3000:]
        assert "2 images, 2 segmented" in first.stdout
        assert len(sessions()) == 1  # Ray does leave its session there: the check below would see one
        assert "Token authentication" not in first.stdout + first.stderr

        shutil.rmtree(source / "gone")
        again = _segment(str(source), str(tmp_path / "out"), env)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "up to date" in again.stdout
        assert again.stdout.count("removed 1 shard") == 1 and "WARNING" not in again.stdout + again.stderr, again
        assert len(sessions()) == 1, "the rerun started a Ray"
        assert "Token authentication" not in again.stdout + again.stderr
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
