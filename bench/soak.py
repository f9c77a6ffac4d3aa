"""Soak benchmark: the local endpoint under 64 clients for 10 minutes, every vector checked (issue 10, item 9).

    python -m bench.soak                                  → bench/RESULTS-soak.md (600 s, 64 clients)
    python -m bench.soak --duration 60                    (a one-minute proof run)
    python -m bench.soak --duration 600 --clients 64 --disconnecting 4 --model-dir fixtures/jina-v3-tiny

The server runs in its own process (``python -m inference.serve``, JV3_DEVICE=cpu, JV3_DTYPE=float32,
every other setting at its default) and is always stopped at the end, on an error or Ctrl-C too.
``--clients`` threads of this process each keep one keep-alive connection and send, until
``--duration`` is over, requests drawn from a pool built beforehand from a fixed seed:

- small (1-4 texts of 2-12 words) and medium (32-256 texts of 5-60 words) requests, in the Jina
  format (``{"data": [...], "parameters": {...}}``, texts as strings or ``{"text", "id"}`` items),
  OpenAI's (``POST /v1/embeddings``) and JSON Lines (per-record task and dimensions overrides), tasks
  and dimensions mixed, float and base64, some with late chunking;
- near-limit requests, at the server's own caps (``Limits.of(settings)``, the same resolution the
  server makes): exactly the most texts a JSON request may hold; a body just under ``JV3_MAX_REQUEST_BYTES``;
  texts past the token limit (truncated); a JSON Lines body just under the records cap. At most one is
  in flight at a time, so they test the caps rather than saturate a 2-core machine;
- deliberately oversized requests (one text, one record or 1 KiB over a cap), whose 413 is expected
  and counted apart from unexpected errors;
- ``--disconnecting`` of the clients send every third request and close the connection before the
  answer (a client going away mid-request).

Every vector of every answer is checked against a reference computed beforehand in this process by
``Engine.embed_many`` on the same texts, task, dimensions and late chunking (max-abs ≤ 1e-4). Per 30 s
window: p50/p99 latency of small requests and of all, counts of each outcome (status and error type),
the server's RSS and threads (read from /proc every 5 s) and CPU. The clients share the machine's
cores with the server: their CPU is reported too.

Checkpoint: the tiny fixture (hidden 64, 2 layers) by default, because what a soak looks for (leaks,
errors, stalls, wrong or mixed-up vectors under concurrency) lives in the serving path, which a tiny
model drives hardest (many requests a second through HTTP, parsing, batching, writing), and because
near-limit requests then finish in seconds: on a bigger model 2,048 texts or 8,192-token texts would
run into ``JV3_REQUEST_TIMEOUT_S`` on 2 cores and test the timeout instead of the caps.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import multiprocessing
import os
import queue
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import astuple, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson

from bench.checkpoints import FIXTURE
from bench.serving import (
    LocalServer,
    code_fingerprint,
    cpu_seconds,
    handle_stop_signals,
    machine,
    random_text,
)
from inference.protocol import JSON, JSONLINES, Limits
from inference.request import EmbedRequest
from inference.settings import TASKS, Settings

HERE = Path(__file__).resolve().parent
OUT_MD = HERE / "RESULTS-soak.md"
TOLERANCE = 1e-4
WINDOW_S = 30
RSS_EVERY_S = 5
CLIENT_TIMEOUT_S = 300  # longer than the server's own JV3_REQUEST_TIMEOUT_S: its 503 must reach us
# What a client draws: mostly small requests, as interactive traffic is (medium ones still carry most of
# the compute); a near-limit draw falls back to small while another near-limit request is in flight.
MIX = {"small": 0.85, "medium": 0.10, "near_limit": 0.02, "oversized": 0.03}
POOL = {"small": 400, "medium": 40}  # distinct requests per kind (each with its reference vectors)
DIMENSIONS = (None, None, 8, 16, 20, 32, 64)  # None: the deployment's default, the full hidden size
SHORT_WORDS = ("a", "b", "dog", "fox", "query", "data", "río", "city", "vector", "model")


@dataclass
class Spec:
    """One request of the pool: what to send, what status to expect, and the vectors it must return."""

    kind: str  # small | medium | near_limit | oversized
    name: str  # what it is, e.g. "jina base64 late-chunking", "max texts"
    path: str
    content_type: str
    body: bytes
    expect: int = 200
    fmt: str = "jina"  # jina | openai | jsonl: where the vectors are in the answer
    requests: list[EmbedRequest] = field(default_factory=list)  # what the server should embed, in order
    expected: list[np.ndarray] | None = None  # one row per returned vector, filled by reference()


# ---------------------------------------------------------------------------------------------- the pool


def short_text(rng: np.random.Generator, lo: int = 2, hi: int = 12) -> str:
    return " ".join(rng.choice(SHORT_WORDS, size=int(rng.integers(lo, hi + 1))))


def pick(rng: np.random.Generator, choices):
    return choices[int(rng.integers(len(choices)))]


def request_spec(rng: np.random.Generator, kind: str, texts: list[str], hidden: int) -> Spec:
    """Texts as one request in a format, task, dimensions and encoding drawn from ``rng``."""
    task, dims = pick(rng, (None, *TASKS)), pick(rng, DIMENSIONS)
    dims = None if dims is not None and dims > hidden else dims
    encoding = pick(rng, ("float", "float", "base64"))
    fmt = pick(rng, ("jina", "jina", "openai", "jsonl"))
    if fmt == "openai":
        return openai_spec(kind, texts, task, dims, encoding)
    if fmt == "jsonl":
        return jsonl_spec(rng, kind, texts, hidden)
    late = len(texts) > 1 and rng.random() < 0.3
    return jina_spec(rng, kind, texts, task, dims, encoding, late)


def jina_spec(rng, kind: str, texts: list[str], task, dims, encoding: str, late: bool, ids=None) -> Spec:
    params = {k: v for k, v in (("task", task), ("dimensions", dims), ("embedding_type", encoding)) if v is not None}
    if late:
        params["late_chunking"] = True
    if ids is None and rng.random() < 0.5:
        ids = [f"doc-{int(rng.integers(1 << 30))}" for _ in texts]
    data = [{"text": t, "id": i} for t, i in zip(texts, ids, strict=True)] if ids else texts
    name = f"jina {encoding}" + (" late-chunking" if late else "") + (" ids" if ids else "")
    body = orjson.dumps({"data": data, "parameters": params})
    request = EmbedRequest(texts=texts, task=task, dimensions=dims, late_chunking=late)
    return Spec(kind, name, "/invocations", JSON, body, fmt="jina", requests=[request])


def openai_spec(kind: str, texts: list[str], task, dims, encoding: str) -> Spec:
    obj = {"input": texts[0] if len(texts) == 1 else texts, "model": "jina-embeddings-v3", "encoding_format": encoding}
    obj |= {k: v for k, v in (("task", task), ("dimensions", dims)) if v is not None}
    request = EmbedRequest(texts=texts, task=task, dimensions=dims)
    return Spec(kind, f"openai {encoding}", "/v1/embeddings", JSON, orjson.dumps(obj), fmt="openai", requests=[request])


def jsonl_spec(rng, kind: str, texts: list[str], hidden: int, overrides: bool = True) -> Spec:
    """One record per text: a fifth of them bare JSON strings, and (``overrides``) a third of the
    others overriding the task or the dimensions, as the format allows."""
    lines, requests = [], []
    for i, text in enumerate(texts):
        record, task, dims = {"text": text, "id": i}, None, None
        if rng.random() < 0.2:
            lines.append(orjson.dumps(text))
        else:
            if overrides and rng.random() < 0.33:
                task, dims = pick(rng, TASKS), pick(rng, [d for d in DIMENSIONS if d is None or d <= hidden])
                record |= {k: v for k, v in (("task", task), ("dimensions", dims)) if v is not None}
            lines.append(orjson.dumps(record))
        requests.append(EmbedRequest(texts=[text], task=task, dimensions=dims))
    body = b"\n".join(lines) + b"\n"
    return Spec(kind, "jsonl float" + (" overrides" if overrides else ""), "/invocations", JSONLINES, body,
                fmt="jsonl", requests=requests)  # fmt: skip


def near_limit_specs(rng, limits, settings: Settings, hidden: int) -> list[Spec]:
    """At the caps: the most texts, a body just under the byte limit, texts past the token limit, and
    a JSON Lines body just under the records cap. Each must be answered 200 with every vector."""
    specs = []
    texts = [short_text(rng, 1, 6) for _ in range(limits.max_texts)]
    spec = jina_spec(rng, "near_limit", texts, pick(rng, TASKS), None, "float", False, ids=[])
    spec.name = f"max texts ({limits.max_texts:,})"
    specs.append(spec)
    specs.append(bytes_spec(rng, settings.max_request_bytes * 97 // 100, "near_limit", "body at 97% of the byte limit"))
    long_texts = [" ".join(random_text(rng) for _ in range(100)) for _ in range(8)]  # ~10,000 tokens each
    spec = jina_spec(rng, "near_limit", long_texts, "retrieval.passage", None, "base64", False, ids=[])
    spec.name = "8 texts past the token limit (truncated)"
    specs.append(spec)
    # Records of one to three words: about max_records × 25 bytes of body, ~15 bytes of vector text per value
    records = [short_text(rng, 1, 3) for _ in range(limits.max_records * 99 // 100)]
    spec = jsonl_spec(rng, "near_limit", records, hidden, overrides=False)
    spec.name = f"JSON Lines, {len(records):,} records (99% of the cap)"
    specs.append(spec)
    return specs


def bytes_spec(rng, size: int, kind: str, name: str, expect: int = 200) -> Spec:
    """A Jina body of about ``size`` bytes, most of them ids (echoed back, as batch transform's metadata
    is): the byte cap is tested without the compute of 6 MB of text."""
    n = 1000
    pad = max(0, (size - 64) // n - 40)
    items = [{"text": short_text(rng, 1, 4), "id": f"{i:06d}-" + "x" * pad} for i in range(n)]
    body = orjson.dumps({"data": items, "parameters": {"dimensions": 16}})
    fill = size - len(body)  # bring the body to the exact size with the last id
    if fill > 0:
        items[-1]["id"] += "x" * fill
        body = orjson.dumps({"data": items, "parameters": {"dimensions": 16}})
    request = EmbedRequest(texts=[item["text"] for item in items], dimensions=16)
    return Spec(kind, name, "/invocations", JSON, body, expect=expect, fmt="jina", requests=[request])


def oversized_specs(rng, limits, settings: Settings) -> list[Spec]:
    """One over each cap: 413 payload_too_large is the right answer, before any compute."""
    over_texts = orjson.dumps({"data": [short_text(rng, 1, 3) for _ in range(limits.max_texts + 1)]})
    over_records = b"".join(orjson.dumps(short_text(rng, 1, 1)) + b"\n" for _ in range(limits.max_records + 1))
    return [
        bytes_spec(rng, settings.max_request_bytes + 1024, "oversized", "body 1 KiB over the byte limit", expect=413),
        Spec("oversized", f"{limits.max_texts + 1:,} texts", "/invocations", JSON, over_texts, expect=413),
        Spec("oversized", f"{limits.max_records + 1:,} JSON Lines records", "/invocations", JSONLINES, over_records,
             expect=413, fmt="jsonl"),
    ]  # fmt: skip


def build_pool(seed: int, limits, settings: Settings, hidden: int) -> dict[str, list[Spec]]:
    rng = np.random.default_rng(seed)
    pool = {
        "small": [request_spec(rng, "small", [short_text(rng) for _ in range(int(rng.integers(1, 5)))], hidden)
                  for _ in range(POOL["small"])],
        "medium": [request_spec(rng, "medium", [random_text(rng) for _ in range(int(rng.integers(32, 257)))], hidden)
                   for _ in range(POOL["medium"])],
    }  # fmt: skip
    pool["near_limit"] = near_limit_specs(rng, limits, settings, hidden)
    pool["oversized"] = oversized_specs(rng, limits, settings)
    return pool


def reference(pool: dict[str, list[Spec]], model_dir: Path, settings: Settings) -> tuple[float, int]:
    """Fill every spec's expected rows with ``Engine.embed_many`` in this process. A spec the engine
    refuses (a late-chunking chunk left without a token of its own) leaves the pool: it would test the
    400, not the vectors. Returns (seconds taken, specs dropped)."""
    from inference.engine import Engine
    from inference.errors import JV3Error

    started, dropped = time.perf_counter(), 0
    engine = Engine.load(model_dir, settings=settings)
    for kind, specs in pool.items():
        kept = []
        for spec in specs:
            if spec.expect == 200:
                results = engine.embed_many(spec.requests)
                if any(isinstance(result, JV3Error) for result in results):
                    dropped += 1
                    continue
                spec.expected = [row for result in results for row in result.embeddings]
            kept.append(spec)
        pool[kind] = kept
    return time.perf_counter() - started, dropped


# ---------------------------------------------------------------------------------------------- checking answers


def rows_of(spec: Spec, data: bytes) -> list:
    """The embeddings of an answer, in order (an error record is kept as its dict)."""
    if spec.fmt == "jsonl":
        records = [orjson.loads(line) for line in data.split(b"\n") if line]
        return [r.get("embedding", r) for r in records]
    items = sorted(orjson.loads(data)["data"], key=lambda item: item["index"])
    return [item["embedding"] for item in items]


def as_vector(value) -> np.ndarray | None:
    if isinstance(value, str):  # base64: little-endian float32 bytes
        return np.frombuffer(base64.b64decode(value), dtype="<f4").astype(np.float32)
    if isinstance(value, list):
        return np.asarray(value, dtype=np.float32)
    return None  # an error record


def check(spec: Spec, data: bytes) -> tuple[int, int]:
    """(vectors checked, vectors that differ from the reference by more than the tolerance or are missing)."""
    rows = rows_of(spec, data)
    expected = spec.expected
    mismatched = abs(len(rows) - len(expected))
    for got, want in zip(rows, expected, strict=False):
        vector = as_vector(got)
        if vector is None or vector.shape != want.shape or float(np.abs(vector - want).max()) > TOLERANCE:
            mismatched += 1
    return len(expected), mismatched


def error_kind(status: int, data: bytes) -> str:
    """``"503 timeout"``: the status and the error type of the body, in Jina's shape (``type``) or
    OpenAI's (``type`` is OpenAI's class, our type is in ``code``)."""
    try:
        error = orjson.loads(data)["error"]
        openai = error.get("type") in ("invalid_request_error", "server_error")
        kind = error.get("code") if openai else error.get("type")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        kind = "unparsable body"
    return f"{status} {kind}"


# ---------------------------------------------------------------------------------------------- the clients


@dataclass
class Outcome:
    end_s: float  # since the start of the soak
    kind: str
    name: str
    latency_s: float | None
    result: str  # ok | expected_error | unexpected | disconnected
    detail: str  # status and error type, or the exception
    checked: int = 0
    mismatched: int = 0


class Soak:
    """The client threads of one client process, and what they saw."""

    def __init__(self, port: int, pool: dict[str, list[Spec]], started: float, deadline: float, disconnecting: int,
                 seed: int, heavy):  # fmt: skip
        self.port, self.pool, self.seed, self.disconnecting = port, pool, seed, disconnecting
        self.started, self.deadline = started, deadline  # time.monotonic(), the same clock in every process
        self.heavy = heavy  # a semaphore shared by the client processes: one near-limit request at a time
        self.outcomes: list[Outcome] = []  # list.append is atomic: no lock needed

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=CLIENT_TIMEOUT_S)

    def run_client(self, c: int) -> None:
        rng = np.random.default_rng(self.seed * 1000 + c)
        conn, n = self.connection(), 0
        time.sleep(max(self.started - time.monotonic(), 0))
        while time.monotonic() < self.deadline:
            n += 1
            if c < self.disconnecting and n % 3 == 0:
                self.disconnect(rng, conn)
                conn = self.connection()
                continue
            spec, heavy = self.draw(rng)
            try:
                conn = self.send(conn, spec)
            finally:
                if heavy:
                    self.heavy.release()
        conn.close()

    def draw(self, rng) -> tuple[Spec, bool]:
        kind = rng.choice(list(MIX), p=list(MIX.values()))
        if kind == "near_limit":
            if self.heavy.acquire(block=False):
                return pick(rng, self.pool["near_limit"]), True
            kind = "small"
        return pick(rng, self.pool[kind]), False

    def send(self, conn: http.client.HTTPConnection, spec: Spec) -> http.client.HTTPConnection:
        """One request and its check; the connection to use next (a new one after a failure)."""
        t0 = time.monotonic()
        try:
            conn.request("POST", spec.path, spec.body, {"Content-Type": spec.content_type, "Accept": "*/*"})
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:  # a connection the server closed or reset
            self.record(spec, None, "unexpected", f"connection {type(exc).__name__}")
            conn.close()
            return self.connection()
        latency = time.monotonic() - t0
        if response.status == spec.expect == 200:
            try:
                checked, mismatched = check(spec, data)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                self.record(spec, latency, "unexpected", f"200 unreadable answer: {type(exc).__name__}")
                return conn
            self.record(spec, latency, "ok", "200", checked, mismatched)
        elif response.status == spec.expect:
            self.record(spec, latency, "expected_error", error_kind(response.status, data))
        else:
            self.record(spec, latency, "unexpected", error_kind(response.status, data))
        return conn

    def disconnect(self, rng, conn: http.client.HTTPConnection) -> None:
        """Send a medium request and close the connection 0-300 ms later, before its answer."""
        spec = pick(rng, self.pool["medium"])
        try:
            conn.request("POST", spec.path, spec.body, {"Content-Type": spec.content_type})
            time.sleep(float(rng.uniform(0, 0.3)))
        except OSError:
            pass
        finally:
            conn.close()
        self.record(spec, None, "disconnected", "closed before the answer")

    def record(self, spec: Spec, latency, result: str, detail: str, checked: int = 0, mismatched: int = 0) -> None:
        now = time.monotonic() - self.started
        self.outcomes.append(Outcome(now, spec.kind, spec.name, latency, result, detail, checked, mismatched))


_POOL: dict[str, list[Spec]] = {}  # set before the client processes fork: they share it copy-on-write


def client_process(clients: range, port: int, started: float, deadline: float, args, heavy, results) -> None:
    """One client process: ``clients`` threads; puts (outcomes, its CPU seconds, threads still waiting)."""
    soak = Soak(port, _POOL, started, deadline, args.disconnecting, args.seed, heavy)
    threads = [threading.Thread(target=soak.run_client, args=(c,), name=f"client-{c}", daemon=True) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:  # the last requests started before the deadline are answered
        thread.join(timeout=max(deadline - time.monotonic(), 0) + CLIENT_TIMEOUT_S)
    results.put(([astuple(o) for o in soak.outcomes], time.process_time(), sum(t.is_alive() for t in threads)))


class Sampler:
    """The server's RSS, threads and CPU every few seconds, on a thread of its own."""

    def __init__(self, pid: int, started: float, every_s: float):
        self.pid, self.started, self.every_s = pid, started, every_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()

    def _run(self) -> None:
        if self._stop.wait(max(self.started - time.monotonic(), 0)):  # the first sample when the clients start
            return
        while True:
            self.sample()
            if self._stop.wait(self.every_s):
                return

    def sample(self) -> None:
        try:
            status = dict(line.split(":", 1) for line in Path(f"/proc/{self.pid}/status").read_text().splitlines())
            self.samples.append({"t_s": time.monotonic() - self.started, "rss_bytes": int(status["VmRSS"].split()[0]) * 1024,
                                 "threads": int(status["Threads"]), "cpu_s": cpu_seconds(self.pid)})  # fmt: skip
        except (FileNotFoundError, ProcessLookupError, KeyError, ValueError):
            pass  # the server has gone: the outcomes say why


