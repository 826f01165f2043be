"""Deployments and infrastructure: infra/prefect.yaml through Prefect's own loader, `segpipe
serve` against a real (test) Prefect server and against `prefect server start` read back with
Prefect's own CLI, and the Docker and KubeRay manifests."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import yaml
from conftest import _free_port
from PIL import Image
from prefect.cli.deploy._config import _load_deploy_configs_and_actions
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.templating import apply_values
from rich.console import Console

from flows.deployments import NIGHTLY_CRON, build_deployments
from pipeline.config import SegmentConfig

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def test_prefect_yaml_loads_with_prefects_loader_and_runs_nightly_at_two_utc(monkeypatch):
    monkeypatch.chdir(ROOT)  # entrypoints are relative to the repository root, as `prefect deploy` runs
    console = Console(record=True)
    deployments, actions = _load_deploy_configs_and_actions(INFRA / "prefect.yaml", console=console)
    assert "Skipping" not in console.export_text()  # the loader accepted every field
    by_name = {d["name"]: d for d in deployments}
    assert set(by_name) == {"nightly", "on-demand"}
    assert actions["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/segpipe"}}]

    nightly = by_name["nightly"]
    [schedule] = nightly["schedules"]
    assert (schedule["cron"], schedule["timezone"], schedule["active"]) == ("0 2 * * *", "UTC", True)
    assert schedule["cron"] == NIGHTLY_CRON  # what `segpipe serve` uses too
    assert "schedules" not in by_name["on-demand"]  # evaluation runs on demand

    monkeypatch.setenv("SEGPIPE_SOURCE", "s3://cams/{date}/")
    monkeypatch.setenv("SEGPIPE_OUTPUT", "s3://out/date={date}/")
    templated = apply_values(nightly, os.environ, remove_notset=False)  # as `prefect deploy` does
    assert templated["parameters"]["config"]["source"] == "s3://cams/{date}/"
    evaluation = {"config": {"predictions": "p", "ground_truth": "g", "output": "o", "num_classes": 2}}
    for deployment, parameters, flow_name in [(templated, templated["parameters"], "segment-archive"),
                                              (by_name["on-demand"], evaluation, "evaluate-predictions")]:
        flow = load_flow_from_entrypoint(deployment["entrypoint"])
        assert flow.name == flow_name
        # the fields infra/prefect.yaml passes are those of the flow's config (extra="forbid")
        config = flow.validate_parameters(parameters)["config"]
        assert config.ray_address == "auto" or flow_name == "evaluate-predictions"
        assert deployment["work_pool"]["name"] == "segpipe"
    nightly = load_flow_from_entrypoint(templated["entrypoint"]).validate_parameters(templated["parameters"])["config"]
    assert (nightly.source, nightly.ray_address, nightly.crf) == ("s3://cams/{date}/", "auto", True)


def test_serve_deployments_have_the_schedule_and_parameters():
    config = SegmentConfig(source="s3://cams/{date}", output="s3://out/date={date}", model="pspnet_resnet50")
    nightly, on_demand = build_deployments(config, storage_secret="survey-s3")
    [schedule] = nightly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "UTC")
    # only what was set is stored: the other fields keep the code's defaults when the run starts
    assert nightly.parameters == {"config": {"source": "s3://cams/{date}", "output": "s3://out/date={date}",
                                             "model": "pspnet_resnet50"}, "storage_secret": "survey-s3"}
    assert nightly.entrypoint.endswith("flows/segment.py:segment_archive")
    assert on_demand.schedules == [] and on_demand.entrypoint.endswith("flows/evaluate.py:evaluate_predictions")


@pytest.mark.slow
def test_segpipe_serve_registers_both_deployments(tmp_path):
    """`segpipe serve` against a real Prefect server (the test harness's), stopped after it
    has registered its deployments."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
        # paths given relative to the folder `serve` runs in: stored absolute, for a worker elsewhere
        (tmp_path / "cams").mkdir()
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "--source", "cams/{date}",
             "--output", "out/date={date}", "--cron", "30 3 * * *", *UNTRAINED],
            env=env | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}, cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 120
            found = {}
            while time.monotonic() < deadline and len(found) < 2:
                time.sleep(1)
                with get_client(sync_client=True) as client:
                    found = {d.name: d for d in client.read_deployments()}
            assert set(found) == {"nightly", "on-demand"}, process.poll()
            assert found["nightly"].schedules[0].schedule.cron == "30 3 * * *"
            assert found["nightly"].parameters["config"]["source"] == f"{tmp_path}/cams/{{date}}"
            assert found["nightly"].parameters["config"]["output"] == f"{tmp_path}/out/date={{date}}"
        finally:
            _stop(process)


