"""Serving overhead on the CPU: the local endpoint against the same engine in a process of its own.

    python -m bench.serving                      → bench/serving.json and the serving sections of bench/RESULTS-serving.md
    python -m bench.serving --specs mid --passes 1      (a quicker run)
    python -m bench.serving --report-only               (the report again from bench/serving.json)

Three kinds of process, because the machine is shared (2 cores) and torch's thread pools are per process:
- the server: ``python -m inference.serve --model-dir DIR --port 0``, exactly as users start it;
- the baseline: ``python -m bench.serving --baseline ...``, a fresh process per pass, doing what the
  server does, at the engine's best and without HTTP: ``parse_request`` of the exact request bodies,
  ``Engine.embed_many`` of 16 requests at a time (as the batcher gathers concurrent callers) on the
  main thread, ``write_response`` of every answer. The server is up and idle meanwhile (its CPU
  during the baseline is reported, to show it is idle);
- the clients: 16 threads of this process, one keep-alive ``http.client`` connection each, sending
  32-text Jina requests (float JSON, the full hidden size) and reading each answer with orjson.

Baseline and served passes alternate (B S B S ...) so that the drift of a shared machine hits both;
the CPU time of other processes during each pass is reported beside it. Per pass: texts/s, real
tokens/s (the tokens the model saw), request latency p50/p99 and CPU seconds per 1,000 vectors: in
the baseline per stage (parse, tokenise, forward, plan & pool, write), in the server per group of
threads read from /proc (handler threads: HTTP, parsing, writing; engine threads: the batcher, its
OpenMP team and the tokenizer's pool; the accept loop), and the clients' own CPU, which shares the
2 cores with the server. Every vector the server returns is checked against the baseline's
(max-abs ≤ 1e-4), and every request's token count too. Last, the added latency of one small
request: sequential 1-text requests, endpoint p50 − in-process ``Engine.embed`` p50, interleaved call
by call with the engine in a fresh process of its own, and the endpoint again with a client that
acknowledges at once (TCP_QUICKACK), which isolates the delayed-ACK wait.

Analysis (``--no-analysis`` skips it), a variant of the server in its own process:
``MALLOC_ARENA_MAX=1`` (one pass after the last default one: how much of the server's extra CPU is
page faults from the batcher thread's malloc arena; since the server sets one arena itself, the
variant now tells whether operator malloc settings, which switch the engine's own off, cost it).
The server's code is not changed for it (RESULTS-serving.md has the analysis).

Checkpoints (bench/checkpoints.py, released layout, the tiny fixture's tokenizer, float32, random):
MID (hidden 384, 6 layers) and WIDE (hidden 1024, 1 layer: 1024-float responses, as in production).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson

from inference.protocol import JSON, Limits, check_response_size, parse_request, write_response
from inference.request import EmbedRequest
from inference.settings import TASKS, Settings

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT_MD = HERE / "RESULTS-serving.md"
OUT_JSON = HERE / "serving.json"
HEADING = "## Serving benchmark: local endpoint vs the engine in-process (bench/serving.py)"
# Sections of RESULTS-serving.md that other hands write and a rerun keeps: response_writing.py's,
# and the hand-written analysis of a run (it names the run it refers to).
KEPT_HEADINGS = ("## Response writing", "## Where the server's extra CPU goes")

CLIENTS = 16  # concurrent clients, and the requests the baseline embeds in one embed_many
TEXTS_PER_REQUEST = 32
# Rounds of 16 requests per pass: about 30 s of work on 2 idle cores, long enough to average out a
# neighbour's burst, short enough that 2 checkpoints × 2 passes × (baseline + served) fit ~8 minutes.
ROUNDS = {"mid": 2, "wide": 2}
SMALL_CALLS = 100
SMALL_TEXT = "a short query about a white rabbit"
TOLERANCE = 1e-4  # max-abs difference allowed between a served vector and the in-process one
VOCAB = 277  # the fixture tokenizer's vocabulary: a smaller embedding table, the same cost per token
GOAL_RATIO, GOAL_ADDED_MS = 0.85, 5.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Mixed-length texts of 5-60 words; with the fixture's 277-token vocabulary a word is ~3 tokens.
WORDS = ("the a of and to in is for on with that by this from at as be are was it an or not "
         "embedding search passage query retrieval model vector document river city data cloud "
         "endpoint latency throughput server request answer quick brown fox jumps over lazy dog "
         "white rabbit follow sigue al conejo blanco der schnelle braune fuchs springt über den hund").split()  # fmt: skip


# ---------------------------------------------------------------------------------------------- workload


def random_text(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(5, 61))))


def workload(n_requests: int, seed: int, texts: int = TEXTS_PER_REQUEST) -> list[tuple[list[str], str]]:
    """``n_requests`` requests of ``texts`` texts, the five tasks in turn; the same for every process."""
    rng = np.random.default_rng(seed)
    return [([random_text(rng) for _ in range(texts)], TASKS[i % len(TASKS)]) for i in range(n_requests)]


def warm_bodies(seed: int) -> list[bytes]:
    """A round of 16 small requests before each pass, baseline and served alike: thread pools, the
    connections' handler threads and the tokenizer warm, for an eighth of a measured round's compute."""
    return [jina_body(texts, task) for texts, task in workload(CLIENTS, seed + 1, texts=TEXTS_PER_REQUEST // 8)]


def jina_body(texts: list[str], task: str) -> bytes:
    """A Jina request body: float embeddings of the full hidden size (the deployment's defaults)."""
    return json.dumps({"data": texts, "parameters": {"task": task}}).encode()


# ---------------------------------------------------------------------------------------------- /proc


def process_usage(pid: int) -> dict:
    """A process's user and system CPU seconds and minor page faults, all its threads (exited ones too)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # the name may hold spaces and ')'
    # stat(5): minflt is field 10, utime 14, stime 15 (counted from 1, the name being field 2)
    return {"user": int(fields[11]) / CLK_TCK, "system": int(fields[12]) / CLK_TCK, "minflt": int(fields[7])}


def cpu_seconds(pid: int) -> float:
    usage = process_usage(pid)
    return usage["user"] + usage["system"]


def own_usage() -> dict:
    """This process's usage, in the same terms as ``process_usage``."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"user": r.ru_utime, "system": r.ru_stime, "minflt": r.ru_minflt}


def usage_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in before}


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of each live thread, from schedstat (nanoseconds on the CPU): stat's 10 ms ticks
    would round the few milliseconds of each of 16 handler threads to nothing."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            found[int(tid)] = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9
        except (FileNotFoundError, ProcessLookupError):  # the thread ended between listing and reading
            pass
    return found


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def machine() -> dict:
    import torch  # here, so that the client side imports no torch for what it measures

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())  # fmt: skip
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "orjson": orjson.__version__,
        "torch_threads": torch.get_num_threads(),
        "server_code_sha256": code_fingerprint(),
    }


