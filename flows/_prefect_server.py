"""Prefect's temporary API server, started at the beginning of a command instead of at its
first flow call.

With no `PREFECT_API_URL`, Prefect starts a temporary server of its own (its "ephemeral" mode,
`prefect.server.api.server.SubprocessASGIServer`) the first time a flow talks to its API, and
waits there for it to answer: seconds of a command's start-up, spent after Ray has started.
The command line starts the same server, with the same command and settings, before it starts
Ray, waits for it only where the flow is called, and points the flow at it with
`temporary_settings`, without flow-run heartbeats. Its runs go to the same database
(PREFECT_HOME) as those of Prefect's own temporary server, so `prefect server start` shows
them later either way.

A configured `PREFECT_API_URL` (environment or profile), or ephemeral mode switched off,
leaves everything to Prefect: nothing is started here. One process has one such server, as it
has one of Prefect's (`temporary_server()`), for every flow it runs.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from pipeline.config import RunError

# uvicorn's exit status when it could not start: its port was taken (since it was chosen here,
# which SubprocessASGIServer retries too), or the app failed to start (its database)
_STARTUP_FAILED = 3
# where SubprocessASGIServer picks its port: below the kernel's ephemeral range, from which Ray,
# starting meanwhile, takes ports of its own
_PORTS = range(8000, 9000)

_server: TemporaryServer | None = None

# how the server starts on Linux: it asks the kernel for SIGTERM when the command that started
# it dies (prctl's PR_SET_PDEATHSIG, kept across exec), then becomes uvicorn. In a session of its
# own, no signal to the command's process group reaches it, so a command ended without its
# atexit handlers (SIGHUP from a closed terminal, SIGKILL) would otherwise leave it running
_TIED_TO_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(0)  # the command ended before the request was made\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
)


def temporary_server() -> TemporaryServer:
    """This process's temporary server, launched at the first call (see `TemporaryServer.start`)."""
    global _server
    if _server is None:
        _server = TemporaryServer()
        _server.start()
    return _server


class TemporaryServer:
    """`start()` launches the server (without waiting); `api()` waits until it answers and
    points Prefect at it for the block it wraps. The server stops when the process exits, in
    an atexit handler: after Prefect's log and event senders have sent it their last, in the
    exit hooks of `threading`, which run first."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._timeout_s = 0.0
        self._env: dict[str, str] = {}

    def start(self) -> None:
        """Launch the server unless a Prefect API is configured (then Prefect has one) or its
        ephemeral mode is off (then the flow says so itself)."""
        from prefect.settings import get_current_settings

        settings = get_current_settings()
        if settings.api.url or not settings.server.ephemeral.enabled:
            return
        self._timeout_s = settings.server.ephemeral.startup_timeout_seconds
        # as SubprocessASGIServer: no UI and no background services, then this process's settings
        self._env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                     "PREFECT__SERVER_FINAL": "1", **settings.to_environment_variables(exclude_unset=True)}
        self._launch()
        atexit.register(self.stop)

    def _launch(self) -> None:
        self.port = _free_port()
        prefect_parent = Path(importlib.util.find_spec("prefect").origin).parent.parent  # type: ignore[arg-type]
        server = ["-m", "uvicorn", "--app-dir", str(prefect_parent), "--factory", "prefect.server.api.server:create_app",
                  "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
        tied = ["-c", _TIED_TO_PARENT, str(os.getpid())] if sys.platform == "linux" else []
        self.process = subprocess.Popen(
            [sys.executable, *tied, *server],
            # a session of its own: a Ctrl-C in a terminal, or a SIGTERM that systemd or `timeout`
            # sends to the command's whole process group, stops the command, which then ends its
            # flow run through this server and stops it on its way out (`stop`); stopped with
            # the command, the server left the flow engine retrying for minutes
            env=self._env, stdin=subprocess.DEVNULL, start_new_session=True,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @contextlib.contextmanager
    def api(self) -> Iterator[None]:
        """Wait for the server to answer (RunError if it does not), then run the block with
        PREFECT_API_URL pointing at it; without a server of ours, run it as it is."""
        if self.process is None:
            yield
            return
        self._wait_healthy()
        from prefect.settings import temporary_settings

        # no flow-run heartbeats: they let a server mark a run whose process died as crashed,
        # and this server ends with the process (its atexit handler, or the kernel's SIGTERM
        # on Linux); ending them costs the flow up to 1 s at exit
        with temporary_settings(updates={"api.url": self.url, "flows.heartbeat_frequency": None}):
            yield

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self._timeout_s
        relaunched = False
        while True:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{self.url}/health", timeout=2).close()
                return
            code = self.process.poll()  # type: ignore[union-attr]
            if code == _STARTUP_FAILED and not relaunched:  # the port may have been taken since it was chosen
                relaunched = True
                self._launch()
            elif code is not None:
                self.process = None
                raise RunError(f"Prefect's temporary server exited with status {code} before it answered "
                               "(set PREFECT_API_URL to use a running Prefect server)")
            elif time.monotonic() > deadline:
                self.stop()
                raise RunError(f"Prefect's temporary server did not answer within {self._timeout_s:g} s "
                               "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def _free_port() -> int:
    for port in random.sample(_PORTS, 50):
        with socket.socket() as probe, contextlib.suppress(OSError):
            probe.bind(("127.0.0.1", port))
            return port
    raise RunError(f"no free port for Prefect's temporary server in {_PORTS.start} to {_PORTS.stop - 1}")
