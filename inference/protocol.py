"""Wire formats: request bytes → ``EmbedRequest`` objects, ``EmbedResult`` objects → response bytes.

docs/wire-format.md is the contract. One ``Invocation`` sits between the two directions:

    parse_request(body, content_type)  ─▶ Invocation(format, requests)        (reject early: 4xx)
    engine.embed_many(invocation.ok_requests)                                (the engine's part)
    write_response(invocation, results, accept) ─▶ (bytes, media type)

JSON formats (Jina, OpenAI, TEI) carry one request; record formats (JSON Lines, CSV) carry one
request per line, so a bad line becomes an error record on its own line instead of failing the batch.
One rule for keys in every JSON format: a key the format does not know is a 400 naming it (a typo must
not fall back to a default), except the harmless ones clients add on their own (``model``, ``user``).

Responses are written by orjson straight from the numpy arrays (float32 rows print in float32's
shortest form), ~20 times faster than ``json.dumps`` of lists (bench/response_writing.py).
``Limits`` caps what one request may ask of the server (texts, records, response bytes), refused
with 413 before any compute.
"""

from __future__ import annotations

import codecs
import json
import math
import re
import sys
import uuid
from dataclasses import dataclass, field

import numpy as np
import orjson

from .encodings import encode_matrix
from .errors import InvalidRequest, JV3Error, ModelError, NotAcceptable, PayloadTooLarge, UnsupportedMediaType
from .request import EmbedRequest, EmbedResult, _short
from .settings import MAX_RECORDS, MAX_RESPONSE_BYTES, MAX_TEXTS, TASKS, Settings

MAX_JSON_DEPTH = 32
JSON = "application/json"
JSONLINES = "application/jsonlines"
CSV = "text/csv"
CONTENT_TYPES = {
    JSON: JSON,
    "application/jsonlines": JSONLINES,
    "application/jsonl": JSONLINES,
    "application/x-jsonlines": JSONLINES,
    "application/x-ndjson": JSONLINES,
    CSV: CSV,
}
ACCEPTS = (JSON, JSONLINES, CSV)
JINA_PARAMETERS = ("task", "dimensions", "late_chunking", "embedding_type", "normalized", "truncate")
# Keys each JSON format knows. `model` and `user` are what OpenAI-style clients add on their own (a model
# name, an end-user id): accepted and ignored everywhere, but they must be strings.
HARMLESS_KEYS = ("model", "user")
JINA_ITEM_KEYS = ("text", "id")
OPENAI_KEYS = ("input", *HARMLESS_KEYS, "encoding_format", "dimensions", "task", "late_chunking")
TEI_KEYS = ("inputs", "normalize", "truncate", "dimensions", "task", *HARMLESS_KEYS, "encoding_format")
# Jina's envelope is checked for keys that mean something somewhere else: a parameter written next to
# 'data' instead of inside 'parameters' (as Jina's public API and OpenAI put them), or another format's
# key. Other keys beside 'data' are the caller's own and ignored, as other keys of a JSON Lines record are.
JINA_MISPLACED = tuple(dict.fromkeys((*JINA_PARAMETERS, *OPENAI_KEYS, *TEI_KEYS, "parameter", "params")))
# A JSON string (escapes included) or one bracket: what the depth scan needs to see, found in C.
# Linear by construction: the quantifiers are possessive (never give back, so no backtracking and no
# backtrack stack) and the closing quote is optional, so a match that starts at a quote cannot fail;
# an unterminated string is one token running to the end instead of a failed match retried at each
# of its quotes (the quadratic scan of issue 10). Every other position fails on its first character.
_JSON_TOKENS = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"?|[\[\]{}]', re.S)
# RFC 4180 fields. A quoted field runs to the next quote that is not doubled; its closing quote is
# optional for the same reason as above, so a missing one is seen (group 2 empty), not backtracked.
# Spaces or tabs after the closing quote are dropped: sloppy writers put them there, and they are
# unambiguous.
_CSV_QUOTED = re.compile(r'"([^"]*+(?:""[^"]*+)*+)("?)[ \t]*+')
_CSV_BARE = re.compile(r"[^,\n]*+")
_BOM = "\ufeff"
# Characters JSON allows raw inside strings that str.splitlines() and JavaScript treat as line breaks;
# escaped on output so a JSON Lines response splits into exactly its records whatever reads it.
_JSON_LINE_BREAKS = (("\u2028", "\\u2028"), ("\u2029", "\\u2029"), ("\x85", "\\u0085"))
_QVALUE = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)\Z")
# orjson writes numpy arrays itself (float32 in float32's shortest form, int8/uint8 as integers).
_ORJSON = orjson.OPT_SERIALIZE_NUMPY
# The same characters as UTF-8 bytes, for orjson's output (each is one whole character there: a lead
# byte never occurs inside another character, so the replacement cannot cut one in two).
_JSON_LINE_BREAK_BYTES = tuple((char.encode(), escape.encode()) for char, escape in _JSON_LINE_BREAKS)

# Estimated response bytes per value (docs/wire-format.md, "Limits"): float32's shortest form of a
# unit vector's component averages ~12.4 characters with its comma ("-0.012345678,"); 13 leaves room.
FLOAT_VALUE_BYTES = 13
ROW_OVERHEAD_BYTES = 64  # {"index":1234,"id":...,"embedding":[...],"tokens":12} around each row


