"""The client's side of docs/wire-format.md: validate arguments, build and split request bodies,
decode responses, and turn the runtime's errors into the tree of ``jv3.errors``.

Nothing here does I/O, so every rule of the contract is testable without an endpoint.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import (
    BadResponse,
    CapacityError,
    EndpointError,
    EndpointNotFound,
    EndpointTimeout,
    EndpointUnavailable,
    InvalidArgument,
    InvalidRequestError,
    ModelNotReady,
    RequestTooLarge,
    ServerError,
    ThrottledError,
)

# The endpoint's vocabulary (inference/settings.py holds the same words; the two sides share no code).
TASKS = ("retrieval.query", "retrieval.passage", "separation", "classification", "text-matching")
EMBEDDING_TYPES = ("float", "base64", "binary", "ubinary")
MAX_DIMENSIONS = 1024
# SageMaker refuses real-time request and response bodies over 6 MB; stay under it with a margin.
MAX_REQUEST_BYTES = 6_000_000
MAX_RESPONSE_BYTES = 6_000_000
CONTENT_TYPE = "application/json"
DEFAULT_TASK = "text-matching"
# Bytes of one response item around its embedding: {"index":123456,"id":...,"embedding":...}; a JSON
# Lines record of a transform job also carries "tokens" (``jv3.batch``).
RESPONSE_ITEM_OVERHEAD = 64

_COMMA = 1
_ENVELOPE_SLACK = 16  # "{"data":[" … "]," … "}" beyond the parameters object


@dataclass(frozen=True)
class EmbedParams:
    """Validated parameters of one ``embed`` call; ``to_wire`` is the ``parameters`` object."""

    task: str
    dimensions: int | None
    late_chunking: bool
    normalized: bool
    embedding_type: str
    truncate: bool = True

    def to_wire(self) -> dict:
        params = {
            "task": self.task,
            "late_chunking": self.late_chunking,
            "embedding_type": self.embedding_type,
            "normalized": self.normalized,
            "truncate": self.truncate,
        }
        if self.dimensions is not None:
            params["dimensions"] = self.dimensions
        return params


def validate_params(
    *,
    task: str,
    dimensions: int | None,
    late_chunking: bool,
    normalized: bool,
    embedding_type: str,
    truncate: bool = True,
) -> EmbedParams:
    """Refuse bad arguments with a message naming the value and the valid choices."""
    check_task(task)
    dimensions = check_dimensions(dimensions)
    check_embedding_type(embedding_type)
    for name, value in (("late_chunking", late_chunking), ("normalized", normalized), ("truncate", truncate)):
        if not isinstance(value, bool):
            raise InvalidArgument(f"{name} must be True or False, got {value!r}")
    return EmbedParams(task, dimensions, late_chunking, normalized, embedding_type, truncate)


# The parameters of an ``embed`` call and their defaults (the clients' signatures spell them out too).
EMBED_DEFAULTS: dict[str, Any] = {
    "task": DEFAULT_TASK,
    "dimensions": None,
    "late_chunking": False,
    "normalized": True,
    "embedding_type": "float",
    "truncate": True,
}


def validate_call(
    texts: Sequence[str], parameters: Mapping[str, Any], *, accepted: Collection[str] = tuple(EMBED_DEFAULTS)
) -> tuple[list[str], EmbedParams]:
    """The arguments of one ``embed`` call, checked in this order: the texts (``validate_texts``), the
    ``parameters`` named in ``accepted`` (``validate_params``; those not given take ``EMBED_DEFAULTS``),
    then that there are no others."""
    texts = validate_texts(texts)
    given = {name: value for name, value in parameters.items() if name in accepted}
    params = validate_params(**{**EMBED_DEFAULTS, **given})
    unknown = sorted(parameters.keys() - given.keys())
    if unknown:
        raise InvalidArgument(f"unknown parameter(s) {unknown}")
    return texts, params


def check_task(task: str) -> str:
    if task not in TASKS:
        raise InvalidArgument(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return task


def check_dimensions(dimensions: int | None) -> int | None:
    """``dimensions`` as an int (None stays None), or ``InvalidArgument`` naming the valid range."""
    if dimensions is None:
        return None
    if isinstance(dimensions, bool) or not isinstance(dimensions, (int, np.integer)):
        raise InvalidArgument(f"dimensions must be an integer from 1 to {MAX_DIMENSIONS}, got {dimensions!r}")
    if not 1 <= dimensions <= MAX_DIMENSIONS:
        raise InvalidArgument(f"dimensions {dimensions} is out of range; expected 1 to {MAX_DIMENSIONS}")
    return int(dimensions)


def check_embedding_type(embedding_type: str) -> str:
    if embedding_type not in EMBEDDING_TYPES:
        raise InvalidArgument(
            f"unknown embedding_type {embedding_type!r}; expected one of {', '.join(EMBEDDING_TYPES)}"
        )
    return embedding_type


def validate_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise InvalidArgument("texts must be a list of strings, got a single string; wrap it in a list")
    try:
        texts = list(texts)
    except TypeError:
        raise InvalidArgument(f"texts must be a list of strings, got {type(texts).__name__}") from None
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidArgument(f"text {i} is {type(text).__name__} {_short(text)}, expected a string")
    return texts


def dumps(obj) -> bytes:
    """The exact bytes sent: compact JSON, UTF-8 (not \\u-escaped, so sizes are what they look)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def item_bytes(text: str) -> int:
    """Size of one ``data`` item as ``dumps`` writes it."""
    return len(dumps({"text": text}))


