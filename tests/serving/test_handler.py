"""inference/inference.py, SageMaker's four functions, as the toolkit calls them (with and without a context)."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from inference import inference as handler
from inference.errors import InvalidRequest
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