@dataclass(frozen=True)
class Limits:
    """What one request may ask: ``max_texts`` of a JSON request (Jina, OpenAI, TEI; the chunks of a
    late-chunking request too), ``max_records`` of a JSON Lines or CSV body, ``max_response_bytes`` of
    its estimated response. Over any of them: 413 at once, naming the cap and how to split."""

    max_texts: int = MAX_TEXTS
    max_records: int = MAX_RECORDS
    max_response_bytes: int = MAX_RESPONSE_BYTES

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        """The caps the operator set (``JV3_MAX_TEXTS_PER_REQUEST`` and the rest, inference/settings.py)."""
        return cls(settings.max_texts, settings.max_records, settings.max_response_bytes)


@dataclass
class Invocation:
    """One parsed request body: its format and one ``EmbedRequest`` (or the error it raised) per record."""

    format: str  # "jina" | "openai" | "tei" | "jsonlines" | "csv"
    requests: list[EmbedRequest | JV3Error]
    results: list[EmbedResult | JV3Error] | None = None
    meta: dict = field(default_factory=dict)

    @property
    def is_records(self) -> bool:
        return self.format in ("jsonlines", "csv")

    def pending(self) -> list[EmbedRequest]:
        """The requests that parsed cleanly: what the engine should embed."""
        return [r for r in self.requests if isinstance(r, EmbedRequest)]

    def complete(self, results: list[EmbedResult | JV3Error]) -> Invocation:
        """Take the engine's results for ``pending()``, in order; parse errors keep their places."""
        done = iter(results)
        self.results = [next(done) if isinstance(r, EmbedRequest) else r for r in self.requests]
        return self


# ---------------------------------------------------------------------------------------------- parsing


def media_type(header: str | None) -> str:
    """``'Application/JSON; charset=utf-8'`` → ``'application/json'``; refuses a charset other than UTF-8."""
    if not header:
        return JSON  # boto3 without ContentType and curl -d send none: the documented format is JSON
    main, _, params = header.partition(";")
    charset = re.search(r"charset\s*=\s*\"?([\w-]+)", params, re.I)
    if charset and charset.group(1).lower() not in ("utf-8", "utf8"):
        raise UnsupportedMediaType(
            f"charset {charset.group(1)!r} is not supported; send UTF-8", field="content_type"
        )
    return main.strip().lower()


def parse_request(
    body: bytes | str,
    content_type: str | None,
    *,
    hidden_size: int,
    tasks: tuple[str, ...] = TASKS,
    limits: Limits | None = None,
) -> Invocation:
    """Parse and validate a request body of the given Content-Type.

    Raises ``InvalidRequest`` (or a subclass) for the whole body; for record formats a bad record is
    kept as its error in ``Invocation.requests`` instead. ``hidden_size`` and ``tasks`` are the loaded
    model's, so a bad ``dimensions`` or ``task`` is refused before the request waits for a batch.
    ``limits``: refuse more texts or records than these with 413 (None: no cap).
    """
    check = _Validator(hidden_size, tasks)
    kind = CONTENT_TYPES.get(media_type(content_type))
    if kind is None:
        raise UnsupportedMediaType(
            f"content type {content_type!r} is not supported; expected one of "
            f"application/json, application/jsonlines, text/csv",
            field="content_type",
        )
    if kind == JSONLINES:
        return _parse_jsonlines(body, check, limits)
    text = _decode(body)
    text = text[1:] if text.startswith(_BOM) else text  # Windows editors start UTF-8 files with one
    if kind == CSV:
        return _parse_csv(text, check, limits)
    return _parse_json_object(_json_body(text), check, limits)


def parse_openai(
    body: bytes | str,
    content_type: str | None,
    *,
    hidden_size: int,
    tasks: tuple[str, ...] = TASKS,
    limits: Limits | None = None,
) -> Invocation:
    """Parse the body of ``POST /v1/embeddings``: OpenAI's embeddings request, and only that.

    The route is OpenAI's, so a Jina or TEI body sent there is refused by name instead of being
    answered in another shape than the OpenAI client will parse.
    """
    if CONTENT_TYPES.get(media_type(content_type)) != JSON:
        raise UnsupportedMediaType(
            f"content type {content_type!r} is not supported on /v1/embeddings; send application/json",
            field="content_type",
        )
    text = _decode(body)
    obj = _json_body(text[1:] if text.startswith(_BOM) else text)
    if not isinstance(obj, dict) or "input" not in obj:
        found = f"keys {sorted(obj)[:8]}" if isinstance(obj, dict) else type(obj).__name__
        raise InvalidRequest(
            f"expected an OpenAI embeddings request, a JSON object with 'input', got {found}; "
            f"Jina ('data') and TEI ('inputs') bodies go to POST /invocations",
            field="input",
        )
    return Invocation("openai", [_Validator(hidden_size, tasks)(_capped(_openai(obj), limits, "input"))])


def _json_body(text: str):
    if not text.strip():
        raise InvalidRequest("empty request body; expected a JSON object", field="body")
    return _loads(text)


def _decode(body: bytes | str, offset: int = 0) -> str:
    if isinstance(body, str):
        return body
    try:
        return bytes(body).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"body is not valid UTF-8: {exc.reason} (byte 0x{body[exc.start]:02x}) at byte offset {offset + exc.start}",
            field="body",
        ) from None


