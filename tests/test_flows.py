"""The Prefect flows end to end under `prefect_test_harness`: moto's S3 server over HTTP,
a real local Ray, Parquet and JSON read back."""

from __future__ import annotations

import errno
import io
import json
import logging
import re
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
from PIL import Image
from prefect import flow
from prefect.artifacts import Artifact
from prefect.testing.utilities import prefect_test_harness

from flows.evaluate import evaluate_predictions
from flows.segment import segment_archive, summarise
from pipeline.config import EvaluateConfig, SegmentConfig
from pipeline.evaluation import NothingToScoreError
from pipeline.masks import encode_mask
from pipeline.outputs import class_names_of_masks
from pipeline.run import NO_CLUSTER, RunSummary
from pipeline.samples import synthetic_scene


@pytest.fixture(scope="module")
def prefect_harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_ray_client_addresses_are_refused():
    with pytest.raises(ValueError, match="Ray Client address"):
        SegmentConfig(source="a", output="b", ray_address="ray://head:10001")


def test_segment_flow_nightly_partitions_on_s3(prefect_harness, ray_cpu, s3_bucket):
    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    for night, count in [("2026-11-19", 2), ("2026-11-20", 3)]:
        for i in range(count):
            fs.pipe_file(f"{bucket[5:]}/cams/{night}/cam1/{i}.png", _png(synthetic_scene(24, 32, i)[0]))
    fs.pipe_file(f"{bucket[5:]}/cams/2026-11-20/cam1/broken.png", b"not a png")
    common = dict(source=f"{bucket}/cams/{{date}}", output=f"{bucket}/segpipe/date={{date}}", model="lraspp_mobilenet_v3_large",
                  weights="none", num_classes=4, class_names=("sky", "road", "car", "tree"), crf=False,
                  storage_options=options, precision="fp32")
    first = segment_archive(SegmentConfig(**common, date="2026-11-19"))
    second = segment_archive(SegmentConfig(**common, date="2026-11-20"))
    assert (first["images"], first["errors"]) == (2, 0)
    assert (second["images"], second["errors"], second["errors_by_type"]) == (4, 1, {"not_an_image": 1})
    assert abs(sum(second["pixel_share"].values()) - 1) < 1e-9
    record = json.loads(fs.cat_file(second["record"]))
    assert record["run_id"] == second["run_id"] and record["images"] == 4
    # what `evaluate` names the classes of these masks by, read from the store
    assert class_names_of_masks(f"{bucket}/segpipe/date=2026-11-20/masks/", options) == ("sky", "road", "car", "tree")
    con = duckdb.connect()
    con.register_filesystem(s3fs.S3FileSystem(**options))
    rows = con.sql(f"""select date, count(*), count(*) filter (where status = 'error')
                       from read_parquet('{bucket}/segpipe/*/images/**/*.parquet', hive_partitioning = true)
                       group by date order by date""").fetchall()
    assert [(str(d), n, e) for d, n, e in rows] == [("2026-11-19", 2, 0), ("2026-11-20", 4, 1)]
    table = Artifact.get("segpipe-run-summary")
    assert table.type == "table" and "errors: not_an_image" in str(table.data)
    metrics = {row["metric"]: row["value"] for row in (json.loads(table.data) if isinstance(table.data, str) else table.data)}
    assert (metrics["images"], metrics["images ok"], metrics["errors"]) == (4, 3, 1)
    markdown = Artifact.get("segpipe-run-outputs")
    assert f"{bucket}/segpipe/date=2026-11-20/images/" in markdown.data
    assert second["folders"] == ["images/", "class_stats/", "masks/"] and "polygons/" not in markdown.data


def test_a_run_with_polygons_names_their_folder(prefect_harness):
    """What the command line's `outputs:` line and the run's artifact list: polygons/ too."""
    summary = RunSummary(run_id="r", source="s3://b/in", output="s3://b/out", model="m", weights="none",
                         class_names=["class_0"], shards_committed=1, shards_skipped=0, images=1, errors=0, errors_by_type={}, non_image_keys=0,
                         pixels_by_class={"class_0": 4}, retried_batches=0, setup_seconds=1.0, ray_cluster="a local Ray",
                         replicas=[], seconds=31.0)

    @flow
    def summarised() -> dict:
        return summarise(summary, "s3://b/out/_runs/r.json", polygons=True, confidence=True)

    result = summarised()
    assert result["folders"] == ["images/", "class_stats/", "masks/", "confidence/", "polygons/"]
    assert "`s3://b/out/confidence/`" in Artifact.get("segpipe-run-outputs").data
    assert "`s3://b/out/polygons/`" in Artifact.get("segpipe-run-outputs").data
    assert "0.033 images/s" in Artifact.get("segpipe-run-outputs").data  # one image in 30 s, not "0.0"


