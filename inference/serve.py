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

Handler threads parse and serialise; one batcher thread per engine (one engine per GPU, from
``JV3_DEVICE``) takes the first waiting request from the shared queue, gathers others for up to
``JV3_BATCH_WAIT_MS`` (or until its token budget is full) and embeds them all with one
``engine.embed_many`` call, so concurrent callers share forward passes and every GPU stays busy.

Health tells the truth: the port is bound at once, but ``/ping`` answers 503 until every engine is
loaded, and a model that cannot load ends the process with status 1 (SageMaker then fails the
deployment with the reason in the log, instead of an InService endpoint that times out every call).
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import re
import signal
import sys
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .errors import InvalidRequest, JV3Error, ModelError, PayloadTooLarge, RequestTimeout
from .protocol import (
    JSON,
    Invocation,
    accepts_json,
    error_body,
    negotiate,
    openai_error_body,
    parse_openai,
    parse_request,
    write_response,
)
from .request import EmbedRequest, EmbedResult
from .settings import Settings

log = logging.getLogger("jv3.serve")

RUNTIME_PATH = re.compile(r"^/endpoints/([A-Za-z0-9-]{1,63})/invocations$")
ENDPOINT_NAME = re.compile(r"[A-Za-z0-9](?:-*[A-Za-z0-9]){0,62}")  # SageMaker's own pattern for EndpointName
OPENAI_PATH = "/v1/embeddings"
AMZ_JSON = "application/x-amz-json-1.1"
CONTROL_BODY_LIMIT = 64 * 1024  # a DescribeEndpoint body is a name
DRAIN_LIMIT = 64 * 1024 * 1024  # read (and drop) an oversized body up to this size to keep the connection


class Batcher:
    """One thread that owns one engine and embeds requests from the shared queue together."""

    def __init__(self, engine, jobs: queue.Queue, *, wait_ms: float, name: str = "jv3-batcher"):
        self.engine = engine
        self.wait_s = max(wait_ms, 0) / 1000
        self.max_tokens = engine.max_batch_tokens  # the engine's budget: one default, in the engine
        self._queue = jobs
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs, tokens, deadline = [job], job.tokens, time.monotonic() + self.wait_s
            stop = False
            while tokens < self.max_tokens:
                try:
                    nxt = self._queue.get(timeout=max(deadline - time.monotonic(), 1e-4))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                jobs.append(nxt)
                tokens += nxt.tokens
            self._embed([j for j in jobs if not j.abandoned])
            if stop:
                self._queue.put(None)  # the next batcher stops too
                return

    def _embed(self, jobs: list[_Job]) -> None:
        flat = [r for job in jobs for r in job.requests]
        log.debug("%s embedded %d request(s) of %d caller(s)", self._thread.name, len(flat), len(jobs))
        if flat:
            try:
                results = self.engine.embed_many(flat)
            except JV3Error as err:
                results = [err] * len(flat)
            except Exception as exc:  # the batcher must outlive any bug below it
                log.exception("embed_many failed")
                results = [ModelError(f"the model failed: {type(exc).__name__}: {exc}")] * len(flat)
        start = 0
        for job in jobs:
            job.results = results[start : start + len(job.requests)] if flat else []
            start += len(job.requests)
            job.done.set()


