"""The peak memory of a command's whole process tree, as the benchmarks measure it."""

from __future__ import annotations

import subprocess
import time

import psutil


def peak_tree_rss(process: subprocess.Popen) -> int:
    """Peak of the summed RSS of `process` and its descendants (a run's driver, Ray's daemons
    and workers, the model replicas), sampled every 0.2 s until it exits."""
    parent, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass  # a process of the tree ended between the listing and the reading
        time.sleep(0.2)
    return peak
