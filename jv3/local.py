"""The local endpoint as a subprocess: ``python -m inference.serve --model-dir DIR --port N``.

It speaks the SageMaker container contract (``GET /ping``, ``POST /invocations``) and the runtime's
``POST /endpoints/{name}/invocations``, so boto3 (``endpoint_url=endpoint.url``) and the batch
rehearsal both talk to it. ``start`` returns once ``/ping`` answers 200, polling; it never sleeps a
fixed time, and fails at once with the server's log if the process dies.

The server dies with whoever started it. It runs in a process group of its own (a Ctrl-C in the
terminal reaches the client, which stops it; ``stop`` ends the whole group, SIGTERM then SIGKILL),
and on Linux with a parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGTERM)``), so that even a
SIGKILL of the client ends it instead of leaving the model in memory and the port taken. That signal
follows the *thread* that started the server: start it from a thread that lives as long as the
endpoint is used (the main thread, as ``jv3 batch local`` does). Its log is an unlinked file, so
nothing of it is left behind either.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from .errors import ClientError, WaitTimeout

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent():
    """A ``preexec_fn`` that makes the child receive SIGTERM when its parent dies (Linux), or None.

    libc is loaded here, in the parent: between fork and exec the child only calls ``prctl``. If the
    parent died before that call, the signal would never come, so the child checks and ends itself."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


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
        try:
            self.process = subprocess.Popen(
                command,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                cwd=self.cwd,
                start_new_session=os.name == "posix",  # a process group of its own, ended whole by stop()
                preexec_fn=_die_with_parent(),
            )
        finally:
            if os.name == "posix":  # the server and log_tail keep writing and reading the open file
                Path(self._log.name).unlink(missing_ok=True)
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
        if not hasattr(os, "pread"):  # not POSIX: the log was not unlinked
            return "\n".join(Path(self._log.name).read_text(errors="replace").splitlines()[-lines:])
        fd = self._log.fileno()
        size = os.fstat(fd).st_size
        start = max(0, size - 256 * 1024)  # the end of the log is enough for its last lines
        raw = os.pread(fd, size - start, start)  # pread: the server's write offset stays where it is
        return "\n".join(raw.decode(errors="replace").splitlines()[-lines:])

    def stop(self, grace: float = 15.0) -> None:
        """End the server and its process group: SIGTERM (it finishes what it is doing), then SIGKILL
        after ``grace`` seconds."""
        process = self.process
        if process is not None and process.poll() is None:
            self._signal_group(hard=False)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._signal_group(hard=True)
                process.wait()
        if self._log is not None:
            self._log.close()
            Path(self._log.name).unlink(missing_ok=True)
            self._log = None

    def _signal_group(self, *, hard: bool) -> None:
        """SIGTERM (or SIGKILL) to the server's process group, while its leader is not reaped."""
        try:
            if os.name == "posix":
                os.killpg(self.process.pid, signal.SIGKILL if hard else signal.SIGTERM)  # start_new_session
            elif hard:
                self.process.kill()
            else:
                self.process.terminate()
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> LocalEndpoint:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        # a run that failed or was interrupted gives the server less time to finish its work: nobody waits for it
        self.stop(grace=15.0 if exc_type is None else 3.0)
