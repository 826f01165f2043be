"""A run's start-up. The command's process, Ray's driver, never imports torch: the replicas
import it in their own processes while the driver starts Prefect. Prefect's flow talks to the
temporary server the command launched before Ray (`flows._prefect_server`), not to one Prefect
starts at the flow's first call, and keeps its runs in PREFECT_HOME's database as Prefect's
own temporary server does."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path

import duckdb
import pytest
from PIL import Image
from prefect.settings import get_current_settings, temporary_settings

from flows._prefect_server import TemporaryServer
from pipeline.config import RunError
from pipeline.samples import synthetic_scene

ROOT = Path(__file__).resolve().parents[1]
# what the driver of a run must not import: torch and the stages cost seconds before Ray could
# start; Prefect's server module is what Prefect imports to start its own temporary server
DRIVER_FREE_OF = ("torch", "torchvision", "pipeline.models", "pipeline.stages", "prefect.server.api.server")


@pytest.mark.slow
def test_a_runs_driver_imports_no_torch_and_its_flow_uses_the_commands_prefect_server(tmp_path) -> None:
    """`segpipe segment` as installed (`flows.cli.run`), with Prefect's log lines on: the run's
    outputs, the modules its process imported (printed by an exit handler, which `run` runs
    before it ends the process), its flow and tasks completed in PREFECT_HOME's database with
    nothing lost on the way (Prefect logs "Error logging to API" for logs it could not send),
    and no process of its own left behind (Prefect's server, Ray's)."""
    (tmp_path / "src").mkdir()
    for index in range(2):
        buffer = io.BytesIO()
        Image.fromarray(synthetic_scene(48, 64, index)[0]).save(buffer, format="PNG")
        (tmp_path / "src" / f"{index}.png").write_bytes(buffer.getvalue())
    argv = ["segpipe", "segment", str(tmp_path / "src"), str(tmp_path / "out"), "--model", "lraspp_mobilenet_v3_large",
            "--weights", "none", "--num-classes", "4", "--no-crf", "--precision", "fp32"]
    code = (f"import atexit, json, sys; atexit.register(lambda: print('imported', json.dumps("
            f"[m for m in {DRIVER_FREE_OF!r} if m in sys.modules]))); sys.argv = {argv!r}; "
            "from flows.cli import run; run()")
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env |= {"RAY_ADDRESS": "local", "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_LOGGING_LEVEL": "INFO"}
    command = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=ROOT, env=env, start_new_session=True)
    out, err = command.communicate(timeout=300)
    assert command.returncode == 0, err[-3000:]
    [imported] = [line for line in out.splitlines() if line.startswith("imported ")]
    assert json.loads(imported.removeprefix("imported ")) == []
    assert "Error logging to API" not in out + err and "Traceback" not in err, err[-3000:]
    with pytest.raises(ProcessLookupError):
        os.killpg(command.pid, 0)
    rows = duckdb.sql(f"select status, count(*) from read_parquet('{tmp_path}/out/images/**/*.parquet') group by 1").fetchall()
    assert rows == [("ok", 2)]
    with sqlite3.connect(tmp_path / "prefect-home" / "prefect.db") as db:
        flows = db.execute("select state_type from flow_run").fetchall()
        tasks = db.execute("select state_type from task_run").fetchall()
    assert flows == [("COMPLETED",)]
    assert len(tasks) == 3 and set(tasks) == {("COMPLETED",)}


def test_the_driver_side_of_a_run_imports_no_torch() -> None:
    """What the command's process and Ray's decode and write tasks import: none of it may pull
    torch in (seconds each, before Ray starts or before a task's first batch)."""
    modules = ("flows.cli", "flows.segment", "pipeline.run", "pipeline.runtime.driver", "pipeline.runtime.replicas",
               "pipeline.io_stages", "pipeline.windows", "pipeline.records", "pipeline.decode", "pipeline.rasters")
    done = subprocess.run([sys.executable, "-c", f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}]; "
                           "print(sorted(m for m in ('torch', 'torchvision', 'pipeline.stages') if m in sys.modules))"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_the_temporary_server_answers_and_prefect_is_pointed_at_it_for_the_block() -> None:
    server = TemporaryServer()
    with temporary_settings(restore_defaults={"api.url"}):
        server.start()
        try:
            assert server.process is not None
            with server.api():
                assert get_current_settings().api.url == server.url
                assert get_current_settings().flows.heartbeat_frequency is None
                urllib.request.urlopen(f"{server.url}/health", timeout=5).close()
            assert get_current_settings().api.url is None
        finally:
            server.stop()
    assert server.process is None


def test_a_configured_prefect_api_starts_no_server() -> None:
    server = TemporaryServer()
    with temporary_settings(updates={"api.url": "http://127.0.0.1:4200/api"}):
        server.start()
        assert server.process is None
        with server.api():
            assert get_current_settings().api.url == "http://127.0.0.1:4200/api"


@pytest.mark.slow
def test_a_server_that_cannot_start_is_one_error(tmp_path) -> None:
    """Its database cannot be created: uvicorn exits, is relaunched once (its port might have
    been taken), exits again, and the command gets one line."""
    unreachable = f"sqlite+aiosqlite:///{tmp_path}/no/such/folder/prefect.db"
    server = TemporaryServer()
    with temporary_settings(restore_defaults={"api.url"}, updates={"server.database.connection_url": unreachable}):
        server.start()
        with pytest.raises(RunError, match="Prefect's temporary server exited with status 3 before it answered"), \
                server.api():
            pass
    assert server.process is None
