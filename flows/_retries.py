"""Retry policy shared by the flows: I/O tasks retry with backoff, and only when the failure is
an I/O error (a flaky network, a storage hiccup). A wrong setting or an empty input fails at
once instead of waiting through every retry."""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE

from pipeline.storage import is_transient


def _retry_on_io(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except Exception as error:
        return is_transient(error)
    return False


# results are never reused across runs: every night must look at the archive afresh
IO_TASK = {"retries": 3, "retry_delay_seconds": [5, 30, 120], "retry_condition_fn": _retry_on_io, "cache_policy": NO_CACHE}