def code_fingerprint() -> str:
    """sha256 of inference/*.py: which version of the server and engine the figures belong to."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "inference").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- the server


class LocalServer:
    """``python -m inference.serve`` in its own process, ready once ``/ping`` answers 200; always
    stopped on leaving the ``with`` block (an error and Ctrl-C included)."""

    def __init__(self, model_dir: Path, log_path: Path, env: dict | None = None, module: tuple = ("inference.serve",)):
        self.model_dir, self.log_path, self.module = model_dir, log_path, module
        self.env = {**os.environ, "JV3_DEVICE": "cpu", "JV3_DTYPE": "float32", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> LocalServer:
        with open(self.log_path, "wb") as log:  # a file, not a pipe: a full pipe would stall the server
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *self.module, "--model-dir", str(self.model_dir), "--port", "0"],
                cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=log, text=True,
            )  # fmt: skip
        try:
            line = self.proc.stdout.readline()  # "jv3 endpoint listening on http://127.0.0.1:PORT", printed once bound
            if not line:
                raise RuntimeError(f"the server ended before binding:\n{self.log_tail()}")
            self.port = int(line.rsplit(":", 1)[1])
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, _ = self.get("/ping")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready within {timeout_s:g} s:\n{self.log_tail()}")

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def stop(self) -> None:
        """SIGTERM (the server finishes in-flight requests), then SIGKILL if it takes over 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def handle_stop_signals() -> None:
    """SIGTERM becomes SystemExit and SIGINT KeyboardInterrupt, so that the ``finally`` and ``with``
    blocks stop the server. SIGINT explicitly: a process started in the background by a shell
    inherits it ignored, and Ctrl-C or ``kill -INT`` would then leave the server running."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    signal.signal(signal.SIGINT, signal.default_int_handler)


class Client:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, port: int, timeout_s: float = 600):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)

    def post(self, path: str, body: bytes, content_type: str = JSON, quickack: bool = False) -> tuple[int, bytes, float]:
        """(status, body, seconds from sending to the last byte read).

        ``quickack``: acknowledge the answer's first segment at once instead of after Linux's delayed-ACK
        timer (~40 ms), to measure how much of a small request's latency that timer is."""
        started = time.perf_counter()
        self.conn.request("POST", path, body, {"Content-Type": content_type, "Accept": JSON})
        if quickack:
            self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        response = self.conn.getresponse()
        data = response.read()
        return response.status, data, time.perf_counter() - started

    def close(self) -> None:
        self.conn.close()


# ---------------------------------------------------------------------------------------------- baseline process


class Stages:
    """Wall and CPU seconds per named stage; CPU is the whole process's (torch's OpenMP team and the
    tokenizer's threads included), which is right here: nothing else runs in the baseline process."""

    def __init__(self):
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] += time.perf_counter() - wall
            self.cpu[name] += time.process_time() - cpu


@contextmanager
def time_forward(engine, stages: Stages):
    """Count the model's forward passes as their own stage (inside ``embed``), without touching the engine's code."""
    forward = engine.model.forward_packed

    def timed(*args, **kwargs):
        with stages("forward"):
            return forward(*args, **kwargs)

    engine.model.forward_packed = timed
    try:
        yield
    finally:
        del engine.model.forward_packed  # the class's method again


def serve_round(engine, settings: Settings, bodies: list[bytes], stages: Stages) -> list:
    """What the server does for these bodies, minus HTTP: parse (and the response-size check), one
    ``embed_many`` for all of them, one response each."""
    limits = Limits.of(settings)  # the caps the server applies
    with stages("parse"):
        invocations = []
        for body in bodies:
            invocation = parse_request(body, JSON, hidden_size=engine.hidden_size, tasks=engine.tasks, limits=limits)
            check_response_size(invocation, JSON, limits, hidden_size=engine.hidden_size, echoed_bytes=len(body),
                                default_dimensions=settings.default_dimensions, default_encoding=settings.default_encoding)  # fmt: skip
            invocations.append(invocation)
    with stages("embed"):
        results = engine.embed_many([r for inv in invocations for r in inv.pending()])
    with stages("write"):
        for invocation, result in zip(invocations, results, strict=True):  # a Jina body is one request
            write_response(invocation.complete([result]), JSON, model=engine.model_name, default_task=settings.default_task)
    return results