def run_soak(server: LocalServer, pool: dict[str, list[Spec]], args) -> tuple[list[Outcome], list[dict], float, int]:
    """The clients in ``--processes`` forked processes (one GIL each: a client checking a 50 MB answer
    must not stall the timing of the others); returns outcomes, samples, client CPU s, unfinished clients."""
    global _POOL
    _POOL = pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the reference engine's tokenizer, forked: no warning
    mp = multiprocessing.get_context("fork")
    heavy, results = mp.Semaphore(1), mp.Queue()
    started = time.monotonic() + 2.0  # every process forked and its threads started before the first request
    deadline = started + args.duration
    groups = [range(k, args.clients, args.processes) for k in range(min(args.processes, args.clients))]
    procs = [mp.Process(target=client_process, args=(g, server.port, started, deadline, args, heavy, results), daemon=True)
             for g in groups]  # fmt: skip
    outcomes, client_cpu, unfinished = [], 0.0, 0
    for proc in procs:  # forked before the sampler's thread exists: a child inherits no lock a thread holds
        proc.start()
    with Sampler(server.pid, started, RSS_EVERY_S) as sampler:
        for _ in procs:
            try:
                found, cpu, waiting = results.get(timeout=max(deadline - time.monotonic(), 0) + CLIENT_TIMEOUT_S + 60)
            except queue.Empty:
                break
            outcomes += [Outcome(*o) for o in found]
            client_cpu += cpu
            unfinished += waiting
        for proc in procs:
            proc.join(timeout=10)
    unfinished += sum(len(g) for g, p in zip(groups, procs, strict=True) if p.exitcode != 0)
    return outcomes, sampler.samples, client_cpu, unfinished


