"""Engine behaviour a caller relies on: mixed tasks, Matryoshka, truncation, long late chunking,
encodings, and a typed error naming the bad value for every bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from inference.encodings import decode_base64, encode_matrix
from inference.engine import Engine
from inference.errors import CapacityError, InvalidRequest
from inference.request import EmbedRequest
from inference.settings import TASKS, Settings

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "jina-v3-tiny"
TEXTS = ["Follow the white rabbit.", "Sigue al conejo blanco.", "跟着白兔走。", "x", "", "Berlin is the capital of Germany."]


@pytest.fixture(scope="module")
def short_engine() -> Engine:
    """A 48-token limit and 16-token overlap, so truncation and windows show on short texts."""
    return Engine.load(FIXTURE, Settings.resolve(device="cpu", max_seq_length="48", late_chunking_overlap="16", max_batch_tokens="64"))


def test_a_mixed_task_batch_equals_each_text_alone(engine):
    # GIVEN requests for every task, interleaved, sent together
    requests = [EmbedRequest(texts=[t], task=TASKS[i % 5], dimensions=[None, 16, 32][i % 3]) for i, t in enumerate(TEXTS * 3)]
    together = engine.embed_many(requests)
    # THEN each equals the same request sent alone
    for request, result in zip(requests, together, strict=True):
        alone = engine.embed(EmbedRequest(texts=request.texts, task=request.task, dimensions=request.dimensions))
        np.testing.assert_allclose(result.embeddings, alone.embeddings, atol=2e-6)
        assert result.extra["task"] == request.task


def test_default_task_is_text_matching(engine):
    default = engine.embed(EmbedRequest(texts=TEXTS)).embeddings
    matching = engine.embed(EmbedRequest(texts=TEXTS, task="text-matching")).embeddings
    query = engine.embed(EmbedRequest(texts=TEXTS, task="retrieval.query")).embeddings
    np.testing.assert_allclose(default, matching, atol=1e-6)
    assert not np.allclose(default, query, atol=1e-3)


def test_matryoshka_truncates_before_normalising(engine):
    raw = engine.embed(EmbedRequest(texts=TEXTS, normalized=False)).embeddings
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)  # raw pooled vectors
    for d in (1, 7, 32, 64):
        cut = engine.embed(EmbedRequest(texts=TEXTS, dimensions=d)).embeddings
        assert cut.shape == (len(TEXTS), d)
        expected = raw[:, :d] / np.linalg.norm(raw[:, :d], axis=1, keepdims=True)
        np.testing.assert_allclose(cut, expected, atol=1e-5)


def test_deployment_default_dimensions_and_encoding():
    engine = Engine.load(FIXTURE, Settings.resolve(device="cpu", default_dimensions="16", default_encoding="binary", default_task="separation"))
    result = engine.embed(EmbedRequest(texts=["a b c"]))
    assert result.embeddings.shape == (1, 16) and result.encoding == "binary" and result.extra["task"] == "separation"


def test_long_texts_are_truncated_or_refused(short_engine):
    long_text = "the rabbit runs " * 40
    result = short_engine.embed(EmbedRequest(texts=[long_text, "short"]))
    assert result.token_counts[0] == 48 and result.token_counts[1] < 48
    with pytest.raises(InvalidRequest, match=r"text 0 is \d+ tokens, over the limit of 48"):
        short_engine.embed(EmbedRequest(texts=[long_text], truncate=False))


def test_long_late_chunking_runs_overlapping_windows(short_engine):
    # GIVEN a document three times longer than the 48-token window
    chunks = ["Organic skincare for sensitive skin " * 3, "with aloe vera and chamomile " * 3, "imagine the soothing feel " * 3]
    result = short_engine.embed(EmbedRequest(texts=chunks, task="retrieval.passage", late_chunking=True))
    # THEN it equals pooling by hand over windows whose first 16 outputs (after the first) are dropped
    sequences, n_tokens = short_engine._late_chunking(chunks, "retrieval.passage", 0)
    assert len(sequences) >= 3 and n_tokens > 2 * 48
    ids = short_engine.tokenizer.encode(short_engine.instructions["retrieval.passage"] + " ".join(chunks)).ids
    outputs, start = [], 0
    while True:
        window = ids[start : start + 48]
        hidden = short_engine.model.forward_packed(torch.tensor(window), [len(window)], ["retrieval.passage"]).numpy()
        outputs.append(hidden if start == 0 else hidden[16:])
        if start + 48 >= len(ids):
            break
        start += 48 - 16
    tokens = np.concatenate(outputs)
    assert len(tokens) == len(ids)
    slots = np.concatenate([s.slots[s.slots >= 0] for s in sequences])
    for c in range(3):
        vec = tokens[slots == c].mean(0)
        np.testing.assert_allclose(result.embeddings[c], vec / np.linalg.norm(vec), atol=1e-5)


def test_out_of_memory_splits_the_batch_and_retries(engine, monkeypatch):
    expected = engine.embed(EmbedRequest(texts=TEXTS)).embeddings
    real = engine.model.forward_packed
    calls = []

    def tight_memory(ids, lengths, tasks):
        calls.append(len(lengths))
        if len(lengths) > 2:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return real(ids, lengths, tasks)

    monkeypatch.setattr(engine.model, "forward_packed", tight_memory)
    np.testing.assert_allclose(engine.embed(EmbedRequest(texts=TEXTS)).embeddings, expected, atol=2e-6)
    assert calls[0] == len(TEXTS)  # tried whole first, then halves until each piece fits
    assert sum(n for n in calls if n <= 2) == len(TEXTS)

    def no_memory(ids, lengths, tasks):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(engine.model, "forward_packed", no_memory)
    with pytest.raises(CapacityError, match="out of GPU memory on one text"):
        engine.embed(EmbedRequest(texts=["one"]))


@pytest.mark.parametrize(
    ("request_kwargs", "message"),
    [
        ({"texts": []}, "no texts to embed"),
        ({"texts": "hello"}, "no texts to embed"),
        ({"texts": ["ok", 3]}, "text 1 is int 3, expected a string"),
        ({"texts": ["ok", None]}, "text 1 is NoneType"),
        ({"texts": ["a\ud800b"]}, r"text 0 is not valid Unicode.*character 1"),
        ({"texts": ["a"], "task": "retrival.query"}, r"unknown task 'retrival.query'; expected one of retrieval.query, retrieval.passage"),
        ({"texts": ["a"], "dimensions": 0}, "dimensions 0 is out of range; expected 1 to 64"),
        ({"texts": ["a"], "dimensions": -3}, "dimensions -3 is out of range"),
        ({"texts": ["a"], "dimensions": 65}, "dimensions 65 is out of range"),
        ({"texts": ["a"], "dimensions": 8.5}, "dimensions must be an integer from 1 to 64, got 8.5"),
        ({"texts": ["a"], "dimensions": "8"}, "got '8'"),
        ({"texts": ["a"], "dimensions": True}, "got True"),
        ({"texts": ["a"], "late_chunking": "yes"}, "late_chunking must be true or false, got 'yes'"),
        ({"texts": ["a"], "encoding": "int4"}, "unknown embedding type 'int4'; expected one of float, base64, binary, ubinary"),
        ({"texts": ["a", ""], "late_chunking": True}, "chunk 1 .* gets no token of its own"),
    ],
)
def test_bad_input_is_a_typed_error_naming_the_value(engine, request_kwargs, message):
    with pytest.raises(InvalidRequest, match=message):
        engine.embed(EmbedRequest(**request_kwargs))


def test_one_bad_request_does_not_spoil_the_others(engine):
    results = engine.embed_many([EmbedRequest(texts=["good"]), EmbedRequest(texts=["bad"], dimensions=0), EmbedRequest(texts=["also good"])])
    assert isinstance(results[1], InvalidRequest)
    assert results[0].embeddings.shape == (1, 64) and results[2].embeddings.shape == (1, 64)


def test_encodings_follow_jinas_api():
    vectors = np.array([[0.5, -1.0, 0.0, 2.0, -0.1, 0.3, 0.2, -0.2, 0.9]], dtype=np.float32)
    np.testing.assert_array_equal(encode_matrix(vectors, "float"), vectors)
    np.testing.assert_array_equal(decode_base64(encode_matrix(vectors, "base64")[0]), vectors[0])
    # sign bits 1,0,0,1,0,1,1,0 | 1 → 0b10010110 = 150, 0b10000000 = 128
    np.testing.assert_array_equal(encode_matrix(vectors, "ubinary"), np.array([[150, 128]], dtype=np.uint8))
    np.testing.assert_array_equal(encode_matrix(vectors, "binary"), np.array([[22, 0]], dtype=np.int8))
    with pytest.raises(InvalidRequest, match="unknown embedding type 'fp8'"):
        encode_matrix(vectors, "fp8")