def measure_baseline(engine, settings: Settings, n_requests: int, seed: int) -> tuple[dict, np.ndarray]:
    requests = workload(n_requests, seed)
    bodies = [jina_body(texts, task) for texts, task in requests]
    serve_round(engine, settings, warm_bodies(seed), Stages())
    stages = Stages()
    busy0, steal0 = machine_cpu_seconds()
    own0, usage0, started = time.process_time(), own_usage(), time.perf_counter()
    rounds, vectors, tokens = [], [], []
    with time_forward(engine, stages):
        for k in range(0, n_requests, CLIENTS):
            t0 = time.perf_counter()
            results = serve_round(engine, settings, bodies[k : k + CLIENTS], stages)
            rounds.append(time.perf_counter() - t0)
            vectors += [r.embeddings for r in results]
            tokens += [r.total_tokens for r in results]
    wall = time.perf_counter() - started
    busy1, steal1 = machine_cpu_seconds()
    own, usage = time.process_time() - own0, usage_delta(usage0, own_usage())
    with stages("tokenise"):  # the same encode_batch calls embed_many made, again, to time them alone
        for texts, task in requests:
            engine.count_tokens(texts, task)
    result = {
        "texts": n_requests * TEXTS_PER_REQUEST,
        "tokens": int(sum(tokens)),
        "request_tokens": tokens,
        "wall_s": wall,
        "round_wall_s": rounds,
        "stage_wall_s": dict(stages.wall),
        "stage_cpu_s": dict(stages.cpu),
        "cpu_s": own,
        "usage": usage,
        "others_cpu_s": (busy1 - busy0) - own,
        "steal_s": steal1 - steal0,
    }
    return result, np.concatenate(vectors)


def small_baseline_main(args) -> None:
    """The in-process side of the small-request measurement, in this (fresh) process, driven over a pipe:
    one line in, one 1-text ``Engine.embed`` and one parse + embed + write out (their seconds, as JSON), so
    that the parent can interleave them with the endpoint's calls. The first line out is the vector."""
    from inference.engine import Engine

    settings = Settings.resolve(device="cpu", dtype="float32")
    engine = Engine.load(args.model_dir, settings=settings)
    request = EmbedRequest(texts=[SMALL_TEXT], task="text-matching")
    body = jina_body([SMALL_TEXT], "text-matching")
    for _ in range(10):
        engine.embed(request)
        serve_round(engine, settings, [body], Stages())
    print(json.dumps(engine.embed(request).embeddings[0].tolist()), flush=True)
    for _ in sys.stdin:
        t0 = time.perf_counter()
        engine.embed(request)
        t1 = time.perf_counter()
        serve_round(engine, settings, [body], Stages())
        print(json.dumps([t1 - t0, time.perf_counter() - t1]), flush=True)


def baseline_main(args) -> None:
    """The in-process baseline, in this (fresh) process: results to ``--out``, vectors to ``--out``.npy.

    It runs on the main thread: the engine at its best. There glibc's main malloc arena serves the
    forward pass, which the engine's ``keep_freed_memory`` keeps; a worker thread (the server's
    batcher) allocates from another arena, which that setting does not hold (RESULTS-serving.md)."""
    from inference.engine import Engine

    settings = Settings.resolve(device="cpu", dtype="float32")
    started = time.perf_counter()
    engine = Engine.load(args.model_dir, settings=settings)
    load_s = time.perf_counter() - started
    result, vectors = measure_baseline(engine, settings, args.requests, args.seed)
    result["load_s"] = load_s
    Path(args.out).write_text(json.dumps(result))
    np.save(f"{args.out}.npy", vectors)


def run_baseline(model_dir: Path, n_requests: int, seed: int, workdir: Path, tag: str) -> tuple[dict, np.ndarray]:
    out = workdir / f"baseline-{tag}.json"
    command = [sys.executable, "-m", "bench.serving", "--baseline", "--model-dir", str(model_dir),
               "--requests", str(n_requests), "--seed", str(seed), "--out", str(out)]  # fmt: skip
    env = {**os.environ, "JV3_DEVICE": "cpu", "JV3_DTYPE": "float32"}
    subprocess.run(command, cwd=ROOT, env=env, check=True, timeout=1800)
    return json.loads(out.read_text()), np.load(f"{out}.npy")


# ---------------------------------------------------------------------------------------------- served pass


def run_clients(port: int, plans: list[list[tuple[int, bytes]]], connections: list[Client] | None = None):
    """Each plan on its own thread and connection, all starting together; returns (wall s, answers),
    answers: (request index, status, latency s, parsed body or raw bytes) per request."""
    connections = connections or [Client(port) for _ in plans]
    answers: list[list] = [[] for _ in plans]
    start = threading.Barrier(len(plans) + 1)

    def client(c: int) -> None:
        start.wait()
        for index, body in plans[c]:
            status, data, latency = connections[c].post("/invocations", body)
            answers[c].append((index, status, latency, orjson.loads(data) if status == 200 else data))

    threads = [threading.Thread(target=client, args=(c,), name=f"client-{c}") for c in range(len(plans))]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, [a for per_client in answers for a in per_client]


def served_pass(server: LocalServer, n_requests: int, seed: int, reference: np.ndarray, ref_tokens: list[int]) -> dict:
    bodies = [jina_body(texts, task) for texts, task in workload(n_requests, seed)]
    warm = warm_bodies(seed)
    idle_threads = set(thread_cpu_seconds(server.pid))
    connections = [Client(server.port) for _ in range(CLIENTS)]
    try:
        # One request per connection first: each gets its handler thread, whose CPU is then told apart.
        run_clients(server.port, [[(i, warm[i])] for i in range(CLIENTS)], connections)
        handlers = set(thread_cpu_seconds(server.pid)) - idle_threads
        plans = [[(i, bodies[i]) for i in range(c, n_requests, CLIENTS)] for c in range(CLIENTS)]
        threads0, server0, client0 = thread_cpu_seconds(server.pid), process_usage(server.pid), time.process_time()
        busy0, steal0 = machine_cpu_seconds()
        wall, answers = run_clients(server.port, plans, connections)
        busy1, steal1 = machine_cpu_seconds()
        threads1, server1, client1 = thread_cpu_seconds(server.pid), process_usage(server.pid), time.process_time()
    finally:
        for conn in connections:
            conn.close()
    by_thread = {tid: cpu - threads0.get(tid, 0.0) for tid, cpu in threads1.items()}
    usage = usage_delta(server0, server1)
    server_cpu, client_cpu = usage["user"] + usage["system"], client1 - client0
    handler_cpu = sum(cpu for tid, cpu in by_thread.items() if tid in handlers)
    main_cpu = by_thread.get(server.pid, 0.0)
    return {
        "texts": n_requests * TEXTS_PER_REQUEST,
        "wall_s": wall,
        "latency_s": [latency for _, _, latency, _ in answers],
        "statuses": sorted({status for _, status, _, _ in answers}),
        "server_cpu_s": server_cpu,
        "server_usage": usage,
        "server_handler_cpu_s": handler_cpu,
        "server_accept_cpu_s": main_cpu,
        "server_engine_cpu_s": server_cpu - handler_cpu - main_cpu,
        "handler_threads": len(handlers),
        "client_cpu_s": client_cpu,
        "others_cpu_s": (busy1 - busy0) - server_cpu - client_cpu,
        "steal_s": steal1 - steal0,
        **check_answers(answers, reference, ref_tokens),
    }


