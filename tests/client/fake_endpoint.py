"""A fake SageMaker endpoint on loopback: a ``http.server`` thread that answers what a test decides.

It speaks the runtime API as botocore parses it (``POST /endpoints/{name}/invocations``; a container
error is HTTP 424 ``ModelError`` wrapping the container's status and body, docs/wire-format.md) and
the container's ``POST /invocations``, so tests reach it through a real boto3 ``sagemaker-runtime``
client (``endpoint_url``) or urllib, with no mock of boto3. ``answer(request)`` returns a
``Reply`` or ``HANG`` (never answer, until the server stops).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HANG = object()


@dataclass
class Request:
    path: str
    body: bytes
    headers: dict

    @property
    def json(self):
        return json.loads(self.body)

    @property
    def texts(self) -> list[str]:
        """The texts of a Jina-format request."""
        return [item["text"] if isinstance(item, dict) else item for item in self.json["data"]]


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict = field(default_factory=dict)


def reply_json(obj, status: int = 200, *, allow_nan: bool = True) -> Reply:
    return Reply(status, json.dumps(obj, allow_nan=allow_nan).encode(), {"Content-Type": "application/json"})


def jina_ok(items: list[dict]) -> Reply:
    return reply_json({"data": items, "model": "jina-embeddings-v3"})


def model_error(status: int, error_type: str, message: str) -> Reply:
    """What the runtime answers when the container answered ``status`` with the wire-format error body."""
    original = json.dumps({"error": {"type": error_type, "message": message, "code": status}})
    side = "client" if status < 500 else "server"
    body = {
        "ErrorCode": f"{side.upper()}_ERROR_FROM_MODEL",
        "Message": f'Received {side} error ({status}) from primary with message "{original}".',
        "OriginalStatusCode": status,
        "OriginalMessage": original,
        "LogStreamArn": "arn:aws:logs:local:000000000000:log-group:/aws/sagemaker/Endpoints/jv3",
    }
    return Reply(424, json.dumps(body).encode(), {"Content-Type": "application/json", "x-amzn-ErrorType": "ModelError"})


def container_timeout() -> Reply:
    """The container's 503 timeout (docs/wire-format.md, "Errors"), as the runtime relays it."""
    return model_error(503, "timeout", "no answer within 60 s (JV3_REQUEST_TIMEOUT_S)")


class FakeEndpoint:
    """``with FakeEndpoint(answer) as fake: ... fake.url ... fake.requests``"""

    def __init__(self, answer: Callable[[Request], Reply | object]):
        self.answer = answer
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.released = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length") or 0)
                request = Request(self.path, self.rfile.read(length), dict(self.headers))
                with fake.lock:
                    fake.requests.append(request)
                reply = fake.answer(request)
                if reply is HANG:
                    fake.released.wait()
                    self.close_connection = True
                    return
                self.send_response(reply.status)
                for name, value in {"Content-Length": str(len(reply.body)), **reply.headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-endpoint", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def sent_texts(self) -> list[list[str]]:
        with self.lock:
            return [r.texts for r in self.requests if r.path.endswith("/invocations") and r.body.startswith(b"{")]

    def __enter__(self) -> FakeEndpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
