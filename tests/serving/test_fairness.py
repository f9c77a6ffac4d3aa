"""Fair, bounded, cancellable work on the local/BYOC server (issue 10, item 2), over real HTTP on loopback.

A large request is cut into units that share every batch with the requests that arrive while it runs; a
request nobody waits for any more (its JV3_REQUEST_TIMEOUT_S passed, or its client closed the
connection) stops costing forward passes within one batch; and the units of a request, however they
were batched, join back into the answer it would have had in one piece. The engines are real: a
wrapper around ``Engine.run`` only counts the forward batches and notes which requests they served.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import struct
import threading
import time

import numpy as np
import pytest

from inference.engine import Engine, Plan
from inference.request import EmbedRequest
from inference.scheduling import Job, Scheduler
from inference.serve import ServerLimits, make_server
from inference.settings import Settings

from .conftest import TINY

BATCHING_ATOL = 1e-5  # what test_endpoint and test_endpoint_health allow between batch compositions
MAX_TEXTS = 2048
# ~100 tokens each: 2,048 of them are ~25 full batches of the CPU budget, several seconds here
LARGE = [f"text number {i} " + "lorem ipsum dolor " * 6 for i in range(MAX_TEXTS)]


class Batches:
    """The forward batches of a real engine: each ``run`` call, with the sizes of the requests it served
    (a request is known here by its number of texts) and the thread that ran it."""

    def __init__(self, engine: Engine):
        self.engine, self._run = engine, engine.run
        self.pause_s = 0.0  # added to every batch: a model as slow as a test needs, whatever the machine
        self.calls: list[list[int]] = []
        self.texts: dict[int, int] = {}  # texts embedded, by the size of the request they belong to
        self.threads: set[str] = set()
        engine.run = self  # the instance attribute: embed_many's self.run finds it

    def __call__(self, plans):
        self.calls.append([len(p.request.texts) for p in plans if isinstance(p, Plan)])
        for p in plans:
            if isinstance(p, Plan):
                self.texts[len(p.request.texts)] = self.texts.get(len(p.request.texts), 0) + p.n_slots
        self.threads.add(threading.current_thread().name)
        if self.pause_s:
            time.sleep(self.pause_s)
        return self._run(plans)

    def serving(self, size: int) -> list[int]:
        """Indexes of the batches that held pieces of a request of ``size`` texts."""
        return [i for i, sizes in enumerate(self.calls) if size in sizes]

    def restore(self) -> None:
        del self.engine.run


@pytest.fixture(scope="module")
def engines():
    """Two engines of their own (as JV3_DEVICE=cpu,cpu loads), at the default CPU budget."""
    return [Engine.load(TINY, Settings.resolve(device="cpu", dtype="float32")) for _ in range(2)]


@pytest.fixture
def serve():
    started = []

    def start(engines: list[Engine], **settings):
        batches = [Batches(e) for e in engines]
        resolved = Settings.resolve(device="cpu", dtype="float32", **settings)
        server = make_server(engines, port=0, settings=resolved, limits=ServerLimits.resolve(resolved))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        started.append((server, batches))
        return server, batches

    yield start
    for server, batches in started:
        server.shutdown()
        server.server_close()
        for b in batches:
            b.restore()


def post(port: int, payload, *, content_type: str = "application/json", timeout: float = 120):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        conn.request("POST", "/invocations", body, {"Content-Type": content_type})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def vectors(body: bytes) -> np.ndarray:
    return np.array([d["embedding"] for d in json.loads(body)["data"]], dtype=np.float32)


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout:g} s for {what}"
        time.sleep(0.01)


def in_background(fn) -> tuple[threading.Thread, dict]:
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=fn()), daemon=True)
    thread.start()
    return thread, box


# ------------------------------------------------------------------------------------ fairness


def test_small_requests_are_served_while_a_large_one_runs(serve, engines):
    # GIVEN one engine busy with a request of the most texts allowed
    server, (batches,) = serve(engines[:1])
    port = server.server_address[1]
    large, answer = in_background(lambda: post(port, {"input": LARGE}))
    wait_for(lambda: batches.serving(MAX_TEXTS), "the large request's first batch")

    # WHEN 24 small requests come from 4 clients while it runs
    latencies, statuses = [], []

    def client(k: int) -> None:
        for j in range(6):
            started = time.monotonic()
            status, body = post(port, {"input": [f"small request {k}.{j}"]})
            latencies.append(time.monotonic() - started)
            statuses.append((status, len(json.loads(body)["data"])))

    clients = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(timeout=120)
    still_running = large.is_alive()
    large.join(timeout=300)

    # THEN every small one is answered within the bound, each in a batch beside the large one
    assert statuses == [(200, 1)] * 24
    assert np.percentile(latencies, 99) < 1.0, sorted(latencies)
    assert still_running, "the large request ended before the small ones: nothing was shown"
    shared = [i for i in batches.serving(MAX_TEXTS) if 1 in batches.calls[i]]
    assert len(shared) >= 6, batches.calls  # small pieces rode along with the large one's
    # AND the large one is whole and right, though it ran in many batches
    status, body = answer["result"]
    assert status == 200 and len(batches.serving(MAX_TEXTS)) > 10
    got = vectors(body)
    sample = list(range(0, MAX_TEXTS, 37))
    reference = engines[0].embed(EmbedRequest(texts=[LARGE[i] for i in sample])).embeddings
    np.testing.assert_allclose(got[sample], reference, atol=BATCHING_ATOL)


def test_split_requests_join_back_into_the_unsplit_answer(serve):
    # GIVEN two engines with a 128-token budget (units of 16 tokens), sharing the server's scheduler
    settings = Settings.resolve(device="cpu", dtype="float32", max_seq_length="128", max_batch_tokens="128")
    small = [Engine.load(TINY, settings) for _ in range(2)]
    server, batches = serve(small, max_seq_length="128", max_batch_tokens="128")
    port = server.server_address[1]
    texts = [f"{i}: " + "the white rabbit runs " * (i % 11) for i in range(40)] + [
        "long " * 400
    ]  # the last is truncated

    # WHEN one request of 41 texts, and 12 JSON Lines records of several sizes, are answered
    status, body = post(port, {"input": texts, "dimensions": 32, "task": "retrieval.passage"})
    records = [texts[i] for i in range(0, 40, 3)][:12]
    jsonl = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(records)).encode()
    jsonl_status, jsonl_body = post(port, jsonl, content_type="application/jsonlines")

    # THEN they ran in many batches, on both engines, and equal the same requests embedded unsplit
    assert status == 200 and jsonl_status == 200
    assert sum(len(b.serving(41)) for b in batches) >= 10 and all(b.calls for b in batches)
    whole = small[0].embed(EmbedRequest(texts=texts, dimensions=32, task="retrieval.passage"))
    np.testing.assert_allclose(vectors(body), whole.embeddings, atol=BATCHING_ATOL)
    assert json.loads(body)["usage"]["total_tokens"] == whole.total_tokens
    lines = [json.loads(line) for line in jsonl_body.splitlines()]
    assert [r["id"] for r in lines] == list(range(len(records)))
    alone = small[1].embed_many([EmbedRequest(texts=[t]) for t in records])
    np.testing.assert_allclose(
        [r["embedding"] for r in lines], [a.embeddings[0] for a in alone], atol=BATCHING_ATOL
    )


# ------------------------------------------------------------------------------------ cancelling


def watch_drops(server, batches: Batches) -> list[int]:
    """The number of batches begun each time the scheduler dropped a job's remaining units: when its
    handler gave up on it, or at a batch boundary past its deadline, whichever came first."""
    seen: list[int] = []
    drop = server.scheduler._drop

    def recording(job, why):
        if not job.done.is_set():
            seen.append(len(batches.calls))
        drop(job, why)

    server.scheduler._drop = recording
    return seen


def test_a_timed_out_requests_work_stops_within_one_batch(serve, engines):
    # GIVEN a server that answers 503 after 1.5 s, and a request that needs several seconds: its ~30
    # batches take at least 0.2 s each (on an idle machine the tiny model alone could finish in time)
    server, (batches,) = serve(engines[:1], request_timeout_s="1.5")
    port = server.server_address[1]
    dropped_at = watch_drops(server, batches)
    batches.pause_s = 0.2

    # WHEN it times out
    status, body = post(port, {"input": LARGE})
    at_503 = len(batches.calls)
    assert status == 503 and "JV3_REQUEST_TIMEOUT_S" in json.loads(body)["error"]["message"]

    # THEN no batch begun after the one running when it was dropped holds any of its work
    assert len(dropped_at) == 1 and dropped_at[0] <= at_503
    ran = batches.serving(MAX_TEXTS)
    assert ran and max(ran) <= dropped_at[0], (ran, dropped_at)
    # AND the engine is free: the next request is answered, in one more batch, and nothing is left over
    assert post(port, {"input": ["after the timeout"]})[0] == 200
    assert len(batches.calls) <= at_503 + 2 and server.scheduler.waiting() == 0
    assert batches.texts[MAX_TEXTS] < MAX_TEXTS  # what was left of it never ran


def test_a_disconnected_clients_work_is_dropped(serve, engines, caplog):
    caplog.set_level(logging.DEBUG, logger="jv3.serve")
    # GIVEN a client whose large request is running
    server, (batches,) = serve(engines[:1])
    port = server.server_address[1]
    dropped_at = watch_drops(server, batches)
    body = json.dumps({"input": LARGE}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
    wait_for(lambda: batches.serving(MAX_TEXTS), "the large request's first batch")

    # WHEN it closes the connection
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # at once, with a reset
    sock.close()
    wait_for(lambda: dropped_at, "the server to notice")

    # THEN no batch begun after the one running then holds any of its work
    assert post(port, {"input": ["after the disconnect"]})[0] == 200
    ran = batches.serving(MAX_TEXTS)
    assert max(ran) <= dropped_at[0] and batches.texts[MAX_TEXTS] < MAX_TEXTS, (ran, dropped_at)
    assert server.scheduler.waiting() == 0
    # AND it is one quiet DEBUG line, as for any client that goes away
    gone = [r for r in caplog.records if "went away" in r.getMessage()]
    assert (
        len(gone) == 1
        and gone[0].levelno == logging.DEBUG
        and "ConnectionAbortedError" in gone[0].getMessage()
    )
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_pipelined_request_is_not_a_disconnect(serve, engines):
    """Data waiting on the socket is the client's next request, not a close: both are answered."""
    server, _ = serve(engines[:1])
    port = server.server_address[1]
    one = json.dumps({"input": LARGE[:300]}).encode()
    two = json.dumps({"input": ["second"]}).encode()
    head = "POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head.format(len(one)).encode() + one + head.format(len(two)).encode() + two)
        reader = sock.makefile("rb")
        for expected in (300, 1):
            assert reader.readline().split()[1] == b"200"
            length = 0
            while (line := reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert len(json.loads(reader.read(length))["data"]) == expected


# ------------------------------------------------------------------------------------ the scheduler's rule


class FakePlan:
    """What the scheduler sees of a plan: its tokens, how it splits, how its pieces join."""

    def __init__(self, name: str, texts: int, tokens_each: int):
        self.name, self.texts, self.tokens_each = name, texts, tokens_each
        self.tokens = texts * tokens_each

    def split(self, max_tokens: int):
        per = max(1, max_tokens // self.tokens_each)
        return [
            FakePlan(self.name, min(per, self.texts - i), self.tokens_each) for i in range(0, self.texts, per)
        ]

    def join(self, pieces, results):
        return [r for result in results for r in result]


def names(batch) -> list[str]:
    return [piece.name for unit in batch for piece in unit.plans]


def test_each_batch_takes_units_round_robin_newcomers_first():
    scheduler = Scheduler()
    far = time.monotonic() + 60
    scheduler.submit(Job([FakePlan("large", 100, 10)], deadline=far, quantum=100))  # 10 units of 100
    assert names(scheduler.next_batch(400, 0)) == ["large"] * 4
    # a small job arriving now is the first of the next batch; the rest of the batch is the large job's
    small = scheduler.submit(Job([FakePlan("small", 1, 10)], deadline=far, quantum=100))
    scheduler.submit(Job([FakePlan("other", 20, 10)], deadline=far, quantum=100))  # 2 units
    assert names(scheduler.next_batch(400, 0)) == ["small", "other", "large", "other"]
    # served least recently first: the large job now leads
    assert names(scheduler.next_batch(400, 0)) == ["large"] * 4
    assert small.done.is_set() is False  # results come back through complete(), not next_batch


def test_results_join_in_order_and_dropped_work_never_starts():
    scheduler = Scheduler()
    job = scheduler.submit(
        Job([FakePlan("a", 6, 10), FakePlan("b", 1, 10)], deadline=time.monotonic() + 60, quantum=20)
    )
    taken = scheduler.next_batch(1000, 0)
    scheduler.complete(taken, [[f"{p.name}{i}" for i in range(p.texts)] for u in taken for p in u.plans])
    assert job.done.is_set() and job.results == [[f"a{i}" for i in (0, 1, 0, 1, 0, 1)], ["b0"]]
    # a job past its deadline is dropped at the next batch boundary; one abandoned, at once
    late = scheduler.submit(Job([FakePlan("late", 50, 10)], deadline=time.monotonic() - 1, quantum=20))
    gone = scheduler.submit(Job([FakePlan("gone", 50, 10)], deadline=time.monotonic() + 60, quantum=20))
    scheduler.abandon(gone)
    assert scheduler.waiting() == 1
    scheduler.submit(Job([FakePlan("next", 1, 10)], deadline=time.monotonic() + 60, quantum=20))
    assert names(scheduler.next_batch(1000, 0)) == ["next"]
    assert late.dropped and gone.dropped and late.done.is_set() and gone.done.is_set()
    scheduler.stop()
    assert scheduler.next_batch(1000, 0) is None


class FakeClock:
    """``time.monotonic`` for the scheduler that a test moves forward: the gather window is then decided by
    the test, not by how fast this machine happens to wake a thread."""

    def __init__(self):
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


def batch_in_thread(scheduler: Scheduler, max_tokens: int, wait_s: float) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(scheduler.next_batch(max_tokens, wait_s)), daemon=True)
    thread.start()
    return thread, out


def test_a_batcher_idle_past_the_gather_window_starts_new_work_at_once(monkeypatch):
    """GIVEN a batcher that has waited for work longer than its gather window (the server is idle)
    WHEN one request arrives
    THEN its batch starts without waiting out the window (30 s here) for company that is not coming."""
    clock = FakeClock()
    monkeypatch.setattr("inference.scheduling.time", clock)
    scheduler = Scheduler()
    thread, out = batch_in_thread(scheduler, 1000, wait_s=30)
    time.sleep(0.1)  # the batcher is now blocked, waiting for work
    clock.offset += 60  # ... and has been for a minute
    scheduler.submit(Job([FakePlan("alone", 1, 10)], deadline=clock.monotonic() + 600, quantum=100))
    thread.join(timeout=10)
    assert not thread.is_alive(), "the lone request waited for the gather window on an idle batcher"
    assert names(out[0]) == ["alone"]


def test_a_batcher_that_just_became_free_gathers_for_its_window():
    """GIVEN work waiting when a batch ends (the server is under load)
    WHEN more arrives within JV3_BATCH_WAIT_MS
    THEN the batcher waited for it and both share the next forward pass."""
    scheduler = Scheduler()
    far = time.monotonic() + 600
    scheduler.submit(Job([FakePlan("first", 1, 10)], deadline=far, quantum=100))
    thread, out = batch_in_thread(scheduler, 20, wait_s=30)  # full at 20 tokens: it stops gathering then
    time.sleep(0.2)
    assert thread.is_alive(), "the batcher started under its budget instead of gathering"
    scheduler.submit(Job([FakePlan("second", 1, 10)], deadline=far, quantum=100))
    thread.join(timeout=10)
    assert names(out[0]) == ["first", "second"]


def test_an_idle_batcher_calls_on_idle_once_and_still_takes_the_next_work():
    """GIVEN a batcher with nothing to do (the local server returns kept memory then)
    WHEN no work comes for ``idle_s``
    THEN ``on_idle`` runs once, without the scheduler's lock (a submit from it does not deadlock), and
    the batcher goes on waiting for, and takes, the next job."""
    scheduler, calls = Scheduler(), []

    def on_idle():
        calls.append(time.monotonic())
        if len(calls) == 1:  # a request arriving while the memory is being returned
            scheduler.submit(Job([FakePlan("after idle", 1, 10)], deadline=time.monotonic() + 600, quantum=100))

    batch = scheduler.next_batch(1000, 0, on_idle=on_idle, idle_s=0.05)
    assert names(batch) == ["after idle"] and len(calls) == 1
    thread, out = batch_in_thread(scheduler, 1000, 0)  # no on_idle: waits without a timeout
    time.sleep(0.2)
    assert thread.is_alive()
    scheduler.submit(Job([FakePlan("next", 1, 10)], deadline=time.monotonic() + 600, quantum=100))
    thread.join(timeout=10)
    assert names(out[0]) == ["next"]


def test_work_that_comes_before_idle_s_does_not_call_on_idle():
    scheduler, calls = Scheduler(), []
    scheduler.submit(Job([FakePlan("waiting", 1, 10)], deadline=time.monotonic() + 600, quantum=100))
    assert names(scheduler.next_batch(1000, 0, on_idle=lambda: calls.append(1), idle_s=0.01)) == ["waiting"]
    assert calls == []
