"""Deployments and infrastructure: infra/prefect.yaml through Prefect's own loader, `segpipe
serve` against a real (test) Prefect server, and the Docker and KubeRay manifests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml
from prefect.cli.deploy._config import _load_deploy_configs_and_actions
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.templating import apply_values
from rich.console import Console

from flows.deployments import NIGHTLY_CRON, build_deployments

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
    assert templated["parameters"]["source"] == "s3://cams/{date}/"
    assert templated["parameters"]["ray_address"] == "auto"
    for deployment, flow_name in [(templated, "segment-archive"), (by_name["on-demand"], "evaluate-predictions")]:
        flow = load_flow_from_entrypoint(deployment["entrypoint"])
        assert flow.name == flow_name
        flow.validate_parameters(deployment["parameters"] | ({} if flow_name == "segment-archive" else {
            "predictions": "p", "ground_truth": "g", "output": "o", "num_classes": 2}))
        assert deployment["work_pool"]["name"] == "segpipe"


def test_serve_deployments_have_the_schedule_and_parameters():
    nightly, on_demand = build_deployments({"source": "s3://cams/{date}", "output": "s3://out/date={date}"})
    [schedule] = nightly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "UTC")
    assert nightly.parameters == {"source": "s3://cams/{date}", "output": "s3://out/date={date}"}
    assert nightly.entrypoint.endswith("flows/segment.py:segment_archive")
    assert on_demand.schedules == [] and on_demand.entrypoint.endswith("flows/evaluate.py:evaluate_predictions")


@pytest.mark.slow
def test_segpipe_serve_registers_both_deployments(tmp_path):
    """`segpipe serve` against a real Prefect server (the test harness's), stopped after it
    has registered its deployments."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import DeploymentSort
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "--source", f"{tmp_path}/{{date}}",
             "--output", f"{tmp_path}/out/date={{date}}", "--cron", "30 3 * * *"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            deadline = time.monotonic() + 120
            found = {}
            while time.monotonic() < deadline and len(found) < 2:
                time.sleep(1)
                with get_client(sync_client=True) as client:
                    # limit and sort given: Prefect 3.8.8's client sends nulls its server rejects
                    found = {d.name: d for d in client.read_deployments(limit=10, sort=DeploymentSort.NAME_ASC)}
            assert set(found) == {"nightly", "on-demand"}, process.poll()
            assert found["nightly"].schedules[0].schedule.cron == "30 3 * * *"
            assert found["nightly"].parameters["source"] == f"{tmp_path}/{{date}}"
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


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
