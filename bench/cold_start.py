"""Cold start of the archive as SageMaker starts it: a fresh container process to the first 200 on /ping
and to the first vector, with where the time goes, for both runtimes.

    python -m bench.cold_start [--checkpoint fixtures/jina-v3-tiny] [--repeats 3] [--out bench/cold-start.json]

Runs the same isolated stacks as tests/containers (root, Python 3.12, Java; no network): the PyTorch
DLC's entrypoint on the archive as the documented command builds it, the same with code/ byte-compiled
for Python 3.12 (what the packager does when a python3.12 is at hand), and the BYOC Dockerfile's
entrypoint. Configurations alternate within each repeat, so a busy machine slows them alike.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.containers import stack

REPO = Path(__file__).resolve().parents[1]
REQUEST = {"name": "first", "method": "POST", "path": "/invocations", "headers": {"Content-Type": "application/json"},
           "body_b64": base64.b64encode(json.dumps({"input": ["cold start"]}).encode()).decode()}  # fmt: skip
STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d,\d{3})")


def _package(checkpoint: str, out: Path, env: dict) -> Path:
    subprocess.run([sys.executable, "-m", "model_package", "--checkpoint", checkpoint, "--output", str(out)],
                   cwd=REPO, env=env, check=True, capture_output=True)  # fmt: skip
    return out


def _dlc_phases(log: str) -> dict:
    """Seconds from TorchServe's first log line to: its inference API bound, the worker's Python up, the model loaded."""
    marks = {"api_bound": "Inference API bind", "worker_started": "Torch worker started", "model_loaded": "loaded jina-embeddings-v3"}
    times, start = {}, None
    for line in log.splitlines():
        found = STAMP.match(line)
        if not found:
            continue
        t = dt.datetime.strptime(found[1], "%Y-%m-%dT%H:%M:%S,%f").timestamp()
        start = start if start is not None else t
        for key, text in marks.items():
            if key not in times and text in line:
                times[key] = round(t - start, 2)
    load = re.search(r"on cpu/torch\.float32 in ([\d.]+)s", log)
    return times | ({"engine_load_s": float(load[1])} if load else {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="fixtures/jina-v3-tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/cold-start.json")
    args = parser.parse_args(argv)
    venv = stack.ensure_venv()
    runs: dict[str, list[dict]] = {"dlc": [], "dlc-bytecode": [], "byoc": []}
    with tempfile.TemporaryDirectory() as tmp:
        plain = _package(args.checkpoint, Path(tmp) / "plain.tar.gz", dict(os.environ))
        with_pyc = _package(args.checkpoint, Path(tmp) / "pyc.tar.gz",
                            {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"})  # fmt: skip
        env = json.loads(subprocess.run([sys.executable, "-c", (
            "import json; from infra.config import DeploySettings as D;"
            "print(json.dumps({r: D.resolve({}, {'JV3_INSTANCE_TYPE': 'ml.g5.xlarge', 'JV3_RUNTIME': r})"
            ".container_environment('realtime') for r in ('dlc', 'byoc')}))")],
            cwd=REPO, check=True, capture_output=True, text=True).stdout)  # fmt: skip
        for _ in range(args.repeats):
            for name, archive in (("dlc", plain), ("dlc-bytecode", with_pyc)):
                record = stack.run_dlc(archive, env["dlc"], [REQUEST], venv=venv)
                runs[name].append({"first_ping_200_s": record["ping"]["first_200_s"],
                                   "first_vector_s": record.get("first_vector_s"), **_dlc_phases(record["log"])})  # fmt: skip
            record = stack.run_byoc(plain, env["byoc"], [REQUEST])
            load = re.search(r"in ([\d.]+)s\n", record["log"])
            runs["byoc"].append({"first_ping_200_s": record["ping"]["first_200_s"],
                                 "first_vector_s": record.get("first_vector_s"),
                                 "engine_load_s": float(load[1]) if load else None})  # fmt: skip
    summary = {
        name: {key: statistics.median(r[key] for r in rows if r.get(key) is not None)
               for key in rows[0] if any(r.get(key) is not None for r in rows)}
        for name, rows in runs.items()
    }  # fmt: skip
    result = {"machine": f"{platform.node()} {os.cpu_count()} cores (CPU only)", "checkpoint": args.checkpoint,
              "repeats": args.repeats, "median": summary, "runs": runs}  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
