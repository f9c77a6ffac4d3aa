"""Bounded work on the local/BYOC server (issue 10, item 2): caps on texts, records and response size,
refused at once with 413 naming the cap and how to split; /execution-parameters tells the truth; the
server's own settings are checked at start-up."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from inference import protocol
from inference.errors import PayloadTooLarge, SettingsError
from inference.request import EmbedResult
from inference.serve import ServerLimits
from inference.settings import Settings

from .conftest import REPO, TINY, Counting, Endpoint

JSON_CT = {"Content-Type": "application/json"}
JSONL_CT = {"Content-Type": "application/jsonlines"}
CSV_CT = {"Content-Type": "text/csv"}


@pytest.fixture
def serve(engine, start_server):
    def start(engines=None, settings: Settings | None = None, **limits):
        engines = engines or [Counting(engine)]
        settings = settings or engine.settings
        server = start_server(engines, settings=settings, limits=ServerLimits.resolve(settings, **limits))
        return Endpoint(process=None, port=server.server_address[1]), engines[0]

    return start


def timed(endpoint, *args):
    started = time.monotonic()
    status, headers, body = endpoint.request(*args)
    return status, json.loads(body) if headers.get("Content-Type") == "application/json" else body, time.monotonic() - started


# ------------------------------------------------------------------------------------ texts per request


@pytest.mark.parametrize(
    "path,payload,field",
    [
        ("/invocations", {"data": ["x" * 100] * 50_000}, "data"),
        ("/invocations", {"input": ["x"] * 2049}, "input"),
        ("/invocations", {"inputs": ["x"] * 2049}, "inputs"),
        ("/v1/embeddings", {"input": ["x"] * 2049}, "input"),
    ],
    ids=["jina-50000x100-chars", "openai", "tei", "openai-route"],
)
def test_more_texts_than_the_cap_is_413_at_once(serve, path, payload, field):
    """The review's case: 50,000 texts of 100 characters (5.2 MB) were 503 after 60 s, then burned a core."""
    endpoint, engine = serve()
    count = len(next(iter(payload.values())))
    status, body, elapsed = timed(endpoint, "POST", path, json.dumps(payload), JSON_CT)
    assert status == 413 and engine.calls == 0 and elapsed < 5
    if path == "/v1/embeddings":  # OpenAI's error shape on OpenAI's route
        message, code, param = body["error"]["message"], body["error"]["code"], body["error"]["param"]
        assert code == "payload_too_large" and param == field
    else:
        message = body["error"]["message"]
        assert body["error"]["type"] == "payload_too_large" and body["error"]["field"] == field
    assert f"{count:,} texts in one request, over the limit of 2,048 (JV3_MAX_TEXTS_PER_REQUEST)" in message
    assert f"split '{field}' into {-(-count // 2048)} or more requests of at most 2,048 texts" in message
    assert endpoint.post_json({"data": ["x"] * 2048}, accept="application/json")[0] == 200  # at the cap: served


def test_late_chunking_chunks_count_as_texts(serve):
    endpoint, engine = serve()
    payload = {"data": ["chunk"] * 3000, "parameters": {"late_chunking": True}}
    status, body, _ = timed(endpoint, "POST", "/invocations", json.dumps(payload), JSON_CT)
    assert status == 413 and engine.calls == 0
    assert "3,000 chunks in one late-chunking request, over the limit of 2,048" in body["error"]["message"]


def test_the_text_cap_is_a_setting(serve):
    endpoint, _ = serve(max_texts=3)
    status, body, _ = timed(endpoint, "POST", "/invocations", json.dumps({"data": ["a"] * 4}), JSON_CT)
    assert status == 413 and "over the limit of 3 " in body["error"]["message"]
    assert endpoint.post_json({"data": ["a"] * 3})[0] == 200


# ------------------------------------------------------------------------------------ records per body


def test_500000_json_lines_records_are_413_in_milliseconds(serve):
    """The review's case: 500,000 records were 503 at 60 s, then a core burned 30 s more."""
    endpoint, engine = serve()
    body = '"a"\n' * 500_000
    status, out, elapsed = timed(endpoint, "POST", "/invocations", body, JSONL_CT)
    assert status == 413 and engine.calls == 0 and elapsed < 2, elapsed
    message = out["error"]["message"]
    assert "500,000 JSON Lines records in one body, over the limit of 65,536 records" in message
    assert "JV3_MAX_RECORDS_PER_REQUEST" in message and "split the body into 8 or more bodies" in message


@pytest.mark.parametrize("quoted", [False, True], ids=["plain", "quoted"])
def test_csv_records_over_the_cap_are_413(serve, quoted):
    endpoint, engine = serve(max_records=100)
    rows = [f'"text, {i}"' if quoted else f"text {i}" for i in range(101)]
    status, out, _ = timed(endpoint, "POST", "/invocations", "id,text\n" + "".join(f"{i},{r}\n" for i, r in enumerate(rows)), CSV_CT)
    assert status == 413 and engine.calls == 0
    assert "101 CSV records in one body, over the limit of 100 records" in out["error"]["message"]
    status, body, _ = timed(endpoint, "POST", "/invocations", "\n".join(rows[:100]) + "\n", CSV_CT)
    assert status == 200 and len(body.splitlines()) == 100  # a header-less body at the cap: served


