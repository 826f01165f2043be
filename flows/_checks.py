"""A flow run stopped by its own checks (`pipeline.preflight`), or refused for its inputs
(nothing to score), ends Failed with the one line the command line prints, and no traceback:
a wrong setting or a missing night's folder is not a crash, and `segpipe serve`'s log is a
service's journal, read every morning.

Prefect logs a flow that raises twice, each time with the traceback: when the flow raises,
and again when its engine, in the served run's process, re-raises the final state's error
("Engine execution exited with unexpected exception"). Returning the Failed state instead
stops the first; the second is Prefect's own, whatever the flow does, so its record of a
failed check is logged without the traceback, the reason added to its message."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from prefect.states import Failed, State

from pipeline.config import JobConfig
from pipeline.preflight import PreflightError

Config = TypeVar("Config", bound=JobConfig)
Refusal = TypeVar("Refusal", bound=Exception)


def failed_checks(check: Callable[[Config], None], config: Config) -> State | None:
    """`check(config)`; the Failed state to return from the flow when it refuses the
    config, else None. Calling the flow still raises the PreflightError (the state's data)."""
    try:
        check(config)
    except PreflightError as err:
        return failed(err)
    return None


def failed(err: Exception) -> State:
    """The Failed state a flow returns for an error that refuses its settings or inputs:
    `refused(err)` as its data, which calling the flow raises."""
    return Failed(message=str(err), data=refused(err))


def refused(err: Refusal) -> Refusal:
    """`err`, marked as a refusal of the run's settings or inputs: the records Prefect logs of
    it (a task's that raises it, the flow's, and its engine's) keep its reason and lose the
    traceback. A task raises it marked so, before Prefect logs its failure."""
    setattr(err, _REFUSED, True)  # an attribute: Prefect may hand back a copy of the state's error
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        _without_traceback(logging.getLogger(name))
    return err


_REFUSED = "refused_by_flow_checks"


class _RefusedSettingsRecords(logging.Filter):
    """Drops the traceback of a record logged with an error marked by `refused`, keeping its
    reason; every other record passes as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if getattr(error, _REFUSED, False):
            record.msg, record.args = f"{record.getMessage()}: {error}", ()
            record.exc_info, record.exc_text = None, None
        return True


def _without_traceback(logger: logging.Logger) -> None:
    if not any(isinstance(f, _RefusedSettingsRecords) for f in logger.filters):
        logger.addFilter(_RefusedSettingsRecords())
