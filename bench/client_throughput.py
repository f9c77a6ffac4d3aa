"""Client-side throughput of ``EmbeddingClient.embed`` against the local endpoint.

    python -m bench.client_throughput [--model-dir fixtures/jina-v3-tiny] [--texts 10000]

Starts ``python -m inference.serve``, then embeds the same texts twice, with the same requests and
concurrency:
- raw: pre-built request bodies POSTed straight to ``/invocations`` (the endpoint's own throughput);
- client: ``EmbeddingClient.embed`` through boto3 (validation, size-aware splitting, SigV4, JSON
  decoding to numpy, reordering).
The ratio jv3/raw is the share of the endpoint's speed the client keeps. Writes
bench/RESULTS-client.md.
"""

from __future__ import annotations

import argparse
import platform
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from jv3 import EmbeddingClient
from jv3.aws import runtime_client
from jv3.local import LocalEndpoint
from jv3.wire import parse_response, plan_requests, request_body, validate_params

RESULTS = Path(__file__).with_name("RESULTS-client.md")


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = "the of embedding model search query passage vector document retrieval city river data".split()
    return [" ".join(rng.choice(words, int(rng.integers(8, 64)))) for _ in range(n)]


def raw_throughput(url: str, texts: list[str], params, ranges, concurrency: int) -> float:
    bodies = [request_body(texts[a:b], params) for a, b in ranges]

    def post(body: bytes) -> bytes:
        request = urllib.request.Request(f"{url}/invocations", data=body, method="POST",
                                         headers={"Content-Type": "application/json", "Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.read()

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(post, bodies))
    elapsed = time.perf_counter() - started
    assert_count = sum(len(parse_response(a, expected=b - s, embedding_type="float")) for a, (s, b) in zip(answers, ranges, strict=True))
    if assert_count != len(texts):
        raise SystemExit(f"raw run returned {assert_count} vectors for {len(texts)} texts")
    return len(texts) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default="fixtures/jina-v3-tiny")
    parser.add_argument("--texts", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()

    texts = corpus(args.texts)
    params = validate_params(task="retrieval.passage", dimensions=None, late_chunking=False, normalized=True,
                             embedding_type="float")
    ranges = plan_requests(texts, params, max_batch_size=args.batch_size)
    with LocalEndpoint(args.model_dir, env={"JV3_LOG_LEVEL": "WARNING"}) as endpoint:
        client = EmbeddingClient("local", runtime_client=runtime_client(endpoint_url=endpoint.url,
                                 max_pool_connections=args.concurrency),
                                 max_batch_size=args.batch_size, max_concurrency=args.concurrency, progress=False)
        client.embed(texts[:256], task="retrieval.passage")  # warm-up: first forward passes, connections
        rows = []
        for _ in range(2):  # alternate, so drift (caches, CPU clocks) hits both alike
            raw = raw_throughput(endpoint.url, texts, params, ranges, args.concurrency)
            started = time.perf_counter()
            vectors = client.embed(texts, task="retrieval.passage")
            via_client = len(texts) / (time.perf_counter() - started)
            rows.append((raw, via_client))
    raw, via_client = np.median(np.array(rows), axis=0)
    lines = [
        "# Client throughput (bench/client_throughput.py)",
        "",
        f"`EmbeddingClient.embed` vs pre-built requests POSTed straight to `/invocations`, same {len(ranges)} requests "
        f"of ≤{args.batch_size} texts, concurrency {args.concurrency}, {len(texts):,} texts of 8–64 words, "
        f"retrieval.passage, float, full size ({vectors.shape[1]} dims), checkpoint `{args.model_dir}`, local endpoint on "
        f"CPU ({platform.processor() or platform.machine()}, {platform.python_version()}). Median of {len(rows)} alternating runs.",
        "",
        "| path | texts/s |",
        "|---|---|",
        f"| endpoint alone (raw HTTP) | {raw:,.0f} |",
        f"| `EmbeddingClient.embed` (boto3) | {via_client:,.0f} |",
        f"| client / endpoint | {via_client / raw:.2f} |",
        "",
        "The raw path posts to the container route `/invocations` with urllib; the client goes through boto3 to the "
        "runtime route `/endpoints/local/invocations`, so the gap is the client's overhead (validation, size-aware "
        "splitting, SigV4, JSON to numpy, reordering) plus any cost of that route in the server. One run on a shared "
        "CPU box: read the ratio, not the absolute numbers.",
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
