"""The wire parsers under abuse (issue 10), in process: linear time, one line rule, valid JSON always,
typed optional fields, RFC 4180 CSV, and no input that makes them raise anything but a 4xx ``JV3Error``."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest

from inference import protocol
from inference.errors import InvalidRequest, JV3Error
from inference.request import EmbedResult

from .parsing import parse, refused

JSONL = "application/jsonlines"
# Characters str.splitlines() splits on besides \n; none of them may end a JSON Lines record.
SPLITLINES_BREAKS = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\r"]


def messages(invocation) -> list:
    """Per record: the texts it would embed, or its error message."""
    return [r.message if isinstance(r, JV3Error) else r.texts for r in invocation.requests]


def strict_json(data: bytes):
    """``json.loads`` that refuses what Python alone accepts (NaN, Infinity): the response must be JSON."""

    def no_constant(name):
        raise AssertionError(f"{name} in a response")

    return json.loads(data, parse_constant=no_constant)


def answered(invocation, accept=None) -> bytes:
    """Complete ``invocation`` with fake one-row results and serialise it, as the server would."""
    results = [
        EmbedResult(np.full((len(r.texts), 4), 0.5, np.float32), [1] * len(r.texts), "float")
        for r in invocation.pending()
    ]
    accept = accept or protocol.negotiate(None, invocation)
    return protocol.write_response(invocation.complete(results), accept, model="m", default_task="text-matching")[0]


# ------------------------------------------------------------------------------ 1. linear-time parsing

# The body of issue 10: enough brackets to reach the depth scan, then an unterminated string of
# escaped quotes, which the old scan re-read from each of its quotes (31 KB: 8 s, 125 KB: 128 s).
ISSUE_BODY = '{"data":["a"],"x":' + "[]," * 33 + '"' + '\\"' * 500_000  # 1 MB


def test_issue_body_of_1mb_is_refused_in_one_pass():
    started = time.perf_counter()
    error = refused(ISSUE_BODY.encode())
    elapsed = time.perf_counter() - started
    assert "not valid JSON" in error.message and error.status == 400
    assert elapsed < 1.0, f"{elapsed:.2f} s: the depth scan is not linear"  # a generous bound; linear is ~20 ms


def test_issue_body_as_a_jsonlines_line_is_an_error_record_in_one_pass():
    started = time.perf_counter()
    invocation = parse(('"ok"\n' + ISSUE_BODY + "\n" + '"after"\n').encode(), JSONL)
    assert time.perf_counter() - started < 1.0
    assert messages(invocation)[0] == ["ok"] and messages(invocation)[2] == ["after"]
    assert "line 2 is not valid JSON" in messages(invocation)[1]


@pytest.mark.parametrize(
    "text",
    [
        '{"data": ["' + "[" * 40 + '"]}',  # brackets inside a string are text
        '{"data": ["\\"' + "{" * 40 + '\\\\"]}',  # an escaped quote does not end the string
        '{"data": ["a"], "x": "\\\\", "y": ' + "[" * 31 + "]" * 31 + "}",  # 32 levels in all
    ],
)
def test_depth_scan_sees_strings_and_escapes_as_the_parser_does(text):
    assert messages(parse(text)) == [json.loads(text)["data"]]


def test_depth_scan_counts_brackets_after_an_escaped_backslash():
    error = refused('{"data": ["a"], "x": "\\\\", "y": ' + "[" * 32 + "]" * 32 + "}")
    assert "nested deeper than 32 levels" in error.message


# ------------------------------------------------------------------------------------ 2. one line rule


@pytest.mark.parametrize("char", SPLITLINES_BREAKS, ids=[f"U+{ord(c):04X}" for c in SPLITLINES_BREAKS])
def test_jsonlines_splits_on_newline_only(char):
    lines = [
        '{"text": "before' + char + 'after", "id": "id' + char + '1"}',  # raw, as some writers send it
        json.dumps({"text": "a" + char + "b", "id": "id" + char + "2"}, ensure_ascii=False),
        '"bare' + char + 'string"',
    ]
    invocation = parse("\n".join(lines).encode() + b"\n", JSONL)
    assert messages(invocation) == [["before" + char + "after"], ["a" + char + "b"], ["bare" + char + "string"]]
    assert invocation.meta["ids"] == ["id" + char + "1", "id" + char + "2", None]
    out = answered(invocation)
    records = [strict_json(line) for line in out.split(b"\n")[:-1]]
    assert [r["id"] for r in records] == invocation.meta["ids"] and all("embedding" in r for r in records)
    # escaped on output too, so even a reader that uses str.splitlines() sees one record per line
    assert len(out.decode().splitlines()) == len(lines)


def test_jsonlines_crlf_ends_a_record_and_a_final_newline_adds_none():
    invocation = parse(b'"a"\r\n"b"\r\n', JSONL)
    assert messages(invocation) == [["a"], ["b"]]


@pytest.mark.parametrize("char", [c for c in SPLITLINES_BREAKS if c != "\r"])
def test_csv_records_end_at_newline_only(char):
    invocation = parse(f"id,text\n1,a{char}b\n2,c\n".encode(), "text/csv")
    assert messages(invocation) == [[f"a{char}b"], ["c"]] and invocation.meta["ids"] == ["1", "2"]


def test_csv_lone_cr_is_text_and_crlf_ends_a_record():
    assert messages(parse(b"a\rb\r\nc\r\n", "text/csv")) == [["a\rb"], ["c"]]


# ------------------------------------------------------------------------------ 3. valid JSON always

NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"]


@pytest.mark.parametrize("token", NON_FINITE)
def test_non_finite_ids_are_refused_by_name(token):
    error = refused('{"data": [{"text": "a", "id": ' + token + "}]}")
    assert token in error.message and "not valid JSON" in error.message


@pytest.mark.parametrize("token", NON_FINITE)
def test_non_finite_jsonlines_id_is_an_error_record_and_the_response_is_json(token):
    invocation = parse(('{"text": "a", "id": 1}\n{"text": "b", "id": ' + token + "}\n").encode(), JSONL)
    assert messages(invocation)[0] == ["a"] and token in messages(invocation)[1]
    records = [strict_json(line) for line in answered(invocation).split(b"\n")[:-1]]
    assert [r["id"] for r in records] == [1, None] and "error" in records[1]


@pytest.mark.parametrize("where", ["dimensions", "id"])
def test_5000_digit_number_is_a_400_naming_it(where):
    huge = "9" * 5000
    body = (
        '{"data": ["a"], "parameters": {"dimensions": ' + huge + "}}"
        if where == "dimensions"
        else '{"data": [{"text": "a", "id": ' + huge + "}]}"
    )
    error = refused(body)
    assert "5000 digits" in error.message and error.status == 400


def test_long_but_parseable_dimensions_is_named_briefly():
    error = refused('{"data": ["a"], "parameters": {"dimensions": ' + "9" * 4000 + "}}")
    assert "out of range" in error.message and len(error.message) < 200


def test_lone_surrogate_in_an_id_is_echoed_as_valid_json():
    invocation = parse('{"data": [{"text": "a", "id": "x\\ud800"}]}')
    assert strict_json(answered(invocation))["data"][0]["id"] == "x\ud800"


def test_error_body_naming_a_lone_surrogate_key_is_valid_json():
    error = refused('{"data": ["a"], "parameters": {"\\ud800": 1}}')
    assert strict_json(protocol.error_body(error))["error"]["code"] == 400


def test_non_finite_embedding_is_a_model_error_not_invalid_json():
    invocation = parse('{"data": ["a"]}')
    invocation.complete([EmbedResult(np.array([[np.nan, 0]], np.float32), [1], "float")])
    with pytest.raises(JV3Error) as info:
        protocol.write_response(invocation, protocol.JSON, model="m", default_task="text-matching")
    assert info.value.status == 500 and "non-finite" in info.value.message


# ------------------------------------------------------------------------- 4. optional fields typed


@pytest.mark.parametrize("value", ["[]", "false", "0", '"x"', '""', "true", "[1]"])
def test_parameters_must_be_an_object(value):
    error = refused('{"data": ["a"], "parameters": ' + value + "}")
    assert "'parameters' must be an object" in error.message and error.field == "parameters"


def test_parameters_null_or_absent_mean_defaults():
    for body in ('{"data": ["a"], "parameters": null}', '{"data": ["a"]}', '{"data": ["a"], "parameters": {}}'):
        assert messages(parse(body)) == [["a"]]


@pytest.mark.parametrize(
    "body,field",
    [
        ('{"inputs": "a", "normalize": 0}', "normalize"),
        ('{"inputs": "a", "truncate": "no"}', "truncate"),
        ('{"input": "a", "encoding_format": ""}', "embedding_type"),
        ('{"input": "a", "encoding_format": 0}', "embedding_type"),
        ('{"input": "a", "model": 5}', "model"),
        ('{"data": ["a"], "parameters": {"late_chunking": 1}}', "late_chunking"),
    ],
)
def test_other_formats_fields_are_typed(body, field):
    error = refused(body)
    assert error.field == field and error.status == 400, error.message


def test_null_flags_mean_their_defaults():
    invocation = parse('{"inputs": "a", "normalize": null, "truncate": null}')
    assert invocation.requests[0].normalized is True and invocation.requests[0].truncate is True


# ---------------------------------------------------------------------------------- 5. CSV, RFC 4180


def test_csv_bom_is_stripped_and_the_header_kept():
    invocation = parse("\ufeffid,text\r\n1,hello\r\n".encode(), "text/csv")
    assert messages(invocation) == [["hello"]] and invocation.meta["ids"] == ["1"]


def test_csv_quoted_fields_hold_commas_newlines_and_doubled_quotes():
    body = 'id,text\n1,"a, b"\n2,"two\r\nlines"\n3,"say ""hi"""\n4,5" screen\n'
    invocation = parse(body.encode(), "text/csv")
    assert messages(invocation) == [["a, b"], ["two\r\nlines"], ['say "hi"'], ['5" screen']]
    assert invocation.meta["ids"] == ["1", "2", "3", "4"]


