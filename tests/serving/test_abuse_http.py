"""The wire parsers under abuse (issue 10), over HTTP on the real local server: each abusive body is a
4xx naming the problem (or an error record in its place), and the server keeps answering."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

JSON_CT = {"Content-Type": "application/json"}
JSONL_CT = {"Content-Type": "application/jsonlines"}
CSV_CT = {"Content-Type": "text/csv"}
ISSUE_BODY = '{"data":["a"],"x":' + "[]," * 33 + '"' + '\\"' * 500_000  # 1 MB: hours for the old depth scan


def error_of(body: bytes) -> dict:
    return json.loads(body)["error"]


def records_of(body: bytes) -> list[dict]:
    assert body.endswith(b"\n")
    return [json.loads(line) for line in body.split(b"\n")[:-1]]


@pytest.mark.parametrize(
    "body,headers",
    [(ISSUE_BODY, JSON_CT), ('"ok"\n' + ISSUE_BODY + "\n", JSONL_CT)],
    ids=["json", "jsonlines"],
)
def test_issue_body_is_refused_while_ping_answers(endpoint, body, headers):
    """The old scan held the GIL for hours on this body; /ping, sent meanwhile, timed out with it."""
    with ThreadPoolExecutor(2) as pool:
        invoked = pool.submit(endpoint.request, "POST", "/invocations", body, headers)
        ping = pool.submit(endpoint.request, "GET", "/ping")
        assert ping.result()[0] == 200
        status, _, out = invoked.result()
    if headers is JSON_CT:
        assert status == 400 and "not valid JSON" in error_of(out)["message"]
    else:
        records = records_of(out)
        assert status == 200 and "embedding" in records[0]
        assert "line 2 is not valid JSON" in records[1]["error"]["message"]
    assert endpoint.request("GET", "/ping")[0] == 200


def test_jsonlines_line_breaks_inside_texts_and_ids(endpoint):
    chars = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\r"]
    lines = ['{"text": "a' + c + 'b", "id": "id' + c + str(i) + '"}' for i, c in enumerate(chars)]
    status, _, out = endpoint.request("POST", "/invocations", "\n".join(lines) + "\n", JSONL_CT)
    records = records_of(out)
    assert status == 200 and len(records) == len(lines) == len(out.decode().splitlines())
    assert [r["id"] for r in records] == ["id" + c + str(i) for i, c in enumerate(chars)]
    assert all("embedding" in r for r in records)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_id_is_a_400_naming_it(endpoint, token):
    status, _, out = endpoint.request("POST", "/invocations", '{"data": [{"text": "a", "id": ' + token + "}]}", JSON_CT)
    assert status == 400 and token in error_of(out)["message"]


def test_5000_digit_dimensions_is_a_400_not_a_500(endpoint):
    body = '{"data": ["a"], "parameters": {"dimensions": ' + "1" * 5000 + "}}"
    status, _, out = endpoint.request("POST", "/invocations", body, JSON_CT)
    assert status == 400 and "5000 digits" in error_of(out)["message"]


def test_lone_surrogate_id_is_echoed_as_valid_json(endpoint):
    status, _, out = endpoint.request("POST", "/invocations", '{"data": [{"text": "a", "id": "\\udc00"}]}', JSON_CT)
    assert status == 200 and json.loads(out)["data"][0]["id"] == "\udc00"


@pytest.mark.parametrize("value", ["[]", "false", "0", '"x"'])
def test_parameters_of_the_wrong_type_is_a_400_naming_it(endpoint, value):
    status, _, out = endpoint.request("POST", "/invocations", '{"data": ["a"], "parameters": ' + value + "}", JSON_CT)
    assert status == 400 and error_of(out)["field"] == "parameters"


def test_csv_blank_line_is_an_error_record_in_its_place(endpoint):
    status, _, out = endpoint.request("POST", "/invocations", "\ufeffid,text\n1,a\n\n2,\"b, c\"\n", CSV_CT)
    records = records_of(out)
    assert status == 200 and [r["id"] for r in records] == ["1", None, "2"]
    assert "line 3 is blank" in records[1]["error"]["message"] and "embedding" in records[2]
    # text/csv output has no place for an error record: the request is refused naming the record
    status, _, out = endpoint.request("POST", "/invocations", "a\n\nb\n", {**CSV_CT, "Accept": "text/csv"})
    assert status == 400 and "line 2" in error_of(out)["message"]


def test_csv_unterminated_quote_is_a_400_naming_its_line(endpoint):
    status, _, out = endpoint.request("POST", "/invocations", 'a\n"b\nc\n', CSV_CT)
    assert status == 400 and "line 2" in error_of(out)["message"] and "never closed" in error_of(out)["message"]


@pytest.mark.parametrize("accept", ["application/json;q=1.2.3", "text/csv;q=nan"])
def test_malformed_accept_is_a_400_not_a_500(endpoint, accept):
    status, headers, out = endpoint.request("POST", "/invocations", '{"data": ["a"]}', {**JSON_CT, "Accept": accept})
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert error_of(out)["field"] == "accept" and "q-value" in error_of(out)["message"]
    assert endpoint.request("GET", "/ping")[0] == 200
