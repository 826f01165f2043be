"""Storage options for the flows, with credentials kept out of flow-run parameters.

Prefect stores every flow run's parameters on its server and shows them in the UI; the
configs' `StorageOptions` hide credential values when serialised, so credentials reach a
flow from places Prefect does not store. The flows merge storage options from three places,
later ones winning:

1. `SEGPIPE_STORAGE_OPTIONS`, a JSON object in the environment of the process that runs the
   flow (for example a Kubernetes secret on the work pool's job);
2. `storage_secret`, the name of a Prefect Secret block whose value is such an object;
3. the config's `storage_options` (an endpoint, a region; credentials only when the flow is
   called in-process, as the command line does).

Each merged option remembers which of them it came from (`StorageOptions.origin`), so that
a refusal (an endpoint without its scheme) names the place to fix it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pipeline.config import StorageOptions, option_name, parse_json_object

STORAGE_OPTIONS_ENV = "SEGPIPE_STORAGE_OPTIONS"


def resolve_storage_options(given: dict[str, Any], storage_secret: str | None) -> StorageOptions:
    """The storage options of the three places above, merged, each knowing its place."""
    layers: list[tuple[str, dict[str, Any]]] = []
    if os.environ.get(STORAGE_OPTIONS_ENV, "").strip():
        layers.append((STORAGE_OPTIONS_ENV, parse_json_object(os.environ[STORAGE_OPTIONS_ENV], STORAGE_OPTIONS_ENV)))
    if storage_secret:
        from prefect.blocks.system import Secret

        value = Secret.load(storage_secret).get()
        secret = f"the Secret block {storage_secret!r}"
        layers.append((secret, parse_json_object(value if isinstance(value, str) else json.dumps(value), secret)))
    return StorageOptions.merged([*layers, (option_name("storage_options"), given)])