def check_answers(answers: list, reference: np.ndarray, ref_tokens: list[int]) -> dict:
    """Every returned vector against the baseline's, every request's token count against the baseline's."""
    checked = mismatched = token_mismatches = 0
    worst, tokens = 0.0, 0
    for index, status, _, answer in answers:
        if status != 200:
            continue
        got = np.asarray([item["embedding"] for item in answer["data"]], dtype=np.float32)
        want = reference[index * TEXTS_PER_REQUEST : (index + 1) * TEXTS_PER_REQUEST]
        diff = np.abs(got - want).max(axis=1) if got.shape == want.shape else np.full(len(want), np.inf)
        checked += len(want)
        mismatched += int((diff > TOLERANCE).sum())
        worst = max(worst, float(diff.max()))
        tokens += answer["usage"]["total_tokens"]
        token_mismatches += answer["usage"]["total_tokens"] != ref_tokens[index]
    errors = sum(1 for _, status, _, _ in answers if status != 200)
    return {"tokens": tokens, "vectors_checked": checked, "vector_mismatches": mismatched, "max_abs_diff": worst,
            "token_mismatches": int(token_mismatches), "errors": errors}  # fmt: skip


def warm_up(server: LocalServer) -> None:
    """A first request, so that the engine's thread pools (OpenMP, tokenizer) exist before any pass
    tells the server's threads apart: threads started later are the connections' handlers."""
    client = Client(server.port)
    try:
        status, data, _ = client.post("/invocations", jina_body(*workload(1, seed=7)[0]))
        if status != 200:
            raise RuntimeError(f"warm-up request answered {status}: {data[:300]!r}")
    finally:
        client.close()


def served_small(server: LocalServer, model_dir: Path, quickack: bool = True) -> dict:
    """Sequential 1-text requests on one keep-alive connection, the server otherwise idle, interleaved
    call by call with the same request in-process (``small_baseline_main``, a fresh process): the machine
    drifts between minutes, not between one call and the next. Each round: the endpoint, the endpoint
    with a client that acknowledges at once (``quickack``), and the engine, in a rotating order."""
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.serving", "--small-baseline", "--model-dir", str(model_dir)],
        cwd=ROOT, env={**os.environ, "JV3_DEVICE": "cpu", "JV3_DTYPE": "float32"},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    client = Client(server.port)
    body = jina_body([SMALL_TEXT], "text-matching")
    out = {"latency_s": [], "quickack_latency_s": [], "engine_s": [], "path_s": []}

    def endpoint(key: str, ack: bool) -> bytes:
        status, data, latency = client.post("/invocations", body, quickack=ack)
        if status != 200:
            raise RuntimeError(f"small request answered {status}: {data[:300]!r}")
        out[key].append(latency)
        return data

    def in_process() -> None:
        child.stdin.write("go\n")
        child.stdin.flush()
        engine_s, path_s = json.loads(child.stdout.readline())
        out["engine_s"].append(engine_s)
        out["path_s"].append(path_s)

    try:
        reference = json.loads(child.stdout.readline())
        for _ in range(10):
            client.post("/invocations", body)
        for out_list in out.values():
            out_list.clear()
        steps = [lambda: endpoint("latency_s", False), in_process] + ([lambda: endpoint("quickack_latency_s", True)] if quickack else [])
        data = b""
        for i in range(SMALL_CALLS):
            shift = i % len(steps)
            for step in steps[shift:] + steps[:shift]:
                data = step() or data
        vector = np.asarray(orjson.loads(data)["data"][0]["embedding"], dtype=np.float32)
        out["max_abs_diff"] = float(np.abs(vector - np.asarray(reference, dtype=np.float32)).max())
    finally:
        client.close()
        child.stdin.close()
        child.wait(timeout=60)
    return out


# ---------------------------------------------------------------------------------------------- one checkpoint

