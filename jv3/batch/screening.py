"""Every record checked before any is sent: blank lines, and records too large for one mini-batch.

A transform job sends each mini-batch whole. One record over ``MaxPayloadInMB`` (or over the
container's request limit) fails the job when its mini-batch comes up, after the work on every record
before it; a mini-batch of only blank lines is a 400 that fails the job as well. ``screen`` reads
every record first:

- a blank line (empty or whitespace only) is withheld: the client answers it with an error record in
  its place (``invalid_request``, 400), the same record wherever the line is; it is never sent;
- a record over the limit (its bytes as a JSON Lines line, newline included) refuses the whole
  corpus with ``OversizedRecord``, naming its line and size, before any work: that is the default,
  so that no record is lost silently. With ``skip_oversized`` it is withheld like a blank line, as a
  ``payload_too_large`` (413) error record in its place.

``batch local`` never sends a withheld record. ``batch submit`` stages it as a small placeholder
(``Withheld.placeholder``) that the container answers with an error record in place, and ``collect``
reports the client's message for it (``Manifest.withheld``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..errors import InvalidArgument
from ..lines import dumps_line
from .jobs import CONTAINER_MAX_PAYLOAD_MB
from .manifest import MiB

# What the container refuses by default (JV3_MAX_REQUEST_BYTES): no mini-batch may be larger.
CONTAINER_MAX_REQUEST_BYTES = CONTAINER_MAX_PAYLOAD_MB * MiB
BLANK, OVERSIZED = "blank", "oversized"
_ERRORS = {BLANK: ("invalid_request", 400), OVERSIZED: ("payload_too_large", 413)}


class OversizedRecord(InvalidArgument):
    """A record larger than one mini-batch may be; found before anything was sent."""

    def __init__(self, message: str, *, line: int, size: int, limit: int):
        super().__init__(message)
        self.line, self.size, self.limit = line, size, limit


@dataclass(frozen=True)
class Limit:
    """The largest record, in bytes of its JSON Lines line (newline included), and what sets it."""

    bytes: int
    why: str


def record_limit(max_payload_mb: float, server_max_bytes: int = CONTAINER_MAX_REQUEST_BYTES) -> Limit:
    """A record must fit one mini-batch: ``MaxPayloadInMB`` and the container's request limit."""
    payload = int(max_payload_mb * MiB)
    if payload <= server_max_bytes:
        return Limit(payload, f"MaxPayloadInMB {max_payload_mb:g}")
    return Limit(server_max_bytes, f"the container's request limit, JV3_MAX_REQUEST_BYTES {server_max_bytes:,}")


def job_limit(payload_mb: float | None = None) -> Limit:
    """The limit of a transform job's records: its ``MaxPayloadInMB``, or when that is sized from the
    corpus (``jobs.max_payload_mb``), the largest it can be."""
    if payload_mb is not None:
        return record_limit(payload_mb)
    return Limit(
        CONTAINER_MAX_REQUEST_BYTES,
        f"the container's request limit, {CONTAINER_MAX_PAYLOAD_MB} MB, the largest MaxPayloadInMB a job can have",
    )


def server_max_request_bytes(environ: Mapping[str, str] = os.environ) -> int:
    """The request limit of a local endpoint started with ``environ`` (it reads JV3_MAX_REQUEST_BYTES)."""
    try:
        return int(environ.get("JV3_MAX_REQUEST_BYTES") or CONTAINER_MAX_REQUEST_BYTES)
    except ValueError:
        return CONTAINER_MAX_REQUEST_BYTES  # the server refuses to start and says why


@dataclass(frozen=True)
class Withheld:
    """A record the client answers itself: never sent, an error record in its place."""

    position: int  # 0-based record position in the corpus
    line: int  # 1-based line of the corpus file
    id: object
    kind: str  # BLANK or OVERSIZED
    message: str

    @property
    def type(self) -> str:
        return _ERRORS[self.kind][0]

    def error(self) -> dict:
        error_type, code = _ERRORS[self.kind]
        return {"type": error_type, "message": self.message, "code": code, "field": f"line {self.line}"}

    def output_line(self) -> str:
        """Its error record, as an output line of docs/wire-format.md (``index``: its corpus position)."""
        return dumps_line({"id": self.id, "index": self.position, "error": self.error()})

    def placeholder(self) -> str:
        """What is staged in its place: a record without ``text``, which the container answers with an
        error record in place (never a blank line, never a body over the limit)."""
        return dumps_line({"id": self.id, "jv3_withheld": self.kind})

    def to_json(self) -> dict:
        return {"line": self.line, "kind": self.kind, "type": self.type, "message": self.message}


def screen(
    records: Iterable[tuple[int, str]],
    *,
    limit: Limit,
    skip_oversized: bool = False,
    source: str = "the corpus",
) -> dict[int, Withheld]:
    """The records to withhold, by corpus position, from ``(line, record)`` pairs (``corpus_records``);
    raises ``OversizedRecord`` for the first record over ``limit`` unless ``skip_oversized``."""
    withheld: dict[int, Withheld] = {}
    oversized: list[tuple[int, int]] = []  # (line, size) when refusing
    for position, (line, record) in enumerate(records):
        if not record.strip():
            message = f'line {line} of {source} is blank; every line must hold one record (send "" to embed an empty text)'
            withheld[position] = Withheld(position, line, position, BLANK, message)
            continue
        size = len(record.encode("utf-8")) + 1
        if size <= limit.bytes:
            continue
        if not skip_oversized:
            oversized.append((line, size))
            continue
        message = (
            f"line {line} of {source} is a record of {size:,} bytes, over the {limit.bytes:,}-byte limit of a "
            f"mini-batch ({limit.why}); skipped, not sent"
        )
        withheld[position] = Withheld(position, line, _record_id(record, position), OVERSIZED, message)
    if oversized:
        (line, size), more = oversized[0], oversized[1:]
        also = f"; {len(more):,} more record(s) are over it, the next on line {more[0][0]}" if more else ""
        raise OversizedRecord(
            f"line {line} of {source} is a record of {size:,} bytes, over the {limit.bytes:,}-byte limit of a "
            f"mini-batch ({limit.why}){also}. Nothing was sent: shorten or remove it, or skip oversized records "
            f"(--skip-oversized) to write an error record in each one's place",
            line=line,
            size=size,
            limit=limit.bytes,
        )
    return withheld


def _record_id(record: str, position: int) -> object:
    """The id a record carries, else its position (as ``corpus_lines`` gives records without one)."""
    try:
        parsed = json.loads(record)
    except ValueError:
        return position
    return parsed.get("id", position) if isinstance(parsed, dict) else position
