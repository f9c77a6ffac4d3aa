"""inference/inference.py, SageMaker's four functions, as the toolkit calls them (with and without a context)."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from http import HTTPStatus

import numpy as np
import pytest

from inference import inference as handler
from inference.errors import InvalidRequest, PayloadTooLarge
from inference.request import EmbedRequest

from .conftest import TINY


class FakeContext:
    """The two calls TorchServe's Context offers that the handler uses."""

    def __init__(self):
        self.status = None

    def set_response_status(self, code, phrase, idx=0):
        self.status = (code, phrase)


@pytest.fixture(scope="module")
def model():
    return handler.model_fn(str(TINY))


def run(model, body, content_type="application/json", accept="application/json", context=None):
    data = handler.input_fn(body, content_type, context)
    prediction = handler.predict_fn(data, model, context)
    return handler.output_fn(prediction, accept, context)


def test_happy_path_bytes_and_str(model):
    body = json.dumps({"data": ["hello"], "parameters": {"task": "retrieval.query", "dimensions": 8}})
    for payload in (body, body.encode()):
        out, content_type = run(model, payload)
        assert content_type == "application/json"
        vector = json.loads(out)["data"][0]["embedding"]
        expected = model.embed(EmbedRequest(texts=["hello"], task="retrieval.query", dimensions=8)).embeddings[0]
        np.testing.assert_allclose(vector, expected, atol=1e-6)


def test_error_with_context_sets_status_and_returns_json(model):
    context = FakeContext()
    out, content_type = run(model, b'{"data": ["a"], "parameters": {"dimensions": 999}}', context=context)
    assert context.status == (400, "Bad Request")
    assert json.loads(out)["error"]["field"] == "dimensions" and content_type == "application/json"
    context = FakeContext()
    out, _ = run(model, b'{"data": ["a"]}', accept="image/png", context=context)
    assert context.status == (406, "Not Acceptable") and json.loads(out)["error"]["type"] == "not_acceptable"


def test_error_without_context_raises_toolkit_error_when_available(model, monkeypatch):
    errors = types.ModuleType("sagemaker_inference.errors")

    class BaseInferenceToolkitError(Exception):
        def __init__(self, status_code, message, phrase):
            super().__init__(status_code, message, phrase)
            self.status_code, self.message, self.phrase = status_code, message, phrase

    errors.BaseInferenceToolkitError = BaseInferenceToolkitError
    monkeypatch.setitem(sys.modules, "sagemaker_inference", types.ModuleType("sagemaker_inference"))
    monkeypatch.setitem(sys.modules, "sagemaker_inference.errors", errors)
    with pytest.raises(BaseInferenceToolkitError) as caught:
        run(model, b'{"data": ["a"], "parameters": {"task": "nope"}}')
    assert caught.value.status_code == 400 and caught.value.phrase == "Bad Request"
    assert json.loads(caught.value.message)["error"]["field"] == "task"


def test_error_without_toolkit_raises_our_error(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "sagemaker_inference", None)  # import fails
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        run(model, b"{oops")


def test_jsonlines_through_handler(model):
    out, content_type = run(model, b'"a"\n{"text": "b", "id": 3}\n', "application/jsonlines", "application/json")
    lines = [json.loads(x) for x in out.decode().splitlines()]
    assert content_type == "application/jsonlines" and [x["id"] for x in lines] == [None, 3]


# --- the work caps, as the local/BYOC server applies them (docs/wire-format.md, "Limits") ---------


class TorchServeContext(FakeContext):
    """TorchServe's context as the toolkit hands it over: the request's headers in ``request_processor``."""

    def __init__(self, headers: dict):
        super().__init__()
        processor = types.SimpleNamespace(get_request_properties=lambda: headers)
        self.request_processor = [processor]


@pytest.fixture
def capped(model, monkeypatch):
    """The engine with some caps lowered (``JV3_*`` as the engine resolved them) and its calls counted."""
    calls = []
    embed_many = model.embed_many
    monkeypatch.setattr(model, "embed_many", lambda requests: calls.append(len(requests)) or embed_many(requests))

    def cap(**caps):
        monkeypatch.setattr(model, "settings", dataclasses.replace(model.settings, **caps))
        return calls

    return cap


def refused(out, content_type, context, status=413) -> dict:
    """The error body, checked to be exactly docs/wire-format.md's: type, message, code, field; no traceback."""
    assert context.status == (status, HTTPStatus(status).phrase) and content_type == "application/json"
    error = json.loads(out)["error"]
    assert set(error) == {"type", "message", "code", "field"} and error["code"] == status
    assert "Traceback" not in error["message"]
    return error


def test_more_texts_than_the_cap_are_413_naming_it_before_any_compute(model, capped):
    calls = capped(max_texts=3)
    context = FakeContext()
    out, content_type = run(model, json.dumps({"data": ["a", "b", "c", "d"]}), context=context)
    error = refused(out, content_type, context)
    assert error == {"type": "payload_too_large", "code": 413, "field": "data", "message":
                     "4 texts in one request, over the limit of 3 (JV3_MAX_TEXTS_PER_REQUEST): split 'data' "
                     "into 2 or more requests of at most 3 texts"}  # fmt: skip
    assert calls == []
    for body, name in (({"input": ["a"] * 4}, "'input'"), ({"inputs": ["a"] * 4}, "'inputs'")):  # OpenAI, TEI
        context = FakeContext()
        assert name in refused(*run(model, json.dumps(body), context=context), context)["message"]
    out, _ = run(model, json.dumps({"data": ["a", "b", "c"]}), context=FakeContext())  # at the cap: served
    assert len(json.loads(out)["data"]) == 3 and calls == [1]