# The analysis variant: the same server with one malloc arena for all threads, so that its batcher
# thread allocates from the arena the engine's keep_freed_memory holds (as the baseline's main thread does).
ARENA_ENV = {"MALLOC_ARENA_MAX": "1"}
def bench_checkpoint(name: str, model_dir: Path, passes: int, rounds: int, workdir: Path, analyse: bool) -> dict:
    n_requests, seed = rounds * CLIENTS, 1000
    record = {"checkpoint": name, "config": json.loads((model_dir / "config.json").read_text()), "passes": []}
    with ExitStack() as stack:
        server = stack.enter_context(LocalServer(model_dir, workdir / f"server-{name}.log"))
        variant = stack.enter_context(LocalServer(model_dir, workdir / f"arena-{name}.log", ARENA_ENV)) if analyse else None
        for s in (server, variant) if variant else (server,):
            warm_up(s)
        record["server_rss_ready_bytes"] = rss_bytes(server.pid)
        reference = ref_tokens = None
        for p in range(passes):
            idle0 = cpu_seconds(server.pid) + (cpu_seconds(variant.pid) if variant else 0.0)
            baseline, vectors = run_baseline(model_dir, n_requests, seed, workdir, f"{name}-{p}")
            baseline["server_cpu_meanwhile_s"] = cpu_seconds(server.pid) + (cpu_seconds(variant.pid) if variant else 0.0) - idle0
            if reference is None:
                reference, ref_tokens = vectors, baseline["request_tokens"]
            baseline["max_abs_diff_to_first"] = float(np.abs(vectors - reference).max())
            served = served_pass(server, n_requests, seed, reference, ref_tokens)
            record["passes"].append({"baseline": baseline, "served": served})
            progress(f"{name} pass {p + 1}/{passes}", baseline=baseline, served=served)
        if variant:  # one pass, right after the last default one: the machine as alike as it gets
            record["served_arena_max_1"] = served_pass(variant, n_requests, seed, reference, ref_tokens)
            progress(f"{name} analysis", served_arena_max_1=record["served_arena_max_1"])
        record["small"] = served_small(server, model_dir)
        record["server_rss_end_bytes"] = rss_bytes(server.pid)
    return record


def progress(what: str, **runs: dict) -> None:
    print(f"[{what}] " + ", ".join(f"{k} {v['texts'] / v['wall_s']:.1f} texts/s ({v.get('server_cpu_s', v.get('cpu_s')):.1f} CPU s)"
                                   for k, v in runs.items()), file=sys.stderr, flush=True)  # fmt: skip


# ---------------------------------------------------------------------------------------------- summary


def available_cpu_s(run: dict, cores: int) -> float:
    """CPU seconds the machine left to a pass: its cores × wall, less what other processes and the
    hypervisor (steal) took meanwhile."""
    return cores * run["wall_s"] - run["others_cpu_s"] - run["steal_s"]


