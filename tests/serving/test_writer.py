"""Response writing and parsing that cost little (issue 11, item 1): orjson writes every JSON format and
JSON Lines from the numpy arrays, the bytes stay what docs/wire-format.md promises (valid JSON, one line
per record, float32 values exact), and the JSON Lines parser keeps every check of the stdlib one."""

from __future__ import annotations

import base64
import csv
import io
import json
import time

import numpy as np
import pytest

from inference import protocol
from inference.encodings import base64_rows, encode_matrix
from inference.errors import InvalidRequest, JV3Error, ModelError
from inference.request import EmbedResult

HIDDEN = 1024


def strict_json(data: bytes):
    """``json.loads`` that refuses what only Python accepts (NaN, Infinity)."""

    def no_constant(name):
        raise AssertionError(f"{name} in a response")

    return json.loads(data, parse_constant=no_constant)


def unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, d)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def answer(body: str, content_type: str, accept: str, vectors: np.ndarray, encoding: str = "float") -> bytes:
    invocation = protocol.parse_request(body, content_type, hidden_size=HIDDEN)
    results = [EmbedResult(vectors[i : i + len(r.texts)], [2] * len(r.texts), encoding) for i, r in enumerate(invocation.pending())]
    if not invocation.is_records:
        results = [EmbedResult(vectors, [2] * len(vectors), encoding)]
    return protocol.write_response(invocation.complete(results), accept, model="m", default_task="text-matching")[0]


# ------------------------------------------------------------------------------------ float values


@pytest.mark.parametrize(
    "body,accept,rows_of",
    [
        ('{"data": ["a", "b", "c"]}', protocol.JSON, lambda out: [d["embedding"] for d in strict_json(out)["data"]]),
        ('{"input": ["a", "b", "c"]}', protocol.JSON, lambda out: [d["embedding"] for d in strict_json(out)["data"]]),
        ('{"inputs": ["a", "b", "c"]}', protocol.JSON, strict_json),
        ('{"data": ["a", "b", "c"]}', protocol.JSONLINES, lambda out: [strict_json(x)["embedding"] for x in out.splitlines()]),
    ],
    ids=["jina", "openai", "tei", "jina-as-jsonlines"],
)
def test_float_rows_read_back_to_the_very_float32_values(body, accept, rows_of):
    vectors = unit_vectors(3, HIDDEN)
    out = answer(body, "application/json", accept, vectors)
    got = np.array(rows_of(out), dtype=np.float64)
    np.testing.assert_array_equal(got.astype(np.float32), vectors)


def test_records_read_back_exactly_as_jsonlines_json_array_and_csv():
    vectors = unit_vectors(3, HIDDEN, seed=1)
    body = '"a"\n{"text": "b", "id": "x"}\n"c"\n'
    lines = answer(body, protocol.JSONLINES, protocol.JSONLINES, vectors)
    array = answer(body, protocol.JSONLINES, protocol.JSON, vectors)
    table = answer(body, protocol.JSONLINES, protocol.CSV, vectors)
    from_lines = [strict_json(line)["embedding"] for line in lines.split(b"\n")[:-1]]
    from_array = [record["embedding"] for record in strict_json(array)]
    from_csv = [[float(v) for v in row] for row in csv.reader(io.StringIO(table.decode()))]
    for rows in (from_lines, from_array, from_csv):
        np.testing.assert_array_equal(np.array(rows).astype(np.float32), vectors)
    assert [strict_json(line)["id"] for line in lines.split(b"\n")[:-1]] == [None, "x", None]


def test_a_float32_prints_in_its_shortest_form():
    """0.1 as float32 is 0.100000001490116...; JSON gets '0.1', which reads back to the same float32."""
    out = answer('{"inputs": "a"}', "application/json", protocol.JSON, np.array([[0.1, -0.5, 1e-8, 3.4e38]], np.float32))
    assert out == b"[[0.1,-0.5,1e-8,3.4e+38]]"


