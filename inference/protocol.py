"""Wire formats: request bytes → ``EmbedRequest`` objects, ``EmbedResult`` objects → response bytes.

docs/wire-format.md is the contract. One ``Invocation`` sits between the two directions:

    parse_request(body, content_type)  ─▶ Invocation(format, requests)        (reject early: 4xx)
    engine.embed_many(invocation.ok_requests)                                (the engine's part)
    write_response(invocation, results, accept) ─▶ (bytes, media type)

JSON formats (Jina, OpenAI, TEI) carry one request; record formats (JSON Lines, CSV) carry one
request per line, so a bad line becomes an error record on its own line instead of failing the batch.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field

import numpy as np

from .encodings import encode_matrix
from .errors import InvalidRequest, JV3Error, NotAcceptable, UnsupportedMediaType
from .request import EmbedRequest, EmbedResult, _short
from .settings import TASKS

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
# A JSON string (escapes included) or one bracket: what the depth scan needs to see, found in C.
_JSON_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.S)


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
    body: bytes | str, content_type: str | None, *, hidden_size: int, tasks: tuple[str, ...] = TASKS
) -> Invocation:
    """Parse and validate a request body of the given Content-Type.

    Raises ``InvalidRequest`` (or a subclass) for the whole body; for record formats a bad record is
    kept as its error in ``Invocation.requests`` instead. ``hidden_size`` and ``tasks`` are the loaded
    model's, so a bad ``dimensions`` or ``task`` is refused before the request waits for a batch.
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
        return _parse_jsonlines(body, check)
    text = _decode(body)
    if kind == CSV:
        return _parse_csv(text, check)
    if not text.strip():
        raise InvalidRequest("empty request body; expected a JSON object", field="body")
    return _parse_json_object(_loads(text), check)


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


def _loads(text: str, what: str = "body"):
    _check_depth(text, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno} (char {exc.pos})",
            field="body",
        ) from None
    except RecursionError:  # the scan above makes this unreachable; kept as the last line of defence
        raise InvalidRequest(f"{what} is nested too deeply", field="body") from None


def _check_depth(text: str, what: str) -> None:
    """Refuse JSON nested deeper than ``MAX_JSON_DEPTH`` before the parser recurses into it."""
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


def _parse_json_object(obj, check: _Validator) -> Invocation:
    if not isinstance(obj, dict):
        raise InvalidRequest(
            f"expected a JSON object with 'data' (Jina), 'input' (OpenAI) or 'inputs' (TEI), got {type(obj).__name__}",
            field="body",
        )
    if "data" in obj:
        return Invocation("jina", [check(_jina(obj))])
    if "input" in obj:
        return Invocation("openai", [check(_openai(obj))])
    if "inputs" in obj:
        return Invocation("tei", [check(_tei(obj))])
    raise InvalidRequest(
        f"no texts: expected a JSON object with 'data' (Jina), 'input' (OpenAI) or 'inputs' (TEI); "
        f"got keys {sorted(obj)[:8]}",
        field="data",
    )


def _jina(obj: dict) -> EmbedRequest:
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
            texts.append(item["text"])
            ids.append(item.get("id"))
        else:
            texts.append(item)
            ids.append(None)
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidRequest(f"'parameters' must be an object, got {_short(params)}", field="parameters")
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
            late_chunking=params.get("late_chunking", False),
            normalized=params.get("normalized", True),
            truncate=params.get("truncate", True),
            encoding=params.get("embedding_type"),
            ids=ids if any(i is not None for i in ids) else None,
    )


def _openai(obj: dict) -> EmbedRequest:
    encoding = obj.get("encoding_format") or "float"  # OpenAI clients expect float unless they ask
    return EmbedRequest(
        texts=_text_list(obj["input"], "input"),
        task=obj.get("task"),
        dimensions=obj.get("dimensions"),
        encoding=encoding,
    )


def _tei(obj: dict) -> EmbedRequest:
    return EmbedRequest(
        texts=_text_list(obj["inputs"], "inputs"),
        task=obj.get("task"),
        dimensions=obj.get("dimensions"),
        normalized=obj.get("normalize", True),
        truncate=obj.get("truncate", True),
        encoding="float",  # TEI answers plain float arrays
    )


def _text_list(value, name: str) -> list:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise InvalidRequest(f"'{name}' holds token ids; send texts instead", field=name)
        return value
    raise InvalidRequest(f"'{name}' must be a string or a list of strings, got {_short(value)}", field=name)