def test_csv_field_over_the_csv_modules_128k_limit_is_one_text():
    assert messages(parse(f'"{"x" * 200_000}"\n'.encode(), "text/csv")) == [["x" * 200_000]]


def test_csv_unterminated_quote_is_a_400_naming_its_line():
    error = refused(b'id,text\n1,a\n2,"never closed\n3,c\n', "text/csv")
    assert "line 3" in error.message and "never closed" in error.message and error.field == "line 3"


def test_csv_text_after_a_closing_quote_is_an_error_record_on_its_line():
    invocation = parse(b'a\n"b"c,d\ne\n', "text/csv")
    assert messages(invocation)[0] == ["a"] and messages(invocation)[2] == ["e"]
    assert "line 2" in messages(invocation)[1] and invocation.requests[1].field == "line 2"


def test_csv_row_without_the_text_column_is_an_error_record():
    invocation = parse(b"id,text\n1\n2,b\n", "text/csv")
    assert "line 2" in messages(invocation)[0] and messages(invocation)[1] == ["b"]
    assert invocation.meta["ids"] == ["1", "2"]


@pytest.mark.parametrize(
    "content_type,body",
    [
        ("text/csv", b"id,text\n1,a\n\n2,b\n  \n3,c\n"),
        (JSONL, b'{"id": "1", "text": "a"}\n\n{"id": "2", "text": "b"}\n  \n{"id": "3", "text": "c"}\n'),
    ],
)
def test_one_rule_for_blank_records(content_type, body):
    """A blank line is an error record in its own place in every record format: never an empty text,
    never a failed batch. The line numbers count the body's lines (the CSV header is line 1)."""
    invocation = parse(body, content_type)
    got = messages(invocation)
    assert [g for g in got if isinstance(g, list)] == [["a"], ["b"], ["c"]]
    blanks = [g for g in got if isinstance(g, str)]
    assert len(blanks) == 2 and all("is blank" in m for m in blanks)
    assert [r["index"] for r in map(strict_json, answered(invocation).split(b"\n")[:-1])] == list(range(5))