class _Job:
    __slots__ = ("requests", "tokens", "results", "done", "abandoned")

    def __init__(self, requests: list[EmbedRequest]):
        self.requests = requests
        # a cheap guess of the tokens (about 4 bytes of UTF-8 each) for the gathering budget
        self.tokens = sum(len(t) // 3 + 2 for r in requests for t in r.texts)
        self.results: list[EmbedResult | JV3Error] | None = None
        self.done = threading.Event()
        self.abandoned = False


class EndpointServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, engines=None, settings: Settings | None = None):
        engines = [engines] if engines is not None and not isinstance(engines, (list, tuple)) else engines
        self.settings = settings or (engines[0].settings if engines else Settings.resolve())
        self.engines: list = []
        self.batchers: list[Batcher] = []
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self.ready = threading.Event()
        self.created_at = self.ready_at = time.time()  # DescribeEndpoint's CreationTime, LastModifiedTime
        super().__init__(address, Handler)
        if engines:
            self.start(engines)

    @property
    def engine(self):
        """The first engine: what parsing validates against (all engines serve one checkpoint)."""
        return self.engines[0]

    def start(self, engines: list) -> None:
        """Serve with these engines: one batcher each, all taking from one queue; /ping turns 200."""
        self.engines = list(engines)
        self.batchers = [
            Batcher(e, self._jobs, wait_ms=self.settings.batch_wait_ms, name=f"jv3-batcher-{i}")
            for i, e in enumerate(self.engines)
        ]
        self.ready_at = time.time()
        self.ready.set()

    def submit(self, requests: list[EmbedRequest]) -> _Job:
        job = _Job(requests)
        self._jobs.put(job)
        return job

    def server_close(self) -> None:
        super().server_close()
        if self.batchers:
            self._jobs.put(None)  # each batcher passes it on before it stops
            for batcher in self.batchers:
                batcher.join(timeout=30)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every response carries Content-Length
    server_version = "jv3-endpoint"
    timeout = 75  # seconds an idle keep-alive connection may hold a thread
    server: EndpointServer

    # ------------------------------------------------------------------------------------ routes

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/ping":
            if self.server.ready.is_set():
                self._send(200, b'{"status":"healthy"}', JSON)
            else:
                self._send(503, b'{"status":"loading"}', JSON)
        elif path == "/execution-parameters":
            body = {
                "MaxConcurrentTransforms": 4,
                "BatchStrategy": "MULTI_RECORD",
                "MaxPayloadInMB": max(1, self.server.settings.max_request_bytes // (1024 * 1024)),
            }
            self._send(200, json.dumps(body).encode(), JSON)
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
            self._drain_body()
            self._error(_NotFound(f"no route POST {path}; try POST /invocations or POST {OPENAI_PATH}"))
            return
        if not self.server.ready.is_set():
            self._drain_body()
            status, body, content_type = 503, error_body(_Loading("the model is still loading; retry shortly")), JSON
        else:
            status, body, content_type = self._invoke(parse_request, self._negotiate, error_body)
        if runtime and status >= 400:
            status, body, content_type = _as_model_error(status, body, runtime.group(1))
            self._send(status, body, content_type, {"x-amzn-ErrorType": "ModelError"})
        else:
            self._send(status, body, content_type)

    def do_PUT(self) -> None:
        self._drain_body()
        self._error(_MethodNotAllowed(f"method PUT is not allowed on {self.path}"))

    do_DELETE = do_PATCH = do_PUT

    # ------------------------------------------------------------------------------------ the work

    def _openai(self) -> None:
        """``POST /v1/embeddings``: the OpenAI body only, answered (errors too) in OpenAI's shapes."""
        if not self.server.ready.is_set():
            self._drain_body()
            status, body = 503, openai_error_body(_Loading("the model is still loading; retry shortly"))
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
        settings = self.server.settings
        engine = self.server.engine
        try:
            body = self._read_body(settings.max_request_bytes)
            invocation = parse(body, self.headers.get("Content-Type"), hidden_size=engine.hidden_size, tasks=engine.tasks)
            accept = choose(self.headers.get("Accept"), invocation)
            job = self.server.submit(invocation.pending())
            if not job.done.wait(max(settings.request_timeout_s - (time.monotonic() - started), 0)):
                job.abandoned = True
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
        except Exception as exc:  # any input must leave the server able to answer the next request
            log.exception("unexpected failure on %s", self.path)
            return 500, errors(ModelError(f"internal error: {type(exc).__name__}: {exc}")), JSON

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

    def _read_body(self, limit: int) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise _LengthRequired("chunked request bodies are not supported; send Content-Length")
        raw = self.headers.get("Content-Length")
        try:
            length = int(raw) if raw is not None else 0
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise InvalidRequest(f"bad Content-Length {raw!r}", field="content_length") from None
        if length > limit:
            self._drain(length)
            raise PayloadTooLarge(
                f"request body of {length} bytes is over the limit of {limit} bytes (JV3_MAX_REQUEST_BYTES; "
                f"SageMaker real-time endpoints allow 6 MB): split the batch",
                field="body",
            )
        return self.rfile.read(length)

    def _drain_body(self) -> None:
        try:
            self._drain(int(self.headers.get("Content-Length") or 0))
        except ValueError:
            self.close_connection = True

    def _drain(self, length: int) -> None:
        if length > DRAIN_LIMIT:
            self.close_connection = True
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                break
            length -= len(chunk)

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


def make_server(engines=None, host: str = "127.0.0.1", port: int = 8080, settings: Settings | None = None) -> EndpointServer:
    """A bound server (not yet serving): call ``serve_forever()``, and ``shutdown()``/``server_close()``.

    ``engines``: an engine or a list of them (ready at once); None: call ``start(engines)`` once loaded.
    """
    return EndpointServer((host, port), engines, settings)


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
    except JV3Error as err:
        print(f"error: {err.message}", file=sys.stderr)
        return 1
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("jv3").addHandler(handler)
    logging.getLogger("jv3").setLevel(settings.log_level)

    server = make_server(None, host, port, settings)  # bound now, /ping says 503 until the engines load
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