def test_more_records_than_the_cap_are_413_naming_it_before_any_compute(model, capped):
    calls = capped(max_records=5)
    context = FakeContext()
    out, content_type = run(model, b'"a"\n' * 6, "application/jsonlines", context=context)
    error = refused(out, content_type, context)
    assert error["type"] == "payload_too_large" and error["field"] == "body"
    assert "6 JSON Lines records in one body, over the limit of 5 records (JV3_MAX_RECORDS_PER_REQUEST)" in error["message"]
    assert "split the body into 2 or more bodies of at most 5 records" in error["message"]
    context = FakeContext()
    csv = "id,text\n" + "".join(f"{i},t{i}\n" for i in range(6))  # the toolkit hands CSV over as str
    assert "JV3_MAX_RECORDS_PER_REQUEST" in refused(*run(model, csv, "text/csv", context=context), context)["message"]
    assert calls == []
    out, _ = run(model, b'"a"\n' * 5, "application/jsonlines", context=FakeContext())
    assert len(out.splitlines()) == 5 and calls == [5]


def test_a_response_over_the_cap_is_413_naming_it_before_any_compute(model, capped):
    calls = capped(max_response_bytes=10_000)
    context = FakeContext()
    out, content_type = run(model, json.dumps({"data": ["x"] * 20}), context=context)
    message = refused(out, content_type, context)["message"]
    assert "the response would be about 0.0 MB (20 embeddings of 64 dimensions as float)" in message
    assert "over the limit of 0.0 MB (JV3_MAX_RESPONSE_BYTES)" in message and "split it into 2 or more" in message
    assert calls == []
    out, _ = run(model, json.dumps({"data": ["x"] * 20, "parameters": {"embedding_type": "binary"}}), context=FakeContext())
    assert len(json.loads(out)["data"]) == 20 and calls == [1]  # a smaller encoding fits


def test_a_body_over_jv3_max_request_bytes_is_413_counted_in_bytes(model, capped):
    calls = capped(max_request_bytes=1000)
    text = "é" * 500  # a body of 513 characters and 1,013 bytes: as str (how the toolkit hands JSON over) too
    for body in (json.dumps({"input": text}, ensure_ascii=False), json.dumps({"input": text}, ensure_ascii=False).encode()):
        context = FakeContext()
        error = refused(*run(model, body, context=context), context)
        assert error["field"] == "body" and error["message"].startswith(
            "request body of 1013 bytes is over the limit of 1000 bytes (JV3_MAX_REQUEST_BYTES"
        )
    assert calls == []
    out, _ = run(model, json.dumps({"input": "é" * 400}, ensure_ascii=False), context=FakeContext())
    assert json.loads(out)["object"] == "list" and calls == [1]


def test_an_over_cap_request_without_a_context_raises_the_413(model, capped, monkeypatch):
    capped(max_texts=1)
    monkeypatch.setitem(sys.modules, "sagemaker_inference", None)  # no toolkit: our own error
    with pytest.raises(PayloadTooLarge, match="JV3_MAX_TEXTS_PER_REQUEST"):
        run(model, json.dumps({"input": ["a", "b"]}))


def test_the_accept_is_read_as_the_toolkit_reads_it_and_refused_before_compute(model, capped, monkeypatch):
    """input_fn sees the Accept TorchServe received (output_fn gets it from the toolkit only after compute)."""
    calls = capped()
    body = json.dumps({"input": ["a"]})
    context = TorchServeContext({"Content-Type": "application/json", "Accept": "image/png"})
    prediction = handler.predict_fn(handler.input_fn(body, "application/json", context), model, context)
    assert calls == []  # refused before compute
    out, content_type = handler.output_fn(prediction, "image/png", context)
    assert refused(out, content_type, context, 406)["type"] == "not_acceptable"
    # missing or */*: the toolkit's default (application/json), so a records request keeps answering records
    monkeypatch.delenv("SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT", raising=False)
    for headers in ({}, {"accept": "*/*"}):
        assert handler._toolkit_accept(TorchServeContext(headers)) == "application/json"
    monkeypatch.setenv("SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT", "text/csv")
    assert handler._toolkit_accept(TorchServeContext({})) == "text/csv"
    assert handler._toolkit_accept(TorchServeContext({"accept": "application/jsonlines"})) == "application/jsonlines"
    assert handler._toolkit_accept(FakeContext()) is None and handler._toolkit_accept(None) is None
    context = TorchServeContext({"Accept": "application/json"})
    out, content_type = run(model, b'"a"\n"b"\n', "application/jsonlines", "application/json", context=context)
    assert content_type == "application/jsonlines" and len(out.splitlines()) == 2 and context.status is None