def test_a_night_with_nothing_new_is_recorded_without_ray(prefect_harness, ray_cpu, tmp_path):
    """The flow's run reads the commit markers first: with every shard up to date it loads no
    model, and still records the run and says so in its artifact."""
    source = tmp_path / "cams"
    source.mkdir()
    (source / "0.png").write_bytes(_png(synthetic_scene(24, 32, 0)[0]))
    config = SegmentConfig(precision="fp32", source=str(source), output=str(tmp_path / "out"), model="lraspp_mobilenet_v3_large",
                           weights="none", num_classes=4, crf=False)
    assert segment_archive(config)["images"] == 1
    again = segment_archive(config)
    assert (again["images"], again["shards_skipped"], again["shards_committed"], again["replicas"]) == (0, 1, 0, [])
    assert again["ray_cluster"] == NO_CLUSTER
    assert json.loads(Path(again["record"]).read_text())["shards_skipped"] == 1
    assert "Nothing to do: the one shard of" in Artifact.get("segpipe-run-outputs").data


def test_evaluate_names_the_classes_of_the_segment_run_whose_masks_it_scores(prefect_harness, ray_cpu, tmp_path):
    """PREDICTIONS that are a segpipe OUTPUT's masks/ are named by the classes its newest run
    recorded (a night with nothing new records them too); ids past them, and masks of any
    other folder, are class_<id>; --class-names still wins."""
    source, output = tmp_path / "cams", tmp_path / "out"
    source.mkdir()
    for i in range(2):
        (source / f"{i}.png").write_bytes(_png(synthetic_scene(24, 32, i)[0]))
    config = SegmentConfig(precision="fp32", source=str(source), output=str(output), model="lraspp_mobilenet_v3_large",
                           weights="none", num_classes=4, crf=False, class_names=("sky", "road", "car", "tree"))
    first = segment_archive(config)
    again = segment_archive(config)  # nothing to do: recorded with the same classes
    assert again["shards_committed"] == 0
    assert json.loads(Path(first["record"]).read_text())["class_names"] == ["sky", "road", "car", "tree"]
    assert json.loads(Path(again["record"]).read_text())["class_names"] == ["sky", "road", "car", "tree"]
    truth = tmp_path / "gt"
    for i in range(2):
        (truth / f"{i}.png").parent.mkdir(exist_ok=True)
        (truth / f"{i}.png").write_bytes(encode_mask(np.asarray(Image.open(output / "masks" / f"{i}.png"))))

    def names(predictions, **options):
        report = evaluate_predictions(EvaluateConfig(predictions=str(predictions), ground_truth=str(truth),
                                                     output=str(tmp_path / "eval"), **{"num_classes": 4} | options))
        return [c["name"] for c in report["classes"]]

    assert names(output / "masks") == ["sky", "road", "car", "tree"]
    assert pq.read_table(tmp_path / "eval" / "per_image.parquet").column_names[2:] == [
        "iou_sky", "iou_road", "iou_car", "iou_tree"]
    # the README's join of the report's per_image rows with the images table, as written
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    [join] = [q for q in re.findall(r"```sql\n(.*?)```", readme, re.S) if "REPORT" in q]
    joined = duckdb.sql(join.replace("REPORT", str(tmp_path / "eval")).replace("OUTPUT", str(output))).fetchall()
    assert sorted((image_id, accuracy) for image_id, accuracy, _ in joined) == [("0.png", 1.0), ("1.png", 1.0)]
    assert names(f"{output}/masks/", num_classes=5) == ["sky", "road", "car", "tree", "class_4"]
    assert names(output / "masks", class_names=["a", "b", "c", "d"]) == ["a", "b", "c", "d"]
    shutil.copytree(output / "masks", tmp_path / "copied" / "masks")  # masks, but not in a segpipe OUTPUT
    assert names(tmp_path / "copied" / "masks") == ["class_0", "class_1", "class_2", "class_3"]
    # the newest run's classes: renamed, every shard is redone and recorded under the new names
    renamed = segment_archive(config.model_copy(update={"class_names": ("w", "x", "y", "z")}))
    assert renamed["shards_committed"] == 1
    assert names(output / "masks") == ["w", "x", "y", "z"]


