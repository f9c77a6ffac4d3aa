"""What the handler needs to know about TorchServe, the model server inside the PyTorch DLC.

Two facts, both found by running the archive in the DLC's stack (tests/containers):

- **Each worker has its own GPU.** TorchServe starts one Python worker per configured worker and hands
  each a GPU id round-robin in ``context.system_properties["gpu_id"]``; a worker that loads onto
  ``cuda:0`` regardless puts every model copy on one GPU. ``worker_device`` reads it.
- **A worker that cannot load leaves /ping healthy.** When ``model_fn`` raises, TorchServe restarts the
  worker with back-off, forever, while ``GET /ping`` keeps answering 200: SageMaker marks the endpoint
  InService and every invocation then times out. ``stop_model_server`` ends TorchServe's frontend
  instead, so /ping is refused, the health check fails and the deployment fails with the reason in
  the log, where the operator looks first.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

log = logging.getLogger("jv3.torchserve")

FRONTEND = b"org.pytorch.serve.ModelServer"  # the Java main class, as the toolkit itself finds it


def worker_gpu(context) -> int | None:
    """The GPU TorchServe assigned to this worker, or None (CPU, or not under TorchServe)."""
    properties = getattr(context, "system_properties", None) or {}
    gpu = properties.get("gpu_id")
    try:
        return None if gpu is None or int(gpu) < 0 else int(gpu)
    except (TypeError, ValueError):
        return None


def frontend_pid() -> int | None:
    """TorchServe's frontend when it is this process's parent (as it is of every Python worker)."""
    parent = os.getppid()
    try:
        cmdline = Path(f"/proc/{parent}/cmdline").read_bytes()
    except OSError:
        return None
    return parent if FRONTEND in cmdline else None


def stop_model_server(reason: BaseException) -> bool:
    """Stop TorchServe after a failed load, so the container reports unhealthy; False when not under it."""
    pid = frontend_pid()
    if pid is None:
        return False
    log.critical(
        "the model cannot be loaded, so the endpoint must not pass its health check: stopping TorchServe "
        "(pid %d). Cause: %s: %s",
        pid, type(reason).__name__, getattr(reason, "message", reason),
    )  # fmt: skip
    for handler in logging.getLogger().handlers + log.handlers:
        handler.flush()
    os.kill(pid, signal.SIGTERM)
    return True