# serve refuses weights it cannot have, as segment does; published ones cannot be downloaded here
UNTRAINED = ("--weights", "none", "--num-classes", "4")


def _stop(process: subprocess.Popen) -> None:
    """Ctrl-C to a process started with start_new_session=True and its children; SIGKILL to
    whatever of that group is left once it has exited, or after 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _post(api: str, path: str, body: dict[str, Any]) -> Any:
    """POST to Prefect's API, retrying 503 as Prefect's own client does: its server answers 503
    when SQLite is busy, which happens on a loaded machine while `segpipe serve` registers.
    Waiting as long as Prefect's client does (PREFECT_API_REQUEST_TIMEOUT, 60 s): a CI run saw
    creating a flow run take more than 10 s, and that POST is not safe to send twice."""
    request = urllib.request.Request(f"{api}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    for attempt in range(10):
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            if error.code != 503 or attempt == 9:
                raise
            time.sleep(0.5 * (attempt + 1))


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[dict[str, str]]:
    """`prefect server start` in a subprocess on a free port, with its own PREFECT_HOME (so its
    own SQLite database); yields the environment that points Prefect's CLI and `segpipe` at it."""
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "COLUMNS": "200"}  # COLUMNS: rich wraps no names
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
             "--no-ui", "--analytics-off"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"prefect server start did not answer at {api}/health:\n"
                                       f"{log.read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield {**env, "PREFECT_API_URL": api}
    finally:
        _stop(server)


@pytest.mark.slow
def test_prefect_cli_lists_what_segpipe_serve_registered_on_prefect_server_start(prefect_server, tmp_path):
    """`prefect deployment ls`, `flow-run ls` and `artifact ls` succeed against `prefect server
    start` once `segpipe serve` has registered both deployments. Prefect 3.8.8's CLI sends JSON
    nulls for the filters it leaves at their defaults, which its server answers with 422 under
    fastapi>=0.151 (hence fastapi<0.151 in pyproject.toml)."""
    env, api = prefect_server, prefect_server["PREFECT_API_URL"]

    def prefect(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "prefect", *args], env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, f"prefect {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
        return result.stdout

    serve, log = _start_serve(tmp_path, env)
    try:
        deadline = time.monotonic() + 120
        # polled with every filter left out of the body, which any fastapi takes: a 422 shows in the CLI below
        while len(deployments := _post(api, "/deployments/filter", {})) < 2:
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        for deployment in deployments:  # a run each, far in the future so serve never starts it
            _post(api, f"/deployments/{deployment['id']}/create_flow_run", {
                "enforce_parameter_schema": False,
                "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": "2099-01-01T00:00:00Z"}},
            })

        listed = prefect("deployment", "ls")
        assert "segment-archive/nightly" in listed and "evaluate-predictions/on-demand" in listed, listed
        runs = prefect("flow-run", "ls")
        assert "segment-archive" in runs and "evaluate-predictions" in runs and "SCHEDULED" in runs, runs
        prefect("artifact", "ls")
    finally:
        _stop(serve)


def _start_serve(tmp_path, env: dict[str, str], *options: str, background: bool = False) -> tuple[subprocess.Popen, Path]:
    """`segpipe serve` of a nightly deployment over tmp_path, its output in serve.log;
    `background`: with SIGINT ignored, as a shell script's `segpipe serve &` starts it."""
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "--source", f"{tmp_path}/{{date}}",
             "--output", f"{tmp_path}/out/date={{date}}", *UNTRAINED, *options],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if background else None,
        )
    return serve, log


@pytest.mark.parametrize("server", ["none configured", "not answering"])
def test_segpipe_serve_without_a_prefect_server_says_so_in_one_line(tmp_path, server):
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # no profile setting PREFECT_API_URL either
    if server == "not answering":
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{_free_port()}/api"
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "serve", "--source", f"{tmp_path}/{{date}}", "--output",
         f"{tmp_path}/out/date={{date}}", *UNTRAINED],
        env=env, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    [line] = done.stderr.splitlines()
    expected = "needs a Prefect server" if server == "none configured" else f"no Prefect server answers at {env.get('PREFECT_API_URL')}"
    assert line.startswith("segpipe: error: ") and expected in line and "PREFECT_API_URL" in line