class _BadNumber(Exception):
    """Raised by the decoder's number hooks; ``_loads`` says where."""


def _refuse_constant(name: str):
    raise _BadNumber(f"{name} is not a JSON value (JSON has no NaN or Infinity); send a finite number, a string or null")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999: echoing it would write a bare Infinity, which is not JSON either
        raise _BadNumber(f"number {_clip(text)} is out of range (it overflows to {value}); send a finite number")
    return value


def _bounded_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # over Python's int-from-string limit (4300 digits): int() refuses, as we must
        raise _BadNumber(
            f"integer {_clip(text)} has {len(text.lstrip('-'))} digits, more than the "
            f"{sys.get_int_max_str_digits()} accepted; send it as a string"
        ) from None


def _clip(text: str, limit: int = 24) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# strict=False: a raw control character inside a string (a form feed or tab pasted from a PDF) is
# unambiguous, so it is taken as text rather than failing the record; responses escape it again.
_DECODER = json.JSONDecoder(
    parse_float=_finite_float, parse_int=_bounded_int, parse_constant=_refuse_constant, strict=False
)


def _loads(text: str, what: str = "body"):
    _check_depth(text, what)
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno} (char {exc.pos})",
            field="body",
        ) from None
    except _BadNumber as exc:
        raise InvalidRequest(f"{what} is not valid JSON: {exc}", field="body") from None
    except RecursionError:  # the scan above makes this unreachable; kept as the last line of defence
        raise InvalidRequest(f"{what} is JSON nested deeper than {MAX_JSON_DEPTH} levels", field="body") from None


def _loads_record(text: str, what: str):
    """One JSON Lines record, parsed by orjson (~3x faster per line than the stdlib decoder) where it
    gives exactly what ``_loads`` gives, else by ``_loads``.

    orjson refuses what the stdlib parser accepts here (a raw control character inside a string, an
    escaped lone surrogate) and what it refuses with its own words (NaN, 1e999, a 5,000-digit integer):
    any refusal goes to ``_loads``, which accepts the former and names the latter as before. One
    difference is silent: orjson reads an integer beyond 64 bits as a float. So a record whose fields
    the server reads or echoes (``text``, ``id``, ``task``, ``dimensions``) hold a float, or an id
    that is a list or object, is parsed again by ``_loads`` (floats there are rare: cost ~0); other
    keys of a record are ignored, so a float there changes nothing.
    """
    _check_depth(text, what)
    try:
        record = orjson.loads(text)
    except ValueError:  # orjson.JSONDecodeError, or a str it cannot take (a lone surrogate)
        return _loads(text, what)
    if isinstance(record, dict):
        fields = (record.get("text"), record.get("id"), record.get("task"), record.get("dimensions"))
    else:
        fields = (record,)
    if any(isinstance(value, (float, list, dict)) for value in fields):
        return _loads(text, what)
    return record


def _check_depth(text: str, what: str) -> None:
    """Refuse JSON nested deeper than ``MAX_JSON_DEPTH`` before the parser recurses into it.

    One pass over ``text``: ``_JSON_TOKENS`` cannot backtrack (see there), and a string with no closing
    quote ends the scan, as the parser will refuse the body at that string anyway.
    """
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return
    depth = 0
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise InvalidRequest(
                    f"{what} is JSON nested deeper than {MAX_JSON_DEPTH} levels (at char {match.start()})",
                    field="body",
                )
        elif token in ("]", "}"):
            depth -= 1


class _Validator:
    def __init__(self, hidden_size: int, tasks: tuple[str, ...]):
        self.hidden_size, self.tasks = hidden_size, tasks

    def __call__(self, request: EmbedRequest) -> EmbedRequest:
        request.validate(hidden_size=self.hidden_size, tasks=self.tasks)
        return request


def _capped(request: EmbedRequest, limits: Limits | None, name: str) -> EmbedRequest:
    """Refuse a JSON request of more texts than ``limits.max_texts`` (413), before any text is checked."""
    count = len(request.texts) if isinstance(request.texts, list) else 1
    if limits is not None and count > limits.max_texts:
        what = "chunks in one late-chunking request" if request.late_chunking is True else "texts in one request"
        raise PayloadTooLarge(
            f"{count:,} {what}, over the limit of {limits.max_texts:,} (JV3_MAX_TEXTS_PER_REQUEST): split "
            f"'{name}' into {-(-count // limits.max_texts)} or more requests of at most {limits.max_texts:,} texts",
            field=name,
        )
    return request


def _records_cap(count: int, limits: Limits | None, unit: str, at_least: bool = False) -> None:
    """Refuse a JSON Lines or CSV body of more records than ``limits.max_records`` (413)."""
    if limits is not None and count > limits.max_records:
        raise PayloadTooLarge(
            f"{'at least ' if at_least else ''}{count:,} {unit} in one body, "
            f"over the limit of {limits.max_records:,} records "
            f"(JV3_MAX_RECORDS_PER_REQUEST): split the body into {-(-count // limits.max_records)} or more "
            f"bodies of at most {limits.max_records:,} records (batch transform: a smaller MaxPayloadInMB)",
            field="body",
        )


