"""Ray starts in the thread that asks for the replicas: ray.init imports modules as it
connects (pydantic.v1 among them), and beside the command line's import of Prefect in another
thread, Python's import locks broke a cycle with an ImportError about 1 `segpipe segment` in 9."""

from __future__ import annotations

import threading

import pytest

from pipeline.config import SegmentConfig
from pipeline.runtime import replicas as replicas_module
from pipeline.runtime.replicas import Replicas

CONFIG = SegmentConfig(source="s", output="o", model="lraspp_mobilenet_v3_large", weights=None, num_classes=4)


def test_ray_starts_in_the_calling_thread_and_its_failure_is_raised_there(monkeypatch) -> None:
    threads: list[threading.Thread] = []

    def connect_ray(address: str | None) -> tuple[bool, str]:
        threads.append(threading.current_thread())
        raise ConnectionError("no Ray at that address")

    monkeypatch.setattr(replicas_module, "connect_ray", connect_ray)
    replicas = Replicas(CONFIG)
    with pytest.raises(ConnectionError, match="no Ray"):
        replicas.start()
    assert threads == [threading.current_thread()]
    assert replicas.started
    with pytest.raises(ConnectionError, match="no Ray"):  # and to the run that asks for them later
        replicas.pool(timeout=0)
    replicas.start()  # once: a second call does not try again
    assert len(threads) == 1
    replicas.close()
