"""The peak memory of a command's whole process tree, as the benchmarks measure it."""

from __future__ import annotations

import contextlib
import subprocess
import time

import psutil


def peak_tree_rss(process: subprocess.Popen, by_process: dict[str, int] | None = None) -> int:
    """Peak of the summed RSS of `process` and its descendants (a run's driver, Ray's daemons
    and workers, the model replicas), sampled every 0.2 s until it exits. `by_process`, when
    given, receives each process's own peak, by its name (Ray names its workers after what
    they run: `ray::SegmentWorker`), to see which one grows."""
    parent, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            sizes = {p: p.memory_info().rss for p in tree if p.is_running()}
        except psutil.Error:
            continue  # a process of the tree ended between the listing and the reading
        peak = max(peak, sum(sizes.values()))
        if by_process is not None:
            for p, rss in sizes.items():
                with contextlib.suppress(psutil.Error):
                    # by pid: Ray renames a worker after the call it runs
                    name = next((n for n in by_process if n.endswith(f" {p.pid}")), f"{p.name()} {p.pid}")
                    by_process[name] = max(by_process.get(name, 0), rss)
        time.sleep(0.2)
    return peak