def _parse_json_object(obj, check: _Validator, limits: Limits | None = None) -> Invocation:
    if not isinstance(obj, dict):
        raise InvalidRequest(
            f"expected a JSON object with 'data' (Jina), 'input' (OpenAI) or 'inputs' (TEI), got {type(obj).__name__}",
            field="body",
        )
    if "data" in obj:
        return Invocation("jina", [check(_capped(_jina(obj), limits, "data"))])
    if "input" in obj:
        return Invocation("openai", [check(_capped(_openai(obj), limits, "input"))])
    if "inputs" in obj:
        return Invocation("tei", [check(_capped(_tei(obj), limits, "inputs"))])
    raise InvalidRequest(
        f"no texts: expected a JSON object with 'data' (Jina), 'input' (OpenAI) or 'inputs' (TEI); "
        f"got keys {sorted(obj)[:8]}",
        field="data",
    )


# Optional fields: absent and null both mean the default; a value of the wrong type is refused by
# name, so `"parameters": false` or `"normalize": 0` cannot quietly stand for "the defaults".


def _object(obj: dict, name: str) -> dict:
    value = obj.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(
            f"'{name}' must be an object (or absent), got {type(value).__name__} {_short(value)}", field=name
        )
    return value


def _flag(obj: dict, name: str, default: bool) -> bool:
    value = obj.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false, got {_short(value)}", field=name)
    return value


def _known_keys(obj: dict, known: tuple[str, ...], where: str, prefix: str = "") -> None:
    """The one rule for keys: refuse the first unknown ones by name; check the harmless ones' types."""
    unknown = [key for key in obj if key not in known]
    if unknown:
        names = ", ".join(_short(key, 40) for key in unknown[:5])
        raise InvalidRequest(
            f"unknown key(s) {names} in {where}; expected some of {', '.join(known)}",
            field=f"{prefix}{unknown[0]}",
        )
    for name in HARMLESS_KEYS:
        value = obj.get(name)
        if name in known and value is not None and not isinstance(value, str):  # ignored, but 5 is a bug
            raise InvalidRequest(f"'{name}' must be a string, got {_short(value)}", field=f"{prefix}{name}")


def _jina_envelope(obj: dict) -> None:
    """Refuse a key beside 'data' that would be ignored there but means something elsewhere."""
    misplaced = [key for key in obj if key in JINA_MISPLACED and key not in HARMLESS_KEYS]
    if misplaced:
        key = misplaced[0]
        if key in JINA_PARAMETERS:
            hint = "it belongs inside 'parameters'"
        elif key in ("parameter", "params"):
            hint = "did you mean 'parameters'?"
        else:
            hint = "it is another format's key, and a body has one format"
        raise InvalidRequest(
            f"unknown key {key!r} beside 'data' in a Jina request; {hint}: "
            f'{{"data": [...], "parameters": {{"task": ..., "dimensions": ...}}}}',
            field=key,
        )
    _known_keys({k: obj[k] for k in HARMLESS_KEYS if k in obj}, HARMLESS_KEYS, "a Jina request")


def _jina(obj: dict) -> EmbedRequest:
    _jina_envelope(obj)
    data = obj["data"]
    if not isinstance(data, list):
        raise InvalidRequest(f"'data' must be a list of texts or {{'text': ...}} objects, got {_short(data)}", field="data")
    texts, ids = [], []
    for i, item in enumerate(data):
        if isinstance(item, dict):
            if "text" not in item:
                raise InvalidRequest(
                    f"data[{i}] has no 'text' (keys: {sorted(item)[:8]}); only text inputs are supported",
                    field=f"data[{i}]",
                )
            _known_keys(item, JINA_ITEM_KEYS, f"data[{i}] (only text inputs are supported)", f"data[{i}].")
            texts.append(item["text"])
            ids.append(item.get("id"))
        else:
            texts.append(item)
            ids.append(None)
    params = _object(obj, "parameters")
    unknown = sorted(set(params) - set(JINA_PARAMETERS))
    if unknown:
        raise InvalidRequest(
            f"unknown parameter(s) {', '.join(map(repr, unknown))}; expected some of {', '.join(JINA_PARAMETERS)}",
            field=f"parameters.{unknown[0]}",
        )
    return EmbedRequest(
        texts=texts,
        task=params.get("task"),
        dimensions=params.get("dimensions"),
        late_chunking=_flag(params, "late_chunking", False),
        normalized=_flag(params, "normalized", True),
        truncate=_flag(params, "truncate", True),
        encoding=params.get("embedding_type"),
        ids=ids if any(i is not None for i in ids) else None,
    )


def _openai(obj: dict) -> EmbedRequest:
    _known_keys(obj, OPENAI_KEYS, "an OpenAI request")
    encoding = obj.get("encoding_format")
    return EmbedRequest(
        texts=_text_list(obj["input"], "input"),
        task=obj.get("task"),
        dimensions=obj.get("dimensions"),
        late_chunking=_flag(obj, "late_chunking", False),
        encoding="float" if encoding is None else encoding,  # OpenAI clients expect float unless they ask
    )


def _tei(obj: dict) -> EmbedRequest:
    _known_keys(obj, TEI_KEYS, "a TEI request")
    encoding = obj.get("encoding_format")
    if encoding is not None and encoding != "float":  # accepted only where it changes nothing
        raise InvalidRequest(
            f"encoding_format {_short(encoding)} is not available in the TEI format, which answers float "
            f"arrays; send 'input' (OpenAI format) for base64",
            field="encoding_format",
        )
    return EmbedRequest(
        texts=_text_list(obj["inputs"], "inputs"),
        task=obj.get("task"),
        dimensions=obj.get("dimensions"),
        normalized=_flag(obj, "normalize", True),
        truncate=_flag(obj, "truncate", True),
        encoding="float",  # TEI answers plain float arrays
    )