def _parse_jsonlines(body: bytes | str, check: _Validator) -> Invocation:
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else bytes(body)
    lines = raw.split(b"\n")
    if lines and not lines[-1].strip():
        lines.pop()  # the newline that ends the last record
    if not raw.strip():
        raise InvalidRequest("empty JSON Lines body; expected one record per line", field="body")
    requests, ids, offset = [], [], 0
    for i, line in enumerate(lines):
        record_id = None
        try:
            text = _decode(line.rstrip(b"\r"), offset)
            if not text.strip():
                raise InvalidRequest(f"line {i + 1} is empty; expected a JSON record", field=f"line {i + 1}")
            record = _loads(text, f"line {i + 1}")
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


def _parse_csv(text: str, check: _Validator) -> Invocation:
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise InvalidRequest(f"body is not valid CSV: {exc}", field="body") from None
    first = [c.strip().lower() for c in rows[0]] if rows else []
    if "text" in first:  # a header row
        header = first
        rows.pop(0)
        text_col, id_col = header.index("text"), (header.index("id") if "id" in header else None)
    else:
        text_col, id_col = 0, None
    if not rows:
        raise InvalidRequest("empty CSV body; expected one text per row", field="body")
    requests, ids = [], []
    for row in rows:
        record_id = row[id_col] if id_col is not None and id_col < len(row) else None
        text = row[text_col] if text_col < len(row) else ""
        try:
            requests.append(check(EmbedRequest(texts=[text], ids=[record_id])))
        except JV3Error as err:
            requests.append(err)
        ids.append(record_id)
    return Invocation("csv", requests, meta={"ids": ids})


# ---------------------------------------------------------------------------------------------- writing


def negotiate(accept: str | None, invocation: Invocation | None = None) -> str:
    """The response media type for an Accept header; raises ``NotAcceptable`` when none fits."""
    if not accept:
        return JSONLINES if invocation is not None and invocation.is_records else JSON
    ranges = []
    for position, part in enumerate(accept.split(",")):
        name, _, params = part.partition(";")
        q = re.search(r"q\s*=\s*([0-9.]+)", params)
        ranges.append((-(float(q.group(1)) if q else 1.0), position, name.strip().lower()))
    for neg_q, _, name in sorted(ranges):
        if neg_q == 0:
            continue
        if name in ("*/*", "application/*"):
            return JSONLINES if invocation is not None and invocation.is_records else JSON
        if name == "text/*":
            return CSV
        if name in CONTENT_TYPES:
            chosen = CONTENT_TYPES[name]
            # records answer records: batch transform's default Accept is application/json
            return JSONLINES if chosen == JSON and invocation is not None and invocation.is_records else chosen
    raise NotAcceptable(
        f"cannot answer with {accept!r}; this endpoint writes application/json, application/jsonlines or text/csv",
        field="accept",
    )


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
        records = [
            (i, (request.ids or [None] * len(request.texts))[i], row, result.token_counts[i] if i < len(result.token_counts) else None)
            for i, row in enumerate(_encoded_rows(result))
        ]
        return _write_records(records, accept), accept
    records = []
    for i, result in enumerate(results):
        record_id = invocation.meta["ids"][i]
        if isinstance(result, JV3Error):
            records.append((i, record_id, result, None))
        else:
            records.append((i, record_id, _encoded_rows(result)[0], result.total_tokens))
    return _write_records(records, accept), accept


def error_body(error: JV3Error) -> bytes:
    return json.dumps(error.to_dict(), ensure_ascii=False).encode("utf-8")


def _encoded_rows(result: EmbedResult) -> list:
    encoded = encode_matrix(result.embeddings, result.encoding)
    return encoded if isinstance(encoded, list) else encoded.tolist()


def _dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


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
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        for index, _, row, _ in records:
            if isinstance(row, JV3Error):
                raise InvalidRequest(
                    f"record {index} failed ({row.message}); text/csv output has no place for an error record, "
                    f"ask for application/jsonlines",
                    field=f"line {index + 1}",
                )
            writer.writerow([row] if isinstance(row, str) else [format(v, ".9g") if isinstance(v, float) else v for v in row])
        return out.getvalue().encode("utf-8")
    lines = []
    for index, record_id, row, tokens in records:
        if isinstance(row, JV3Error):
            lines.append(_dumps({"id": record_id, "index": index, "error": row.to_dict()["error"]}))
        else:
            record = {"id": record_id, "index": index, "embedding": row}
            if tokens is not None:
                record["tokens"] = tokens
            lines.append(_dumps(record))
    return b"\n".join(lines) + b"\n"