def test_jsonlines_at_the_record_cap_is_served(serve):
    endpoint, _ = serve(max_records=50)
    status, out, _ = timed(endpoint, "POST", "/invocations", '"a"\n' * 50, JSONL_CT)
    assert status == 200 and len(out.splitlines()) == 50
    status, out, _ = timed(endpoint, "POST", "/invocations", '"a"\n' * 50 + '"b"', JSONL_CT)  # no final newline
    assert status == 413 and "51 JSON Lines records" in out["error"]["message"]


# ------------------------------------------------------------------------------------ response size


def test_an_estimated_response_over_the_cap_is_413_naming_it_and_how_to_split(serve):
    endpoint, engine = serve(max_response_bytes=100_000)
    status, body, _ = timed(endpoint, "POST", "/invocations", json.dumps({"data": ["x"] * 200}), JSON_CT)
    message = body["error"]["message"]
    assert status == 413 and engine.calls == 0 and body["error"]["type"] == "payload_too_large"
    assert "the response would be about 0.2 MB (200 embeddings of 64 dimensions as float)" in message
    assert "over the limit of 0.1 MB (JV3_MAX_RESPONSE_BYTES)" in message
    assert "split it into 2 or more requests of at most 110 texts" in message
    assert "base64, binary" in message
    # the same texts in a smaller encoding or fewer dimensions fit
    for parameters in ({"embedding_type": "binary"}, {"embedding_type": "base64"}, {"dimensions": 8}):
        assert endpoint.post_json({"data": ["x"] * 200, "parameters": parameters})[0] == 200, parameters


def test_late_chunking_is_estimated_by_its_chunk_count(serve):
    """The review's case: late chunking turned 0.5 MB into a 135 MB response."""
    endpoint, engine = serve(max_response_bytes=100_000)
    payload = {"data": ["a short chunk"] * 200, "parameters": {"late_chunking": True}}
    status, body, _ = timed(endpoint, "POST", "/invocations", json.dumps(payload), JSON_CT)
    assert status == 413 and engine.calls == 0 and "200 embeddings of 64 dimensions" in body["error"]["message"]


def test_records_over_the_response_cap_are_413_naming_records(serve):
    endpoint, engine = serve(max_response_bytes=100_000)
    status, body, _ = timed(endpoint, "POST", "/invocations", '"a"\n' * 200, JSONL_CT)
    assert status == 413 and engine.calls == 0 and "requests of at most 111 records" in body["error"]["message"]