def _text_list(value, name: str) -> list:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if value and (_token_ids(value) or any(isinstance(v, list) and _token_ids(v) for v in value)):
            raise InvalidRequest(f"'{name}' holds token ids; send texts instead (this endpoint tokenizes)", field=name)
        return value
    raise InvalidRequest(f"'{name}' must be a string or a list of strings, got {_short(value)}", field=name)


def _token_ids(values: list) -> bool:
    return bool(values) and all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _blank_line(line: int) -> InvalidRequest:
    """The one rule for blank records in every record format: an error record in the blank line's place
    (never an empty text, never a failed batch), so the output still has one line per input line."""
    return InvalidRequest(
        f'line {line} is blank; every line must hold one record (send "" to embed an empty text)',
        field=f"line {line}",
    )


def _parse_jsonlines(body: bytes | str, check: _Validator, limits: Limits | None = None) -> Invocation:
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else bytes(body)
    offset = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    if not raw[offset:].strip():
        raise InvalidRequest("empty JSON Lines body; expected one record per line", field="body")
    # counted in C before any line is split or parsed: 500,000 records are refused in milliseconds
    _records_cap(raw.count(b"\n", offset) + (not raw.endswith(b"\n")), limits, "JSON Lines records")
    # The one line rule: a record ends at \n (a \r before it is dropped), never where str.splitlines()
    # would also split (form feed, U+2028, U+0085, a lone \r...): texts may hold those, and one extra
    # split would shift every later record against the input lines batch transform joins them to.
    lines = raw[offset:].split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the newline that ends the last record does not start a blank one
    requests, ids = [], []
    for i, line in enumerate(lines):
        record_id = None
        try:
            text = _decode(line.rstrip(b"\r"), offset)
            if not text.strip():
                raise _blank_line(i + 1)
            record = _loads_record(text, f"line {i + 1}")
            if isinstance(record, dict):
                record_id = record.get("id")
                if "text" not in record:
                    raise InvalidRequest(f"line {i + 1} has no 'text' (keys: {sorted(record)[:8]})", field="text")
                request = EmbedRequest(
                    texts=[record["text"]],
                    task=record.get("task"),
                    dimensions=record.get("dimensions"),
                    ids=[record_id],
                )
            else:
                request = EmbedRequest(texts=[record])
            requests.append(check(request))
        except JV3Error as err:
            requests.append(err)
        ids.append(record_id)
        offset += len(line) + 1
    return Invocation("jsonlines", requests, meta={"ids": ids})


def _parse_csv(text: str, check: _Validator, limits: Limits | None = None) -> Invocation:
    if not text.strip():
        raise InvalidRequest("empty CSV body; expected one text per row", field="body")
    if limits is not None and '"' not in text:  # no quotes: every line is a record (a header at most one less)
        _records_cap(text.count("\n") + (not text.endswith("\n")) - 1, limits, "CSV records", at_least=True)
    records = _csv_records(text)
    first = records[0][1]
    # A first field that is a UUID marks jina-sagemaker's batch layout: that row is a record, not a header.
    header = [c.strip().lower() for c in first] if isinstance(first, list) and not _is_uuid(first[0]) else []
    columns = None
    if "text" in header:  # a header row
        records.pop(0)
        columns = (header.index("text"), header.index("id") if "id" in header else None, len(header))
    if not records:
        raise InvalidRequest("CSV body has a header row and no records; expected one text per row", field="body")
    _records_cap(len(records), limits, "CSV records")
    requests, ids = [], []
    for line, fields in records:
        if isinstance(fields, JV3Error):  # a blank or malformed line: its error is its record
            requests.append(fields)
            ids.append(None)
            continue
        record_id = _csv_id(fields, columns)  # kept on an error record too, so the caller can join it back
        try:
            requests.append(check(EmbedRequest(texts=[_csv_text(fields, line, columns)], ids=[record_id])))
        except JV3Error as err:
            requests.append(err)
        ids.append(record_id)
    return Invocation("csv", requests, meta={"ids": ids})


def _csv_id(fields: list[str], columns: tuple[int, int | None, int] | None) -> str | None:
    """A row's id: its 'id' column under a header; without one, a UUID first field (jina-sagemaker's layout)."""
    if columns is not None:
        id_col = columns[1]
        return fields[id_col] if id_col is not None and id_col < len(fields) else None
    return fields[0] if len(fields) > 1 and _is_uuid(fields[0]) else None


