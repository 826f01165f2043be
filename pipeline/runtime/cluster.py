"""Joining a Ray cluster (or starting a local one), and what the driver asks of it."""

from __future__ import annotations

import logging
import os

import ray


def connect_ray(address: str | None) -> tuple[bool, str]:
    """Join the cluster at `address` (or RAY_ADDRESS), or start a local one. Returns whether
    this call connected (and so should disconnect) and how Ray was found, for the summary."""
    if ray.is_initialized():
        return False, "the Ray session already open in this process"
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, logging_level=logging.WARNING)
        return True, f"the Ray cluster at {ray.get_runtime_context().gcs_address}"
    ray.init(include_dashboard=False, logging_level=logging.WARNING)
    return True, "a local Ray started for this run"


def node_cpus() -> float:
    """The CPUs Ray counts on the node this process runs on (cgroup limits included)."""
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return float(node["Resources"].get("CPU", 1.0))
    return float(os.cpu_count() or 1)


def nodes_with_cpus() -> int:
    return max(1, sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) > 0))


def short_error(err: BaseException) -> str:
    """One line for an error row: the last line of Ray's wrapped traceback."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__)[:500]
