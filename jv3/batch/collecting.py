"""Stage 4 of a batch run: read every part's ``<part>.out`` back into one array aligned with the
corpus (``collect``), with error records listed and parts without complete output named."""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .. import aws
from ..errors import BatchJobError, ProtocolError
from ..lines import decode_lines, dumps_line
from ..wire import decode_embedding, output_dtype
from .files import atomic_write
from .manifest import Manifest, Part


@dataclass
class RecordError:
    position: int  # 0-based record position in the corpus
    id: object
    message: str
    type: str | None = None


@dataclass
class BatchResult:
    """Rows aligned with the corpus. Rows of failed records are NaN (float) or 0 (binary), and
    ``valid`` is False there; ``missing_parts`` lists parts with no or incomplete output."""

    embeddings: np.ndarray
    ids: list
    valid: np.ndarray
    errors: list[RecordError]
    missing_parts: list[str]

    @property
    def complete(self) -> bool:
        return not self.errors and not self.missing_parts

    def save(self, directory: str | os.PathLike) -> list[Path]:
        """``embeddings.npy``, ``ids.json`` and ``errors.jsonl`` under ``directory``, each written atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, self.embeddings)
        written = [
            atomic_write(directory / "embeddings.npy", [buffer.getvalue()]),
            atomic_write(directory / "ids.json", [json.dumps(self.ids).encode()]),
            atomic_write(
                directory / "errors.jsonl",
                (dumps_line(asdict(e)).encode() + b"\n" for e in self.errors),
            ),
        ]
        return written


def parse_output_lines(lines: Sequence[str], embedding_type: str, first: int = 0):
    """``(ids, rows, errors)`` of JSON Lines output records; ``rows[i]`` is None for an error record."""
    ids: list = []
    rows: list[np.ndarray | None] = []
    errors: list[RecordError] = []
    for offset, line in enumerate(lines):
        position = first + offset
        try:
            record = json.loads(line)
        except ValueError:
            record = {"error": {"message": f"output line is not JSON: {line[:80]!r}", "type": "protocol_error"}}
        if not isinstance(record, dict):
            record = {"error": {"message": f"output line is not an object: {line[:80]!r}", "type": "protocol_error"}}
        ids.append(record.get("id"))
        if "error" in record or "embedding" not in record:
            error = record.get("error")
            if not isinstance(error, dict):
                error = {"message": f"record has neither embedding nor error object: {line[:80]!r}"}
            errors.append(RecordError(position, record.get("id"), str(error.get("message")), error.get("type")))
            rows.append(None)
            continue
        try:
            rows.append(decode_embedding(record["embedding"], embedding_type))
        except ProtocolError as exc:  # NaN, a wrong type: an error of this record, not a silent row
            errors.append(RecordError(position, record.get("id"), str(exc), "bad_response"))
            rows.append(None)
    return ids, rows, errors


def part_records(manifest: Manifest, part: Part, lines: Sequence[str]):
    """``parse_output_lines`` of ``part``'s output, with the records the client withheld (a blank
    line, a skipped oversized record: ``screening``) reported with the client's message, not the
    container's answer to their placeholders. Returns ``(ids, rows, errors, final)``: ``final`` are the
    errors of withheld records, which no re-run can change."""
    ids, rows, errors = parse_output_lines(lines, manifest.embedding_type, part.first)
    final = []
    for k, error in enumerate(errors):
        withheld = manifest.withheld.get(str(error.position))
        if withheld is not None:
            errors[k] = RecordError(error.position, error.id, withheld["message"], withheld["type"])
            final.append(errors[k])
    return ids, rows, errors, final


def read_part_output(manifest: Manifest, part: Part, s3) -> list[str] | None:
    """The lines of ``part``'s output (by the one line rule), or None when it has none yet."""
    uri = manifest.output_part_uri(part)
    body = aws.read_s3_object(s3, uri)
    if body is None:
        return None
    try:
        return decode_lines(body, what=uri)
    except ValueError as exc:
        raise BatchJobError(str(exc)) from None


def collect(manifest: Manifest, *, s3, progress: bool = False) -> BatchResult:
    """Read every part's ``.out`` into one array aligned with the corpus."""
    n = manifest.records
    ids: list = [None] * n
    rows: list[np.ndarray | None] = [None] * n
    errors: list[RecordError] = []
    missing: list[str] = []
    for part in tqdm(manifest.parts, unit="part", desc="collecting", disable=not progress, file=sys.stderr):
        lines = read_part_output(manifest, part, s3)
        if lines is None or len(lines) != part.records:
            missing.append(part.name)
            continue
        part_ids, part_rows, part_errors, _ = part_records(manifest, part, lines)
        ids[part.first : part.first + part.records] = part_ids
        rows[part.first : part.first + part.records] = part_rows
        errors.extend(part_errors)
    return assemble(rows, ids, errors, missing, manifest.embedding_type)


def assemble(rows, ids, errors, missing, embedding_type: str) -> BatchResult:
    valid = np.array([r is not None for r in rows], dtype=bool)
    present = [r for r in rows if r is not None]
    widths = {r.shape for r in present}
    if len(widths) > 1:
        raise BatchJobError(f"outputs hold embeddings of different shapes {sorted(widths)}")
    width = present[0].shape[0] if present else 0
    dtype = output_dtype(embedding_type)
    matrix = np.full((len(rows), width), np.nan if dtype.kind == "f" else 0, dtype=dtype)
    if present:
        matrix[valid] = np.stack(present)
    return BatchResult(matrix, ids, valid, errors, missing)