def test_non_contiguous_and_other_dtypes_are_written():
    """Matryoshka truncation hands the writer a column slice; a model may answer float64 or float16."""
    wide = unit_vectors(4, 64)
    for vectors in (wide[:, :8], wide.astype(np.float64), wide.astype(np.float16), np.asfortranarray(wide)):
        out = answer('{"inputs": ["a", "b", "c", "d"]}', "application/json", protocol.JSON, vectors)
        np.testing.assert_array_equal(np.array(strict_json(out), np.float32), np.asarray(vectors, np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("accept", [protocol.JSON, protocol.JSONLINES, protocol.CSV])
def test_a_non_finite_value_is_a_model_error_never_null_or_nan(bad, accept):
    """orjson would write NaN as null: the writer refuses first, naming the value and its row."""
    vectors = unit_vectors(2, 8)
    vectors[1, 3] = bad
    with pytest.raises(ModelError, match=f"non-finite number \\({bad} in row 1\\)"):
        answer('{"data": ["a", "b"]}', "application/json", accept, vectors)


# ------------------------------------------------------------------------------------ base64, binary


@pytest.mark.parametrize("d", [1, 2, 3, 4, 5, 7, 8, 9, 64, 1022, 1023, 1024])
def test_base64_is_each_rows_little_endian_float32_bytes(d):
    vectors = unit_vectors(5, d)
    expected = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in vectors]
    assert base64_rows(vectors) == expected
    assert encode_matrix(vectors[:, ::-1], "base64") == [base64.b64encode(r.astype("<f4").tobytes()).decode() for r in vectors[:, ::-1]]
    out = answer('{"input": ["a", "b", "c", "d", "e"], "encoding_format": "base64"}', "application/json", protocol.JSON, vectors, "base64")
    assert [item["embedding"] for item in strict_json(out)["data"]] == expected


def test_base64_as_csv_is_one_field_per_row():
    vectors = unit_vectors(3, 16)
    out = answer('{"data": ["a", "b", "c"], "parameters": {"embedding_type": "base64"}}', "application/json", protocol.CSV, vectors, "base64")
    assert out.decode().splitlines() == base64_rows(vectors)


@pytest.mark.parametrize("encoding,dtype", [("binary", np.int8), ("ubinary", np.uint8)])
def test_binary_encodings_are_integers_in_every_format(encoding, dtype):
    vectors = unit_vectors(3, 20)
    packed = encode_matrix(vectors, encoding)
    assert packed.dtype == dtype and packed.shape == (3, 3)
    body = '{"data": ["a", "b", "c"], "parameters": {"embedding_type": "' + encoding + '"}}'
    as_json = [d["embedding"] for d in strict_json(answer(body, "application/json", protocol.JSON, vectors, encoding))["data"]]
    as_csv = [[int(v) for v in row.split(",")] for row in answer(body, "application/json", protocol.CSV, vectors, encoding).decode().splitlines()]
    assert as_json == as_csv == packed.tolist()


# ------------------------------------------------------------------------------------ what requests echo


def test_ids_orjson_cannot_write_are_echoed_by_the_standard_library():
    """An integer beyond 64 bits and a lone surrogate: valid JSON, the same id back."""
    body = '{"data": [{"text": "a", "id": 123456789012345678901234567890}, {"text": "b", "id": "x\\udc00"}]}'
    out = answer(body, "application/json", protocol.JSON, unit_vectors(2, 8))
    data = strict_json(out)["data"]
    assert data[0]["id"] == 123456789012345678901234567890 and data[1]["id"] == "x\udc00"
    np.testing.assert_array_equal(np.array([d["embedding"] for d in data], np.float32), unit_vectors(2, 8))


def test_json_line_breaks_inside_strings_are_escaped():
    body = '{"text": "a", "id": "1\u2028 2\u2029 3\x85"}\n'
    out = answer(body, protocol.JSONLINES, protocol.JSONLINES, unit_vectors(1, 8))
    assert b"\\u2028" in out and b"\\u2029" in out and b"\\u0085" in out
    assert len(out.decode().splitlines()) == 1 and strict_json(out)["id"] == "1\u2028 2\u2029 3\x85"


def test_error_bodies_are_compact_valid_json():
    body = protocol.error_body(InvalidRequest("bad \u2028 thing", field="x"))
    assert strict_json(body) == {"error": {"type": "invalid_request", "message": "bad \u2028 thing", "code": 400, "field": "x"}}
    assert b"\\u2028" in body


# ------------------------------------------------------------------------------------ JSON Lines parsing


LINES = [
    '{"text": "a", "id": 18446744073709551615}',  # 2^64 - 1: orjson reads it exactly
    '{"text": "a", "id": 18446744073709551616}',  # 2^64: orjson would read a float
    '{"text": "a", "id": -9223372036854775809}',
    '{"text": "a", "id": 1.5}',
    '{"text": "a", "id": [1, {"k": 123456789012345678901234567890}]}',
    '{"text": "a", "id": {"nested": 99999999999999999999}}',
    '{"text": "a", "other": 99999999999999999999}',
    '{"text": "tab\there", "id": "raw\x0ccontrol"}',  # raw control characters: accepted
    '{"text": "\\ud800\\udc00 pair"}',
    '{"text": "\\udc00 lone"}',
    '{"text": "a", "id": NaN}',
    '{"text": "a", "id": 1e999}',
    '{"text": "a", "id": ' + "1" * 5000 + "}",
    '{"text": "a", "dimensions": 99999999999999999999999}',
    '{"text": "a", "text": "b"}',  # duplicate keys: the last wins, as before
    "12345678901234567890123",
    '"bare"',
    "[1, 2]",
    '{"text": 5}',
    '{"text": "a", "task": "retrieval.query", "dimensions": 8}',
    '{"id": 3}',
    "{",
    '"\ufeffbom"',
    "\ufeff" + '"bom-first"',
]


def stdlib_view(invocation) -> list:
    return [(r.message, r.field) if isinstance(r, JV3Error) else (r.texts, r.ids, r.task, r.dimensions) for r in invocation.requests]


def test_jsonlines_parses_exactly_as_the_stdlib_parser_did(monkeypatch):
    """Each line through orjson (with its fallbacks) and through the stdlib parser alone: the same
    records, ids of the same type and value, and the same error messages."""
    body = ("\n".join(LINES) + "\n").encode()
    fast = protocol.parse_request(body, protocol.JSONLINES, hidden_size=HIDDEN)
    monkeypatch.setattr(protocol, "_loads_record", protocol._loads)
    slow = protocol.parse_request(body, protocol.JSONLINES, hidden_size=HIDDEN)
    assert stdlib_view(fast) == stdlib_view(slow)
    assert fast.meta["ids"] == slow.meta["ids"]
    assert [type(i) for i in fast.meta["ids"]] == [type(i) for i in slow.meta["ids"]]
    assert fast.meta["ids"][1] == 18446744073709551616 and isinstance(fast.meta["ids"][1], int)
    messages = [m for m, *_ in stdlib_view(fast) if isinstance(m, str)]
    assert any("NaN is not a JSON value" in m for m in messages)
    assert any("1e999 is out of range" in m for m in messages)
    assert any("5000 digits" in m for m in messages)


def test_jsonlines_depth_check_still_runs_first():
    body = ('{"text": "a", "id": ' + "[" * 40 + "]" * 40 + "}\n").encode()
    error = protocol.parse_request(body, protocol.JSONLINES, hidden_size=HIDDEN).requests[0]
    assert isinstance(error, InvalidRequest) and "nested deeper than 32 levels" in error.message


# ------------------------------------------------------------------------------------ cost


def test_writing_1000_float_vectors_of_1024_costs_milliseconds_not_a_second():
    """json.dumps of lists took 1.2-1.6 s here; a generous bound for a shared 2-core box."""
    vectors = unit_vectors(1000, 1024)
    body = json.dumps({"data": [f"text {i}" for i in range(1000)]})
    answer(body, "application/json", protocol.JSON, vectors)  # warm up
    started = time.perf_counter()
    out = answer(body, "application/json", protocol.JSON, vectors)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.4, f"{elapsed * 1000:.0f} ms"
    assert len(strict_json(out)["data"]) == 1000