# ---------------------------------------------------------------------------------------------- summary


def pct_ms(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) * 1e3 if values else None


def summarise_outcomes(outcomes: list[Outcome]) -> dict:
    small = [o.latency_s for o in outcomes if o.kind == "small" and o.result == "ok"]
    answered = [o.latency_s for o in outcomes if o.latency_s is not None]
    return {
        "requests": len(outcomes),
        "by_kind": dict(Counter(o.kind for o in outcomes)),
        "by_result": dict(Counter(o.result for o in outcomes)),
        "small_p50_ms": pct_ms(small, 50),
        "small_p99_ms": pct_ms(small, 99),
        "small_max_ms": max(small) * 1e3 if small else None,
        "all_p50_ms": pct_ms(answered, 50),
        "all_p99_ms": pct_ms(answered, 99),
        "expected_errors": dict(Counter(f"{o.detail} ({o.name})" for o in outcomes if o.result == "expected_error")),
        "unexpected": dict(Counter(f"{o.detail} ({o.kind}: {o.name})" for o in outcomes if o.result == "unexpected")),
        "vectors_checked": sum(o.checked for o in outcomes),
        "vector_mismatches": sum(o.mismatched for o in outcomes),
        "near_limit_ok": dict(Counter(o.name for o in outcomes if o.kind == "near_limit" and o.result == "ok")),
    }


