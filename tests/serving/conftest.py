"""Fixtures for the serving tests: the tiny checkpoint, a real endpoint process on loopback, boto3 clients."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "fixtures" / "jina-v3-tiny"


@pytest.fixture(scope="session")
def golden() -> dict:
    return json.loads((TINY / "golden.json").read_text())


@pytest.fixture(scope="session")
def engine():
    from inference.engine import Engine
    from inference.settings import Settings

    return Engine.load(TINY, settings=Settings.resolve(device="cpu", dtype="float32"))


class Counting:
    """The session's engine, counting ``embed_many`` calls: 'never processed' or 'refused at once'
    means zero of them."""

    def __init__(self, engine):
        self._engine, self.calls = engine, 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def embed_many(self, requests):
        self.calls += 1
        return self._engine.embed_many(requests)


@pytest.fixture
def start_server():
    """``start(engines, **options)``: ``inference.serve.make_server(engines, port=0, **options)`` serving
    on a daemon thread in this process; returns the server. Each one is shut down after the test."""
    from inference.serve import make_server

    started = []

    def start(engines, **options):
        server = make_server(engines, port=0, **options)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


class Endpoint:
    """A running ``python -m inference.serve`` process."""

    def __init__(self, process: subprocess.Popen, port: int):
        self.process, self.port = process, port
        self.url = f"http://127.0.0.1:{port}"

    def request(self, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None):
        """One request on a fresh connection: (status, headers, body bytes)."""
        if isinstance(body, str):
            body = body.encode("utf-8")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def post_json(self, payload, *, path="/invocations", accept=None):
        headers = {"Content-Type": "application/json"}
        if accept:
            headers["Accept"] = accept
        status, _, body = self.request("POST", path, json.dumps(payload), headers)
        return status, json.loads(body)


def start_endpoint(model_dir: Path, *, cwd: Path = REPO, env: dict | None = None, python_path: str | None = None,
                   module: str = "inference.serve", timeout: float = 120) -> Endpoint:  # fmt: skip
    """Start the server with ``--port 0``, read the port it prints, poll /ping until it answers."""
    full_env = {**os.environ, "JV3_DEVICE": "cpu", "JV3_DTYPE": "float32", **(env or {})}
    if python_path is not None:
        full_env["PYTHONPATH"] = python_path
    process = subprocess.Popen(
        [sys.executable, "-m", module, "--model-dir", str(model_dir), "--port", "0"],
        cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = process.stdout.readline()  # blocks until the model is loaded and the socket bound
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"endpoint did not start: {line!r} {process.stderr.read()[-2000:]}")
    endpoint = Endpoint(process, int(line.rsplit(":", 1)[1]))
    deadline = time.monotonic() + timeout
    while True:
        try:
            if endpoint.request("GET", "/ping")[0] == 200:
                return endpoint
        except OSError:
            if time.monotonic() > deadline:
                raise
        if process.poll() is not None:
            raise RuntimeError(f"endpoint exited: {process.stderr.read()[-2000:]}")


def stop_endpoint(endpoint: Endpoint) -> str:
    endpoint.process.terminate()
    try:
        _, err = endpoint.process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        endpoint.process.kill()
        _, err = endpoint.process.communicate()
    return err


@pytest.fixture(scope="session")
def endpoint():
    # a short timeout is not needed here; JV3_BATCH_WAIT_MS widened so concurrent callers share batches
    ep = start_endpoint(TINY, env={"JV3_BATCH_WAIT_MS": "5"})
    yield ep
    stop_endpoint(ep)


def runtime_client(port: int):
    return boto3.client(
        "sagemaker-runtime",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"max_attempts": 1}, read_timeout=60),
    )


@pytest.fixture(scope="session")
def runtime(endpoint):
    return runtime_client(endpoint.port)