def test_quoted_empty_csv_field_is_an_empty_text_not_a_blank_line():
    assert messages(parse(b'a\n""\n', "text/csv")) == [["a"], [""]]


@pytest.mark.parametrize("content_type", ["application/json", JSONL, "text/csv"])
def test_utf8_bom_is_stripped_in_every_format(content_type):
    body = {"application/json": '{"data": ["a"]}', JSONL: '"a"\n', "text/csv": "a\n"}[content_type]
    assert messages(parse(("\ufeff" + body).encode(), content_type)) == [["a"]]


# ------------------------------------------------------------------------- 6. client mistakes never 500


@pytest.mark.parametrize("accept", ["application/json;q=1.2.3", "application/json;q=", "text/csv;q=nan", "*/*;q=2", "*/*;q=-1"])
def test_malformed_accept_q_is_a_400_naming_it(accept):
    with pytest.raises(InvalidRequest) as info:
        protocol.negotiate(accept)
    assert info.value.status == 400 and "q=" in info.value.message and info.value.field == "accept"


@pytest.mark.parametrize(
    "accept,chosen",
    [("text/csv;Q=1, application/json;q=0.5", "text/csv"), ("application/json;q=0.5,text/csv;q=.9", "text/csv"),
     ("application/json; charset=utf-8", "application/json"), (" , ", None)],
)  # fmt: skip
def test_well_formed_accept_still_negotiates(accept, chosen):
    if chosen is None:
        with pytest.raises(JV3Error) as info:
            protocol.negotiate(accept)
        assert info.value.status == 406
    else:
        assert protocol.negotiate(accept) == chosen