def _csv_text(fields: list[str], line: int, columns: tuple[int, int | None, int] | None) -> str:
    """The one text of a CSV row, or ``InvalidRequest`` for a row that cannot be one text.

    Every row must be unambiguous: a field too many is almost always a text with an unquoted comma
    (the SageMaker SDK's ``CSVSerializer`` writes a list of strings unquoted), and embedding its
    first part would be a silently wrong vector.
    """
    if columns is not None:
        text_col, _, width = columns
        if text_col >= len(fields):  # a short row must not become an empty text
            raise InvalidRequest(
                f"line {line} has {len(fields)} field(s), no column {text_col + 1} ('text')", field=f"line {line}"
            )
        if len(fields) > width:
            raise InvalidRequest(
                f"line {line} has {len(fields)} fields but the header has {width}; "
                f'quote a text that holds commas ("Berlin, the capital")',
                field=f"line {line}",
            )
        return fields[text_col]
    if len(fields) == 1:
        return fields[0]
    if len(fields) == 2 and _is_uuid(fields[0]):  # jina-sagemaker's batch layout: id,text
        return fields[1]
    raise InvalidRequest(
        f"line {line} has {len(fields)} fields; without a header a row is one text, or a UUID and a text "
        f'(jina-sagemaker\'s batch layout): quote a text that holds commas ("Berlin, the capital") '
        f"or add a header row naming the 'text' (and 'id') column",
        field=f"line {line}",
    )


def _is_uuid(value: str) -> bool:
    """What jina-sagemaker's batch helper takes for an id it wrote or keeps (``uuid.UUID(value)`` parses)."""
    if len(value) > 45:  # the longest form: "urn:uuid:" and 36 characters
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _csv_records(text: str) -> list[tuple[int, list[str] | InvalidRequest]]:
    """RFC 4180 records in one pass: (the line a record starts on, its fields or that line's error).

    A record ends at \\n outside quotes (a \\r before it is dropped; a lone \\r is text, as in JSON
    Lines). A field that starts with a quote runs to the next quote that is not doubled and may hold
    commas and newlines; a quote inside an unquoted field is text, as spreadsheets write it.
    Linear: ``pos`` only moves forward and every pattern is anchored at it and possessive.
    """
    records, pos, line, end = [], 0, 1, len(text)
    while pos < end:
        start, first_line = pos, line
        newline = text.find("\n", pos)
        stop = end if newline < 0 else newline
        if text.find('"', pos, stop) < 0:  # no quote on the line (the common case): split it in C
            fields = text[pos:stop].split(",")
            if fields[-1].endswith("\r"):
                fields[-1] = fields[-1][:-1]
            record, pos = fields, stop
        else:
            record, pos, line = _csv_quoted_record(text, pos, line)
        if isinstance(record, list) and len(record) == 1 and not record[0].strip() and text[start] != '"':
            record = _blank_line(first_line)
        records.append((first_line, record))
        if pos < end:  # the \n that ends the record
            pos += 1
            line += 1
    return records


def _csv_quoted_record(text: str, pos: int, line: int) -> tuple[list[str] | InvalidRequest, int, int]:
    """One record that has a quote in it, from ``pos`` to (not past) the \\n that ends it.

    Text between a closing quote and the next comma makes an error record of the rest of that line;
    a quote that is never closed refuses the body, as no later record has a knowable start.
    """
    fields, first_line, end = [], line, len(text)
    while True:
        if text.startswith('"', pos):
            match = _CSV_QUOTED.match(text, pos)
            if not match.group(2):
                raise InvalidRequest(
                    f"CSV line {line}: the quoted field opened at column {_column(text, pos)} is never closed; "
                    f'a field that starts with " ends at the next single " (write "" for a quote inside it)',
                    field=f"line {line}",
                )
            fields.append(match.group(1).replace('""', '"'))
            line += match.group(1).count("\n")
            pos = match.end()
            if text.startswith("\r", pos) and (pos + 1 == end or text[pos + 1] == "\n"):
                pos += 1  # \r\n ends the record
        else:
            match = _CSV_BARE.match(text, pos)
            value, pos = match.group(), match.end()
            fields.append(value[:-1] if value.endswith("\r") and (pos == end or text[pos] == "\n") else value)
        if pos == end or text[pos] == "\n":
            return fields, pos, line
        if text[pos] == ",":
            pos += 1
            continue
        error = InvalidRequest(
            f"CSV line {line}, column {_column(text, pos)}: {text[pos]!r} after the closing quote of a field; "
            f'a quoted field ends at its closing quote (write "" for a quote inside it)',
            field=f"line {first_line}",
        )
        newline = text.find("\n", pos)
        return error, (end if newline < 0 else newline), line  # the rest of the line is the bad record's


def _column(text: str, pos: int) -> int:
    return pos - text.rfind("\n", 0, pos)


# ---------------------------------------------------------------------------------------------- writing


def negotiate(accept: str | None, invocation: Invocation | None = None, *, as_sent: bool = False) -> str:
    """The response media type for an Accept header; raises ``NotAcceptable`` when none fits.

    A records request (JSON Lines, CSV) answers records unless it asks for ``application/json``; then it
    gets one JSON array of the same records (what the SageMaker SDK's ``JSONDeserializer`` parses).
    ``as_sent``: whether ``accept`` is the caller's own header. The SageMaker inference toolkit puts
    ``application/json`` in place of a missing Accept (which batch transform sends), so where
    ``as_sent`` is False a records request keeps answering records.
    """
    if not accept:
        return JSONLINES if invocation is not None and invocation.is_records else JSON
    ranges = []
    for position, part in enumerate(accept.split(",")):
        name, *params = part.split(";")
        ranges.append((-_qvalue(part, params), position, name.strip().lower()))
    for neg_q, _, name in sorted(ranges):
        if neg_q == 0:
            continue
        if name in ("*/*", "application/*"):
            return JSONLINES if invocation is not None and invocation.is_records else JSON
        if name == "text/*":
            return CSV
        if name in CONTENT_TYPES:
            chosen = CONTENT_TYPES[name]
            records = invocation is not None and invocation.is_records
            return JSONLINES if chosen == JSON and records and not as_sent else chosen
    raise NotAcceptable(
        f"cannot answer with {accept!r}; this endpoint writes application/json, application/jsonlines or text/csv",
        field="accept",
    )


