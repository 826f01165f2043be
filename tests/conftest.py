"""Shared fixtures: the real-data folder (skipped cleanly when absent) and a real S3 API over
HTTP (moto's server in a subprocess, as s3fs's own test suite runs it)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import boto3
import pytest
import torch

SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """URL of a moto S3 server on 127.0.0.1, with dummy credentials in the environment."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.2)
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1"}.items():
            os.environ.setdefault(key, value)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> tuple[str, dict]:
    """A fresh bucket; returns (s3://bucket, storage_options)."""
    import s3fs

    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    fs = s3fs.S3FileSystem(**options)
    readable = request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40].strip("-")
    name = f"b-{readable}-{uuid.uuid4().hex[:8]}"
    fs.mkdir(name)
    fs.invalidate_cache()
    return f"s3://{name}", options


@pytest.fixture(scope="session")
def _ray_session():
    import ray

    yield
    ray.shutdown()


@pytest.fixture
def ray_cpu(_ray_session):
    """A real local Ray with 2 CPUs, shared by the tests that use it (tests that declare GPUs
    start their own and this one comes back afterwards)."""
    import ray

    if ray.is_initialized() and ray.cluster_resources().get("GPU"):
        ray.shutdown()
    if not ray.is_initialized():
        # "local": a Ray of the suite's own, never the cluster that /tmp/ray/ray_current_cluster
        # names (a `ray start` on this machine, or a multi-node test killed before its cleanup)
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    return ray


class FlakyS3Proxy:
    """An HTTP proxy in front of moto's S3 server that answers 503 to the next N requests
    when told to: a storage service failing, then recovering (or not). And, for the keys in
    `refused`, the error S3 answers their GETs with every time (status, code): as AWS refuses an
    object encrypted with a customer's key read without it (400 InvalidRequest), which moto's
    server does not enforce."""

    def __init__(self, upstream: str) -> None:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlparse

        self.failures_left = 0
        self.failed = 0
        self.refused: dict[str, tuple[int, str]] = {}  # "bucket/key": (status, S3's error code)
        # LIST requests (ListObjectsV2 pages) seen, and a delay added to each, to stand in for
        # a slow listing of a huge archive
        self.list_requests: list[str] = []
        self.list_delay_s = 0.0
        self._lock = threading.Lock()
        target = urlparse(upstream)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # botocore's PUTs wait for "100 Continue"

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)

            def _handle(self) -> None:
                body = self._body()
                if self.command == "GET" and "list-type=2" in self.path:
                    with proxy._lock:
                        proxy.list_requests.append(self.path)
                    time.sleep(proxy.list_delay_s)
                with proxy._lock:
                    fail = proxy.failures_left > 0
                    if fail:
                        proxy.failures_left -= 1
                        proxy.failed += 1
                status, code = 503, "SlowDown"
                if self.command in {"GET", "HEAD"} and (refusal := proxy.refused.get(self.path.lstrip("/").split("?")[0])):
                    fail, (status, code) = True, refusal
                if fail:
                    payload = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                    self.send_response(status)
                    # a HEAD answer has no body: one would break the kept-alive connection
                    self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                upstream_connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                skip = {"connection", "expect", "transfer-encoding", "content-length"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                headers["Content-Length"] = str(len(body))
                upstream_connection.request(self.command, self.path, body=body, headers=headers)
                response = upstream_connection.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in {"transfer-encoding", "connection", "content-length"}:
                        self.send_header(key, value)
                # a HEAD answer has no body but tells the object's length
                self.send_header("Content-Length", response.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream_connection.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fail_next(self, count: int) -> None:
        with self._lock:
            self.failures_left = count

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def flaky_s3(s3_bucket):
    bucket, options = s3_bucket
    proxy = FlakyS3Proxy(options["endpoint_url"])
    # one attempt in botocore (total_max_attempts counts the first; max_attempts counts only
    # retries); s3fs retries a 503 SlowDown on its own (S3FileSystem.retries, a class setting
    # a test can lower in its own process, as test_checkpoint_storage does)
    through_proxy = options | {"endpoint_url": proxy.endpoint,
                               "config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}}}
    yield bucket, options, through_proxy, proxy
    proxy.close()


def _set_moto_auth(endpoint: str, initial_no_auth_requests: str) -> str:
    """Turn moto's IAM checks on ("0": from the next request) or off ("inf"), server-wide;
    returns the setting it replaced."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=initial_no_auth_requests.encode(),
                                     method="POST", headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]


@pytest.fixture
def get_object_denied(s3_endpoint: str) -> Callable[[list[str]], AbstractContextManager[dict]]:
    """`get_object_denied(denied)`: see `_get_object_denied`."""
    return lambda denied: _get_object_denied(s3_endpoint, denied)


@contextmanager
def _get_object_denied(endpoint: str, denied: list[str]) -> Iterator[dict]:
    """Storage options of an IAM user whom moto's S3 server refuses s3:GetObject (GET and HEAD)
    on the objects `denied` (bucket/key), with S3's own 403 AccessDenied: everything else,
    listing included, is allowed. An identity policy, since moto's server authorises by those
    alone (it stores a bucket policy but does not enforce it); and IAM checks only while they
    are on, server-wide, so on for this block alone."""
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    user = f"reader-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="all-but-some-objects", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
                      {"Effect": "Deny", "Action": "s3:GetObject", "Resource": [f"arn:aws:s3:::{o}" for o in denied]}]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    before = _set_moto_auth(endpoint, "0")
    try:
        yield {"endpoint_url": endpoint, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    finally:
        _set_moto_auth(endpoint, before)


def needs_work(checked: dict | object) -> bool:
    """Whether `pipeline.run.up_to_date` found work (it hands over its listing, closed here)
    rather than a night with nothing to do (its record)."""
    from pipeline.run import ListingUnderway

    if isinstance(checked, ListingUnderway):
        checked.close()
        return True
    assert isinstance(checked, dict), checked
    return False


def stop_with_signal(command: list[str], ready: Callable[[], bool], stop: int, *, group: bool,
                     cwd: Path | None = None) -> str:
    """Run a segpipe command until `ready()`, then send it `stop` (to its process group with
    `group`, as a terminal's Ctrl-C, systemd's stop and `timeout` send it): it must end within
    45 s (Ray's and Prefect's own timeouts, a flow engine retrying a dead server or a driver
    waiting 60 s for a dead GCS, not after them), with exit 128 + the signal and no traceback.
    Returns its stderr."""
    running = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=group, cwd=cwd)
    deadline = time.monotonic() + 300
    while not ready() and running.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running.poll() is None, running.communicate()
    stopped = time.monotonic()
    if group:
        os.killpg(running.pid, stop)
    else:
        running.send_signal(stop)
    _, err = running.communicate(timeout=120)
    assert time.monotonic() - stopped < 45, err
    assert running.returncode == 128 + stop, err
    assert "Traceback" not in err, err
    return err
