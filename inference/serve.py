"""The local endpoint and the BYOC container server: SageMaker's container contract over HTTP/1.1.

    python -m inference.serve --model-dir DIR [--host 127.0.0.1] [--port 8080]   (--port 0: any free port)
    docker run IMAGE serve                                                     (SageMaker: /opt/ml/model, 0.0.0.0:8080)

Routes: ``GET /ping``, ``POST /invocations``, ``GET /execution-parameters`` (batch transform), and the
SageMaker runtime API's own ``POST /endpoints/{name}/invocations`` so that plain boto3
``sagemaker-runtime`` with ``endpoint_url=http://127.0.0.1:N`` works, its errors included (a container
4xx/5xx reaches boto3 as ``ModelError``, HTTP 424, as on AWS). For the clients users already have
(docs/clients.md): ``POST /v1/embeddings``, OpenAI's embeddings API with OpenAI's error shape, and
the one SageMaker control-plane call clients make before they invoke, ``DescribeEndpoint`` (``POST /``
with ``X-Amz-Target: SageMaker.DescribeEndpoint``, botocore's json protocol), answered InService.

Handler threads parse, tokenise (``engine.prepare``) and serialise; one batcher thread per engine (one
engine per GPU, from ``JV3_DEVICE``) takes its batches from the shared scheduler (``inference/scheduling.py``):
after gathering until ``JV3_BATCH_WAIT_MS`` past the end of its last batch (or until its token budget is full), units of at most an
eighth of the budget taken round-robin across the waiting requests, embedded with one ``engine.embed_many``
call, so concurrent callers share forward passes, a small request never waits behind a large one for
more than a batch, and every GPU stays busy. A request's work that nobody waits for any more (its
``JV3_REQUEST_TIMEOUT_S`` passed, or its client closed the connection) is dropped at the next batch.

Health tells the truth: the port is bound at once, but ``/ping`` answers 503 until every engine is
loaded, and a model that cannot load ends the process with status 1 (SageMaker then fails the
deployment with the reason in the log, instead of an InService endpoint that times out every call).

Strict framing and bounded work (``ServerLimits``): a body is exactly its ``Content-Length`` (one
length, ASCII digits) or the request is refused and the connection closed (400, 411); a body that
stalls is 408 after ``JV3_BODY_TIMEOUT_S``; connections beyond ``JV3_MAX_CONNECTIONS`` are answered
503 and closed by the accept loop itself, so descriptors never run out; a request over its caps of
texts, records or response bytes is 413 before any compute; a client that goes away is one DEBUG line.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import queue
import re
import resource
import select
import selectors
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .errors import InvalidRequest, JV3Error, ModelError, RequestTimeout, SettingsError
from .protocol import (
    JSON,
    Invocation,
    Limits,
    accepts_json,
    check_request_size,
    check_response_size,
    error_body,
    negotiate,
    openai_error_body,
    parse_openai,
    parse_request,
    write_response,
)
from .request import EmbedRequest
from .scheduling import UNIT_SHARE, Job, Scheduler
from .settings import Settings

log = logging.getLogger("jv3.serve")

RUNTIME_PATH = re.compile(r"^/endpoints/([A-Za-z0-9-]{1,63})/invocations$")
ENDPOINT_NAME = re.compile(r"[A-Za-z0-9](?:-*[A-Za-z0-9]){0,62}")  # SageMaker's own pattern for EndpointName
OPENAI_PATH = "/v1/embeddings"
AMZ_JSON = "application/x-amz-json-1.1"
CONTROL_BODY_LIMIT = 64 * 1024  # a DescribeEndpoint body is a name
DRAIN_LIMIT = 64 * 1024 * 1024  # read (and drop) an oversized body up to this size to keep the connection
MiB = 1024 * 1024
CONTENT_LENGTH = re.compile(r"[0-9]+")  # RFC 9110: 1*DIGIT, ASCII only (int() also takes +44, 44_0, ٤٤)
# Descriptors kept free of connections: the listening socket, refused connections lingering
# (LINGER_CAPACITY), the model's files, torch's and the logger's.
FD_RESERVE = 64
LINGER_CAPACITY = 128  # refused connections closed gently at once; more are closed outright
LINGER_S = 2.0  # how long a refused connection may take to send what it was sending
ACCEPT_BACKOFF_S = 0.1  # pause of the accept loop when the process is out of descriptors
# Conservative text throughput of one engine, in bytes of text per second (~4 bytes a token), for
# MaxPayloadInMB: a mini-batch must be answered within JV3_REQUEST_TIMEOUT_S. A GPU: 25,000 tokens/s,
# a small fraction of what README.md measured on an H100 (~400,000); a CPU: 500 tokens/s, an assumption
# for the full model (the bench's hidden-384 model did ~850 tokens/s on 2 cores).
TEXT_BYTES_PER_S = {"cuda": 100_000, "cpu": 2_000}
# A 1024-dimension float response is ~13 KB per record: ~16 bytes of response per byte of ~800-byte records.
RESPONSE_PER_REQUEST_BYTE = 16
SAGEMAKER_PAYLOAD_BUDGET_MB = 100  # SageMaker: MaxPayloadInMB × MaxConcurrentTransforms ≤ 100
# A CPU engine keeps the memory it frees (cpu_runtime.keep_freed_memory: the next batch is faster for it);
# a batcher hands it back to the system once idle this long, and at most every TRIM_INTERVAL_S under load,
# so that the server's resident memory follows its work, not the high-water mark of its heap.
IDLE_TRIM_S = 2.0
TRIM_INTERVAL_S = 30.0
WAIT_SLICE_S = 0.05  # how often a handler waiting for its job checks that its client is still there
# The server's own settings beyond inference/settings.py (whose work caps both runtimes apply):
# variable, default, meaning.
SERVER_ENV = {
    "body_timeout_s": ("JV3_BODY_TIMEOUT_S", "30", "seconds a request body may take to arrive before 408"),
    "max_connections": ("JV3_MAX_CONNECTIONS", "512", "open connections at most; more are answered 503 and closed"),
}


@dataclass(frozen=True)
class ServerLimits:
    """Framing and work bounds of the local/BYOC server (docs/wire-format.md, "Limits")."""

    body_timeout_s: float = 30.0
    max_connections: int = 512
    work: Limits = Limits()

    @classmethod
    def resolve(cls, settings: Settings, environ=os.environ, **overrides) -> ServerLimits:
        """Arguments win over ``JV3_*`` variables, which win over the defaults; a bad value is a
        ``SettingsError`` naming the variable (the server then refuses to start). The work caps come
        from ``settings`` unless given here."""
        raw = {}
        for name, (var, default, _) in SERVER_ENV.items():
            value = overrides.pop(name, None)
            raw[name] = value if value is not None else environ.get(var, default)
        work = Limits.of(settings)
        unknown = set(overrides) - set(Limits.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown limit(s) {sorted(unknown)}")
        limits = cls(
            body_timeout_s=_setting_float(raw["body_timeout_s"], "JV3_BODY_TIMEOUT_S", minimum=0.001),
            max_connections=_setting_int(raw["max_connections"], "JV3_MAX_CONNECTIONS", minimum=1),
            work=Limits(**{**work.__dict__, **{k: v for k, v in overrides.items() if v is not None}}),
        )
        _check_descriptors(limits.max_connections)
        return limits


def _setting_int(value, name: str, minimum: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise SettingsError(f"{name}={value!r} is not an integer") from None
    if number < minimum:
        raise SettingsError(f"{name}={number} must be at least {minimum}")
    return number


def _setting_float(value, name: str, minimum: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name}={value!r} is not a number") from None
    if not minimum <= number < math.inf:  # also refuses NaN
        raise SettingsError(f"{name}={value!r} must be a finite number of at least {minimum:g}")
    return number


def _check_descriptors(max_connections: int) -> None:
    """Refuse a connection cap the process cannot honour: past the descriptor limit, accept() fails
    and the server stops answering instead of answering 503."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = soft - LINGER_CAPACITY - FD_RESERVE
    if soft != resource.RLIM_INFINITY and max_connections > room:
        raise SettingsError(
            f"JV3_MAX_CONNECTIONS={max_connections} does not fit the descriptor limit of {soft} (ulimit -n) "
            f"less {LINGER_CAPACITY + FD_RESERVE} kept for the server itself; set it to at most {max(room, 0)} "
            f"or raise the limit"
        )