@pytest.mark.parametrize("encoding", ["float", "base64", "binary", "ubinary"])
@pytest.mark.parametrize("dims", [8, 64, 1024])
@pytest.mark.parametrize("accept", [protocol.JSON, protocol.JSONLINES, protocol.CSV])
def test_the_estimate_is_not_below_the_response(encoding, dims, accept):
    """Unit vectors of float32 (what the model answers): the estimate bounds the bytes written."""
    rng = np.random.default_rng(dims)
    vectors = rng.standard_normal((300, dims)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    body = json.dumps({"data": [{"text": "t", "id": f"doc-{i}"} for i in range(300)], "parameters": {"embedding_type": encoding}})
    invocation = protocol.parse_request(body, "application/json", hidden_size=dims)
    estimate = protocol.check_response_size(invocation, accept, None, hidden_size=dims, default_dimensions=None,
                                            default_encoding="float", echoed_bytes=len(body))  # fmt: skip
    invocation.complete([EmbedResult(vectors, [3] * 300, encoding)])
    written = protocol.write_response(invocation, accept, model="jina-embeddings-v3", default_task="text-matching")[0]
    assert len(written) <= estimate
    if accept != protocol.CSV:  # CSV has no ids or keys, so there the estimate is all margin
        assert estimate < 1.6 * len(written) + 300 * 64  # and not far above it


def test_no_limits_means_no_caps():
    """A caller that passes no limits (model_package validating a checkpoint, tests) gets no caps; both
    runtimes pass the operator's (``Limits.of(settings)``)."""
    invocation = protocol.parse_request(json.dumps({"data": ["x"] * 5000}), "application/json", hidden_size=64)
    assert len(invocation.requests[0].texts) == 5000
    with pytest.raises(PayloadTooLarge, match="5,000 texts"):
        protocol.parse_request(json.dumps({"data": ["x"] * 5000}), "application/json", hidden_size=64, limits=protocol.Limits())


# ------------------------------------------------------------------------------------ /execution-parameters


class FakeEngine:
    """What the server and /execution-parameters read of an engine, on a named device."""

    max_batch_tokens, hidden_size, tasks, model_name = 8192, 1024, ("text-matching",), "jina-embeddings-v3"

    def __init__(self, device: str):
        self.model = type("Model", (), {"device": device})()

    def embed_many(self, requests):
        return []


def execution_parameters(serve, engines, **settings) -> dict:
    endpoint, _ = serve(engines=engines, settings=Settings.resolve(device="cpu", **settings))
    status, _, body = endpoint.request("GET", "/execution-parameters")
    assert status == 200
    return json.loads(body)


def test_execution_parameters_of_the_local_cpu_server(serve, engine):
    """One engine runs one batch at a time: one transform; on a CPU 1 MB is already past 60 s of work."""
    assert execution_parameters(serve, [Counting(engine)]) == {
        "MaxConcurrentTransforms": 1, "BatchStrategy": "MULTI_RECORD", "MaxPayloadInMB": 1}  # fmt: skip


def test_execution_parameters_follow_the_engines_and_the_timeout(serve):
    realtime = execution_parameters(serve, [FakeEngine("cuda:0")], request_timeout_s=55, max_request_bytes=8 * 2**20)
    assert realtime == {"MaxConcurrentTransforms": 1, "BatchStrategy": "MULTI_RECORD", "MaxPayloadInMB": 5}
    # infra's batch mode: 100 MB requests, an hour per invocation, 4 GPUs: bounded by SageMaker's 100 MB budget
    batch = execution_parameters(serve, [FakeEngine(f"cuda:{i}") for i in range(4)], request_timeout_s=3600,
                                 max_request_bytes=100 * 2**20)  # fmt: skip
    assert batch["MaxConcurrentTransforms"] == 4 and batch["MaxPayloadInMB"] == 25
    assert batch["MaxPayloadInMB"] * batch["MaxConcurrentTransforms"] <= 100
    two_cpus = execution_parameters(serve, [FakeEngine("cpu"), FakeEngine("cpu")])
    assert two_cpus["MaxConcurrentTransforms"] == 2 and two_cpus["MaxPayloadInMB"] == 1


def test_execution_parameters_wait_for_the_engines(engine, start_server):
    server = start_server(None, settings=engine.settings, limits=ServerLimits())
    assert Endpoint(process=None, port=server.server_address[1]).request("GET", "/execution-parameters")[0] == 503


# ------------------------------------------------------------------------------------ the server's settings


def test_server_limits_from_the_environment(monkeypatch):
    env = {"JV3_BODY_TIMEOUT_S": "2.5", "JV3_MAX_CONNECTIONS": "64"}
    for var, value in {"JV3_MAX_TEXTS_PER_REQUEST": "10", "JV3_MAX_RECORDS_PER_REQUEST": "20"}.items():
        monkeypatch.setenv(var, value)  # the work caps are settings of both runtimes (inference/settings.py)
    settings = Settings.resolve(max_request_bytes=100 * 2**20)
    limits = ServerLimits.resolve(settings, environ=env)
    assert (limits.body_timeout_s, limits.max_connections, limits.work.max_texts, limits.work.max_records) == (2.5, 64, 10, 20)
    assert limits.work.max_response_bytes == 10 * 100 * 2**20  # derived from the request limit
    monkeypatch.delenv("JV3_MAX_TEXTS_PER_REQUEST")
    assert Settings.resolve().max_texts == 2048 and Settings.resolve().max_response_bytes == 64 * 2**20
    monkeypatch.setenv("JV3_MAX_RESPONSE_BYTES", "5000")
    assert ServerLimits.resolve(Settings.resolve(), environ={}).work.max_response_bytes == 5000
    assert ServerLimits.resolve(Settings.resolve(), environ={}, max_texts=3).work.max_texts == 3  # an argument wins


@pytest.mark.parametrize(
    "env,message",
    [
        ({"JV3_BODY_TIMEOUT_S": "soon"}, "JV3_BODY_TIMEOUT_S='soon' is not a number"),
        ({"JV3_BODY_TIMEOUT_S": "nan"}, "JV3_BODY_TIMEOUT_S='nan' must be a finite number"),
        ({"JV3_MAX_TEXTS_PER_REQUEST": "0"}, "JV3_MAX_TEXTS_PER_REQUEST=0 must be at least 1"),
        ({"JV3_MAX_RECORDS_PER_REQUEST": "many"}, "JV3_MAX_RECORDS_PER_REQUEST='many' is not an integer"),
        ({"JV3_MAX_RESPONSE_BYTES": "10"}, "JV3_MAX_RESPONSE_BYTES=10 must be at least 1024"),
        ({"JV3_MAX_CONNECTIONS": "10000000"}, "JV3_MAX_CONNECTIONS=10000000 does not fit the descriptor limit"),
    ],
)
def test_a_bad_server_setting_is_named(env, message, monkeypatch):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ServerLimits.resolve(Settings.resolve(), environ=env)


def test_a_bad_server_setting_stops_the_server_at_start_up():
    done = subprocess.run([sys.executable, "-m", "inference.serve", "--model-dir", str(TINY), "--port", "0"],
                          cwd=REPO, env={**__import__("os").environ, "JV3_BODY_TIMEOUT_S": "-1"},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1 and "JV3_BODY_TIMEOUT_S='-1' must be a finite number of at least 0.001" in done.stderr
