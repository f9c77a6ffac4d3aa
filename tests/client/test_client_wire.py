"""The client's side of the wire format, without any endpoint: validation, splitting, decoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
from client_support import contract

from jv3 import wire
from jv3.errors import InvalidArgument, ProtocolError, RequestTooLarge


def params(**kw):
    base = {"task": "text-matching", "dimensions": None, "late_chunking": False, "normalized": True,
            "embedding_type": "float"}
    return wire.validate_params(**{**base, **kw})


def test_unknown_task_names_the_value_and_lists_the_valid_ones():
    with pytest.raises(InvalidArgument) as info:
        params(task="retrival.query")
    message = str(info.value)
    assert "'retrival.query'" in message
    assert all(task in message for task in wire.TASKS)


@pytest.mark.parametrize("bad", [0, 1025, -3])
def test_dimensions_out_of_range_are_refused(bad):
    with pytest.raises(InvalidArgument, match=rf"dimensions {bad} is out of range; expected 1 to 1024"):
        params(dimensions=bad)


@pytest.mark.parametrize("bad", [True, 8.0, "8"])
def test_dimensions_must_be_an_integer(bad):
    with pytest.raises(InvalidArgument, match="must be an integer"):
        params(dimensions=bad)


def test_unknown_embedding_type_lists_the_valid_ones():
    with pytest.raises(InvalidArgument, match=r"unknown embedding_type 'int4'; expected one of float, base64, binary, ubinary"):
        params(embedding_type="int4")


def test_texts_must_be_a_list_of_strings():
    with pytest.raises(InvalidArgument, match="single string"):
        wire.validate_texts("hello")
    with pytest.raises(InvalidArgument, match=r"text 1 is int 5"):
        wire.validate_texts(["a", 5])


@pytest.mark.parametrize("name", ["jina-float.json", "jina-base64.json", "jina-binary.json", "jina-ubinary.json",
                                  "jina-late-chunking.json"])
def test_request_body_is_the_contract_example(name):
    example = contract(name)
    call = dict(example["client_call"])
    texts = call.pop("texts")
    p = params(**call)
    assert json.loads(wire.request_body(texts, p)) == example["request"]


@pytest.mark.parametrize("name", ["jina-float.json", "jina-base64.json", "jina-binary.json", "jina-ubinary.json"])
def test_contract_responses_decode_to_the_documented_arrays(name):
    example = contract(name)
    et = example["client_call"]["embedding_type"]
    matrix = wire.parse_response(json.dumps(example["response"]).encode(), expected=2, embedding_type=et)
    assert matrix.dtype == wire.output_dtype(et)
    np.testing.assert_array_equal(matrix, np.asarray(example["decoded"], dtype=wire.output_dtype(et)))


def test_rows_follow_index_not_position():
    shuffled = {"data": [{"index": 1, "embedding": [0.0, 1.0]}, {"index": 0, "embedding": [1.0, 0.0]}]}
    matrix = wire.parse_response(json.dumps(shuffled).encode(), expected=2, embedding_type="float")
    np.testing.assert_array_equal(matrix, [[1.0, 0.0], [0.0, 1.0]])


@pytest.mark.parametrize(
    "payload, match",
    [
        ({"data": [{"index": 0, "embedding": [1.0]}]}, "asked for 2 embeddings, response carries 1"),
        ({"data": [{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [1.0]}]}, "duplicate"),
        ({"data": [{"index": 0, "embedding": [1.0]}, {"index": 1}]}, "no 'embedding'"),
        ({"data": [{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": [1.0, 2.0]}]}, "different shapes"),
        ({"vectors": []}, "'data' list"),
    ],
)
def test_malformed_responses_raise_protocol_error(payload, match):
    with pytest.raises(ProtocolError, match=match):
        wire.parse_response(json.dumps(payload).encode(), expected=2, embedding_type="float")


def test_plan_keeps_every_request_under_the_byte_limit_measured_on_the_encoded_json():
    texts = [("é世" * (50 + i % 97)) for i in range(500)]  # multi-byte: characters ≠ bytes
    p = params(dimensions=8)
    limit = 20_000
    ranges = wire.plan_requests(texts, p, max_batch_size=10_000, max_request_bytes=limit)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(texts)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))  # contiguous, in order
    sizes = [len(wire.request_body(texts[a:b], p)) for a, b in ranges]
    assert max(sizes) <= limit
    # greedy: adding the next text to any request would have crossed the limit
    for (a, b), _size in zip(ranges[:-1], sizes, strict=False):
        assert len(wire.request_body(texts[a : b + 1], p)) > limit


def test_plan_respects_the_count_limit():
    ranges = wire.plan_requests(["x"] * 10, params(dimensions=8), max_batch_size=4)
    assert ranges == [(0, 4), (4, 8), (8, 10)]


def test_plan_keeps_the_expected_response_under_its_limit():
    # full-size float vectors are ~24 kB of JSON each: 6 MB holds a few hundred
    ranges = wire.plan_requests(["x"] * 1000, params(), max_batch_size=1000)
    per_text = wire.response_bytes_per_item(None, "float")
    assert len(ranges) > 1
    assert max(b - a for a, b in ranges) * per_text <= wire.MAX_RESPONSE_BYTES
    # binary vectors are 128 bytes: the same texts fit in one request
    assert wire.plan_requests(["x"] * 1000, params(embedding_type="binary"), max_batch_size=1000) == [(0, 1000)]


def test_a_text_too_large_for_any_request_is_refused_with_its_index():
    with pytest.raises(RequestTooLarge, match=r"text 1 alone makes a [\d,]+-byte request; the limit is 1,000 bytes"):
        wire.plan_requests(["ok", "x" * 2000], params(), max_batch_size=8, max_request_bytes=1000)


def test_late_chunking_is_one_request_whatever_the_count_limit():
    assert wire.plan_requests(["a"] * 50, params(late_chunking=True), max_batch_size=4) == [(0, 50)]


def test_late_chunking_over_the_limit_is_refused_not_split():
    with pytest.raises(RequestTooLarge, match="late chunking sends all 3 chunks of a document in one request"):
        wire.plan_requests(["x" * 600] * 3, params(late_chunking=True), max_batch_size=8, max_request_bytes=1000)