def windows(outcomes: list[Outcome], samples: list[dict], duration_s: float) -> list[dict]:
    rows = []
    n = max(1, int(np.ceil(duration_s / WINDOW_S)))
    for w in range(n):
        lo, hi = w * WINDOW_S, (w + 1) * WINDOW_S if w < n - 1 else float("inf")  # stragglers join the last
        inside = [o for o in outcomes if lo <= o.end_s < hi]
        in_samples = [s for s in samples if lo <= s["t_s"] < hi] or samples[-1:]
        row = summarise_outcomes(inside) | {"from_s": lo, "to_s": min(hi, duration_s) if hi != float("inf") else None}
        row["rss_max_bytes"] = max(s["rss_bytes"] for s in in_samples) if in_samples else None
        row["rss_end_bytes"] = in_samples[-1]["rss_bytes"] if in_samples else None
        row["threads_max"] = max(s["threads"] for s in in_samples) if in_samples else None
        # the server's CPU seconds over the window, from the samples around it
        before = [s for s in samples if s["t_s"] <= lo] or samples[:1]
        after = [s for s in samples if s["t_s"] >= min(hi, duration_s)] or samples[-1:]
        row["server_cpu_s"] = after[0]["cpu_s"] - before[-1]["cpu_s"] if before and after else None
        rows.append(row)
    return rows


