"""Checkpoints go through storage like every other object: a job loading a checkpoint while
training rewrites it gets one version whole, and transient storage errors are retried."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import s3fs
import torch

from pipeline.models import (
    ModelMeta,
    WeightsUnavailableError,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.storage import StorageUnavailableError

ARCHITECTURE = "lraspp_mobilenet_v3_large"  # 3.2M parameters: a 13 MB file, slow enough to race


def _versions(count: int, model: torch.nn.Module | None = None) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """A model (by default a real one) and `count` state dicts for it whose every floating
    tensor differs."""
    model = model or build_model(ARCHITECTURE, num_classes=4)
    base = model.state_dict()
    return model, [{k: v + i if v.is_floating_point() else v.clone() for k, v in base.items()} for i in range(count)]


def _save(model: torch.nn.Module, url: str, version: int, state: dict[str, torch.Tensor], options: dict | None) -> None:
    model.load_state_dict(state)
    save_checkpoint(model, url, model.meta.model_copy(update={"extra": {"version": version}}), storage_options=options)


def _tiny_model() -> torch.nn.Module:
    """A checkpoint of a few bytes, for tests about requests rather than sizes."""
    model = torch.nn.Conv2d(3, 4, 1)
    model.meta = ModelMeta.default(ARCHITECTURE, 4)
    return model


def _is_version(loaded: dict[str, torch.Tensor], written: dict[str, torch.Tensor]) -> bool:
    return loaded.keys() == written.keys() and all(torch.equal(loaded[k], written[k]) for k in written)


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_a_checkpoint_rewritten_while_read_is_always_read_whole(where: str, tmp_path, request) -> None:
    if where == "s3":
        bucket, options = request.getfixturevalue("s3_bucket")
        url, rewrites = f"{bucket}/models/best.pt", 8
        # s3fs reads objects over its block size in parallel ranges: small blocks make a
        # 13 MB checkpoint such an object, where an unpinned read would mix two versions
        options = options | {"default_block_size": 2**18}
    else:
        url, options, rewrites = str(tmp_path / "models" / "best.pt"), None, 12
    model, versions = _versions(3)
    _save(model, url, 0, versions[0], options)
    seen: list[int] = []
    failures: list[str] = []
    done = threading.Event()

    def read_until_done() -> None:
        while not done.is_set():
            try:
                meta, state = load_checkpoint(url, storage_options=options)
            except Exception as err:  # a torn file fails to unpickle: record it, keep reading
                failures.append(f"{type(err).__name__}: {err}")
                continue
            version = meta.extra["version"]
            if not _is_version(state, versions[version]):
                failures.append(f"metadata of version {version} with other weights")
            seen.append(version)

    reader = threading.Thread(target=read_until_done)
    reader.start()
    try:
        for rewrite in range(1, rewrites + 1):
            _save(model, url, rewrite % len(versions), versions[rewrite % len(versions)], options)
    finally:
        done.set()
        reader.join()
    assert failures == []
    assert len(set(seen)) >= 2, f"the reader never overlapped a rewrite (saw versions {seen})"
    if where == "local":
        assert [p.name for p in (tmp_path / "models").iterdir()] == ["best.pt"]  # no temporaries left


@pytest.fixture
def flaky_checkpoint(flaky_s3, monkeypatch):
    """A checkpoint URL, storage options through the flaky proxy, the proxy, and the backoff
    delays asked for (recorded, not slept). s3fs (which retries a 503 SlowDown itself) and
    botocore (whose `max_attempts` counts retries, not attempts) make one attempt each, so
    every injected failure meets segpipe's own retries."""
    bucket, _, through_proxy, proxy = flaky_s3
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    delays: list[float] = []
    monkeypatch.setattr("pipeline.storage.time", SimpleNamespace(sleep=delays.append))  # storage's clock only
    return f"{bucket}/models/best.pt", through_proxy, proxy, delays


def test_checkpoint_writes_and_reads_are_retried_through_a_storage_hiccup(flaky_checkpoint) -> None:
    url, options, proxy, delays = flaky_checkpoint
    model, versions = _versions(1, _tiny_model())
    proxy.fail_next(2)
    _save(model, url, 0, versions[0], options)
    proxy.fail_next(2)
    meta, state = load_checkpoint(url, storage_options=options)
    assert proxy.failed == 4 and delays == [0.5, 1] * 2  # two retries for the write, two for the read
    assert meta.extra == {"version": 0} and _is_version(state, versions[0])


def test_checkpoint_storage_that_stays_down_fails_after_backing_off(flaky_checkpoint) -> None:
    url, options, proxy, delays = flaky_checkpoint
    model, versions = _versions(1, _tiny_model())
    proxy.fail_next(10**9)
    with pytest.raises(StorageUnavailableError, match=r"best\.pt: still failing after 5 attempts"):
        _save(model, url, 0, versions[0], options)
    with pytest.raises(WeightsUnavailableError, match=r"cannot read checkpoint .*still failing after 5 attempts"):
        load_checkpoint(url, storage_options=options)
    assert proxy.failed == 10 and delays == [0.5, 1, 2, 4] * 2