def accepts_json(accept: str | None) -> str:
    """``application/json`` if the Accept header allows it, else ``NotAcceptable``: for routes that
    answer only JSON (``/v1/embeddings``, as OpenAI's API does)."""
    if not accept:
        return JSON
    for part in accept.split(","):
        name, *params = part.split(";")
        if name.strip().lower() in (JSON, "application/*", "*/*") and _qvalue(part, params) > 0:
            return JSON
    raise NotAcceptable(f"cannot answer with {accept!r}; this route writes application/json", field="accept")


def _qvalue(part: str, params: list[str]) -> float:
    """The weight of one Accept range: 1 when it has no q; a malformed q is the client's mistake (400),
    not a reason to guess its preference or to fail inside the server."""
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() != "q":
            continue
        value = value.strip()
        if _QVALUE.match(value) and float(value) <= 1:
            return float(value)
        raise InvalidRequest(
            f"malformed Accept header: q={_short(value)} in {_short(part.strip())}; "
            f"a q-value is a number from 0 to 1, e.g. 'application/json;q=0.5'",
            field="accept",
        )
    return 1.0


def write_response(invocation: Invocation, accept: str, *, model: str, default_task: str) -> tuple[bytes, str]:
    """Serialise ``invocation.results`` in the request's own format (or as the Accept header asks)."""
    results = invocation.results or []
    if not invocation.is_records:
        result = results[0]
        if isinstance(result, JV3Error):
            raise result
        request = invocation.requests[0]
        if accept == JSON:
            writer = {"jina": _write_jina, "openai": _write_openai, "tei": _write_tei}[invocation.format]
            return writer(request, result, model, default_task), JSON
        ids = request.ids or [None] * len(request.texts)
        tokens = result.token_counts
        records = [
            (i, ids[i], row, tokens[i] if i < len(tokens) else None) for i, row in enumerate(_encoded_rows(result))
        ]
        return _write_records(records, accept), accept
    records = []
    for i, result in enumerate(results):
        record_id = invocation.meta["ids"][i]
        if isinstance(result, JV3Error):
            records.append((i, record_id, result, None))
        else:
            records.append((i, record_id, _encoded_rows(result)[0], result.total_tokens))
    if accept == JSON:  # asked for one JSON document: the records as one array
        return _dumps([_record(*r) for r in records]), JSON
    return _write_records(records, accept), accept


def error_body(error: JV3Error) -> bytes:
    return _json_bytes(error.to_dict())


def openai_error_body(error: JV3Error) -> bytes:
    """OpenAI's error shape, which its clients read into ``APIError.message``/``.type``/``.param``/``.code``."""
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    return _json_bytes({"error": {"message": error.message, "type": kind, "param": error.field, "code": error.kind}})


def check_request_size(size: int, limit: int) -> None:
    """Refuse (413) a request body of more than ``limit`` bytes (``JV3_MAX_REQUEST_BYTES``)."""
    if size > limit:
        raise PayloadTooLarge(
            f"request body of {size} bytes is over the limit of {limit} bytes (JV3_MAX_REQUEST_BYTES; "
            f"SageMaker real-time endpoints allow 6 MB): split the batch",
            field="body",
        )


