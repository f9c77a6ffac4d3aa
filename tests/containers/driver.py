"""Run a model.tar.gz the way the PyTorch inference DLC runs it, with no network, and record what happens.

    unshare --mount --net --pid --fork --mount-proc -- python driver.py SPEC.json RESULT.json

Started by ``stack.py`` inside fresh mount, network and PID namespaces (so nothing here touches the
host: not its network, not its /etc, not another TorchServe), this script:

1. lays a writable overlay on /etc (the toolkit writes /etc/sagemaker-ts.properties; the upper
   layer keeps it for the test to read) and points /etc/resolv.conf at a DNS sink on 127.0.0.1:53
   that records every name anything asks for: a host name looked up is a network attempt;
2. brings up loopback, the only interface: nothing can leave the namespace;
3. lays an overlay on /opt too and unpacks the archive as /opt/ml/model, where SageMaker puts it,
   copies what the image would hold (the BYOC image's /opt/program), then starts the image's
   entrypoint (the DLC's ``serve`` → ``sagemaker_pytorch_serving_container.serving.main()``, or the
   BYOC Dockerfile's ENTRYPOINT + CMD) with the environment the CDK stacks set;
4. polls ``GET /ping`` as SageMaker does, sends the spec's requests over HTTP, and writes every
   status, header and body, the server's log and the DNS names asked for to RESULT.json.

Standard library only: it runs with whatever Python starts it.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

PORT = 8080


def main(spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec["workdir"])
    result: dict = {"events": []}
    started = time.monotonic()

    def event(name: str, **extra) -> None:
        result["events"].append({"t": round(time.monotonic() - started, 3), "event": name, **extra})

    _isolate(work)
    dns = DnsSink()
    model_dir = Path("/opt/ml/model")
    model_dir.mkdir(parents=True)
    with tarfile.open(spec["archive"]) as tar:
        tar.extractall(model_dir, filter="data")
    for source, dest in spec.get("copies", []):  # as the image's COPY lines lay them out
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        if Path(source).is_dir():
            shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copyfile(source, dest)
    event("unpacked")

    env = {
        "PATH": f"{spec['bin']}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(work),
        "LANG": "C.UTF-8",
        **spec["environment"],
    }
    log = open(work / "serving.log", "wb")
    t0 = time.monotonic()
    server = subprocess.Popen(
        spec["command"], cwd=spec.get("cwd") or work, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        result["ping"] = _wait_healthy(server, spec["ping_timeout_s"], t0)
        event("ping", **result["ping"])
        if result["ping"]["healthy"]:
            result["responses"] = [_send(r) for r in spec["requests"]]
            first = next((r for r in result["responses"] if r["status"] == 200), None)
            if first is not None:
                result["first_vector_s"] = round(result["ping"]["first_200_s"] + first["elapsed_s"], 3)
        if spec.get("observe_s"):
            result["observed_pings"] = _observe(server, spec["observe_s"])
        result["server_exited"] = server.poll() is not None
    finally:
        _stop(server)
        log.close()
    ts_config = Path("/etc/sagemaker-ts.properties")
    result["ts_config"] = ts_config.read_text() if ts_config.exists() else None
    result["dns_queries"] = dns.names
    result["log"] = (work / "serving.log").read_text(errors="replace")[-200_000:]
    Path(result_path).write_text(json.dumps(result))
    return 0


def _isolate(work: Path) -> None:
    """Private, writable /etc and /opt, our resolver, and loopback up (this runs in new namespaces)."""
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    for top in ("etc", "opt"):
        upper, scratch = work / f"{top}-upper", work / f"{top}-work"
        upper.mkdir(parents=True)
        scratch.mkdir()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir=/{top},upperdir={upper},workdir={scratch}", f"/{top}"], check=True)  # fmt: skip
    Path("/etc/resolv.conf").unlink(missing_ok=True)  # often a symlink: replace it, don't write through it
    Path("/etc/resolv.conf").write_text("nameserver 127.0.0.1\noptions attempts:1 timeout:1\n")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


class DnsSink:
    """A resolver that answers nothing and remembers every name asked for."""

    def __init__(self):
        self.names: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 53))
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            packet, _ = self.sock.recvfrom(4096)
            self.names.append(_qname(packet))


def _qname(packet: bytes) -> str:
    labels, i = [], 12  # the question follows the 12-byte header
    while i < len(packet) and packet[i]:
        n = packet[i]
        labels.append(packet[i + 1 : i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    return ".".join(labels)


def _request(method: str, path: str, body: bytes | None = None, headers: dict | None = None,
             timeout: float = 120) -> tuple[int, dict, bytes]:  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _ping() -> int | None:
    try:
        return _request("GET", "/ping", timeout=5)[0]
    except OSError:
        return None


def _wait_healthy(server: subprocess.Popen, timeout_s: float, t0: float) -> dict:
    seen: dict[str, int] = {}
    while time.monotonic() - t0 < timeout_s:
        status = _ping()
        seen[str(status)] = seen.get(str(status), 0) + 1
        if status == 200:
            return {"healthy": True, "first_200_s": round(time.monotonic() - t0, 3), "seen": seen}
        if server.poll() is not None and status is None:
            break
        time.sleep(0.2)
    return {"healthy": False, "first_200_s": None, "seen": seen, "after_s": round(time.monotonic() - t0, 3)}


def _observe(server: subprocess.Popen, seconds: float) -> list[tuple[float, int | None]]:
    """/ping every half second: [(seconds since the start of watching, status or None if refused)]."""
    timeline, start = [], time.monotonic()
    while time.monotonic() - start < seconds:
        timeline.append((round(time.monotonic() - start, 2), _ping()))
        time.sleep(0.5)
    return timeline


def _send(req: dict) -> dict:
    body = base64.b64decode(req["body_b64"]) if req.get("body_b64") is not None else None
    started = time.monotonic()
    try:
        status, headers, payload = _request(req.get("method", "POST"), req.get("path", "/invocations"),
                                            body, req.get("headers"))  # fmt: skip
    except OSError as exc:
        return {"name": req["name"], "status": None, "error": f"{type(exc).__name__}: {exc}"}
    return {
        "name": req["name"],
        "status": status,
        "headers": {k.lower(): v for k, v in headers.items()},
        "body_b64": base64.b64encode(payload).decode("ascii"),
        "elapsed_s": round(time.monotonic() - started, 3),
    }


def _stop(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    # TorchServe's frontend and workers: whatever is left in this PID namespace
    subprocess.run(["pkill", "-KILL", "-f", "org.pytorch.serve|model_service_worker"], check=False)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