def test_class_names_of_masks_given_relative_or_beside_unreadable_records(tmp_path, monkeypatch, caplog):
    """`masks` from inside OUTPUT is that OUTPUT's; records that cannot be read name nothing
    (logged), rather than failing the evaluation."""
    output = tmp_path / "out"
    (output / "masks").mkdir(parents=True)
    (output / "_runs").mkdir()
    (output / "_segpipe.json").write_text("{}")
    (output / "_runs" / "20261122T040000Z-1a2b3c.json").write_text(json.dumps({"class_names": ["sky", "road"]}))
    monkeypatch.chdir(output)
    assert class_names_of_masks("masks") == ("sky", "road")
    (output / "_segpipe.json").unlink()
    (output / "_segpipe.json").mkdir()  # read as a file: IsADirectoryError
    assert class_names_of_masks("masks") is None
    assert "cannot read the run records beside masks" in caplog.text


def _write_masks(fs, root: str, masks: dict[str, np.ndarray]) -> None:
    for key, labels in masks.items():
        fs.pipe_file(f"{root}/{key}", encode_mask(labels))


def test_evaluate_flow_scores_dataset_wide_and_reports_what_it_left_out(prefect_harness, ray_cpu, s3_bucket, tmp_path,
                                                                         capfd, caplog):
    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    root = bucket[5:]
    # two images with hand-countable confusion, ground truth given as Cityscapes-like ids that
    # the label map turns into classes 0..2 (id 7 -> 0, 8 -> 1, 26 -> 2, anything else kept)
    pred_a = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]], np.uint8)
    gt_a = np.array([[7, 7, 7, 8], [7, 7, 8, 8], [26, 26, 26, 255], [26, 26, 26, 26]], np.uint8)
    pred_b = np.zeros((2, 2), np.uint8)
    gt_b = np.array([[7, 8], [255, 7]], np.uint8)
    _write_masks(fs, f"{root}/pred", {"city/a_pred.png": pred_a, "city/b_pred.png": pred_b,
                                     "city/c_pred.png": np.zeros((3, 3), np.uint8),  # size mismatch
                                     "city/d_pred.png": np.zeros((2, 2), np.uint8),  # labels out of range
                                     "city/e_pred.png": pred_b})
    _write_masks(fs, f"{root}/gt", {"city/a_gt.png": gt_a, "city/b_gt.png": gt_b, "city/c_gt.png": gt_b,
                                   "city/d_gt.png": np.full((2, 2), 40, np.uint8), "city/f_gt.png": gt_b})
    fs.pipe_file(f"{root}/gt/city/notes.txt", b"x")
    report = evaluate_predictions(EvaluateConfig(
        predictions=f"{bucket}/pred", ground_truth=f"{bucket}/gt", output=str(tmp_path / "eval"), num_classes=3,
        class_names=["road", "sidewalk", "car"], label_map={7: 0, 8: 1, 26: 2},
        prediction_suffix="_pred", ground_truth_suffix="_gt", storage_options=options,
    ))
    # by hand, rows ground truth: a gives [[4,1,0],[0,3,0],[0,0,7]], b gives [[2,0,0],[1,0,0],[0,0,0]]
    expected_cm = [[6, 1, 0], [1, 3, 0], [0, 0, 7]]
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved == report and saved["confusion_matrix"] == expected_cm
    assert saved["images"] == 2
    assert [c["iou"] for c in saved["classes"]] == pytest.approx([6 / 8, 3 / 5, 1.0])
    assert saved["miou"] == pytest.approx((6 / 8 + 3 / 5 + 1) / 3)
    assert saved["pixel_accuracy"] == pytest.approx(16 / 18)
    # the flow's last line, in a served deployment's log too: rounded as the report's table
    captured = capfd.readouterr()
    assert f"mIoU {(6 / 8 + 3 / 5 + 1) / 3:.4f} over 2 images; report in" in captured.out + captured.err + caplog.text
    assert saved["classes"][1] == {"id": 1, "name": "sidewalk", "iou": pytest.approx(0.6), "dice": pytest.approx(0.75),
                                   "precision": pytest.approx(0.75), "recall": pytest.approx(0.75),
                                   "gt_pixels": 4, "pred_pixels": 4}
    assert saved["unpaired_predictions"] == ["city/e_pred.png"]
    assert saved["unpaired_ground_truth"] == ["city/f_gt.png"]
    reasons = {e["image_id"]: e["reason"] for e in saved["excluded"]}
    assert "size mismatch" in reasons["city/c"] and "city/c_pred.png is 3x3" in reasons["city/c"]
    assert "labels [40] outside [0, 3)" in reasons["city/d"]
    assert reasons["city/notes.txt"] == "ground_truth: not a mask (PNG or GeoTIFF)"
    assert saved["excluded_summary"].endswith("; 1 file not paired, e.g. ground truth city/notes.txt: not a mask (PNG or GeoTIFF)")
    per_image = pq.read_table(tmp_path / "eval" / "per_image.parquet").to_pylist()
    assert [r["image_id"] for r in per_image] == ["city/a", "city/b"]
    assert per_image[1]["iou_car"] is None and per_image[1]["pixel_accuracy"] == pytest.approx(2 / 3)
    for plot in ["confusion_matrix.png", "per_class_iou.png"]:
        assert Image.open(tmp_path / "eval" / plot).size[0] > 200
    artifact = Artifact.get("segpipe-evaluation")
    assert "| 1 | sidewalk | 0.6000 |" in artifact.data