def check_response_size(
    invocation: Invocation,
    accept: str,
    limits: Limits | None,
    *,
    hidden_size: int,
    default_dimensions: int | None,
    default_encoding: str,
    echoed_bytes: int = 0,
) -> int:
    """Refuse (413) a request whose response would exceed ``limits.max_response_bytes``; return the estimate.

    Estimated before any compute from what the request asks: one row per text (a late-chunking request
    answers one row per chunk, so its chunk count is its row count) × its dimensions × the bytes one
    value takes in its encoding (``_row_bytes``), plus ``echoed_bytes`` for ids echoed back (the
    request's size bounds them).
    """
    estimate, rows = echoed_bytes, 0
    shapes = {}  # (dimensions, encoding) → rows: what the message names
    for request in invocation.pending():
        dims = request.dimensions or default_dimensions or hidden_size
        encoding = request.encoding or default_encoding
        shapes[dims, encoding] = shapes.get((dims, encoding), 0) + len(request.texts)
        rows += len(request.texts)
        estimate += len(request.texts) * (_row_bytes(dims, encoding) + ROW_OVERHEAD_BYTES)
    if limits is None or estimate <= limits.max_response_bytes:
        return estimate
    (dims, encoding), _ = max(shapes.items(), key=lambda item: item[1])
    per_request = max(1, limits.max_response_bytes * rows // estimate)
    unit = "records" if invocation.is_records else "texts"
    raise PayloadTooLarge(
        f"the response would be about {_megabytes(estimate)} ({rows:,} embeddings of {dims} dimensions as "
        f"{encoding}), over the limit of {_megabytes(limits.max_response_bytes)} (JV3_MAX_RESPONSE_BYTES): "
        f"split it into {-(-rows // per_request)} or more requests of at most {per_request:,} {unit}, "
        f"or ask for fewer dimensions or a smaller embedding_type (base64, binary)",
        field="body",
    )


def _row_bytes(dims: int, encoding: str) -> int:
    """Bytes of one embedding in the response: float numbers, base64 text, or int8/uint8 numbers."""
    if encoding == "base64":
        return 4 * -(-4 * dims // 3) + 2  # 4·d bytes as base64, in quotes
    if encoding in ("binary", "ubinary"):
        return 5 * -(-dims // 8)  # "-128," at most per packed byte
    return FLOAT_VALUE_BYTES * dims


def _megabytes(count: int) -> str:
    return f"{count / 1e6:,.1f} MB"


def _encoded_rows(result: EmbedResult) -> np.ndarray | list[str]:
    """The rows as the writer takes them: a C-contiguous numpy array (orjson writes it in C) or base64 strings."""
    rows = encode_matrix(result.embeddings, result.encoding)
    if isinstance(rows, np.ndarray) and rows.dtype.kind == "f" and not np.isfinite(rows).all():
        # orjson would write NaN as null; the parsers refuse NaN in requests, so the model made it
        bad = np.argwhere(~np.isfinite(rows))[0]
        raise ModelError(
            f"the response would hold a non-finite number ({rows[tuple(bad)]} in row {bad[0]}); "
            f"refusing to write invalid JSON"
        )
    return rows


def _dumps(obj) -> bytes:
    return _json_bytes(obj)


def _json_bytes(obj) -> bytes:
    """``obj`` as compact UTF-8 JSON that is valid and one line whatever the request echoed into it.

    orjson writes it (numpy rows included); what orjson cannot write goes to the standard library:
    an echoed integer beyond 64 bits, or a string with a lone surrogate (then escaped as ``\\uXXXX``).
    """
    try:
        data = orjson.dumps(obj, option=_ORJSON)
    except orjson.JSONEncodeError:
        data = _stdlib_json_bytes(obj)
    if data.isascii():  # numbers and ASCII ids (the common case): ~1 ms per 12 MB, where each scan below is ~12
        return data
    for char, escape in _JSON_LINE_BREAK_BYTES:
        if char in data:
            data = data.replace(char, escape)
    return data


def _stdlib_json_bytes(obj) -> bytes:
    options = {"separators": (",", ":"), "allow_nan": False, "default": _plain}
    try:
        return json.dumps(obj, ensure_ascii=False, **options).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate in an echoed id or key: its \uXXXX escape is still valid JSON
        return json.dumps(obj, **options).encode("ascii")
    except ValueError as exc:  # NaN or infinity in a plain float: refuse, never write invalid JSON
        raise ModelError(f"the response would hold a non-finite number ({exc}); refusing to write invalid JSON") from None


def _plain(value):
    """numpy values for ``json.dumps``: the numbers orjson would print (float32's shortest form)."""
    if isinstance(value, (np.ndarray, np.generic)):
        return orjson.loads(orjson.dumps(value, option=_ORJSON))
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _write_jina(request: EmbedRequest, result: EmbedResult, model: str, default_task: str) -> bytes:
    rows = _encoded_rows(result)
    ids = result.ids or request.ids
    data = []
    for i, row in enumerate(rows):
        item = {"index": i}
        if ids is not None and ids[i] is not None:
            item["id"] = ids[i]
        item["embedding"] = row
        data.append(item)
    return _dumps(
        {
            "data": data,
            "usage": {"total_tokens": result.total_tokens},
            "model": model,
            "parameters": {
                "task": request.task or default_task,
                "dimensions": int(np.shape(result.embeddings)[1]),
                "embedding_type": result.encoding,
                "late_chunking": request.late_chunking,
            },
        }
    )


def _write_openai(request: EmbedRequest, result: EmbedResult, model: str, default_task: str) -> bytes:
    data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(_encoded_rows(result))]
    tokens = result.total_tokens
    return _dumps(
        {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    )


def _write_tei(request: EmbedRequest, result: EmbedResult, model: str, default_task: str) -> bytes:
    return _dumps(_encoded_rows(result))


def _write_records(records: list, accept: str) -> bytes:
    """records: (index, id, encoded row | JV3Error, tokens)."""
    if accept == CSV:
        return b"".join(_csv_row(index, row) for index, _, row, _ in records)
    return b"\n".join(_dumps(_record(*r)) for r in records) + b"\n"


def _csv_row(index: int, row) -> bytes:
    """One CSV line: a base64 string, or the row's numbers as JSON writes them without the brackets
    (float32's shortest form, which reads back to the same float32; never a comma or a quote inside)."""
    if isinstance(row, JV3Error):
        raise InvalidRequest(
            f"record {index} failed ({row.message}); text/csv output has no place for an error record, "
            f"ask for application/jsonlines",
            field=f"line {index + 1}",
        )
    if isinstance(row, str):
        return row.encode("ascii") + b"\n"  # base64: letters, digits, + / =, nothing CSV must quote
    return orjson.dumps(row, option=_ORJSON)[1:-1] + b"\n"


def _record(index: int, record_id, row, tokens) -> dict:
    """One output record: its embedding, or its error in its place."""
    if isinstance(row, JV3Error):
        return {"id": record_id, "index": index, "error": row.to_dict()["error"]}
    record = {"id": record_id, "index": index, "embedding": row}
    if tokens is not None:
        record["tokens"] = tokens
    return record
