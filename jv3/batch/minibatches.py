"""The mini-batches of a rehearsal: sized to fit the endpoint's time as well as its request limit,
split and sent again when one does not fit, never losing a record.

SageMaker's MultiRecord strategy packs as many records as fit ``MaxPayloadInMB``; 2.4 MB of short
texts is 20,000 records, and on a CPU one such mini-batch outlasts the local server's request
timeout (``JV3_REQUEST_TIMEOUT_S``, 60 s): a 503, and nothing written. So ``plan`` caps a mini-batch
by records as well as bytes (``Pacing.max_records``), and ``answer`` splits a mini-batch that the
endpoint answers with 503 (timeout), 507 (memory), 413 or not at all in time into two halves and
sends each again, down to single records; a single record that still fails after
``RETRIES_OF_ONE`` more tries gets an error record in its place. Each split, and each mini-batch that
took more than half the timeout, halves the cap for the mini-batches planned after it.

Records that ``screening`` withheld (blank lines, skipped oversized records) keep their place in a
mini-batch but are never sent: their error records are written by the client, and a mini-batch of
only withheld records is never sent at all.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from ..errors import BatchJobError
from ..lines import dumps_line
from .screening import Withheld

DEFAULT_MAX_RECORDS = 128  # records per request at most: a few seconds of a CPU, well under the 60 s timeout
DEFAULT_REQUEST_TIMEOUT_S = 60.0  # the local server's JV3_REQUEST_TIMEOUT_S
RETRIES_OF_ONE = 2  # more tries of a single record the endpoint could not answer in time
SPLIT_STATUSES = (413, 503, 507)


class Overloaded(BatchJobError):
    """The endpoint could not answer a mini-batch: 503 (no answer within its timeout), 507 (out of
    memory), 413 (over its request limit), or no answer at all within the client's timeout
    (``status`` None). A smaller mini-batch may succeed."""

    def __init__(self, message: str, *, status: int | None, error_type: str | None = None):
        super().__init__(message)
        self.status = status
        self.error_type = error_type


@dataclass
class MiniBatch:
    """A run of consecutive corpus records: ``bytes`` are sent, ``Withheld`` ones answered locally."""

    first: int  # corpus position of its first record
    records: list[bytes | Withheld]

    @property
    def sent(self) -> list[bytes]:
        return [r for r in self.records if isinstance(r, bytes)]


class Pacing:
    """What the mini-batches of one run have learnt: the record cap (it only shrinks), the request
    timeout they must fit, and counts of requests and splits. Shared by the sending threads."""

    def __init__(self, max_records: int = DEFAULT_MAX_RECORDS, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S):
        if max_records < 1:
            raise ValueError(f"max_records must be at least 1, got {max_records}")
        self.max_records = max_records
        self.timeout_s = timeout_s
        self.requests = 0
        self.splits = 0
        self._lock = threading.Lock()

    @property
    def client_timeout_s(self) -> float:
        """How long the client waits for an answer: the server answers 503 at ``timeout_s``."""
        return self.timeout_s + 30.0

    def sent(self) -> None:
        with self._lock:
            self.requests += 1

    def too_slow(self, records: int, *, split: bool) -> None:
        """A mini-batch of ``records`` was split, or took more than half the timeout: later ones get
        at most half as many."""
        with self._lock:
            self.splits += split
            self.max_records = max(1, min(self.max_records, records // 2))


def plan(
    lines: Sequence[bytes],
    withheld: Mapping[int, Withheld],
    max_payload_bytes: int,
    pacing: Pacing,
) -> Iterator[MiniBatch]:
    """Consecutive mini-batches over every record, in order: at most ``max_payload_bytes`` of sent
    records (each with its newline) and at most ``pacing.max_records`` of them, read as each
    mini-batch is planned. Records over ``max_payload_bytes`` must have been withheld (``screening``)."""
    records: list[bytes | Withheld] = []
    size = count = first = 0
    for position, line in enumerate(lines):
        held = withheld.get(position)
        if held is not None:
            records.append(held)
            continue
        record = len(line) + 1
        if record > max_payload_bytes:
            raise BatchJobError(
                f"record {position} is {record:,} bytes, over the {max_payload_bytes:,}-byte mini-batch; "
                "screening.screen withholds or refuses such records before any is sent"
            )
        if count and (size + record > max_payload_bytes or count >= pacing.max_records):
            yield MiniBatch(first, records)
            records, size, count, first = [], 0, 0, position
        records.append(line)
        size += record
        count += 1
    if records:
        yield MiniBatch(first, records)


Post = Callable[..., list[str]]


def answer(url: str, batch: MiniBatch, pacing: Pacing, *, post: Post, notify: Callable[[str], None] | None = None) -> list[str]:
    """One output line per record of ``batch``, in order: the endpoint's answers to the records sent
    (split and sent again as needed), the client's error records for the withheld ones."""
    sent = batch.sent
    positions = [batch.first + k for k, r in enumerate(batch.records) if isinstance(r, bytes)]
    answers = iter(_answer_lines(url, sent, positions, pacing, post, notify or (lambda _: None)) if sent else ())
    return [next(answers) if isinstance(r, bytes) else r.output_line() for r in batch.records]


def _answer_lines(url: str, lines: list[bytes], positions: list[int], pacing: Pacing, post: Post, notify) -> list[str]:
    tries = 0
    while True:
        started = time.monotonic()
        pacing.sent()
        try:
            out = post(url, lines, timeout=pacing.client_timeout_s)
        except Overloaded as exc:
            if len(lines) > 1:
                pacing.too_slow(len(lines), split=True)
                half = len(lines) // 2
                notify(
                    f"a mini-batch of {len(lines):,} records from record {positions[0]:,} was refused ({exc}); "
                    f"sending it again as {half:,} + {len(lines) - half:,} records, and at most "
                    f"{pacing.max_records:,} per request from now on"
                )
                return _answer_lines(url, lines[:half], positions[:half], pacing, post, notify) + _answer_lines(
                    url, lines[half:], positions[half:], pacing, post, notify
                )
            tries += 1
            if tries > RETRIES_OF_ONE or exc.status == 413:
                notify(f"record {positions[0]:,} got no answer in {tries} tries ({exc}); an error record takes its place")
                return [_failed(lines[0], exc, tries)]
            continue
        if time.monotonic() - started > pacing.timeout_s / 2 and len(lines) > 1:
            pacing.too_slow(len(lines), split=False)
        return out


def _failed(line: bytes, exc: Overloaded, tries: int) -> str:
    """The error record of a single record the endpoint could not answer (docs/wire-format.md)."""
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    record_id = record.get("id") if isinstance(record, dict) else None
    error = {
        "type": exc.error_type or "timeout",
        "message": f"no answer after {tries} tries: {exc}",
        "code": exc.status or 503,
    }
    return dumps_line({"id": record_id, "index": 0, "error": error})
