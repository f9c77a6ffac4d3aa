"""Stage 1 of a batch run: read a local corpus as JSON Lines records and stage it on S3.

``corpus_lines`` reads a local file (JSON Lines ``{"text", "id"?}``, CSV with a text column, or plain
text, one document a line) as JSON Lines records with ids (missing ids become the record's 0-based
position); ``corpus_records`` also gives the line of the file each record comes from. A JSON Lines
line that does not parse is passed on as it is, so the endpoint answers it with an error record and
every output line still matches its input line. A blank line (JSON Lines or plain text) is passed
on blank: the one rule of docs/wire-format.md makes it an error record in its place, never an empty
text (``screening`` answers it without sending it). Lines end at ``\n`` only (``jv3.lines``): a
form feed, U+2028 or a lone ``\r`` inside a text or an id is part of it, never a record boundary,
here and when outputs are read back.

``stage_corpus`` first checks every record (``screening``): one over the size a mini-batch may have
refuses the corpus before anything is uploaded, unless ``skip_oversized``. It then writes the lines
to S3 as part files ``<run>/parts/part-00000.jsonl`` … and a ``<run>/manifest.json`` that remembers
the parts, their record counts, the job's parameters and the records the client answers itself
(blank or skipped oversized ones): those are staged as small placeholders the container answers with
an error record in place, so no mini-batch is ever blank or too large, and ``collect`` reports them
with the client's message.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from .. import aws
from ..errors import InvalidArgument
from ..lines import dumps_line, iter_lines
from .manifest import JSONLINES, RUN_PREFIX, Manifest, Part, job_environment
from .screening import Limit, job_limit, screen


def corpus_format(path: Path, fmt: str | None = None) -> str:
    if fmt:
        if fmt not in ("jsonl", "csv", "text"):
            raise InvalidArgument(f"unknown corpus format {fmt!r}; expected one of jsonl, csv, text")
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    return "text"


def corpus_lines(
    path: str | os.PathLike,
    *,
    fmt: str | None = None,
    text_column: str = "text",
    id_column: str = "id",
) -> Iterator[str]:
    """One JSON Lines record per document, without the newline; see the module doc."""
    for _, record in corpus_records(path, fmt=fmt, text_column=text_column, id_column=id_column):
        yield record


def corpus_records(
    path: str | os.PathLike,
    *,
    fmt: str | None = None,
    text_column: str = "text",
    id_column: str = "id",
) -> Iterator[tuple[int, str]]:
    """``(line, record)``: ``corpus_lines`` with the 1-based line of the file each record is on (for
    CSV, the line its row ends on)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgument(f"input file {str(path)!r} does not exist")
    kind = corpus_format(path, fmt)
    # newline="\n": lines end at \n only (a lone \r stays in its text); the csv module does its own
    with path.open(encoding="utf-8-sig", newline="" if kind == "csv" else "\n") as handle:
        if kind == "jsonl":
            for position, line in enumerate(iter_lines(handle)):
                yield position + 1, _jsonl_record(line, position)
        elif kind == "csv":
            reader = csv.DictReader(handle, dialect="excel-tab" if path.suffix.lower() == ".tsv" else "excel")
            if reader.fieldnames is None or text_column not in reader.fieldnames:
                raise InvalidArgument(
                    f"{path.name} has no {text_column!r} column; columns: {', '.join(reader.fieldnames or [])}"
                )
            for position, row in enumerate(reader):
                record_id = row.get(id_column) if id_column in reader.fieldnames else None
                record = {"text": row[text_column] or "", "id": position if record_id in (None, "") else record_id}
                yield reader.line_num, dumps_line(record)
        else:
            for position, line in enumerate(iter_lines(handle)):
                # a blank line stays blank: an error record in its place, never an empty text
                yield position + 1, dumps_line({"text": line, "id": position}) if line.strip() else line


def _jsonl_record(line: str, position: int) -> str:
    try:
        record = json.loads(line)
    except ValueError:
        return line  # the endpoint answers it with an error record; the line keeps its place
    if isinstance(record, str):
        return dumps_line({"text": record, "id": position})
    if isinstance(record, dict) and "id" not in record:
        return dumps_line({**record, "id": position})
    return dumps_line(record) if isinstance(record, dict) else line


def new_run_name(prefix: str = "jv3") -> str:
    """A transform job name (≤ 63 characters, [a-zA-Z0-9-]) that sorts by time."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{prefix}-{stamp}-{os.urandom(3).hex()}"


def stage_corpus(
    path: str | os.PathLike,
    *,
    input_bucket: str,
    output_bucket: str,
    s3,
    run_name: str | None = None,
    records_per_part: int = 10_000,
    fmt: str | None = None,
    text_column: str = "text",
    id_column: str = "id",
    task: str | None = None,
    dimensions: int | None = None,
    embedding_type: str = "float",
    limit: Limit | None = None,
    skip_oversized: bool = False,
) -> Manifest:
    """Write the corpus as JSON Lines part files under ``s3://input_bucket/jv3-batch/<run>/parts/``;
    ``task``, ``dimensions`` and ``embedding_type`` are the job's ``JV3_DEFAULT_*`` environment.

    Every record is checked first (``screening.screen``) against ``limit``, by default the largest
    ``MaxPayloadInMB`` a job can have (``screening.job_limit``): a record over it raises
    ``OversizedRecord`` before anything is uploaded, unless ``skip_oversized``; blank lines and
    skipped records are staged as placeholders (``Manifest.withheld``)."""
    if records_per_part < 1:
        raise InvalidArgument(f"records_per_part must be at least 1, got {records_per_part}")
    job_environment(task=task, dimensions=dimensions, embedding_type=embedding_type)  # refuse bad values now
    options = {"fmt": fmt, "text_column": text_column, "id_column": id_column}
    limit = limit or job_limit()
    withheld = screen(
        corpus_records(path, **options), limit=limit, skip_oversized=skip_oversized, source=Path(path).name
    )
    run_name = run_name or new_run_name()
    manifest = Manifest(
        run_uri=f"s3://{input_bucket}/{RUN_PREFIX}/{run_name}",
        output_uri=f"s3://{output_bucket}/{RUN_PREFIX}/{run_name}",
        source=Path(path).name,
        parts=[],
        task=task,
        dimensions=dimensions,
        embedding_type=embedding_type,
        withheld={str(position): w.to_json() for position, w in withheld.items()},
    )
    buffer: list[bytes] = []
    first = 0

    def flush() -> None:
        nonlocal first
        if not buffer:
            return
        name = f"part-{len(manifest.parts):05d}.jsonl"
        body = b"".join(buffer)
        part = Part(name, len(buffer), first, len(body), max(len(b) for b in buffer))
        aws.put_s3_object(s3, manifest.part_uri(part), body, JSONLINES)
        manifest.parts.append(part)
        first += len(buffer)
        buffer.clear()

    for position, line in enumerate(corpus_lines(path, **options)):
        if position in withheld:
            line = withheld[position].placeholder()
        buffer.append(line.encode("utf-8") + b"\n")
        if len(buffer) >= records_per_part:
            flush()
    flush()
    if not manifest.parts:
        raise InvalidArgument(f"input file {str(path)!r} holds no records")
    manifest.save(s3)
    return manifest
