"""``make run``: package a checkpoint, serve the unpacked archive locally, embed samples through boto3.

    python -m model_package.quickstart [--checkpoint fixtures/jina-v3-tiny]

1. ``python -m model_package`` builds model.tar.gz from the checkpoint, exactly as for AWS (its
   dependencies installed into code/lib for the DLC's Python; downloaded once, then cached);
2. the archive is unpacked into a temp dir and served from there with only its ``code/`` on the
   path (``python -m jv3_inference.serve``; this machine's packages stand in for code/lib, which
   is built for the DLC's Python), which proves code/ works alone;
3. multilingual sample texts are embedded with each task through plain boto3 ``sagemaker-runtime``
   pointed at the local endpoint, and a similarity table is printed; then the server is stopped.

The embedded tiny checkpoint has RANDOM weights: its similarities mean nothing. For real ones run
``CHECKPOINT=/path/to/jina-embeddings-v3 make run`` (a local copy of the Hub model; 570M parameters).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from inference.settings import TASKS

from .build import CODE_PACKAGE, PackageError, build_package

SAMPLES = [
    ("en", "The cat sleeps on the sofa."),
    ("de", "Die Katze schläft auf dem Sofa."),
    ("es", "El gato duerme en el sofá."),
    ("zh", "猫在沙发上睡觉。"),
    ("en", "Stock markets fell sharply today."),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_package.quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=os.environ.get("CHECKPOINT", "fixtures/jina-v3-tiny"))
    args = parser.parse_args(argv)
    tiny = Path(args.checkpoint).resolve().name == "jina-v3-tiny"

    with tempfile.TemporaryDirectory(prefix="jv3-quickstart-") as tmp:
        tmp = Path(tmp)
        print(f"1. packaging {args.checkpoint} …", flush=True)
        try:
            archive = build_package(args.checkpoint, tmp / "model.tar.gz")
        except PackageError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        model_dir = tmp / "model"
        with tarfile.open(archive) as tar:
            tar.extractall(model_dir, filter="data")
        print(f"   {archive.stat().st_size / 1e6:.1f} MB; unpacked to {model_dir}")

        print("2. starting the endpoint from the unpacked archive (only code/ on PYTHONPATH) …", flush=True)
        env = {**os.environ, "PYTHONPATH": str(model_dir / "code")}
        server = subprocess.Popen(
            [sys.executable, "-m", f"{CODE_PACKAGE}.serve", "--model-dir", str(model_dir), "--port", "0"],
            cwd=tmp, env=env, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            line = server.stdout.readline()
            if "listening on" not in line:
                print("error: the endpoint did not start (see its log above)", file=sys.stderr)
                return 1
            url = line.strip().rsplit(" ", 1)[1]
            if not _wait_ready(url, server):
                print("error: the endpoint did not become ready (see its log above)", file=sys.stderr)
                return 1
            print(f"   {url}")
            _demo(url)
        finally:
            server.terminate()
            server.wait(timeout=30)
        print("4. endpoint stopped.")
    if tiny:
        print(
            "\nNOTE: fixtures/jina-v3-tiny has RANDOM weights (hidden 64, 2 layers): the numbers above show the\n"
            "plumbing works, not that the model is any good. For real vectors download jinaai/jina-embeddings-v3\n"
            "(e.g. huggingface-cli download jinaai/jina-embeddings-v3 --local-dir ~/jv3) and run\n"
            "    CHECKPOINT=~/jv3 make run"
        )
    return 0


def _wait_ready(url: str, server: subprocess.Popen, timeout: float = 300) -> bool:
    """Poll /ping: the server binds at once and answers 503 until the model is loaded."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    return False


def _demo(url: str) -> None:
    import boto3
    from botocore.config import Config

    runtime = boto3.client(
        "sagemaker-runtime", endpoint_url=url, region_name="us-east-1",
        aws_access_key_id="local", aws_secret_access_key="local", config=Config(retries={"max_attempts": 1}),
    )  # fmt: skip
    texts = [t for _, t in SAMPLES]
    labels = [f"#{i} {lang}" for i, (lang, _) in enumerate(SAMPLES)]
    print("3. embedding through boto3 sagemaker-runtime invoke_endpoint, one call per task:")
    for label, (_, text) in zip(labels, SAMPLES, strict=True):
        print(f"   {label}: {text}")
    for task in TASKS:
        answer = runtime.invoke_endpoint(
            EndpointName="jv3-local", ContentType="application/json", Accept="application/json",
            Body=json.dumps({"data": texts, "parameters": {"task": task}}),
        )  # fmt: skip
        body = json.loads(answer["Body"].read())
        vectors = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
        sims = vectors @ vectors.T  # normalised vectors: cosine similarity
        print(f"\n   task={task}  ({vectors.shape[1]} dims, {body['usage']['total_tokens']} tokens)")
        print("   " + " " * 6 + "".join(f"{label:>8}" for label in labels))
        for label, row in zip(labels, sims, strict=True):
            print(f"   {label:<6}" + "".join(f"{v:8.3f}" for v in row))
    try:
        runtime.invoke_endpoint(EndpointName="jv3-local", ContentType="application/json",
                                Body=json.dumps({"data": texts, "parameters": {"task": "retrival.query"}}))  # fmt: skip
    except runtime.exceptions.ModelError as err:
        original = json.loads(err.response["OriginalMessage"])
        print(f"\n   a bad request reaches boto3 as ModelError ({err.response['OriginalStatusCode']}): {original['error']['message']}")


if __name__ == "__main__":
    sys.exit(main())
