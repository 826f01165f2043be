"""Joining a Ray cluster (or starting a local one), and what the driver asks of it."""

from __future__ import annotations

import logging
import os
import signal
import threading

import ray

# Ray's own setting for how its processes authenticate to each other ("token" or "disabled")
AUTH_MODE_ENV = "RAY_AUTH_MODE"


def connect_ray(address: str | None, *, training: bool = False) -> tuple[bool, str]:
    """Join the cluster at `address` (or RAY_ADDRESS), or start a local one (for Ray Train
    when `training`). Returns whether this call connected (and so should disconnect) and how
    Ray was found, for the summary."""
    if ray.is_initialized():
        return False, "the Ray session already open in this process"
    wanted = address or os.environ.get("RAY_ADDRESS") or None
    if wanted in (None, "local"):
        _choose_token_auth()
        # no autoscaler drains a node of a Ray started here: Ray Train's preemption watcher would
        # watch nothing, and its actor logs an error line at every training run (the processes
        # Ray starts inherit this environment)
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # only for training: the hook costs every worker an import, about 0.8 s of a segment
        # run's start here
        hook = {"worker_process_setup_hook": f"{__name__}.quiet_placement_group_cleaner"} if training else None
        # "local", not None: given no address, Ray joins the newest cluster started on this
        # machine (`ray start`, another program's), which the summary would call this run's own
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, runtime_env=hook)
        _python_handles_sigterm()
        return True, "a local Ray started for this run"
    ray.init(address=address, logging_level=logging.WARNING)
    _python_handles_sigterm()
    return True, f"the Ray cluster at {ray.get_runtime_context().gcs_address}"


def _python_handles_sigterm() -> None:
    """SIGTERM to Python's handler again (`ray.init`'s, which raises SystemExit(15)), in place
    of the crash handler Ray's core worker put in as it connected. That one printed a C++
    stack dump on every SIGTERM and handed the signal on; and when the signal also reached the
    local Ray's daemons (sent to the command's process group: systemd's stop, a terminal's job
    control) the process then aborted in `ray.shutdown`, exit 134 with no line of ours. A
    segmentation run was spared only because Prefect's flow engine, started after Ray, puts in
    a Python handler of its own; training and evaluation start Ray inside their flow."""
    handler = signal.getsignal(signal.SIGTERM)  # None: one put in outside Python, left alone
    if threading.current_thread() is threading.main_thread() and handler is not None:
        signal.signal(signal.SIGTERM, handler)


def quiet_placement_group_cleaner() -> None:
    """Run in each worker process of a local Ray started for training. Ray Train's placement group
    cleaner asks Ray's State API, every few seconds of a training run, whether the run's
    controller is alive, to remove its placement group should it die. The State API is the
    dashboard's, which a local Ray starts without (`ray[default]` is not installed), so every
    question fails with a warning line, and the cleaner can never remove anything; nor need it:
    the local Ray, and its placement groups, end with the command. The cleaner finds the cluster
    to ask by RAY_ADDRESS, else by looking for one on this machine ("auto"): with another Ray
    running here, that fails with an exception that killed its thread, printed as a traceback.
    So RAY_ADDRESS names this worker's own cluster (it is inherited from the command, which
    may have set it empty), where the question fails as above."""
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    logging.getLogger(PLACEMENT_GROUP_CLEANER).setLevel(logging.ERROR)


# the cleaner's module, and so its logger's name: a private one of Ray Train's, checked by a test
PLACEMENT_GROUP_CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def _choose_token_auth() -> None:
    """A local Ray that Ray starts itself turns token authentication on (Ray >= 2.51) and warns
    that it did, on every command: "Token authentication is enabled for this Ray cluster. Set
    RAY_AUTH_MODE=disabled to opt out". segpipe makes that choice itself, so there is nothing
    to warn about and the local cluster is protected as Ray intends (it listens on the node's
    address, not only on 127.0.0.1); a RAY_AUTH_MODE already set is the user's and is kept.

    Ray reads its settings once, when imported: as Ray does when it enables the mode itself
    (`authentication_token_setup._enable_token_auth`), they are read again so this process
    agrees with the processes it is about to start, which inherit the environment. Ray writes
    the token to ~/.ray/auth_token if there is none."""
    if os.environ.get(AUTH_MODE_ENV) is not None:
        return
    from ray._raylet import Config

    os.environ[AUTH_MODE_ENV] = "token"
    Config.initialize("")


def node_cpus() -> float:
    """The CPUs Ray counts on the node this process runs on (cgroup limits included)."""
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return float(node["Resources"].get("CPU", 1.0))
    return float(os.cpu_count() or 1)


def cpu_nodes() -> list[tuple[str, float]]:
    """The live nodes with CPUs: (node id, CPUs Ray counts there)."""
    return [(node["NodeID"], float(node["Resources"]["CPU"])) for node in ray.nodes()
            if node["Alive"] and node["Resources"].get("CPU", 0) > 0]


def nodes_with_cpus() -> int:
    return max(1, len(cpu_nodes()))


def short_error(err: BaseException) -> str:
    """One line for an error row: the last line of Ray's wrapped traceback."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__)[:500]