SEEDS = [
    b'{"data": [{"text": "hello", "id": "d1"}, "world"], "parameters": {"task": "retrieval.query", "dimensions": 8}}',
    b'{"input": ["a", "b"], "encoding_format": "base64", "dimensions": 4}',
    b'{"inputs": "a", "normalize": false}',
    b'{"text": "a", "id": 1}\n"b"\n{"text": "c", "dimensions": 4}\n',
    b'id,text\n1,"a, b"\n2,c\n',
]
NOISE = [b"NaN", b"1e999", b"9" * 5000, b"[" * 40, b'"', b"\\", b"\n", b"\r", b",", b"\xff", b"\\ud800",
         b"\xe2\x80\xa8", b"\xef\xbb\xbf", b"null", b"{}", b"[]", b"-", b"0.", b"}", b"]"]  # fmt: skip


def test_mangled_bodies_raise_only_jv3_errors_and_answer_valid_json():
    """Seeded mutations of valid bodies in every format: a 4xx ``JV3Error`` or a parse whose response
    is strict JSON; any other exception would be a 500 with a traceback."""
    rng = random.Random(10)
    for _ in range(3000):
        seed = bytearray(rng.choice(SEEDS))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(seed) + 1)
            if rng.random() < 0.5:
                seed[at:at] = rng.choice(NOISE)
            else:
                del seed[at : at + rng.randint(1, 4)]
        content_type = "text/csv" if seed.startswith(b"id,") else JSONL if b"\n" in seed else "application/json"
        try:
            invocation = parse(bytes(seed), content_type)
        except JV3Error as err:
            assert 400 <= err.status < 500 and strict_json(protocol.error_body(err))
            continue
        try:
            out = answered(invocation)
        except JV3Error as err:
            assert 400 <= err.status < 500
            continue
        if invocation.is_records:
            assert len(out.split(b"\n")) - 1 == len(invocation.requests)
            for line in out.split(b"\n")[:-1]:
                strict_json(line)
        else:
            strict_json(out)
