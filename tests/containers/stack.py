"""A replica of the PyTorch 2.6 inference DLC's serving stack, built from PyPI and Debian, and a runner.

The image is not available here (no container registry), so the stack is rebuilt from its parts at
the versions the image ships: CPython 3.12, torch 2.6.0, TorchServe 0.12.0, torch-model-archiver
0.12.0 and the SageMaker PyTorch inference toolkit 2.0.25 (which brings sagemaker-inference; it
imports pkg_resources, so a setuptools of the image's time), with
OpenJDK 17 for TorchServe's frontend. The virtual environment is cached outside the repository
(``$JV3_DLC_VENV``, default ``~/.cache/jv3/dlc-<hash of the pins>``): the first run downloads about
3 GB (torch's CUDA build is the only torch 2.6.0 on PyPI), later runs install nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PYTHON_VERSION = "3.12"
PACKAGES = (
    "torch==2.6.0",
    "torchserve==0.12.0",
    "torch-model-archiver==0.12.0",
    "sagemaker-pytorch-inference==2.0.25",
    # what the image has beside them that they import: the toolkit imports pkg_resources (gone from
    # newer setuptools), TorchServe's Python worker imports yaml
    "setuptools==75.8.0",
    "PyYAML==6.0.2",
)


class StackUnavailable(Exception):
    """This machine lacks a part that cannot be installed from the project's files (the message says which)."""


def find_python() -> str:
    """A CPython of the DLC's version: ``$JV3_DLC_PYTHON``, ``python3.12`` on PATH, or pyenv's."""
    candidates = [os.environ.get("JV3_DLC_PYTHON"), shutil.which(f"python{PYTHON_VERSION}")]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    if pyenv.is_dir():
        candidates += [str(p / "bin" / f"python{PYTHON_VERSION}") for p in sorted(pyenv.glob(f"{PYTHON_VERSION}.*"))]
    for candidate in filter(None, candidates):
        try:
            out = subprocess.run([candidate, "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == PYTHON_VERSION:
            return candidate
    raise StackUnavailable(f"no Python {PYTHON_VERSION} with venv here (set JV3_DLC_PYTHON)")


def check_tools() -> None:
    for tool in ("java", "unshare", "mount", "ip"):
        if shutil.which(tool) is None:
            raise StackUnavailable(f"{tool!r} is not installed (Debian: openjdk-17-jre-headless, util-linux, iproute2)")
    if os.geteuid() != 0:
        raise StackUnavailable("the stack runs in new mount/network namespaces, which needs root")


def ensure_venv(log=print) -> Path:
    """The cached virtual environment with the DLC's serving packages; built once."""
    check_tools()
    digest = hashlib.sha256("\n".join((PYTHON_VERSION, *PACKAGES)).encode()).hexdigest()[:12]
    venv = Path(os.environ.get("JV3_DLC_VENV") or Path.home() / ".cache" / "jv3" / f"dlc-{digest}")
    marker = venv / ".jv3-complete"
    if marker.exists() and marker.read_text() == "\n".join(PACKAGES):
        return venv
    python = find_python()
    log(f"building the DLC serving stack in {venv} (once; about 3 GB of downloads) …")
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    done = subprocess.run([*pip, "install", *PACKAGES], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"could not install the DLC stack: {done.stderr[-2000:]}")
    marker.write_text("\n".join(PACKAGES))
    return venv


def run_dlc(archive: Path, environment: dict[str, str], requests: list[dict], *, venv: Path, **kw) -> dict:
    """Serve ``archive`` as the PyTorch inference DLC does: its entrypoint, ``serve``."""
    command = [str(venv / "bin" / "python"), str(HERE / "dlc_entrypoint.py"), "serve"]
    return run(archive, command, environment, requests, bin_dir=venv / "bin", **kw)


def run_byoc(archive: Path, environment: dict[str, str], requests: list[dict], **kw) -> dict:
    """Serve ``archive`` as the BYOC image does: the Dockerfile's COPY, ENV, WORKDIR, ENTRYPOINT and CMD
    (``docker run IMAGE serve``), this machine's Python standing in for the image's."""
    image = dockerfile(REPO / "Dockerfile")
    command = [sys.executable if part == "python" else part for part in image["entrypoint"] + image["cmd"]]
    copies = [(str(REPO / src), dest) for src, dest in image["copy"]]
    return run(archive, command, image["env"] | environment, requests, bin_dir=Path(sys.executable).parent,
               cwd=image["workdir"], copies=copies, **kw)  # fmt: skip


def dockerfile(path: Path) -> dict:
    """ENV, WORKDIR, COPY, ENTRYPOINT and CMD of a single-stage Dockerfile (exec-form commands)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    image: dict = {"env": {}, "workdir": "/", "copy": [], "entrypoint": [], "cmd": []}
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "ENV":
            image["env"].update(part.split("=", 1) for part in shlex.split(rest))
        elif word == "WORKDIR":
            image["workdir"] = rest.strip()
        elif word == "COPY":
            src, dest = shlex.split(rest)
            image["copy"].append((src.rstrip("/"), dest.rstrip("/") if src.endswith("/") else dest))
        elif word in ("ENTRYPOINT", "CMD"):
            image[word.lower()] = json.loads(rest)
    return image


def run(archive: Path, command: list[str], environment: dict[str, str], requests: list[dict], *,
        bin_dir: Path, cwd: str | None = None, copies: list[tuple[str, str]] = (),
        ping_timeout_s: float = 240, observe_s: float = 0) -> dict:  # fmt: skip
    """Serve ``archive`` with ``command``, isolated from the network, send ``requests``; return the record.

    ``requests``: ``{"name", "method", "path", "headers", "body_b64"}``. The record holds ``ping``
    (first 200 on /ping, statuses seen), ``responses``, ``first_vector_s``, ``ts_config`` (the
    TorchServe config the DLC toolkit wrote, if any), ``dns_queries`` (every host name looked up: a
    network attempt), ``observed_pings``, ``server_exited``, ``events`` and the server's ``log``.
    """
    with tempfile.TemporaryDirectory(prefix="jv3-dlc-") as tmp:
        tmp = Path(tmp)
        spec = {
            "workdir": str(tmp / "work"),
            "archive": str(Path(archive).resolve()),
            "bin": str(bin_dir),
            "command": command,
            "cwd": cwd,
            "copies": [list(c) for c in copies],
            "environment": environment,
            "requests": requests,
            "ping_timeout_s": ping_timeout_s,
            "observe_s": observe_s,
        }
        (tmp / "spec.json").write_text(json.dumps(spec))
        cmd = ["unshare", "--mount", "--net", "--pid", "--fork", "--mount-proc", "--",
               sys.executable, str(HERE / "driver.py"), str(tmp / "spec.json"), str(tmp / "result.json")]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=ping_timeout_s + observe_s + 600)
        if done.returncode != 0 or not (tmp / "result.json").exists():
            raise RuntimeError(f"the stack driver failed ({done.returncode}): {done.stderr[-4000:]}")
        return json.loads((tmp / "result.json").read_text())
