"""The two deployments, for `segpipe serve` (one process, Prefect's serve) and mirrored by
infra/prefect.yaml (a work pool, for clusters)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Any

from prefect.client.orchestration import get_client
from prefect.deployments.runner import RunnerDeployment
from prefect.runner import Runner
from prefect.schedules import Cron
from prefect.settings import PREFECT_API_URL

from pipeline.config import RunError, SegmentConfig

NIGHTLY_CRON = "0 2 * * *"  # 02:00 UTC, after the day's images have landed


def build_deployments(config: SegmentConfig, *, storage_secret: str | None = None,
                      cron: str = NIGHTLY_CRON) -> list[RunnerDeployment]:
    """`nightly` runs segment-archive on the cron schedule (UTC) with this config; its SOURCE
    may hold {date}, which each run fills with the previous day. `on-demand` runs
    evaluate-predictions when asked, with the config given then.

    Prefect stores a deployment's parameters, so credentials are refused here: they belong in
    the Secret block named `storage_secret`, or in the worker's environment."""
    _refuse_credentials(config)
    # imported here: `segpipe serve` checks the server first, without torch and Ray (seconds)
    from flows.evaluate import evaluate_predictions
    from flows.segment import segment_archive

    # only what was set: defaults stay the code's, so an upgrade's new defaults apply
    parameters = {"config": config.model_dump(mode="json", exclude_defaults=True), "storage_secret": storage_secret}
    nightly = segment_archive.to_deployment(
        name="nightly", schedules=[Cron(cron, timezone="UTC")], parameters=parameters,
        description="Segment last night's images", tags=["segpipe"],
    )
    on_demand = evaluate_predictions.to_deployment(
        name="on-demand", description="Dataset-wide IoU against ground truth", tags=["segpipe"],
    )
    return [nightly, on_demand]


def _refuse_credentials(config: SegmentConfig) -> None:
    if hidden := config.storage_options.hidden_keys():
        raise ValueError(
            f"--storage-options holds {', '.join(hidden)}, which Prefect would store with the deployment; put "
            "credentials in a Secret block (--storage-secret) or in the worker's environment (AWS_*)"
        )


def check_prefect_server() -> str:
    """The URL of the Prefect server's API, once it answers. A schedule is kept by a server
    that outlives this process: without PREFECT_API_URL, Prefect would serve against a
    temporary server of its own, gone with the process (and with it, the nightly runs)."""
    url = PREFECT_API_URL.value()
    if not url:
        raise RunError("segpipe serve needs a Prefect server to keep the schedule: start one (prefect server start) "
                       "and point PREFECT_API_URL at its API, e.g. export PREFECT_API_URL=http://127.0.0.1:4200/api")
    with get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
    if failure is not None:
        raise RunError(f"no Prefect server answers at {url} (PREFECT_API_URL: {type(failure).__name__}); start it "
                       "(prefect server start), or point PREFECT_API_URL at one that runs")
    return url


class _SigtermStoppingRunner(Runner):
    """Prefect's runner, stopped by SIGTERM (what systemd and Kubernetes send) as Prefect
    means it to be: the flow runs in flight are cancelled (their processes are serve's
    children, which a SIGTERM to serve alone does not reach), the loop stops, and the
    schedules are paused on the way out. Prefect 3.8's own handler calls its async-dispatched
    stop() from inside the event loop, which only makes a coroutine it drops, then
    sys.exit()s wherever the loop was: tracebacks of cancelled tasks, schedules left unpaused,
    and runs in flight waited for. Here the handler (run in the loop's thread, between any
    two bytecodes) only asks the loop to stop the runner, once it has started, and once."""

    _stop_requested = False

    def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
        if self._stop_requested:
            return
        self._stop_requested = True
        try:
            loop = asyncio.get_running_loop()  # start() installs this handler from inside the loop
        except RuntimeError:  # the loop has ended: serve is on its way out already
            return
        self._logger.info("SIGTERM received: cancelling the flow runs in flight and stopping")
        loop.call_soon_threadsafe(self._stop_on_loop, loop)

    def _stop_on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._stopping = loop.create_task(self._stop_once_started())  # held: a task nobody holds may be collected

    async def _stop_once_started(self) -> None:
        while not self.started and not self.stopping:  # astop() refuses a runner still starting
            await asyncio.sleep(0.1)
        if self.started:
            await self.astop()


def serve_deployments(config: SegmentConfig, *, storage_secret: str | None = None, cron: str = NIGHTLY_CRON) -> None:
    """Serve both deployments from this process until Ctrl-C (or SIGTERM), after checking that
    the Prefect server answers (RunError, one line, if not). Prints how to trigger each."""
    _refuse_credentials(config)
    url = check_prefect_server()
    try:
        deployments = build_deployments(config, storage_secret=storage_secret, cron=cron)
        names = [f"{d.flow_name}/{d.name}" for d in deployments]
        print(f"serving {' and '.join(names)} on the Prefect server at {url}; the nightly schedule is {cron} (UTC). "
              "Ctrl-C stops.")
        evaluation = {"config": {"predictions": "PREDICTIONS", "ground_truth": "GROUND_TRUTH", "output": "OUTPUT",
                                 "num_classes": 19}}
        print("to trigger a deployment now:")
        print(f"  prefect deployment run '{names[0]}'")
        print(f"  prefect deployment run '{names[1]}' --params '{json.dumps(evaluation)}'")
        sys.stdout.flush()
        runner = _SigtermStoppingRunner(pause_on_shutdown=True)
        for deployment in deployments:
            runner.add_deployment(deployment)
        # Ctrl-C or SIGTERM ends the runner's loop, which pauses the schedules on its way out;
        # a Ctrl-C before then ends the imports or the registration above. Returns on SIGTERM,
        # raises KeyboardInterrupt on Ctrl-C.
        try:
            asyncio.run(runner.start())
        finally:  # the runner's handler, left installed, would find no loop
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except KeyboardInterrupt:
        pass
    print("stopped serving")
