"""A run's start-up. The command's process, Ray's driver, never imports torch: the replicas
import it in their own processes while the driver starts Prefect. Prefect's flow talks to the
temporary server the command launched before Ray (`flows._prefect_server`), not to one Prefect
starts at the flow's first call, and keeps its runs in PREFECT_HOME's database as Prefect's
own temporary server does."""

from __future__ import annotations

import io
import json
import os
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
    (tmp_path / "src").mkdir()
    for index in range(2):
        buffer = io.BytesIO()
        Image.fromarray(synthetic_scene(48, 64, index)[0]).save(buffer, format="PNG")
        (tmp_path / "src" / f"{index}.png").write_bytes(buffer.getvalue())
    argv = ["segment", str(tmp_path / "src"), str(tmp_path / "out"), "--model", "lraspp_mobilenet_v3_large",
            "--weights", "none", "--num-classes", "4", "--no-crf", "--precision", "fp32"]
    code = (f"import json, sys; from flows.cli import main; code = main({argv!r}); "
            f"print(json.dumps([code, [m for m in {DRIVER_FREE_OF!r} if m in sys.modules]]))")
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env |= {"RAY_ADDRESS": "local", "PREFECT_HOME": str(tmp_path / "prefect-home")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    exit_code, imported = json.loads(done.stdout.splitlines()[-1])
    assert exit_code == 0 and imported == [], done.stdout
    rows = duckdb.sql(f"select status, count(*) from read_parquet('{tmp_path}/out/images/**/*.parquet') group by 1").fetchall()
    assert rows == [("ok", 2)]
    assert (tmp_path / "prefect-home" / "prefect.db").stat().st_size > 0  # where the flow run was recorded


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