def request_body(texts: Sequence[str], params: EmbedParams) -> bytes:
    return dumps({"data": [{"text": t} for t in texts], "parameters": params.to_wire()})


def response_bytes_per_item(
    dimensions: int | None, embedding_type: str, *, overhead: int = RESPONSE_ITEM_OVERHEAD
) -> int:
    """A generous estimate of one response item (a ``data`` item, or a transform job's JSON Lines
    record with a larger ``overhead``). The container's float formatting is its own business, so
    assume the longest float32 repr: ~24 characters with sign, exponent and comma."""
    d = dimensions or MAX_DIMENSIONS
    if embedding_type == "float":
        return overhead + 24 * d
    if embedding_type == "base64":
        return overhead + 4 * math.ceil(4 * d / 3)
    return overhead + 5 * math.ceil(d / 8)  # "-128,"


def plan_requests(
    texts: Sequence[str],
    params: EmbedParams,
    *,
    max_batch_size: int,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    max_response_bytes: int = MAX_RESPONSE_BYTES,
) -> list[tuple[int, int]]:
    """Split ``texts`` into ``[start, stop)`` ranges, in order, whose request bodies stay within
    ``max_request_bytes`` (measured on the encoded JSON), whose expected responses stay within
    ``max_response_bytes``, and which hold at most ``max_batch_size`` texts.

    Late chunking embeds the texts as chunks of one document, so they always go in one request;
    a document over the limit is refused rather than split.
    """
    overhead = len(dumps({"data": [], "parameters": params.to_wire()})) + _ENVELOPE_SLACK
    sizes = [item_bytes(t) for t in texts]
    if params.late_chunking:
        total = overhead + sum(sizes) + _COMMA * max(len(sizes) - 1, 0)
        if total > max_request_bytes:
            raise RequestTooLarge(
                f"late chunking sends all {len(texts)} chunks of a document in one request, and this one "
                f"would be {total:,} bytes; the limit is {max_request_bytes:,}. Embed fewer or shorter "
                "chunks per call (one document per call)"
            )
        return [(0, len(texts))] if texts else []
    per_response = max(1, (max_response_bytes - 256) // response_bytes_per_item(params.dimensions, params.embedding_type))
    limit = max(1, min(max_batch_size, per_response))
    ranges: list[tuple[int, int]] = []
    start, used = 0, overhead
    for i, size in enumerate(sizes):
        if overhead + size > max_request_bytes:
            raise RequestTooLarge(
                f"text {i} alone makes a {overhead + size:,}-byte request; the limit is "
                f"{max_request_bytes:,} bytes. Split the text (or use batch transform)"
            )
        extra = size + (_COMMA if i > start else 0)
        if i > start and (used + extra > max_request_bytes or i - start >= limit):
            ranges.append((start, i))
            start, used, extra = i, overhead, size
        used += extra
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


_INTEGER_RANGE = {"binary": (-128, 127), "ubinary": (0, 255)}


def decode_embedding(value, embedding_type: str) -> np.ndarray:
    """One ``embedding`` value of a response as a 1-d array: float32 for float and base64 (base64 is
    only a compact transport for the same float32 numbers), int8 for binary, uint8 for ubinary.

    Refused with ``BadResponse`` rather than coerced: anything but a flat list of numbers (strings,
    booleans, nulls, nested lists), an empty vector, NaN or infinity, base64 that is not whole
    float32 values, and binary numbers that are not integers of the type's range.
    """
    if embedding_type == "base64":
        if not isinstance(value, str):
            raise BadResponse(f"a base64 embedding must be a string, got {type(value).__name__} {_short(value)}")
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadResponse(f"a base64 embedding does not decode: {exc}") from None
        if len(raw) % 4:
            raise BadResponse(f"a base64 embedding holds {len(raw)} bytes, not a whole number of float32 values")
        array = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    else:
        check_embedding_type(embedding_type)  # base64 is handled above
        if not isinstance(value, list):
            raise BadResponse(f"a {embedding_type} embedding must be a list of numbers, got {type(value).__name__} {_short(value)}")
        try:
            numbers = np.asarray(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise BadResponse(f"a {embedding_type} embedding is not a flat list of numbers: {exc}") from None
        if numbers.ndim != 1 or (numbers.size and numbers.dtype.kind not in "iuf"):
            raise BadResponse(f"a {embedding_type} embedding is not a flat list of numbers: {_short(value)}")
        if embedding_type == "float":
            with np.errstate(over="ignore"):  # a number beyond float32 becomes inf, refused below
                array = numbers.astype(np.float32)
        else:
            low, high = _INTEGER_RANGE[embedding_type]
            if numbers.size and numbers.dtype.kind == "f":
                raise BadResponse(f"a {embedding_type} embedding must hold integers, got {_short(value)}")
            if numbers.size and (numbers.min() < low or numbers.max() > high):
                bad = numbers[(numbers < low) | (numbers > high)][0]
                raise BadResponse(f"a {embedding_type} embedding holds {bad}, outside {low}..{high}")
            array = numbers.astype(output_dtype(embedding_type))
    if array.size == 0:
        raise BadResponse(f"a {embedding_type} embedding is empty")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        at = int(np.flatnonzero(~np.isfinite(array))[0])
        raise BadResponse(f"a {embedding_type} embedding holds {array[at]} at position {at}; vectors must be finite")
    return array


def parse_response(
    body: bytes, *, expected: int, embedding_type: str, dimensions: int | None = None
) -> np.ndarray:
    """The ``(expected, d)`` matrix of a Jina-format response, rows in request order.

    Nothing wrong is returned: ``BadResponse`` (naming the fault) unless the response holds exactly
    ``expected`` items; each carries an ``index`` and the indices are a permutation of
    ``0..expected-1`` (rows are put in that order), or none does (rows stay in response order);
    every embedding decodes (``decode_embedding``: finite, numbers of the right type) and has the
    width ``dimensions`` asks for (``output_width``), or, without ``dimensions``, all the same width.
    """
    try:
        payload = json.loads(body)
    except (ValueError, TypeError) as exc:
        raise BadResponse(f"response is not a JSON object with a 'data' list: {exc}") from None
    items = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(items, list):
        raise BadResponse(f"response is not a JSON object with a 'data' list: {_short(payload)}")
    if len(items) != expected:
        raise BadResponse(f"asked for {expected} embeddings, response carries {len(items)}")
    for position, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadResponse(f"response item {position} is {type(item).__name__} {_short(item)}, expected an object")
        if "embedding" not in item:
            raise BadResponse(f"response item {position} has no 'embedding'")
    order = _response_order(items)
    width = output_width(dimensions, embedding_type) or None
    rows: list[np.ndarray] = [None] * expected  # type: ignore[list-item]
    for position, item in enumerate(items):
        try:
            row = decode_embedding(item["embedding"], embedding_type)
        except BadResponse as exc:
            raise BadResponse(f"response item {position}: {exc.message}") from None
        if width is not None and row.shape[0] != width:
            raise BadResponse(
                f"response item {position} has {row.shape[0]} {embedding_type} values; dimensions={dimensions} "
                f"asks for {width}"
            )
        rows[order[position]] = row
    return stack_rows(rows)


def _response_order(items: Sequence[dict]) -> list[int]:
    """Where each response item goes: its ``index`` when every item has one, else its position."""
    has_index = ["index" in item for item in items]
    if not any(has_index):
        return list(range(len(items)))
    if not all(has_index):
        missing = has_index.index(False)
        raise BadResponse(f"response item {missing} has no 'index' while other items have one")
    seen: dict[int, int] = {}
    for position, item in enumerate(items):
        index = item["index"]
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(items):
            raise BadResponse(
                f"response item {position} has index {_short(index)}; expected an integer from 0 to {len(items) - 1}"
            )
        if index in seen:
            raise BadResponse(
                f"response items {seen[index]} and {position} have the same index {index} (a duplicate): "
                "the indices are not a permutation"
            )
        seen[index] = position
    return [item["index"] for item in items]


def stack_rows(rows: Sequence[np.ndarray]) -> np.ndarray:
    widths = {row.shape for row in rows}
    if len(widths) > 1:
        raise BadResponse(f"embeddings of different shapes in one response: {sorted(widths)}")
    return np.stack(rows)


def output_dtype(embedding_type: str) -> np.dtype:
    return np.dtype({"float": np.float32, "base64": np.float32, "binary": np.int8, "ubinary": np.uint8}[embedding_type])


def no_vectors(dimensions: int | None, embedding_type: str) -> np.ndarray:
    """The result of embedding no texts: shape (0, d), the dtype of ``embedding_type``."""
    return np.empty((0, output_width(dimensions, embedding_type)), dtype=output_dtype(embedding_type))


def output_width(dimensions: int | None, embedding_type: str) -> int:
    """Columns of the result when it is known up front (0 when the endpoint decides)."""
    if dimensions is None:
        return 0
    return math.ceil(dimensions / 8) if embedding_type in ("binary", "ubinary") else dimensions


# ---- errors -------------------------------------------------------------------------------------

_BY_STATUS: dict[int, type[EndpointError]] = {503: EndpointUnavailable, 507: CapacityError, 500: ServerError}


def parse_error_body(raw) -> tuple[str, str | None, str | None]:
    """(message, type, field) from an ``{"error": {...}}`` body, or the raw text when it is not one."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw or "")
    try:
        error = json.loads(text)["error"]
        return str(error["message"]), error.get("type"), error.get("field")
    except (ValueError, TypeError, KeyError):
        return text.strip() or "(no message)", None, None


def error_from_botocore(exc) -> EndpointError:
    """Map a ``botocore.exceptions.ClientError`` of ``invoke_endpoint*`` to the client's tree."""
    response = getattr(exc, "response", {}) or {}
    error = response.get("Error", {})
    code = error.get("Code", "")
    http_status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code == "ModelError":
        status = response.get("OriginalStatusCode")
        status = int(status) if status is not None else None
        message, error_type, field = parse_error_body(response.get("OriginalMessage", error.get("Message", "")))
        said = f"{message} {error.get('Message', '')}".lower()
        if error_type == "timeout" or (status in (None, 0, 503, 504) and "timed out" in said):
            cls = EndpointTimeout  # the container's 503 timeout, or the runtime's "invocation timed out"
        elif status is not None and 400 <= status < 500:
            cls = InvalidRequestError
        else:
            cls = _BY_STATUS.get(status, ServerError)
        return cls(
            message, status=status, error_type=error_type, field=field, log_stream_arn=response.get("LogStreamArn")
        )
    message = error.get("Message", str(exc))
    if code in ("ThrottlingException", "Throttling", "TooManyRequestsException"):
        return ThrottledError(message, status=http_status, error_type=code)
    if code == "ModelNotReadyException":
        return ModelNotReady(message, status=http_status, error_type=code)
    if code in ("ServiceUnavailable", "ServiceUnavailableException") or http_status == 503:
        return EndpointUnavailable(message, status=http_status, error_type=code)
    if code == "ValidationError" and "not found" in message.lower():
        return EndpointNotFound(message, status=http_status, error_type=code)
    if code in ("InternalFailure", "InternalServerError") or (http_status or 0) >= 500:
        return ServerError(message, status=http_status, error_type=code)
    if http_status is not None and 400 <= http_status < 500:
        return InvalidRequestError(message, status=http_status, error_type=code)
    return EndpointError(message, status=http_status, error_type=code or None)


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