class _Kept(logging.Handler):
    """The records a logger hands its handlers: what is left once its filters have run."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_evaluate_flow_fails_only_when_nothing_pairs_or_nothing_scores(prefect_harness, ray_cpu, tmp_path):
    """Nothing to score is the folders' doing, not a crash: the flow ends Failed with one line,
    and Prefect's records of it (the task's, the flow's) keep the reason without a traceback."""
    kept = _Kept()
    loggers = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    for logger in loggers:
        logger.addHandler(kept)
    try:
        _nothing_pairs_or_nothing_scores(tmp_path)
    finally:
        for logger in loggers:
            logger.removeHandler(kept)
    failures = [r for r in kept.records if r.levelno >= logging.ERROR]
    assert any("none of the 2 pairs could be scored" in r.getMessage() for r in failures)
    assert all(r.exc_info is None for r in failures), [r.getMessage() for r in failures if r.exc_info]


def _nothing_pairs_or_nothing_scores(tmp_path) -> None:
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred" / "a.png").write_bytes(encode_mask(np.zeros((2, 2), np.uint8)))
    (tmp_path / "gt" / "b.png").write_bytes(encode_mask(np.zeros((2, 2), np.uint8)))
    with pytest.raises(NothingToScoreError, match="1 prediction, 1 ground-truth mask\\)"):
        evaluate_predictions(EvaluateConfig(predictions=str(tmp_path / "pred"), ground_truth=str(tmp_path / "gt"),
                                            output=str(tmp_path / "eval"), num_classes=2))
    assert not (tmp_path / "eval").exists()
    # the ground truth's names carry a suffix after the predictions' keys: named, with the option
    for name in ("a_gtFine.png", "c_gtFine.png"):
        (tmp_path / "gt" / name).write_bytes(encode_mask(np.zeros((2, 2), np.uint8)))
    (tmp_path / "gt" / "b.png").unlink()
    (tmp_path / "pred" / "c.png").write_bytes(encode_mask(np.zeros((2, 2), np.uint8)))
    with pytest.raises(NothingToScoreError, match=r"the ground-truth masks' names end with _gtFine after a "
                                                  r"prediction's: pass --ground-truth-suffix _gtFine$"):
        evaluate_predictions(EvaluateConfig(predictions=str(tmp_path / "pred"), ground_truth=str(tmp_path / "gt"),
                                            output=str(tmp_path / "eval"), num_classes=2))
    # pairs made, none of them scorable: refused by the scoring itself, naming why, and no report
    for name in ("a_gtFine.png", "c_gtFine.png"):
        (tmp_path / "gt" / name).write_bytes(encode_mask(np.zeros((3, 3), np.uint8)))
    with pytest.raises(NothingToScoreError, match=r"^none of the 2 pairs could be scored: 2 pairs left out, e\.g\. a: size mismatch"):
        evaluate_predictions(EvaluateConfig(predictions=str(tmp_path / "pred"), ground_truth=str(tmp_path / "gt"),
                                            output=str(tmp_path / "eval"), num_classes=2, ground_truth_suffix="_gtFine"))
    assert not (tmp_path / "eval").exists()


