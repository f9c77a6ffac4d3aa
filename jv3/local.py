"""The local endpoint as a subprocess: ``python -m inference.serve --model-dir DIR --port N``.

It speaks the SageMaker container contract (``GET /ping``, ``POST /invocations``) and the runtime's
``POST /endpoints/{name}/invocations``, so boto3 (``endpoint_url=endpoint.url``) and the batch
rehearsal both talk to it. ``start`` returns once ``/ping`` answers 200, polling; it never sleeps a
fixed time, and fails at once with the server's log if the process dies.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from .errors import ClientError, WaitTimeout


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalEndpoint:
    """``with LocalEndpoint(model_dir) as endpoint: ... endpoint.url ...``"""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
        python: str = sys.executable,
        cwd: str | os.PathLike | None = None,
        startup_timeout: float = 180.0,
    ):
        self.model_dir = Path(model_dir)
        self.port = port or free_port()
        self.env = env or {}
        self.python = python
        self.cwd = cwd
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalEndpoint:
        if not self.model_dir.is_dir():
            raise ClientError(f"model directory {str(self.model_dir)!r} does not exist")
        self._log = tempfile.NamedTemporaryFile(prefix="jv3-serve-", suffix=".log", delete=False)
        command = [self.python, "-m", "inference.serve", "--model-dir", str(self.model_dir), "--port", str(self.port)]
        self.process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            cwd=self.cwd,
        )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        interval = 0.05
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise ClientError(
                    f"local endpoint exited with status {self.process.returncode} before answering /ping "
                    f"({' '.join(self.process.args)}):\n{self.log_tail()}"
                )
            if self.ping():
                return
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise WaitTimeout(f"local endpoint did not answer /ping within {self.startup_timeout:g} s:\n{tail}")
            time.sleep(interval)  # a poll interval, not a wait for readiness
            interval = min(0.5, interval * 1.5)

    def ping(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def log_tail(self, lines: int = 40) -> str:
        if self._log is None:
            return ""
        text = Path(self._log.name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            Path(self._log.name).unlink(missing_ok=True)
            self._log = None

    def __enter__(self) -> LocalEndpoint:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
