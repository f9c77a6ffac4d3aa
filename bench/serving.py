"""Serving overhead on the CPU: the local endpoint against the engine in-process, and response encodings.

    python -m bench.serving            → bench/RESULTS-serving.md

1. throughput: 16 concurrent clients each sending 32-text requests to the local endpoint (HTTP/1.1
   keep-alive, cross-request batching) vs the same requests embedded in-process, one after another;
2. the p50 latency a small request pays for HTTP + parsing + batching (endpoint p50 − in-process p50);
3. response size and serialisation time of float / base64 / binary for 1000 × 1024.

The checkpoint is random (bench/checkpoints.py, released layout): hidden 384, 6 layers, the tiny
fixture's tokenizer and vocabulary, float32.
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from bench.checkpoints import MID, make_released_checkpoint
from inference.engine import Engine
from inference.protocol import Invocation, write_response
from inference.request import EmbedRequest, EmbedResult
from inference.settings import Settings

CLIENTS, TEXTS_PER_REQUEST, REQUESTS_PER_CLIENT = 16, 32, 1
WORDS = ("the quick brown fox jumps over lazy dog rabbit white follow sigue al conejo blanco "
         "embedding search passage query retrieval model vector").split()  # fmt: skip
OUT = Path(__file__).resolve().parent / "RESULTS-serving.md"


def texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(8, 48))) for _ in range(n)]


def payload(batch: list[str], task: str) -> bytes:
    return json.dumps({"data": batch, "parameters": {"task": task}}).encode()


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="jv3-bench-"))
    ckpt = make_released_checkpoint(tmp / "mid", sizes=MID | {"vocab_size": 277}, dtype=torch.float32)
    tasks = ("retrieval.query", "retrieval.passage", "text-matching", "classification")
    jobs = [(texts(TEXTS_PER_REQUEST, seed=i), tasks[i % len(tasks)]) for i in range(CLIENTS * REQUESTS_PER_CLIENT)]
    n_texts = len(jobs) * TEXTS_PER_REQUEST
    small = ["a short query about a white rabbit"]
    lines = [f"# Serving benchmark (CPU, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch {torch.__version__})", ""]

    # --- in-process ------------------------------------------------------------------------------
    settings = Settings.resolve(device="cpu", dtype="float32")
    engine = Engine.load(ckpt, settings=settings)
    engine.embed(EmbedRequest(texts=jobs[0][0], task=jobs[0][1]))  # warm-up
    started = time.perf_counter()
    for batch, task in jobs:
        engine.embed(EmbedRequest(texts=batch, task=task))
    inproc_s = time.perf_counter() - started
    started = time.perf_counter()
    for k in range(0, len(jobs), CLIENTS):
        engine.embed_many([EmbedRequest(texts=b, task=t) for b, t in jobs[k : k + CLIENTS]])
    inproc_many_s = time.perf_counter() - started
    inproc_small = []
    for _ in range(60):
        t0 = time.perf_counter()
        engine.embed(EmbedRequest(texts=small))
        inproc_small.append(time.perf_counter() - t0)
    del engine

    # --- local endpoint --------------------------------------------------------------------------
    env = {**os.environ, "JV3_DEVICE": "cpu", "JV3_DTYPE": "float32"}
    server = subprocess.Popen([sys.executable, "-m", "inference.serve", "--model-dir", str(ckpt), "--port", "0"],
                              env=env, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        port = int(server.stdout.readline().rsplit(":", 1)[1])
        local = threading.local()

        def post(body: bytes) -> float:
            if not hasattr(local, "conn"):
                local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn = local.conn
            t0 = time.perf_counter()
            conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(response.status)
            return time.perf_counter() - t0

        post(payload(*jobs[0]))  # warm-up
        bodies = [payload(b, t) for b, t in jobs]
        started = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            latencies = list(pool.map(post, bodies))
        served_s = time.perf_counter() - started
        local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)  # the old one idled out
        served_small = [post(payload(small, "text-matching")) for _ in range(60)]
    finally:
        server.terminate()
        server.wait(timeout=30)

    p50_in, p50_http = statistics.median(inproc_small), statistics.median(served_small)
    lines += [
        "## Throughput: 16 clients × 32-text requests (random hidden-384, 6-layer checkpoint, float32)",
        "",
        f"{len(jobs)} requests, {n_texts} texts of 8–48 words, four tasks mixed.",
        "",
        "| path | wall s | texts/s |",
        "|---|---:|---:|",
        f"| engine in-process, `embed` per request, sequential | {inproc_s:.2f} | {n_texts / inproc_s:.0f} |",
        f"| engine in-process, `embed_many` of 16 requests | {inproc_many_s:.2f} | {n_texts / inproc_many_s:.0f} |",
        f"| local endpoint, 16 concurrent HTTP clients (keep-alive) | {served_s:.2f} | {n_texts / served_s:.0f} |",
        "",
        f"Endpoint request latency under that load: p50 {statistics.median(latencies) * 1e3:.0f} ms, "
        f"p95 {np.percentile(latencies, 95) * 1e3:.0f} ms.",
        "",
        "## Added latency of one small request (1 text, sequential, 60 calls)",
        "",
        f"- in-process `engine.embed`: p50 {p50_in * 1e3:.2f} ms",
        f"- local endpoint over HTTP: p50 {p50_http * 1e3:.2f} ms",
        f"- added by HTTP + parsing + batcher hand-off (JV3_BATCH_WAIT_MS={settings.batch_wait_ms:g}): **{(p50_http - p50_in) * 1e3:.2f} ms**",
        "",
    ]
    lines += serialisation()
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def serialisation() -> list[str]:
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((1000, 1024)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    rows = ["## Response encodings for 1000 × 1024 (Jina format, `write_response`)", "",
            "| embedding_type | bytes | serialise ms | vs float |", "|---|---:|---:|---:|"]  # fmt: skip
    base = None
    for encoding in ("float", "base64", "binary", "ubinary"):
        request = EmbedRequest(texts=["x"] * 1000, encoding=encoding)
        result = EmbedResult(embeddings=matrix, token_counts=[10] * 1000, encoding=encoding)
        times = []
        for _ in range(3):
            inv = Invocation("jina", [request], results=[result])
            t0 = time.perf_counter()
            body, _ = write_response(inv, "application/json", model="jina-embeddings-v3", default_task="text-matching")
            times.append(time.perf_counter() - t0)
        base = base or len(body)
        rows.append(f"| {encoding} | {len(body):,} | {min(times) * 1e3:.0f} | {len(body) / base:.3f} |")
    return rows + ["", "float is JSON numbers (shortest repr of each float32 as a double, ~19 chars); "
                   "base64 is 4 bytes per dimension, +1/3; binary is one bit per dimension."]  # fmt: skip


if __name__ == "__main__":
    main()