def test_io_tasks_retry_only_io_errors(prefect_harness):
    from prefect import flow, task

    from flows._retries import IO_TASK
    from pipeline.config import RunError

    calls = {"flaky": 0, "wrong": 0}

    @task(**(IO_TASK | {"retry_delay_seconds": 0}))
    def flaky():
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            try:
                raise ConnectionResetError("peer reset")
            except ConnectionResetError as err:
                raise RunError("cannot reach source") from err  # wrapped, as prepare_output does
        return "done"

    @task(**(IO_TASK | {"retry_delay_seconds": 0}))
    def wrong():
        calls["wrong"] += 1
        raise ValueError("num_classes must be positive")

    @flow
    def both():
        return flaky(), wrong()

    with pytest.raises(ValueError, match="num_classes"):
        both()
    assert calls == {"flaky": 3, "wrong": 1}


def test_missing_or_forbidden_paths_are_not_worth_a_retry():
    from pipeline.config import RunError
    from pipeline.storage import is_transient

    def wrapped(cause: BaseException) -> RunError:
        try:
            raise cause
        except BaseException as err:
            try:
                raise RunError("cannot write to output") from err
            except RunError as outer:
                return outer

    assert is_transient(wrapped(ConnectionResetError())) and is_transient(TimeoutError()) and is_transient(OSError(5, "5xx"))
    assert not any(is_transient(wrapped(e)) for e in [FileNotFoundError(), PermissionError(), NotADirectoryError()])
    assert not is_transient(ValueError("bad"))
    # as s3fs raises S3's answers: a 400 or 405 refuses the request for good, a 503 and a 500 may pass
    assert not any(is_transient(OSError(number, "refused")) for number in (errno.EINVAL, errno.ENOSYS, errno.EREMCHG))
    assert all(is_transient(OSError(number, "5xx")) for number in (errno.EBUSY, errno.EREMOTEIO, errno.EIO))
    # as s3fs translates botocore's errors: a body cut short in flight may pass, an invalid request not
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    def s3_error(code: str) -> OSError:
        return translate_boto_error(ClientError({"Error": {"Code": code, "Message": code}}, "GetObject"))

    assert not is_transient(s3_error("InvalidRequest")) and not is_transient(s3_error("InvalidRange"))
    assert is_transient(s3_error("IncompleteBody")) and is_transient(s3_error("SlowDown"))


def test_credentials_never_reach_outputs_artifacts_or_logs(prefect_harness, ray_cpu, s3_bucket, capfd, caplog):
    from prefect.client.orchestration import get_client

    bucket, options = s3_bucket
    secret = "s3cr3t-DO-NOT-LEAK"
    fs = s3fs.S3FileSystem(**options)
    fs.pipe_file(f"{bucket[5:]}/in/a.png", _png(synthetic_scene(24, 32, 0)[0]))
    fs.pipe_file(f"{bucket[5:]}/in/broken.png", b"garbage")
    leaky = options | {"secret": secret}  # moto accepts any secret
    state = segment_archive(SegmentConfig(precision="fp32", source=f"{bucket}/in", output=f"{bucket}/out", model="lraspp_mobilenet_v3_large",
                                          weights="none", num_classes=4, crf=False, storage_options=leaky),
                            return_state=True)
    assert state.is_completed()
    with get_client(sync_client=True) as client:  # the run's parameters, as Prefect stored them
        stored = json.dumps(client.read_flow_run(state.state_details.flow_run_id).parameters, default=str)
    assert secret not in stored and options["endpoint_url"] in stored
    for path in fs.find(f"{bucket[5:]}/out"):  # tables, masks, markers, the run record
        assert secret.encode() not in fs.cat_file(path), path
    for key in ["segpipe-run-summary", "segpipe-run-outputs"]:
        assert secret not in str(Artifact.get(key).data)
    captured = capfd.readouterr()
    assert secret not in captured.out + captured.err + caplog.text