@pytest.mark.slow
def test_segpipe_serve_says_how_to_trigger_and_stops_on_ctrl_c(prefect_server, tmp_path):
    env, api = prefect_server, prefect_server["PREFECT_API_URL"]
    serve, log = _start_serve(tmp_path, env)
    try:
        deadline = time.monotonic() + 120
        while len(_post(api, "/deployments/filter", {})) < 2:  # registered: serve() runs
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        os.killpg(serve.pid, signal.SIGINT)  # Ctrl-C, to the process and its children
        serve.wait(timeout=20)  # a few seconds; 20 keeps a slow machine from failing it
    finally:
        _stop(serve)
    output = log.read_text()
    assert serve.returncode == 0, output
    assert "prefect deployment run 'segment-archive/nightly'" in output
    assert "prefect deployment run 'evaluate-predictions/on-demand' --params" in output
    assert "Traceback" not in output and "never awaited" not in output, output
    assert output.rstrip().endswith("stopped serving")


@pytest.mark.slow
def test_segpipe_serve_logs_a_night_it_runs_and_stops_on_sigterm(prefect_server, tmp_path):
    """A service's log: the nightly flow run triggered now (as the schedule would at 02:00)
    shows in serve's output with its progress, its summary and its end state. SIGTERM (what
    systemd and Kubernetes send) to serve alone, while a second run is under way, cancels
    that run and stops serving within seconds, with the schedule paused, as Ctrl-C does; also
    when serve was started in the background by a script, with SIGINT ignored."""
    env, api = prefect_server, prefect_server["PREFECT_API_URL"]
    env = {**env, "RAY_ADDRESS": "local"}  # a Ray of its own, as on a machine with none running
    yesterday = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).date().isoformat()  # what {date} becomes
    night = tmp_path / yesterday
    night.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(night / name)
    serve, log = _start_serve(tmp_path, env, "--model", "deeplabv3_mobilenet_v3_large", "--weights", "none",
                              "--num-classes", "3", "--no-compile", background=True)
    try:
        deadline = time.monotonic() + 120
        while not (nightly := [d for d in _post(api, "/deployments/filter", {}) if d["name"] == "nightly"]):
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        _post(api, f"/deployments/{nightly[0]['id']}/create_flow_run", {})  # scheduled now
        deadline = time.monotonic() + 240
        while not re.search(r"Flow run '[^']+' - Finished in state", output := log.read_text()):
            assert serve.poll() is None and time.monotonic() < deadline, output[-3000:]
            time.sleep(1)
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(night / "c.png")  # work again
        second = _post(api, f"/deployments/{nightly[0]['id']}/create_flow_run", {})
        deadline = time.monotonic() + 120
        while log.read_text().count("Beginning flow run") < 2:
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        os.kill(serve.pid, signal.SIGTERM)  # to serve alone, as a service manager does
        time.sleep(0.5)
        os.kill(serve.pid, signal.SIGTERM)  # an impatient second one changes nothing
        serve.wait(timeout=60)
    finally:
        _stop(serve)
    output = log.read_text()
    assert serve.returncode == 0, output
    with urllib.request.urlopen(f"{api}/flow_runs/{second['id']}", timeout=10) as response:
        assert json.load(response)["state"]["type"] == "CANCELLED", output
    assert "Beginning flow run" in output and "for flow 'segment-archive'" in output, output
    assert "2 images of 2" in output, output  # the run's progress
    summary = re.search(r"run (\S+): 2 images, 2 segmented and 0 errors,", output)
    assert summary, output
    assert (tmp_path / "out" / f"date={yesterday}" / "_runs" / f"{summary.group(1)}.json").is_file()
    assert f"outputs: {tmp_path}/out/date={yesterday}/images/" in output
    assert "Finished in state Completed()" in output
    nightly_after = [d for d in _post(api, "/deployments/filter", {}) if d["name"] == "nightly"]
    assert nightly_after[0]["paused"], (nightly_after, output)  # on the way out, as Prefect's serve does on Ctrl-C
    # the run in flight ends with Ray's exit on SIGTERM, which Prefect logs as a crash with its
    # traceback before the runner records the cancellation; serve itself says nothing else
    before_sigterm = output.split("SIGTERM received")[0]
    assert "Traceback" not in before_sigterm and "never awaited" not in output, output
    assert "never retrieved" not in output and "has not yet started" not in output, output
    assert output.count("SIGTERM received") == 1
    assert output.rstrip().endswith("stopped serving")
    again, log = _start_serve(tmp_path, env)  # serving again resumes the schedule
    try:
        deadline = time.monotonic() + 120
        while next(d for d in _post(api, "/deployments/filter", {}) if d["name"] == "nightly")["paused"]:
            assert again.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
    finally:
        _stop(again)