def served_summary(runs: list[dict], base_wall: float, base_available: float, cores: int) -> dict:
    """Pooled figures of served passes (total texts / total wall), per 1,000 vectors where a cost.
    ``base_wall``, ``base_available``: the baseline's for the same texts."""
    texts, wall = sum(r["texts"] for r in runs), sum(r["wall_s"] for r in runs)
    per_k = 1000 / texts
    latencies = [x for r in runs for x in r["latency_s"]]
    return {
        "texts_per_s": texts / wall,
        "tokens_per_s": sum(r["tokens"] for r in runs) / wall,
        "ratio": base_wall / wall,
        # The same ratio with each pass's wall time replaced by the CPU time the neighbours left it:
        # first-order, it takes out whichever pass shared the machine more.
        "adjusted_ratio": base_available / sum(available_cpu_s(r, cores) for r in runs),
        "p50_ms": ms(pct(latencies, 50)),
        "p99_ms": ms(pct(latencies, 99)),
        "cpu_per_1000": sum(r["server_cpu_s"] for r in runs) * per_k,
        "system_per_1000": sum(r["server_usage"]["system"] for r in runs) * per_k,
        "minflt_per_1000": sum(r["server_usage"]["minflt"] for r in runs) * per_k,
        "handlers_per_1000": sum(r["server_handler_cpu_s"] for r in runs) * per_k,
        "engine_per_1000": sum(r["server_engine_cpu_s"] for r in runs) * per_k,
        "accept_per_1000": sum(r["server_accept_cpu_s"] for r in runs) * per_k,
        "clients_per_1000": sum(r["client_cpu_s"] for r in runs) * per_k,
        "vectors_checked": sum(r["vectors_checked"] for r in runs),
        "vector_mismatches": sum(r["vector_mismatches"] for r in runs),
        "max_abs_diff": max(r["max_abs_diff"] for r in runs),
        "token_mismatches": sum(r["token_mismatches"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
    }


def summarise(record: dict, cores: int) -> dict:
    """Pooled over passes (total texts / total wall), each pass pair's ratio, CPU per 1,000 vectors."""
    base = [p["baseline"] for p in record["passes"]]
    base_available = sum(available_cpu_s(b, cores) for b in base)
    texts = sum(b["texts"] for b in base)
    per_k = 1000 / texts

    def stage(name, kind="cpu"):
        return sum(b[f"stage_{kind}_s"].get(name, 0.0) for b in base)

    engine_wall, base_wall = stage("embed", "wall"), sum(b["wall_s"] for b in base)
    tokens = sum(b["tokens"] for b in base)
    forward, tokenise, embed = stage("forward"), stage("tokenise"), stage("embed")
    rounds = [r for b in base for r in b["round_wall_s"]]
    summary = {
        "engine_texts_per_s": texts / engine_wall,
        "engine_tokens_per_s": tokens / engine_wall,
        "baseline_texts_per_s": texts / base_wall,
        "baseline_tokens_per_s": tokens / base_wall,
        "baseline_round_p50_ms": ms(pct(rounds, 50)),
        "baseline_round_p99_ms": ms(pct(rounds, 99)),
        "baseline_cpu_per_1000": {
            "parse": stage("parse") * per_k,
            "tokenise": tokenise * per_k,
            "forward": forward * per_k,
            "plan_and_pool": (embed - forward - tokenise) * per_k,
            "write": stage("write") * per_k,
            "total": sum(b["cpu_s"] for b in base) * per_k,
            "system": sum(b["usage"]["system"] for b in base) * per_k,
            "minflt": sum(b["usage"]["minflt"] for b in base) * per_k,
        },
        "served": served_summary([p["served"] for p in record["passes"]], base_wall, base_available, cores),
        "pass_ratios": [p["baseline"]["wall_s"] / p["served"]["wall_s"] for p in record["passes"]],
        "pass_adjusted_ratios": [available_cpu_s(p["baseline"], cores) / available_cpu_s(p["served"], cores)
                                 for p in record["passes"]],  # fmt: skip
    }
    summary["served"]["ratio_to_engine_only"] = engine_wall / sum(p["served"]["wall_s"] for p in record["passes"])
    # Less sensitive to neighbours than the wall-clock ratio: on saturated cores throughput follows CPU
    # seconds per vector. Clients are left out: in production they run on other machines.
    summary["served"]["cpu_ratio"] = summary["baseline_cpu_per_1000"]["total"] / summary["served"]["cpu_per_1000"]
    if "served_arena_max_1" in record:  # one pass: its ratio is to the mean baseline pass
        arena = served_summary([record["served_arena_max_1"]], base_wall / len(base), base_available / len(base), cores)
        arena["cpu_ratio"] = summary["baseline_cpu_per_1000"]["total"] / arena["cpu_per_1000"]
        summary["served_arena_max_1"] = arena
    small_run = record["small"]
    summary["small"] = {
        "engine_p50_ms": ms(pct(small_run["engine_s"], 50)),
        "path_p50_ms": ms(pct(small_run["path_s"], 50)),
        "served_p50_ms": ms(pct(small_run["latency_s"], 50)),
        "served_p99_ms": ms(pct(small_run["latency_s"], 99)),
        "quickack_p50_ms": ms(pct(small_run["quickack_latency_s"], 50)),
        "max_abs_diff": small_run["max_abs_diff"],
        # per round, endpoint minus the engine's call beside it: the median of the pairs, less noisy
        "added_paired_p50_ms": ms(pct([a - b for a, b in zip(small_run["latency_s"], small_run["engine_s"], strict=True)], 50)),
    }
    small = summary["small"]
    small["added_p50_ms"] = small["served_p50_ms"] - small["engine_p50_ms"]
    small["added_quickack_p50_ms"] = small["quickack_p50_ms"] - small["engine_p50_ms"]
    summary["throughput_goal_met"] = summary["served"]["ratio"] >= GOAL_RATIO
    summary["latency_goal_met"] = small["added_p50_ms"] <= GOAL_ADDED_MS
    return summary


def ms(seconds: float) -> float:
    return seconds * 1e3


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def describe(config: dict) -> str:
    return (f"hidden {config['hidden_size']}, {config['num_hidden_layers']} layer(s), "
            f"{config['num_attention_heads']} heads, FFN {config['intermediate_size']}")  # fmt: skip


def report(records: list[dict], info: dict, settings: dict) -> list[str]:
    return (report_header(info, settings) + report_throughput(records) + report_cpu(records)
            + report_small(records) + report_goals(records))  # fmt: skip


def report_header(info: dict, settings: dict) -> list[str]:
    return [
        HEADING, "",
        f"Run {info['date']}, {info['wall_minutes']:.1f} min in all. Machine: {info['cpu']}, {info['logical_cores']} logical "
        f"cores ({info['usable_cores']} usable), {info['memory_gib']} GiB, shared with other jobs; Python {info['python']}, "
        f"torch {info['torch']} ({info['torch_threads']} intra-op threads), numpy {info['numpy']}, orjson {info['orjson']}. "
        "Raw numbers: bench/serving.json.",
        "",
        f"Method (bench/serving.py): the server (`python -m inference.serve`, JV3_DEVICE=cpu, JV3_DTYPE=float32, "
        f"JV3_BATCH_WAIT_MS={settings['batch_wait_ms']:g}, JV3_MAX_BATCH_TOKENS {settings['max_batch_tokens']}) and the "
        "in-process baseline each in their own process (the baseline a fresh one per pass, the server up and idle "
        f"meanwhile); passes alternate baseline / served, {info['passes']} of each per checkpoint; a pass is "
        f"{', '.join(f'{n} rounds of {CLIENTS} requests for {k.upper()}' for k, n in info['rounds'].items())}. Load: {CLIENTS} clients × {TEXTS_PER_REQUEST}-text Jina requests (texts of 5–60 "
        "random words from a fixed seed, the five tasks in turn, float JSON, full hidden size) on keep-alive "
        "`http.client` connections, answers parsed with orjson. Baseline, on its main thread: `parse_request` + "
        f"`Engine.embed_many` of {CLIENTS} requests at a time + `write_response` of each; \"engine only\" is the "
        "`embed_many` time alone. Latency p50/p99: per request; for the baseline, per round of 16 requests (they "
        "complete together). Checkpoints: random, released layout, the tiny fixture's tokenizer (vocabulary "
        f"{VOCAB}, ~3 tokens a word), float32. Analysis rows: a second server started with `MALLOC_ARENA_MAX=1`, "
        "one pass after the last default one. Server code measured: inference/*.py sha256 "
        f"`{info['server_code_sha256']}`" + ("" if info["server_code_sha256_end"] == info["server_code_sha256"] else
        f" at the start, `{info['server_code_sha256_end']}` at the end (it was being changed while this ran)") + ".",
        "",
        f"**Goal**: served throughput ≥ {GOAL_RATIO:.0%} of the in-process baseline; p50 added latency of one small "
        f"request ≤ {GOAL_ADDED_MS:g} ms.",
        "",
    ]  # fmt: skip


def label(record: dict) -> str:
    return f"{record['checkpoint'].upper()} ({describe(record['config'])})"


def report_throughput(records: list[dict]) -> list[str]:
    lines = [
        "### Throughput: 16 clients × 32-text requests",
        "",
        "| checkpoint | path | texts/s | tokens/s | p50 ms | p99 ms | served ÷ baseline | adjusted for neighbours |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        s, name = r["summary"], label(r)
        v = s["served"]
        lines += [
            f"| {name} | in-process, engine only (`embed_many` ×16) | {s['engine_texts_per_s']:.1f} | {s['engine_tokens_per_s']:,.0f} | – | – | ({v['ratio_to_engine_only']:.3f}) | |",
            f"| {name} | in-process baseline (parse + `embed_many` ×16 + write) | {s['baseline_texts_per_s']:.1f} | {s['baseline_tokens_per_s']:,.0f} | {s['baseline_round_p50_ms']:,.0f} | {s['baseline_round_p99_ms']:,.0f} | 1 | 1 |",
            f"| {name} | **local endpoint, 16 HTTP clients** | {v['texts_per_s']:.1f} | {v['tokens_per_s']:,.0f} | {v['p50_ms']:,.0f} | {v['p99_ms']:,.0f} | **{v['ratio']:.3f}** | {v['adjusted_ratio']:.3f} |",
        ]  # fmt: skip
        if "served_arena_max_1" in s:
            a = s["served_arena_max_1"]
            lines.append(f"| {name} | analysis: local endpoint, `MALLOC_ARENA_MAX=1` | {a['texts_per_s']:.1f} | {a['tokens_per_s']:,.0f} | "
                         f"{a['p50_ms']:,.0f} | {a['p99_ms']:,.0f} | {a['ratio']:.3f} | {a['adjusted_ratio']:.3f} |")  # fmt: skip
    lines += [
        "",
        "Per pass, with the CPU seconds other processes on the machine used meanwhile (2 cores give 2 CPU s per second "
        "of wall): the neighbours' share is the noise in each ratio. \"Adjusted\" divides each pass's texts by the CPU "
        "seconds left to it (cores × wall − others − steal) instead of its wall time.",
        "",
        "| checkpoint | pass | baseline texts/s | others' CPU s | served texts/s | others' CPU s | served ÷ baseline | adjusted |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in records:
        s = r["summary"]
        for i, p in enumerate(r["passes"]):
            b, v = p["baseline"], p["served"]
            lines.append(f"| {r['checkpoint'].upper()} | {i + 1} | {b['texts'] / b['wall_s']:.1f} | {b['others_cpu_s']:.1f} | "
                         f"{v['texts'] / v['wall_s']:.1f} | {v['others_cpu_s']:.1f} | {s['pass_ratios'][i]:.3f} | "
                         f"{s['pass_adjusted_ratios'][i]:.3f} |")  # fmt: skip
        if "served_arena_max_1" in r:
            a, sa = r["served_arena_max_1"], s["served_arena_max_1"]
            lines.append(f"| {r['checkpoint'].upper()} | analysis: `MALLOC_ARENA_MAX=1`, to the mean baseline pass | – | – | "
                         f"{a['texts'] / a['wall_s']:.1f} | {a['others_cpu_s']:.1f} | {sa['ratio']:.3f} | {sa['adjusted_ratio']:.3f} |")  # fmt: skip
    return lines + [""]


def report_cpu(records: list[dict]) -> list[str]:
    lines = [
        "### CPU seconds per 1,000 vectors",
        "",
        "Baseline by stage: whole-process CPU time around each stage; tokenise is the same `encode_batch` calls timed "
        "again alone, plan & pool is `embed_many` less forward and tokenise; system time and minor page faults over "
        "the whole pass.",
        "",
        "| checkpoint | parse | tokenise | forward | plan & pool | write | **total** | of it system | minor faults |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in records:
        c = r["summary"]["baseline_cpu_per_1000"]
        lines.append(f"| {r['checkpoint'].upper()} | {c['parse']:.3f} | {c['tokenise']:.2f} | {c['forward']:.2f} | "
                     f"{c['plan_and_pool']:.2f} | {c['write']:.3f} | **{c['total']:.2f}** | {c['system']:.2f} | {c['minflt']:,.0f} |")  # fmt: skip
    lines += [
        "",
        "Server, from /proc: total and system time, minor faults (/proc/PID/stat), and by thread group "
        "(/proc/PID/task/TID/schedstat): handler threads (one per connection: HTTP, parse, response-size check, "
        "write), engine (every other thread: the batcher, its OpenMP team, the tokenizer's pool), the accept loop "
        "(main thread). The clients run in the bench process on the same 2 cores: their CPU (HTTP, orjson parsing "
        "of 32 vectors an answer) competes with the server's, and is not counted in the server's.",
        "",
        "| checkpoint | server | **total** | of it system | minor faults | handlers | engine | accept loop | clients | baseline ÷ server CPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in records:
        s = r["summary"]
        for name, key in (("default", "served"), ("`MALLOC_ARENA_MAX=1`", "served_arena_max_1")):
            if key in s:
                v = s[key]
                lines.append(f"| {r['checkpoint'].upper()} | {name} | **{v['cpu_per_1000']:.2f}** | {v['system_per_1000']:.2f} | "
                             f"{v['minflt_per_1000']:,.0f} | {v['handlers_per_1000']:.3f} | {v['engine_per_1000']:.2f} | "
                             f"{v['accept_per_1000']:.3f} | {v['clients_per_1000']:.2f} | {v['cpu_ratio']:.3f} |")  # fmt: skip
    return lines + [""]


def report_small(records: list[dict]) -> list[str]:
    lines = [
        f"### Added latency of one small request (1 text, {SMALL_CALLS} sequential calls, server otherwise idle)",
        "",
        "Each round, in a rotating order: one endpoint call, one endpoint call whose client acknowledges the answer's "
        "first segment at once (`TCP_QUICKACK`, client side), and one `Engine.embed` plus one parse + embed + write of "
        "the same request in a fresh process of their own, driven over a pipe: both sides see the machine of the same "
        "moment. Added = endpoint p50 − `Engine.embed` p50; paired = the median over rounds of endpoint − engine.",
        "",
        "| checkpoint | `Engine.embed` p50 ms | parse + embed + write p50 ms | endpoint p50 ms | endpoint p99 ms | **added p50 ms** | added, paired ms | endpoint p50, client QUICKACK |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in records:
        s = r["summary"]["small"]
        lines.append(f"| {r['checkpoint'].upper()} | {s['engine_p50_ms']:.2f} | {s['path_p50_ms']:.2f} | {s['served_p50_ms']:.2f} | "
                     f"{s['served_p99_ms']:.2f} | **{s['added_p50_ms']:.2f}** | {s['added_paired_p50_ms']:.2f} | {s['quickack_p50_ms']:.2f} |")  # fmt: skip
    return lines + [""]


def report_goals(records: list[dict]) -> list[str]:
    lines = ["### Correctness and goals", ""]
    for r in records:
        s, name = r["summary"], r["checkpoint"].upper()
        v, small = s["served"], s["small"]
        checked = [s[k] for k in ("served", "served_arena_max_1") if k in s]
        lines.append(
            f"- {name}: {sum(c['vectors_checked'] for c in checked):,} served vectors checked against the baseline's, "
            f"{sum(c['vector_mismatches'] for c in checked)} over {TOLERANCE:g} (max-abs difference "
            f"{max(c['max_abs_diff'] for c in checked):.1e}; the small request's {small['max_abs_diff']:.1e}); "
            f"{sum(c['token_mismatches'] for c in checked)} requests with another token count; "
            f"{sum(c['errors'] for c in checked)} errors. Throughput goal (≥ {GOAL_RATIO:.0%}): "
            f"**{'met' if s['throughput_goal_met'] else 'not met'}** ({v['ratio']:.1%} of the baseline, "
            f"{v['ratio_to_engine_only']:.1%} of engine only; adjusted for the neighbours' CPU {v['adjusted_ratio']:.1%}, "
            f"by CPU seconds per vector {v['cpu_ratio']:.1%}: the verdict is the unadjusted ratio's). "
            f"Added-latency goal (≤ {GOAL_ADDED_MS:g} ms): **{'met' if s['latency_goal_met'] else 'not met'}** "
            f"({small['added_p50_ms']:.2f} ms)."
        )  # fmt: skip
    idle = max(p["baseline"]["server_cpu_meanwhile_s"] for r in records for p in r["passes"])
    others = [run["others_cpu_s"] for r in records for p in r["passes"] for run in p.values()]
    others += [r["served_arena_max_1"]["others_cpu_s"] for r in records if "served_arena_max_1" in r]
    lines += [
        f"- The idle server(s) used at most {idle:.2f} CPU s while a baseline process ran. Other processes on the "
        f"machine used {min(others):.1f}–{max(others):.1f} CPU s during a pass.",
        "",
    ]  # fmt: skip
    return lines


def write_markdown(lines: list[str]) -> None:
    """Replace this benchmark's sections of RESULTS-serving.md, keeping the sections others write."""
    text = OUT_MD.read_text() if OUT_MD.exists() else ""
    kept = []
    for heading in KEPT_HEADINGS:
        start = text.find(heading)
        if start < 0:
            continue
        end = min((text.find(h, start + 1) for h in KEPT_HEADINGS if text.find(h, start + 1) > start), default=len(text))
        kept.append((start, text[start:end].rstrip() + "\n"))
    body = "\n".join(lines).rstrip() + "\n"
    OUT_MD.write_text("\n".join([body] + [section for _, section in sorted(kept)]))


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", default="mid,wide", help="checkpoints to run: mid, wide (comma-separated)")
    parser.add_argument("--passes", type=int, default=2, help="baseline/served pass pairs per checkpoint")
    parser.add_argument("--rounds", type=int, help=f"rounds of {CLIENTS} requests per pass (default: {ROUNDS})")
    parser.add_argument("--no-analysis", action="store_true",
                        help="skip the analysis variant (a server with MALLOC_ARENA_MAX=1)")
    parser.add_argument("--no-write", action="store_true", help="print the results only")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from bench/serving.json, running nothing")
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--small-baseline", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.baseline:
        baseline_main(args)
        return
    if args.small_baseline:
        small_baseline_main(args)
        return
    if args.report_only:
        data = json.loads(OUT_JSON.read_text())
        info, settings, records = data["machine"], data["settings"], data["checkpoints"]
    else:
        handle_stop_signals()
        info, settings, records = run(args)
    for record in records:
        record["summary"] = summarise(record, info["usable_cores"])
    lines = report(records, info, settings)
    print("\n".join(lines))
    if not args.no_write:
        OUT_JSON.write_text(json.dumps({"machine": info, "settings": settings, "checkpoints": records}, indent=1))
        write_markdown(lines)
        print(f"wrote {OUT_JSON} and {OUT_MD}", file=sys.stderr)


def run(args) -> tuple[dict, dict, list[dict]]:
    """Every checkpoint's passes; (machine and run info, server settings, one record per checkpoint)."""
    import torch

    from bench.checkpoints import MID, WIDE, make_released_checkpoint
    from inference.engine import DEFAULT_BATCH_TOKENS

    specs = {"mid": MID, "wide": WIDE}
    names = args.specs.split(",")
    started = time.perf_counter()
    info = machine() | {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "passes": args.passes}
    records = []
    with tempfile.TemporaryDirectory(prefix="jv3-serving-") as tmp:
        workdir = Path(tmp)
        for name in names:
            model_dir = make_released_checkpoint(workdir / name, sizes=specs[name] | {"vocab_size": VOCAB}, dtype=torch.float32)
            records.append(bench_checkpoint(name, model_dir, args.passes, args.rounds or ROUNDS[name], workdir, not args.no_analysis))
    info["wall_minutes"] = (time.perf_counter() - started) / 60
    info["rounds"] = {name: args.rounds or ROUNDS[name] for name in names}
    info["server_code_sha256_end"] = code_fingerprint()
    defaults = Settings.resolve(device="cpu", dtype="float32")
    settings = {"batch_wait_ms": defaults.batch_wait_ms, "max_batch_tokens": defaults.max_batch_tokens or DEFAULT_BATCH_TOKENS["cpu"]}
    return info, settings, records


if __name__ == "__main__":
    main()