def test_credentials_from_a_secret_block_are_not_stored_with_the_run(prefect_harness, ray_cpu, s3_bucket, monkeypatch):
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # the endpoint is only in the block
    bucket, options = s3_bucket
    marker = "s3cr3t-IN-A-BLOCK"
    Secret(value=options | {"secret": marker}).save("segpipe-test-storage", overwrite=True)
    s3fs.S3FileSystem(**options).pipe_file(f"{bucket[5:]}/in/a.png", _png(synthetic_scene(24, 32, 0)[0]))
    state = segment_archive(SegmentConfig(precision="fp32", source=f"{bucket}/in", output=f"{bucket}/out", model="lraspp_mobilenet_v3_large",
                                          weights="none", num_classes=4, crf=False),
                            storage_secret="segpipe-test-storage", return_state=True)
    assert state.is_completed() and state.result()["images"] == 1  # so the block's endpoint was used
    with get_client(sync_client=True) as client:
        stored = json.dumps(client.read_flow_run(state.state_details.flow_run_id).parameters, default=str)
    assert '"storage_secret": "segpipe-test-storage"' in stored
    assert marker not in stored and options["endpoint_url"] not in stored


@pytest.mark.parametrize("job", ["segment", "evaluate", "train"])
def test_a_flow_its_checks_refuse_ends_failed_with_the_reason_as_its_message(prefect_harness, tmp_path, job):
    """A wrong setting found by the flow's own checks (a deployment's run: the command line
    checks before) is the state's one-line message, as the command line prints it, not
    Prefect's "Flow run encountered an exception"; calling the flow raises it as before."""
    from flows.train import train_model
    from pipeline.config import TrainConfig
    from pipeline.preflight import PreflightError

    missing = tmp_path / "missing"
    if job == "segment":
        run, config = segment_archive, SegmentConfig(source=str(missing), output=str(tmp_path / "out"), weights="none",
                                                     num_classes=3)
    elif job == "evaluate":
        run, config = evaluate_predictions, EvaluateConfig(predictions=str(missing), ground_truth=str(tmp_path),
                                                           output=str(tmp_path / "out"), num_classes=3)
    else:
        run, config = train_model, TrainConfig(images=str(missing), labels=str(tmp_path), output=str(tmp_path / "m.pt"),
                                               model="lraspp_mobilenet_v3_large", num_classes=3)
    state = run(config, return_state=True)
    assert state.is_failed() and state.message.endswith(f"{missing} is not a folder that exists"), state.message
    assert "encountered an exception" not in state.message
    with pytest.raises(PreflightError, match="is not a folder that exists"):
        run(config)
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.pt").exists()


def test_only_the_errors_a_flows_checks_refused_lose_their_traceback_in_its_log():
    """The served run's engine logs the refused check's error again, with a traceback: that
    record keeps its reason, formatted (a URL's %20 and Prefect's %r arguments included), and
    loses the traceback; any other PreflightError logged there keeps its traceback."""
    import logging
    import sys

    from flows._checks import failed_checks
    from pipeline.preflight import PreflightError

    reason = "SOURCE s3://cams/night%20one is not a folder that exists"

    def refuse(config: SegmentConfig) -> None:
        raise PreflightError(reason)

    state = failed_checks(refuse, SegmentConfig(source="s", output="o"))
    refused = state.data

    def record(error: BaseException, message: str, *args: object) -> logging.LogRecord:
        try:
            raise error
        except BaseException:
            return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, message, args, sys.exc_info())

    logger = logging.getLogger("prefect.flow_runs")
    engine = record(refused, "Encountered exception during execution: %r", refused)
    assert all(f.filter(engine) for f in logger.filters)
    assert engine.exc_info is None and engine.getMessage() == (
        f"Encountered exception during execution: PreflightError('{reason}'): {reason}")
    assert logging.Formatter().format(engine).count(reason) == 2  # formats, "%20" and all
    other = record(PreflightError("--resume s3://m/last.pt holds another model"), "Task failed")
    assert all(f.filter(other) for f in logger.filters)
    assert other.exc_info is not None and "Traceback" in logging.Formatter().format(other)
