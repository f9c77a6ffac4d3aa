"""The local endpoint over real HTTP: every request format, every bad request, boto3, concurrency."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from botocore.exceptions import ClientError

from inference.request import EmbedRequest

from .conftest import TINY, start_endpoint, stop_endpoint

TASKS = ["retrieval.query", "retrieval.passage", "separation", "classification", "text-matching"]


def reference(engine, texts, **kw) -> np.ndarray:
    return engine.embed(EmbedRequest(texts=list(texts), **kw)).embeddings


def assert_close(a, b, tol=1e-5):
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=tol)


# ------------------------------------------------------------------------------------------- routes


def test_ping_and_execution_parameters(endpoint):
    assert endpoint.request("GET", "/ping")[0] == 200
    status, _, body = endpoint.request("GET", "/execution-parameters")
    assert status == 200
    # the truth for this server: one CPU engine, a mini-batch it can answer within the request timeout
    assert json.loads(body) == {"MaxConcurrentTransforms": 1, "BatchStrategy": "MULTI_RECORD", "MaxPayloadInMB": 1}


def test_unknown_route_is_404_json(endpoint):
    status, _, body = endpoint.request("POST", "/nope", b"{}", {"Content-Type": "application/json"})
    assert status == 404 and "no route" in json.loads(body)["error"]["message"]


# ------------------------------------------------------------------------------------------- formats


def test_jina_format(endpoint, engine):
    payload = {"data": [{"text": "hello", "id": "doc-1"}, "world"], "parameters": {"task": "retrieval.passage", "dimensions": 32}}
    status, body = endpoint.post_json(payload)
    assert status == 200
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["data"][0]["id"] == "doc-1" and "id" not in body["data"][1]
    assert body["model"] == "jina-embeddings-v3" and body["usage"]["total_tokens"] > 0
    assert body["parameters"] == {"task": "retrieval.passage", "dimensions": 32, "embedding_type": "float", "late_chunking": False}
    assert_close([d["embedding"] for d in body["data"]], reference(engine, ["hello", "world"], task="retrieval.passage", dimensions=32))


@pytest.mark.parametrize("encoding", ["base64", "binary", "ubinary"])
def test_jina_encodings(endpoint, engine, encoding):
    status, body = endpoint.post_json({"data": ["a cat", "a dog"], "parameters": {"embedding_type": encoding}})
    assert status == 200 and body["parameters"]["embedding_type"] == encoding
    ref = reference(engine, ["a cat", "a dog"])
    got = [d["embedding"] for d in body["data"]]
    if encoding == "base64":
        assert_close([np.frombuffer(base64.b64decode(s), "<f4") for s in got], ref)
    else:
        bits = np.packbits(ref > 0, axis=-1).astype(np.int16)
        assert got == (bits - 128 if encoding == "binary" else bits).tolist()


def test_late_chunking(endpoint, engine):
    chunks = ["The cat sat.", "It was happy.", "Then it slept."]
    status, body = endpoint.post_json({"data": chunks, "parameters": {"late_chunking": True, "task": "retrieval.passage"}})
    assert status == 200 and len(body["data"]) == 3
    assert_close([d["embedding"] for d in body["data"]], reference(engine, chunks, late_chunking=True, task="retrieval.passage"))


def test_openai_format(endpoint, engine):
    status, body = endpoint.post_json({"input": ["hello", "world"], "model": "x", "dimensions": 16, "task": "separation"})
    assert status == 200 and body["object"] == "list"
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    assert [d["object"] for d in body["data"]] == ["embedding", "embedding"]
    assert_close([d["embedding"] for d in body["data"]], reference(engine, ["hello", "world"], task="separation", dimensions=16))
    status, body = endpoint.post_json({"input": "hello", "encoding_format": "base64"})
    assert status == 200
    assert_close([np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), "<f4")], reference(engine, ["hello"]))


def test_tei_format(endpoint, engine):
    status, body = endpoint.post_json({"inputs": ["hello", "world"], "normalize": False, "task": "classification"})
    assert status == 200 and isinstance(body, list) and len(body) == 2
    assert_close(body, reference(engine, ["hello", "world"], task="classification", normalized=False))
    status, body = endpoint.post_json({"inputs": "hello"})
    assert status == 200 and len(body) == 1


def test_jsonlines_one_line_per_record_errors_in_place(endpoint, engine):
    lines = [
        json.dumps({"text": "hello", "id": {"doc": 7}}),
        json.dumps("bare string"),
        "{not json",
        json.dumps({"text": "hola", "id": "x", "task": "retrieval.query", "dimensions": 8}),
        json.dumps({"id": "no-text"}),
        "",
        json.dumps({"text": "end"}),
    ]
    status, headers, body = endpoint.request(
        "POST", "/invocations", "\n".join(lines) + "\n", {"Content-Type": "application/jsonlines", "Accept": "application/jsonlines"}
    )
    assert status == 200 and headers["Content-Type"] == "application/jsonlines"
    out = [json.loads(line) for line in body.decode().splitlines()]
    assert [r["index"] for r in out] == list(range(7))
    assert [r.get("id") for r in out] == [{"doc": 7}, None, None, "x", "no-text", None, None]
    assert ["error" in r for r in out] == [False, False, True, False, True, True, False]
    assert "not valid JSON" in out[2]["error"]["message"] and out[2]["error"]["code"] == 400
    assert_close([out[0]["embedding"]], reference(engine, ["hello"]))
    assert_close([out[3]["embedding"]], reference(engine, ["hola"], task="retrieval.query", dimensions=8))
    assert out[0]["tokens"] > 0


def test_jsonlines_invalid_utf8_line_names_offset(endpoint):
    body = b'{"text": "ok"}\n{"text": "bad \xff"}\n'
    status, _, out = endpoint.request("POST", "/invocations", body, {"Content-Type": "application/jsonlines"})
    records = [json.loads(line) for line in out.decode().splitlines()]
    assert status == 200 and "embedding" in records[0]
    assert "byte offset 29" in records[1]["error"]["message"]


def test_csv_with_header_to_jsonlines_and_csv(endpoint, engine):
    body = 'id,text\n1,hello\n2,"hello, world"\n'
    status, headers, out = endpoint.request("POST", "/invocations", body, {"Content-Type": "text/csv"})
    assert status == 200 and headers["Content-Type"] == "application/jsonlines"
    records = [json.loads(line) for line in out.decode().splitlines()]
    assert [r["id"] for r in records] == ["1", "2"]
    assert_close([r["embedding"] for r in records], reference(engine, ["hello", "hello, world"]))
    status, headers, out = endpoint.request("POST", "/invocations", "hello\nworld\n", {"Content-Type": "text/csv", "Accept": "text/csv"})
    assert status == 200 and headers["Content-Type"] == "text/csv"
    rows = [[float(v) for v in line.split(",")] for line in out.decode().splitlines()]
    assert_close(rows, reference(engine, ["hello", "world"]))


def test_json_request_answered_as_csv_and_jsonlines(endpoint, engine):
    status, headers, out = endpoint.request(
        "POST", "/invocations", json.dumps({"data": ["a", "b"]}), {"Content-Type": "application/json", "Accept": "text/csv"}
    )
    assert status == 200 and len(out.decode().splitlines()) == 2
    status, headers, out = endpoint.request(
        "POST", "/invocations", json.dumps({"data": ["a", "b"]}),
        {"Content-Type": "application/json", "Accept": "application/jsonlines;q=0.9, text/html"},
    )  # fmt: skip
    assert status == 200 and headers["Content-Type"] == "application/jsonlines"


def test_env_default_task_applies(engine):
    """JV3_DEFAULT_TASK reaches requests that name no task (what a batch transform job relies on)."""
    ep = start_endpoint(TINY, env={"JV3_DEFAULT_TASK": "retrieval.query", "JV3_DEFAULT_DIMENSIONS": "8"})
    try:
        status, _, out = ep.request("POST", "/invocations", '"hello"\n', {"Content-Type": "application/jsonlines"})
        assert status == 200
        assert_close([json.loads(out)["embedding"]], reference(engine, ["hello"], task="retrieval.query", dimensions=8))
    finally:
        stop_endpoint(ep)


# ------------------------------------------------------------------------------------------- bad requests

JSON_CT = {"Content-Type": "application/json"}
BAD = [
    ("malformed json", b'{"data": [', JSON_CT, 400, "not valid JSON"),
    ("empty body", b"", JSON_CT, 400, "empty request body"),
    ("no data", b'{"texts": ["a"]}', JSON_CT, 400, "'data' (Jina)"),
    ("empty data", b'{"data": []}', JSON_CT, 400, "no texts"),
    ("data not list", b'{"data": "a"}', JSON_CT, 400, "'data' must be a list"),
    ("non-string text", b'{"data": ["a", 5]}', JSON_CT, 400, "text 1 is int"),
    ("null text", b'{"data": [{"text": null}]}', JSON_CT, 400, "text 0 is NoneType"),
    ("item without text", b'{"data": [{"image": "x"}]}', JSON_CT, 400, "data[0] has no 'text'"),
    ("unknown task", b'{"data": ["a"], "parameters": {"task": "retrival.query"}}', JSON_CT, 400, "unknown task 'retrival.query'; expected one of"),
    ("dimensions 0", b'{"data": ["a"], "parameters": {"dimensions": 0}}', JSON_CT, 400, "dimensions 0 is out of range; expected 1 to 64"),
    ("dimensions negative", b'{"data": ["a"], "parameters": {"dimensions": -3}}', JSON_CT, 400, "dimensions -3 is out of range"),
    ("dimensions too large", b'{"data": ["a"], "parameters": {"dimensions": 65}}', JSON_CT, 400, "dimensions 65 is out of range"),
    ("dimensions fractional", b'{"data": ["a"], "parameters": {"dimensions": 8.5}}', JSON_CT, 400, "got 8.5"),
    ("dimensions string", b'{"data": ["a"], "parameters": {"dimensions": "8"}}', JSON_CT, 400, "got '8'"),
    ("late_chunking not bool", b'{"data": ["a"], "parameters": {"late_chunking": "yes"}}', JSON_CT, 400, "late_chunking must be true or false"),
    ("unknown encoding", b'{"data": ["a"], "parameters": {"embedding_type": "int4"}}', JSON_CT, 400, "unknown embedding type 'int4'"),
    ("unknown parameter", b'{"data": ["a"], "parameters": {"dimension": 8}}', JSON_CT, 400, "unknown parameter(s) 'dimension'"),
    ("lone surrogate", b'{"data": ["ok \\ud800 x"]}', JSON_CT, 400, "lone surrogates"),
    ("invalid utf-8", b'{"data": ["caf\xc3"]}', JSON_CT, 400, "not valid UTF-8"),
    ("deeply nested", b"[" * 5000 + b"]" * 5000, JSON_CT, 400, "nested deeper than 32"),
    ("nested in data", b'{"data": ' + b"[" * 40 + b"]" * 40 + b"}", JSON_CT, 400, "nested deeper than 32"),
    ("openai token ids", b'{"input": [1, 2, 3]}', JSON_CT, 400, "token ids"),
    ("top-level array", b'["a"]', JSON_CT, 400, "expected a JSON object"),
    ("content type", b"hello", {"Content-Type": "application/x-npy"}, 415, "content type 'application/x-npy' is not supported"),
    ("charset", b'{"data":["a"]}', {"Content-Type": "application/json; charset=latin-1"}, 415, "charset 'latin-1'"),
    ("accept", b'{"data":["a"]}', {**JSON_CT, "Accept": "application/x-protobuf"}, 406, "cannot answer with 'application/x-protobuf'"),
    ("empty jsonlines", b"\n", {"Content-Type": "application/jsonlines"}, 400, "empty JSON Lines body"),
]


@pytest.mark.parametrize("name,body,headers,status,message", BAD, ids=[b[0] for b in BAD])
def test_bad_request_is_4xx_naming_the_problem_and_server_survives(endpoint, name, body, headers, status, message):
    got, _, out = endpoint.request("POST", "/invocations", body, headers)
    assert got == status, out
    if status >= 400:
        error = json.loads(out)["error"]
        assert error["code"] == status and message in error["message"], error
    assert endpoint.post_json({"data": ["still alive"]})[0] == 200


def test_body_over_6mb_is_413_and_connection_survives(endpoint):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=60)
    big = json.dumps({"data": ["x" * 1000] * 6500}).encode()
    assert len(big) > 6 * 1024 * 1024
    conn.request("POST", "/invocations", big, JSON_CT)
    response = conn.getresponse()
    error = json.loads(response.read())["error"]
    assert response.status == 413 and error["type"] == "payload_too_large" and str(len(big)) in error["message"]
    conn.request("POST", "/invocations", json.dumps({"data": ["same connection"]}), JSON_CT)  # keep-alive held
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read())["data"]
    conn.close()


def test_keep_alive_many_requests_one_connection(endpoint):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=60)
    for i in range(5):
        conn.request("POST", "/invocations", json.dumps({"data": [f"text {i}"]} if i % 2 else {"data": 5}), JSON_CT)
        response = conn.getresponse()
        response.read()
        assert response.status == (200 if i % 2 else 400)
    conn.close()


# ------------------------------------------------------------------------------------------- boto3


def test_boto3_invoke_endpoint(runtime, engine):
    answer = runtime.invoke_endpoint(
        EndpointName="jv3-local", ContentType="application/json", Accept="application/json",
        Body=json.dumps({"data": ["Follow the white rabbit."], "parameters": {"task": "retrieval.query"}}),
    )  # fmt: skip
    assert answer["ContentType"] == "application/json"
    body = json.loads(answer["Body"].read())
    assert_close([body["data"][0]["embedding"]], reference(engine, ["Follow the white rabbit."], task="retrieval.query"))


def test_boto3_container_error_is_model_error(runtime):
    with pytest.raises(ClientError) as caught:
        runtime.invoke_endpoint(
            EndpointName="jv3-local", ContentType="application/json",
            Body=json.dumps({"data": ["a"], "parameters": {"task": "retrival.query"}}),
        )  # fmt: skip
    err = caught.value
    assert type(err).__name__ == "ModelError"
    assert err.response["Error"]["Code"] == "ModelError"
    assert err.response["ResponseMetadata"]["HTTPStatusCode"] == 424
    assert err.response["OriginalStatusCode"] == 400
    original = json.loads(err.response["OriginalMessage"])
    assert original["error"]["type"] == "invalid_request" and "retrival.query" in original["error"]["message"]
    assert "Received client error (400)" in err.response["Error"]["Message"]


def test_boto3_unsupported_accept_is_model_error_406(runtime):
    with pytest.raises(runtime.exceptions.ModelError) as caught:
        runtime.invoke_endpoint(EndpointName="e", ContentType="application/json", Accept="image/png", Body=b'{"data":["a"]}')
    assert caught.value.response["OriginalStatusCode"] == 406


# ------------------------------------------------------------------------------------------- concurrency


def test_32_concurrent_clients_mixed_tasks_match_alone(endpoint, engine, golden):
    """GIVEN 32 clients with different tasks, dimensions and texts at once (so requests share batches)
    WHEN they all call the endpoint together
    THEN every vector equals the one its text gets alone, in-process."""
    texts = golden["texts"]
    jobs = [(TASKS[i % 5], [texts[(i + k) % len(texts)] for k in range(1 + i % 3)], [None, 8, 32][i % 3]) for i in range(32)]

    def call(job):
        task, batch, dims = job
        params = {"task": task} | ({"dimensions": dims} if dims else {})
        return endpoint.post_json({"data": batch, "parameters": params})

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(call, jobs))
    for (task, batch, dims), (status, body) in zip(jobs, answers, strict=True):
        assert status == 200
        for text, item in zip(batch, body["data"], strict=True):
            alone = reference(engine, [text], task=task, dimensions=dims)[0]
            cos = float(np.dot(alone, item["embedding"]) / np.linalg.norm(alone) / np.linalg.norm(item["embedding"]))
            assert cos >= 0.99999
            assert_close([item["embedding"]], [alone], tol=1e-4)