@pytest.mark.slow
def test_a_served_night_that_fails_its_checks_logs_one_line_without_a_traceback(prefect_server, tmp_path):
    """A night whose SOURCE folder is missing is a mistake in the settings, not a crash: the
    flow run ends Failed with the same one line the command line prints, and serve's log (a
    service's journal, read every morning) holds no traceback."""
    env, api = prefect_server, prefect_server["PREFECT_API_URL"]
    yesterday = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).date().isoformat()
    serve, log = _start_serve(tmp_path, env)  # tmp_path/<yesterday> is never made
    try:
        deadline = time.monotonic() + 120
        while not (nightly := [d for d in _post(api, "/deployments/filter", {}) if d["name"] == "nightly"]):
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        run = _post(api, f"/deployments/{nightly[0]['id']}/create_flow_run", {})
        deadline = time.monotonic() + 240
        while not re.search(r"Flow run '[^']+' - Finished in state", output := log.read_text()):
            assert serve.poll() is None and time.monotonic() < deadline, output[-3000:]
            time.sleep(1)
        time.sleep(3)  # what the runner says after the flow run's process exits
        os.killpg(serve.pid, signal.SIGINT)
        serve.wait(timeout=20)
    finally:
        _stop(serve)
    output = log.read_text()
    reason = f"SOURCE {tmp_path}/{yesterday} is not a folder that exists"
    assert f"Finished in state Failed('{reason}')" in output, output
    with urllib.request.urlopen(f"{api}/flow_runs/{run['id']}", timeout=10) as response:
        state = json.load(response)["state"]
    assert (state["type"], state["message"]) == ("FAILED", reason)
    assert "Traceback" not in output, output


def test_dockerfile_cuda_runtime_installs_the_package_and_drops_root():
    lines = [line.strip() for line in (INFRA / "Dockerfile").read_text().splitlines() if line.strip() and not line.startswith("#")]
    base = next(line for line in lines if line.startswith("FROM "))
    assert re.match(r"FROM nvidia/cuda:\d+\.\d+(\.\d+)?-(cudnn-)?runtime-ubuntu", base)
    text = "\n".join(lines)
    assert "pip install -c constraints.txt ." in text  # the locked set, as CI installs it
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}
    python = re.search(r"python3\.(\d+)-venv", text).group(1)
    assert f"3.{python}" == f"{sys.version_info.major}.{sys.version_info.minor}"  # constraints.txt was frozen on it


def test_raycluster_has_a_cpu_head_and_autoscaled_one_gpu_workers():
    cluster = yaml.safe_load((INFRA / "ray" / "raycluster.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__  # head, workers and drivers must share it
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    [head_container] = head["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]
    [gpu] = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"] and gpu["maxReplicas"] > gpu["minReplicas"]
    [worker] = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert worker["image"] == head_container["image"]


@pytest.mark.slow
def test_prefect_server_start_schedules_nightly_runs_for_what_segpipe_serve_registered(prefect_server, tmp_path):
    """The server's scheduler turns the nightly cron into SCHEDULED flow runs at 02:00 UTC.
    Prefect 3.8.8's scheduler bulk-inserts flow runs with a `state` key, which SQLAlchemy 2.1
    rejects (InvalidRequestError: "please supply a bulk_dml decorated function"), so under it
    no nightly run is ever created (hence sqlalchemy<2.1 in pyproject.toml). Its recent
    deployments pass runs every 5 s, so this takes seconds once serve has registered."""
    env, api = prefect_server, prefect_server["PREFECT_API_URL"]
    serve, log = _start_serve(tmp_path, env)  # the default cron: its runs are hours away, so serve never starts one
    try:
        deadline = time.monotonic() + 45
        while not (nightly := [d for d in _post(api, "/deployments/filter", {}) if d["name"] == "nightly"]):
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        by_nightly = {"deployments": {"id": {"any_": [nightly[0]["id"]]}}}
        deadline = time.monotonic() + 30
        while not (runs := _post(api, "/flow_runs/filter", by_nightly)) and time.monotonic() < deadline:
            time.sleep(1)
        server_log = (tmp_path / "server.log").read_text()  # the fixture's
        assert runs, f"no flow run scheduled for the nightly deployment in 30 s; server log:\n{server_log[-3000:]}"
        assert {run["state"]["type"] for run in runs} == {"SCHEDULED"}
        assert {run["expected_start_time"][11:19] for run in runs} == {"02:00:00"}  # NIGHTLY_CRON, UTC
    finally:
        _stop(serve)
