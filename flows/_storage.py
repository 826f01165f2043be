"""Storage options for the flows, with credentials kept out of flow-run parameters.

Prefect stores every flow run's parameters on its server and shows them in the UI, so
credentials must not travel as parameters. The flows merge storage options from three places,
later ones winning:

1. `SEGPIPE_STORAGE_OPTIONS`, a JSON object in the environment of the process that runs the
   flow (a Kubernetes secret on the work pool's job; the CLI puts `--storage-options` here);
2. `storage_secret`, the name of a Prefect Secret block whose value is such an object;
3. the `storage_options` parameter, for what is not secret (an endpoint, a region).
"""

from __future__ import annotations

import json
import os
from typing import Any

STORAGE_OPTIONS_ENV = "SEGPIPE_STORAGE_OPTIONS"


def _json_object(text: str, origin: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        # the text holds credentials: name the position, never the content
        raise ValueError(f"{origin} is not valid JSON ({err.msg} at position {err.pos})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{origin} must be a JSON object, got {type(value).__name__}")
    return value


def resolve_storage_options(parameter: dict[str, Any] | None, storage_secret: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if os.environ.get(STORAGE_OPTIONS_ENV, "").strip():
        options |= _json_object(os.environ[STORAGE_OPTIONS_ENV], STORAGE_OPTIONS_ENV)
    if storage_secret:
        from prefect.blocks.system import Secret

        value = Secret.load(storage_secret).get()
        origin = f"the Secret block {storage_secret!r}"
        options |= _json_object(value, origin) if isinstance(value, str) else _json_object(json.dumps(value), origin)
    return options | (parameter or {})