def _return_freed_memory() -> bool:
    from .cpu_runtime import return_freed_memory  # here: the server itself loads without torch

    return return_freed_memory()


class Batcher:
    """One thread that owns one engine and embeds the batches the shared scheduler gives it."""

    def __init__(self, engine, scheduler: Scheduler, *, wait_ms: float, name: str = "jv3-batcher"):
        self.engine = engine
        self.wait_s = max(wait_ms, 0) / 1000
        self.max_tokens = engine.max_batch_tokens  # the engine's budget: one default, in the engine
        self._scheduler = scheduler
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        trimmed = time.monotonic()
        while True:
            batch = self._scheduler.next_batch(self.max_tokens, self.wait_s, on_idle=self._idle, idle_s=IDLE_TRIM_S)
            if batch is None:
                return
            self._scheduler.complete(batch, self._embed(batch))
            if time.monotonic() - trimmed >= TRIM_INTERVAL_S:  # under load, now and then (see IDLE_TRIM_S)
                _return_freed_memory()
                trimmed = time.monotonic()

    def _idle(self) -> None:
        if _return_freed_memory():
            log.debug("%s idle for %g s: freed memory returned to the system", self._thread.name, IDLE_TRIM_S)

    def _embed(self, batch) -> list:
        """One ``embed_many`` call over the batch's pieces of plans: a result or an error for each."""
        plans = [piece for unit in batch for piece in unit.plans]
        log.debug("%s embeds %d piece(s) of %d request(s)", self._thread.name, len(plans), len({id(u.job) for u in batch}))
        try:
            results = self.engine.embed_many(plans)
        except JV3Error as err:
            return [err] * len(plans)
        except Exception as exc:  # the batcher must outlive any bug below it
            log.exception("embed_many failed")
            return [ModelError(f"the model failed: {type(exc).__name__}: {exc}")] * len(plans)
        if len(results) != len(plans):
            log.error("embed_many gave %d results for %d plans", len(results), len(plans))
            return [ModelError(f"the model gave {len(results)} results for {len(plans)} requests")] * len(plans)
        return results


class EndpointServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # a burst of connects waits in the kernel instead of a 1 s SYN retry

    def __init__(self, address, engines=None, settings: Settings | None = None, limits: ServerLimits | None = None):
        engines = [engines] if engines is not None and not isinstance(engines, (list, tuple)) else engines
        self.settings = settings or (engines[0].settings if engines else Settings.resolve())
        self.limits = limits or ServerLimits.resolve(self.settings)
        self.engines: list = []
        self.batchers: list[Batcher] = []
        self.scheduler = Scheduler()
        self.ready = threading.Event()
        self.created_at = self.ready_at = time.time()  # DescribeEndpoint's CreationTime, LastModifiedTime
        self._open = 0  # connections being served (each holds a thread and a descriptor)
        self._open_lock = threading.Lock()
        self._refuser = _Refuser()
        self._warned_at = 0.0
        super().__init__(address, Handler)
        if engines:
            self.start(engines)

    @property
    def engine(self):
        """The first engine: what parsing validates against (all engines serve one checkpoint)."""
        return self.engines[0]

    def start(self, engines: list) -> None:
        """Serve with these engines: one batcher each, all taking from one scheduler; /ping turns 200."""
        self.engines = list(engines)
        self.batchers = [
            Batcher(e, self.scheduler, wait_ms=self.settings.batch_wait_ms, name=f"jv3-batcher-{i}")
            for i, e in enumerate(self.engines)
        ]
        self.ready_at = time.time()
        self.ready.set()

    def submit(self, requests: list[EmbedRequest], deadline: float | None = None) -> Job:
        """Prepare ``requests`` on the calling (handler) thread, then hand them to the batchers as one job,
        to be answered, or dropped, by ``deadline`` (``time.monotonic()``; default: JV3_REQUEST_TIMEOUT_S from now)."""
        if deadline is None:
            deadline = time.monotonic() + self.settings.request_timeout_s
        plans = [self.engine.prepare(r) for r in requests]  # tokenising releases the GIL: beside the batchers
        quantum = max(1, min(e.max_batch_tokens for e in self.engines) // UNIT_SHARE)
        return self.scheduler.submit(Job(plans, deadline=deadline, quantum=quantum))

    def execution_parameters(self) -> dict:
        """What batch transform should send, truthfully: one transform per engine (each runs one batch
        at a time), and mini-batches small enough that one is answered within the request timeout at a
        conservative throughput (``TEXT_BYTES_PER_S``), fits the request limit, keeps its response under
        the response cap, and keeps MaxPayloadInMB × MaxConcurrentTransforms within SageMaker's 100."""
        engines = max(len(self.engines), 1)
        on_gpu = any(str(getattr(getattr(e, "model", None), "device", "cpu")).startswith("cuda") for e in self.engines)
        rate = TEXT_BYTES_PER_S["cuda" if on_gpu else "cpu"]
        payload_mb = min(
            self.settings.max_request_bytes // MiB,
            int(self.settings.request_timeout_s * rate // MiB),
            self.limits.work.max_response_bytes // RESPONSE_PER_REQUEST_BYTE // MiB,
            SAGEMAKER_PAYLOAD_BUDGET_MB // engines,
        )
        payload_mb = max(1, payload_mb)  # 1 MB is the least a job can ask; on a CPU it may still take long
        return {"MaxConcurrentTransforms": engines, "BatchStrategy": "MULTI_RECORD", "MaxPayloadInMB": payload_mb}

    # ------------------------------------------------------------------------------------ connections

    def get_request(self):
        """accept(), pausing when the process is out of descriptors: the listening socket stays readable
        then, and without a pause serve_forever would spin on it at 100 % CPU."""
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._warn(f"accept failed ({exc.strerror}); pausing {ACCEPT_BACKOFF_S:g} s "
                           f"(JV3_MAX_CONNECTIONS={self.limits.max_connections})")  # fmt: skip
                time.sleep(ACCEPT_BACKOFF_S)
            raise  # socketserver drops the failed accept and polls again

    def process_request(self, request, client_address) -> None:
        """A thread per connection up to ``max_connections``; beyond, a 503 from this (the accept) thread."""
        with self._open_lock:
            full = self._open >= self.limits.max_connections
            if not full:
                self._open += 1
        if full:
            self._warn(f"{self.limits.max_connections} connections open (JV3_MAX_CONNECTIONS); answering 503")
            self._refuser.refuse(request, self.limits.max_connections)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: the connection is not open after all
            self._closed()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._closed()

    def _closed(self) -> None:
        with self._open_lock:
            self._open -= 1

    def handle_error(self, request, client_address) -> None:
        """A client that went away is routine: one DEBUG line. Anything else keeps its traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("client %s:%s went away: %s: %s", *client_address[:2], type(exc).__name__, exc)
        else:
            log.error("unexpected failure serving %s:%s", *client_address[:2], exc_info=True)

    def _warn(self, message: str) -> None:
        """A warning at most every 10 s: a flood of connections must not become a flood of log lines."""
        now = time.monotonic()
        if now - self._warned_at >= 10:
            self._warned_at = now
            log.warning("%s", message)

    def server_close(self) -> None:
        super().server_close()
        self._refuser.stop()
        if self.batchers:
            self.scheduler.stop()  # the batchers finish the work already submitted, then stop
            for batcher in self.batchers:
                batcher.join(timeout=30)


class _Refuser:
    """Answers connections over the cap with 503 and closes them gently, off the handler threads.

    The answer is sent at once (a fresh socket's send buffer holds it); then the connection waits up to
    ``LINGER_S`` for the client to finish sending, reading and dropping it, before it is closed: closing
    a socket with unread bytes sends a reset, which can destroy the 503 before the client reads it.
    At most ``LINGER_CAPACITY`` linger at once (the oldest is closed outright), so refusals cannot
    exhaust descriptors either.
    """

    def __init__(self):
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="jv3-refuser", daemon=True)
        self._thread.start()

    def refuse(self, sock: socket.socket, cap: int) -> None:
        body = error_body(_Overloaded(f"the server has {cap} connections open (JV3_MAX_CONNECTIONS); retry shortly"))
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: {JSON}\r\nContent-Length: {len(body)}\r\n"
                "Retry-After: 1\r\nConnection: close\r\n\r\n")  # fmt: skip
        try:
            sock.setblocking(False)
            sock.send(head.encode("ascii") + body)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the client is gone already
            sock.close()
            return
        self._inbox.put((sock, time.monotonic() + LINGER_S))

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        lingering: dict[socket.socket, float] = {}  # each refused connection's deadline, oldest first
        while True:
            item = self._next(0.05) if lingering else self._inbox.get()  # nothing lingers: sleep until one does
            while item is not False:
                if item is None:  # the server is closing
                    for sock in list(lingering):
                        self._close(sock, selector, lingering)
                    return
                if len(lingering) >= LINGER_CAPACITY:
                    self._close(next(iter(lingering)), selector, lingering)
                selector.register(item[0], selectors.EVENT_READ)
                lingering[item[0]] = item[1]
                item = self._next(0)
            for key, _ in selector.select(timeout=0.05):
                if not _read_and_drop(key.fileobj):  # the client closed its side: nothing can be lost now
                    self._close(key.fileobj, selector, lingering)
            now = time.monotonic()
            for sock in [s for s, deadline in lingering.items() if deadline <= now]:
                self._close(sock, selector, lingering)

    def _next(self, timeout: float):
        """The next refused connection, None to stop, or False when none came within ``timeout``."""
        try:
            return self._inbox.get(timeout=timeout) if timeout else self._inbox.get_nowait()
        except queue.Empty:
            return False

    @staticmethod
    def _close(sock: socket.socket, selector, lingering: dict) -> None:
        selector.unregister(sock)
        del lingering[sock]
        sock.close()


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the client has closed the connection: readable with nothing to read (or reset). Readable
    with data is a pipelined request, not a close; it stays unread. A client that only half-closes
    (shuts down its sending side and still reads) looks the same and is taken as gone."""
    try:
        if hasattr(select, "poll"):  # poll has no FD_SETSIZE limit on the descriptor number
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            if not poller.poll(0):
                return False
        elif not select.select([sock], [], [], 0)[0]:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:  # reset, or the descriptor is gone
        return True


def _read_and_drop(sock: socket.socket) -> bool:
    """Read what a refused client sent; False once it has closed its side (or the socket failed)."""
    try:
        return bool(sock.recv(1 << 16))
    except BlockingIOError:
        return True
    except OSError:
        return False


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every response carries Content-Length
    server_version = "jv3-endpoint"
    timeout = 75  # seconds an idle keep-alive connection may hold a thread
    # Headers and body go out in two writes; with Nagle's algorithm the body then waits for the client's
    # delayed ACK (~40 ms on Linux): bench/serving.py measured it as most of a small request's latency.
    disable_nagle_algorithm = True
    server: EndpointServer

    # ------------------------------------------------------------------------------------ routes

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        framing = self._drop_body()  # a GET may carry a body; it must be read to find the next request
        if framing is not None:
            self._error(framing)
        elif path == "/ping":
            if self.server.ready.is_set():
                self._send(200, b'{"status":"healthy"}', JSON)
            else:
                self._send(503, b'{"status":"loading"}', JSON)
        elif path == "/execution-parameters":
            if self.server.ready.is_set():  # the answer depends on the engines
                self._send(200, json.dumps(self.server.execution_parameters()).encode(), JSON)
            else:
                self._send(503, b'{"status":"loading"}', JSON)
        else:
            self._error(_NotFound(f"no route GET {path}; try GET /ping or POST /invocations"))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == OPENAI_PATH:
            self._openai()
            return
        if path == "/" and "X-Amz-Target" in self.headers:
            self._control_plane(self.headers["X-Amz-Target"])
            return
        runtime = RUNTIME_PATH.match(path)
        if path != "/invocations" and not runtime:
            route = _NotFound(f"no route POST {path}; try POST /invocations or POST {OPENAI_PATH}")
            self._error(self._drop_body() or route)
            return
        if not self.server.ready.is_set():
            err = self._drop_body() or _Loading("the model is still loading; retry shortly")
            status, body, content_type = err.status, error_body(err), JSON
        else:
            status, body, content_type = self._invoke(parse_request, self._negotiate, error_body)
        if runtime and status >= 400:
            status, body, content_type = _as_model_error(status, body, runtime.group(1))
            self._send(status, body, content_type, {"x-amzn-ErrorType": "ModelError"})
        else:
            self._send(status, body, content_type)

    def do_PUT(self) -> None:
        self._error(self._drop_body() or _MethodNotAllowed(f"method {self.command} is not allowed on {self.path}"))

    do_DELETE = do_PATCH = do_PUT

    # ------------------------------------------------------------------------------------ the work

    def _openai(self) -> None:
        """``POST /v1/embeddings``: the OpenAI body only, answered (errors too) in OpenAI's shapes."""
        if not self.server.ready.is_set():
            err = self._drop_body() or _Loading("the model is still loading; retry shortly")
            status, body = err.status, openai_error_body(err)
        else:
            status, body, _ = self._invoke(parse_openai, lambda accept, _: accepts_json(accept), openai_error_body)
        self._send(status, body, JSON)

    @staticmethod
    def _negotiate(accept: str | None, invocation: Invocation) -> str:
        return negotiate(accept, invocation, as_sent=True)  # this server sees the caller's own header

    def _invoke(self, parse, choose, errors) -> tuple[int, bytes, str]:
        """Read, ``parse``, ``choose`` the media type (406 before any compute), embed, answer; any
        failure becomes its status and ``errors(err)``, so the server always answers the next request."""
        started = time.monotonic()
        settings, limits = self.server.settings, self.server.limits.work
        engine = self.server.engine
        try:
            body = self._read_body(settings.max_request_bytes)
            invocation = parse(body, self.headers.get("Content-Type"), hidden_size=engine.hidden_size,
                               tasks=engine.tasks, limits=limits)  # fmt: skip
            accept = choose(self.headers.get("Accept"), invocation)
            check_response_size(
                invocation, accept, limits, hidden_size=engine.hidden_size, echoed_bytes=len(body),
                default_dimensions=settings.default_dimensions, default_encoding=settings.default_encoding,
            )  # fmt: skip
            deadline = started + settings.request_timeout_s
            job = self.server.submit(invocation.pending(), deadline=deadline)
            if not self._wait(job, deadline) or job.dropped:
                raise RequestTimeout(f"no answer within {settings.request_timeout_s:g} s (JV3_REQUEST_TIMEOUT_S)")
            invocation.complete(job.results)
            payload, content_type = write_response(
                invocation, accept, model=engine.model_name, default_task=settings.default_task
            )
            return 200, payload, content_type
        except JV3Error as err:
            if err.status >= 500:
                log.error("%s: %s", type(err).__name__, err.message)
            return err.status, errors(err), JSON
        except ConnectionError:  # the client went away: nobody to answer (EndpointServer.handle_error logs it)
            raise
        except Exception as exc:  # any input must leave the server able to answer the next request
            log.exception("unexpected failure on %s", self.path)
            return 500, errors(ModelError(f"internal error: {type(exc).__name__}: {exc}")), JSON

    def _wait(self, job: Job, deadline: float) -> bool:
        """Wait for ``job`` until ``deadline``, in short slices, watching the client: True once it is done.
        A job nobody waits for any more is abandoned (its units not yet started are dropped): False at the
        deadline; a client that closed its connection raises ``ConnectionAbortedError``, logged at DEBUG
        by ``EndpointServer.handle_error`` like any client that goes away."""
        while not job.done.wait(min(WAIT_SLICE_S, max(deadline - time.monotonic(), 0))):
            if time.monotonic() >= deadline:
                self.server.scheduler.abandon(job)
                return False
            if _peer_closed(self.connection):
                self.server.scheduler.abandon(job)
                self.close_connection = True
                raise ConnectionAbortedError("the client closed the connection while its request was being embedded")
        return True

    # ------------------------------------------------------------------------------------ control plane

    def _control_plane(self, target: str) -> None:
        """The SageMaker API calls clients make before invoking, in botocore's json protocol.

        jina-sagemaker's ``connect_to_endpoint`` and sagemaker-core's ``Endpoint.get`` call
        ``DescribeEndpoint`` first and give up on any error; everything else (create, delete, scale)
        has no meaning for one local process and is refused by name.
        """
        try:
            body = self._read_body(CONTROL_BODY_LIMIT)
            if target != "SageMaker.DescribeEndpoint":
                raise _AwsError(
                    "UnknownOperationException",
                    f"the local endpoint answers SageMaker.DescribeEndpoint only, not {target[:80]!r}",
                )
            answer = self._describe_endpoint(_endpoint_name(body))
            self._send(200, json.dumps(answer).encode(), AMZ_JSON)
        except JV3Error as err:
            kind = err.aws_type if isinstance(err, _AwsError) else "ValidationException"
            self._aws_error(400 if err.status < 500 else err.status, kind, err.message)
        except ConnectionError:  # the client went away: nobody to answer
            raise
        except Exception as exc:  # any input must leave the server able to answer the next request
            log.exception("unexpected failure on %s %s", self.path, target[:80])
            self._aws_error(500, "InternalFailure", f"internal error: {type(exc).__name__}: {exc}")

    def _aws_error(self, status: int, kind: str, message: str) -> None:
        """botocore's json protocol reads the error code from ``__type`` (or this header) and ``message``."""
        body = json.dumps({"__type": kind, "message": message}).encode()
        self._send(status, body, AMZ_JSON, {"x-amzn-ErrorType": kind})

    def _describe_endpoint(self, name: str) -> dict:
        """What botocore and sagemaker-core read from DescribeEndpoint: InService once the model is loaded."""
        server = self.server
        return {
            "EndpointName": name,
            "EndpointArn": f"arn:aws:sagemaker:local:000000000000:endpoint/{name.lower()}",
            "EndpointConfigName": name,
            "ProductionVariants": [
                {"VariantName": "AllTraffic", "CurrentWeight": 1.0, "DesiredWeight": 1.0,
                 "CurrentInstanceCount": 1, "DesiredInstanceCount": 1}
            ],  # fmt: skip
            "EndpointStatus": "InService" if server.ready.is_set() else "Creating",
            "CreationTime": server.created_at,  # the json protocol's timestamps: epoch seconds
            "LastModifiedTime": server.ready_at,
        }

    # ------------------------------------------------------------------------------------ framing

    def _body_length(self) -> int:
        """The body's length, checked strictly: a length read wrongly makes the rest of the body the next
        request (or the next request part of this body), so anything doubtful is refused and the
        connection closed. One ``Content-Length`` of ASCII digits (repeats must agree); no
        ``Transfer-Encoding`` (chunked bodies are not supported; with a length, it is a smuggling attempt)."""
        encodings = self.headers.get_all("Transfer-Encoding") or []
        if encodings:
            self.close_connection = True
            raise _LengthRequired(
                f"Transfer-Encoding {', '.join(encodings)[:80]!r} is not supported (chunked request bodies "
                f"are not); send the body with Content-Length",
                field="transfer_encoding",
            )
        values = [v.strip(" \t") for v in self.headers.get_all("Content-Length") or []]
        if not values:
            return 0
        if any(not CONTENT_LENGTH.fullmatch(v) for v in values) or len(set(map(int, values))) > 1:
            self.close_connection = True
            shown = ", ".join(repr(v[:40]) for v in values[:4])
            raise InvalidRequest(
                f"bad Content-Length {shown}: expected one length in ASCII digits"
                + (" (the headers disagree)" if len(values) > 1 else ""),
                field="content_length",
            )
        return int(values[0])

    def _read_body(self, limit: int) -> bytes:
        length = self._body_length()
        if length > limit:
            self._discard(length)  # kept connection: the 413 is read by a client that sent its whole body
            check_request_size(length, limit)
        return self._receive(length)

    def _drop_body(self) -> JV3Error | None:
        """Read and drop the body of a request answered without it; its framing error, if it has one."""
        try:
            self._discard(self._body_length())
        except JV3Error as err:
            return err
        return None

    def _discard(self, length: int) -> None:
        """Read and drop ``length`` bytes to keep the connection; past ``DRAIN_LIMIT``, or when they do
        not come, close it instead (the caller's answer stands either way)."""
        if length > DRAIN_LIMIT:
            self.close_connection = True
            return
        try:
            self._receive(length, keep=False)
        except JV3Error:
            pass  # _receive closed the connection

    def _receive(self, length: int, keep: bool = True) -> bytes:
        """Exactly ``length`` body bytes, all within ``JV3_BODY_TIMEOUT_S``; else a refusal that closes
        the connection: 408 when they stall, 400 when the client ends them early (a cut body is never
        processed: 3 of 10 records must not be answered as if they were all)."""
        timeout = self.server.limits.body_timeout_s
        deadline = time.monotonic() + timeout
        chunks, got = [], 0  # grown as bytes arrive: a claimed length alone reserves no memory
        try:
            while got < length:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                self.connection.settimeout(remaining)  # each read waits only until the body's deadline
                chunk = self.rfile.read1(min(length - got, 1 << 20))
                if not chunk:
                    self.close_connection = True
                    raise InvalidRequest(
                        f"the request body ended after {got:,} of {length:,} bytes (Content-Length): nothing "
                        f"was processed; send the whole body",
                        field="body",
                    )
                got += len(chunk)
                if keep:
                    chunks.append(chunk)
        except TimeoutError:
            self.close_connection = True
            raise _BodyTimeout(
                f"the request body stalled: {got:,} of {length:,} bytes arrived within {timeout:g} s "
                f"(JV3_BODY_TIMEOUT_S); send the whole body without pauses",
                field="body",
            ) from None
        except ConnectionError:
            self.close_connection = True
            raise
        finally:
            self.connection.settimeout(self.timeout)  # the answer is written with the usual timeout
        return b"".join(chunks)

    # ------------------------------------------------------------------------------------ replies

    def _error(self, err: JV3Error) -> None:
        self._send(err.status, error_body(err), JSON)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        log.debug("%s %s", self.address_string(), format % args)


class _NotFound(JV3Error):
    status, kind = 404, "not_found"


class _MethodNotAllowed(JV3Error):
    status, kind = 405, "method_not_allowed"


class _Loading(JV3Error):
    status, kind = 503, "loading"


class _LengthRequired(InvalidRequest):
    status, kind = 411, "length_required"


class _BodyTimeout(InvalidRequest):
    status, kind = 408, "body_timeout"


class _Overloaded(JV3Error):
    status, kind = 503, "overloaded"


class _AwsError(InvalidRequest):
    """A control-plane refusal, with the error code botocore raises it as."""

    def __init__(self, aws_type: str, message: str):
        super().__init__(message)
        self.aws_type = aws_type


def _endpoint_name(body: bytes) -> str:
    """``EndpointName`` of a DescribeEndpoint body, checked as SageMaker checks it."""
    try:
        request = json.loads(body or b"{}")
    except (ValueError, RecursionError):  # 64 KiB of brackets nest deeper than json.loads recurses
        raise _AwsError("SerializationException", "the request body is not valid JSON") from None
    name = request.get("EndpointName") if isinstance(request, dict) else None
    if not isinstance(name, str) or len(name) > 63 or not ENDPOINT_NAME.fullmatch(name):
        raise _AwsError(
            "ValidationException",
            f"EndpointName must be 1 to 63 letters, digits or hyphens (not at either end), got {str(name)[:80]!r}",
        )
    return name


def _as_model_error(status: int, body: bytes, endpoint: str) -> tuple[int, bytes, str]:
    """What the SageMaker runtime API answers when the container fails: ModelError, HTTP 424.

    botocore (rest-json) reads the code from ``x-amzn-ErrorType`` and the members of the
    ``ModelError`` shape (``Message``, ``OriginalStatusCode``, ``OriginalMessage``, ``LogStreamArn``)
    from the JSON body.
    """
    original = body.decode("utf-8", "replace")
    side = "client" if status < 500 else "server"
    wrapped = {
        "ErrorCode": f"{side.upper()}_ERROR_FROM_MODEL",
        "Message": f"Received {side} error ({status}) from primary with message \"{original}\".",
        "OriginalStatusCode": status,
        "OriginalMessage": original,
        "LogStreamArn": f"arn:aws:logs:local:000000000000:log-group:/aws/sagemaker/Endpoints/{endpoint}",
    }
    return HTTPStatus.FAILED_DEPENDENCY.value, json.dumps(wrapped).encode(), "application/json"


def make_server(
    engines=None, host: str = "127.0.0.1", port: int = 8080, settings: Settings | None = None,
    limits: ServerLimits | None = None,
) -> EndpointServer:  # fmt: skip
    """A bound server (not yet serving): call ``serve_forever()``, and ``shutdown()``/``server_close()``.

    ``engines``: an engine or a list of them (ready at once); None: call ``start(engines)`` once loaded.
    ``limits``: None reads them from the environment (``ServerLimits.resolve``).
    """
    return EndpointServer((host, port), engines, settings, limits)


def load_engines(model_dir: str, settings: Settings) -> list:
    """One engine per device of ``JV3_DEVICE`` (auto: one per visible GPU), loaded one after another."""
    import os

    import torch

    from .engine import Engine, serving_devices  # imported here so the protocol and server load without torch

    devices = serving_devices(settings.device)
    on_cpu = sum(1 for d in devices if d.startswith("cpu"))
    if on_cpu > 1:  # engines on the CPU share its cores: one OpenMP team each, not N teams fighting for all
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // on_cpu))
    return [Engine.load(model_dir, settings=settings, device=d) for d in devices]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", choices=["serve"], help="'serve': SageMaker's container start command")
    parser.add_argument("--model-dir", default=None, help="checkpoint or unpacked model.tar.gz (default /opt/ml/model)")
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1; 0.0.0.0 for 'serve')")
    parser.add_argument("--port", type=int, default=None, help="port (default 8080; 0 picks a free one)")
    args = parser.parse_args(argv)
    in_container = args.command == "serve"
    model_dir = args.model_dir or "/opt/ml/model"
    host = args.host or ("0.0.0.0" if in_container else "127.0.0.1")
    port = 8080 if args.port is None else args.port

    try:
        settings = Settings.resolve()
        limits = ServerLimits.resolve(settings)
    except JV3Error as err:
        print(f"error: {err.message}", file=sys.stderr)
        return 1
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("jv3").addHandler(handler)
    logging.getLogger("jv3").setLevel(settings.log_level)

    server = make_server(None, host, port, settings, limits)  # bound now, /ping says 503 until the engines load
    bound_host, bound_port = server.server_address[:2]
    print(f"jv3 endpoint listening on http://{bound_host}:{bound_port}", flush=True)
    failure: list[BaseException] = []

    def load() -> None:
        try:
            server.start(load_engines(model_dir, settings))
            log.info("ready: %d engine(s) on %s", len(server.engines), ", ".join(str(e.model.device) for e in server.engines))
        except BaseException as exc:  # noqa: BLE001 - any load failure must end the process, not leave it "up"
            failure.append(exc)
            threading.Thread(target=server.shutdown, daemon=True).start()

    def stop(signum, frame):  # SIGTERM from docker stop / the quickstart: finish in-flight requests
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    threading.Thread(target=load, name="jv3-load", daemon=True).start()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    if failure:
        err = failure[0]
        print(f"error: cannot load {model_dir}: {getattr(err, 'message', None) or f'{type(err).__name__}: {err}'}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
