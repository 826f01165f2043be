"""The direction of the layers: `pipeline` is a library that runs without Ray, Prefect or the
application; only `pipeline.runtime` imports Ray, and nothing in `pipeline` imports `flows`."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import pipeline

# None in sys.modules makes `import ray` (and every `from ray...`) raise ImportError
_BLOCK = "import sys; sys.modules.update({name: None for name in ('ray', 'prefect', 'flows')}); "


def _library_modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(pipeline.__path__, prefix="pipeline.")]
    return sorted(n for n in names if not (n == "pipeline.runtime" or n.startswith("pipeline.runtime.")))


def test_every_library_module_is_found() -> None:
    modules = _library_modules()
    # a sample of each layer, so a walk that silently finds nothing cannot pass the test below
    assert {"pipeline.config", "pipeline.outputs", "pipeline.run", "pipeline.stages", "pipeline.models.weights"} <= set(modules)


@pytest.mark.parametrize("module", _library_modules())
def test_library_module_imports_without_ray_prefect_or_flows(module: str) -> None:
    # a fresh interpreter per module: in a shared one, a dependency pulled in by an earlier
    # module could hide a violation
    done = subprocess.run([sys.executable, "-c", f"{_BLOCK}import {module}"], capture_output=True, text=True)
    assert done.returncode == 0, f"{module} needs ray, prefect or flows:\n{done.stderr[-2000:]}"


def test_the_block_catches_a_module_that_imports_ray() -> None:
    done = subprocess.run([sys.executable, "-c", f"{_BLOCK}import pipeline.runtime.cluster"], capture_output=True, text=True)
    assert done.returncode != 0 and "ray" in done.stderr