def mib(value) -> str:
    return "–" if value is None else f"{value / 2**20:,.0f}"


def fmt_ms(value) -> str:
    return "–" if value is None else f"{value:,.0f}"


def report(info: dict, summary: dict, rows: list[dict]) -> list[str]:
    rss = info["rss"]
    lines = [
        "# Soak benchmark: the local endpoint under load (bench/soak.py)",
        "",
        f"Run {info['date']}: **{info['duration_s']:g} s** with **{info['clients']} clients** in {info['processes']} "
        f"processes ({info['disconnecting']} of them closing every third connection before the answer). " + ("" if info["duration_s"] >= 600 else
        "A short proof run: the 10-minute soak of issue 10 is `python -m bench.soak` (600 s), still to be run. "),
        "",
        f"Machine: {info['machine']['cpu']}, {info['machine']['logical_cores']} logical cores, shared with other jobs; "
        f"Python {info['machine']['python']}, torch {info['machine']['torch']}. Server: `python -m inference.serve` on "
        f"`{info['model_dir']}` ({info['model']}), JV3_DEVICE=cpu, JV3_DTYPE=float32, other settings default; caps "
        f"{info['caps']}; `GET /execution-parameters`: `{info['execution_parameters']}`. Server code: inference/*.py "
        f"sha256 `{info['server_code_sha256']}`. The clients are threads of {info['processes']} bench processes on the "
        f"same cores (they used {info['client_cpu_s']:.0f} CPU s, the server {info['server_cpu_s']:.0f}; 2 cores give "
        f"{2 * info['duration_s']:.0f}).",
        "",
        f"Mix per draw: {', '.join(f'{k} {v:.0%}' for k, v in MIX.items())} (near-limit: one at a time, else small). "
        f"Pool: {info['pool']}. Reference vectors: `Engine.embed_many` in the bench process before the soak "
        f"({info['reference_s']:.0f} s); every returned vector checked, tolerance {TOLERANCE:g} max-abs.",
        "",
        "## Summary",
        "",
        f"- Requests finished: {summary['requests']:,} ({', '.join(f'{k} {v:,}' for k, v in summary['by_kind'].items())}); "
        f"{info['unfinished']} client(s) still waiting at the end.",
        f"- Small requests: p50 {fmt_ms(summary['small_p50_ms'])} ms, **p99 {fmt_ms(summary['small_p99_ms'])} ms**, max "
        f"{fmt_ms(summary['small_max_ms'])} ms. All answered requests: p50 {fmt_ms(summary['all_p50_ms'])} ms, p99 "
        f"{fmt_ms(summary['all_p99_ms'])} ms.",
        f"- Vectors checked: {summary['vectors_checked']:,}; **mismatches: {summary['vector_mismatches']}**.",
        f"- Near-limit requests answered in full: {summary['near_limit_ok'] or 'none'}.",
        f"- Expected errors (deliberately oversized): {summary['expected_errors'] or 'none'}.",
        f"- Deliberate disconnects: {summary['by_result'].get('disconnected', 0)}.",
        f"- **Unexpected errors: {sum(summary['unexpected'].values())}** {summary['unexpected'] or ''}",
        f"- Server RSS: {mib(rss['start'])} MiB at the start, peak {mib(rss['peak'])} MiB, {mib(rss['end'])} MiB at the "
        f"end; threads {info['threads']['start']} → {info['threads']['end']} (peak {info['threads']['peak']}).",
        f"- Server log: {info['log_errors']} ERROR line(s), {info['log_tracebacks']} traceback(s).",
        "",
        f"## Per {WINDOW_S} s window",
        "",
        "| window s | requests | small p50 ms | small p99 ms | all p50 ms | all p99 ms | ok | expected errors | disconnects | unexpected | mismatches | RSS max MiB | threads max | server CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for row in rows:
        results = row["by_result"]
        span = f"{row['from_s']:.0f}–{row['to_s']:.0f}" if row["to_s"] is not None else f"{row['from_s']:.0f}–end"
        lines.append(
            f"| {span} | {row['requests']:,} | {fmt_ms(row['small_p50_ms'])} | {fmt_ms(row['small_p99_ms'])} | "
            f"{fmt_ms(row['all_p50_ms'])} | {fmt_ms(row['all_p99_ms'])} | {results.get('ok', 0):,} | "
            f"{results.get('expected_error', 0)} | {results.get('disconnected', 0)} | {results.get('unexpected', 0)} | "
            f"{row['vector_mismatches']} | {mib(row['rss_max_bytes'])} | {row['threads_max']} | "
            f"{'–' if row['server_cpu_s'] is None else format(row['server_cpu_s'], '.0f')} |"
        )  # fmt: skip
    lines += ["", "RSS every 5 s (MiB): " + ", ".join(mib(s["rss_bytes"]) for s in info["rss_samples"]), ""]
    return lines


def log_counts(path: Path) -> tuple[int, int]:
    text = path.read_text(errors="replace") if path.exists() else ""
    return sum(" ERROR " in line for line in text.splitlines()), text.count("Traceback")


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--processes", type=int, default=4, help="client processes the clients are spread over")
    parser.add_argument("--disconnecting", type=int, default=4, help="clients that close every third connection early")
    parser.add_argument("--model-dir", type=Path, default=FIXTURE, help="checkpoint (default: the tiny fixture)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print the results only")
    parser.add_argument("--json", type=Path, help="also write the raw numbers (windows, samples, summary) here")
    args = parser.parse_args()
    handle_stop_signals()
    settings = Settings.resolve(device="cpu", dtype="float32")
    limits = Limits.of(settings)  # the work caps exactly as the server resolves them (JV3_MAX_* or defaults)
    config = json.loads((args.model_dir / "config.json").read_text())
    hidden = int(config["hidden_size"])
    pool = build_pool(args.seed, limits, settings, hidden)
    reference_s, dropped = reference(pool, args.model_dir, settings)
    print(f"reference vectors ready in {reference_s:.0f} s ({dropped} refused specs dropped); soaking for "
          f"{args.duration:g} s", file=sys.stderr, flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="jv3-soak-") as tmp:
        log_path = Path(tmp) / "server.log"
        with LocalServer(args.model_dir, log_path) as server:
            status, params = server.get("/execution-parameters")
            server0 = cpu_seconds(server.pid)
            outcomes, samples, client_cpu, unfinished = run_soak(server, pool, args)
            server_cpu = cpu_seconds(server.pid) - server0
        log_errors, log_tracebacks = log_counts(log_path)
        log_tail = server.log_tail(40)
    summary = summarise_outcomes(outcomes)
    rows = windows(outcomes, samples, args.duration)
    info = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": args.duration,
        "clients": args.clients,
        "processes": args.processes,
        "disconnecting": args.disconnecting,
        "machine": machine(),
        "server_code_sha256": code_fingerprint(),
        "model_dir": os.path.relpath(args.model_dir, HERE.parent),
        "model": f"hidden {hidden}, {config['num_hidden_layers']} layers",
        "caps": f"{limits.max_texts:,} texts, {limits.max_records:,} records, {settings.max_request_bytes:,} body bytes, "
                f"{limits.max_response_bytes:,} response bytes",  # fmt: skip
        "execution_parameters": params.decode() if status == 200 else f"HTTP {status}",
        "pool": ", ".join(f"{len(v)} {k}" for k, v in pool.items()),
        "reference_s": reference_s,
        "unfinished": unfinished,
        "client_cpu_s": client_cpu,
        "server_cpu_s": server_cpu,
        "rss": {"start": samples[0]["rss_bytes"] if samples else None,
                "peak": max((s["rss_bytes"] for s in samples), default=None),
                "end": samples[-1]["rss_bytes"] if samples else None},  # fmt: skip
        "threads": {"start": samples[0]["threads"] if samples else None,
                    "peak": max((s["threads"] for s in samples), default=None),
                    "end": samples[-1]["threads"] if samples else None},  # fmt: skip
        "rss_samples": samples,
        "log_errors": log_errors,
        "log_tracebacks": log_tracebacks,
    }
    lines = report(info, summary, rows)
    print("\n".join(lines))
    if log_errors or log_tracebacks:
        print("server log tail:\n" + log_tail, file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"info": info, "summary": summary, "windows": rows, "log_tail": log_tail}, indent=1))
    if not args.no_write:
        OUT_MD.write_text("\n".join(lines))
        print(f"wrote {OUT_MD}", file=sys.stderr)


if __name__ == "__main__":
    main()
