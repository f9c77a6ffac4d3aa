"""Batch transform over S3 corpora, and a local rehearsal of the same job.

The story of one corpus:

1. ``corpus_lines`` reads a local file (JSON Lines ``{"text", "id"?}``, CSV with a text column, or
   plain text, one document a line) as JSON Lines records with ids (missing ids become the record's
   0-based position). A JSON Lines line that does not parse is passed on as it is, so the endpoint
   answers it with an error record and every output line still matches its input line. Lines end at
   ``\n`` only (``client.lines``): a form feed, U+2028 or a lone ``\r`` inside a text or an id is
   part of it, never a record boundary, here and when outputs are read back.
2. ``stage_corpus`` writes those lines to S3 as part files ``<run>/parts/part-00000.jsonl`` … and a
   ``<run>/manifest.json`` that remembers the parts, their record counts and the job's settings.
3. ``submit`` creates the transform job (SplitType Line, BatchStrategy MultiRecord, JSON Lines in and
   out, AssembleWith Line), with ``MaxPayloadInMB`` sized by ``max_payload_mb`` so that a mini-batch's
   request fits the container and its response stays moderate.
4. ``wait`` polls the job, showing how many parts have outputs; ``collect`` reads every
   ``<part>.out`` back into one array aligned with the input, listing error records;
   ``failed_parts`` + ``submit(..., parts=...)`` re-run only the parts without complete outputs
   (through a SageMaker manifest file, so outputs land where the first job put them).

``run_local`` rehearses steps 3–4 against ``python -m inference.serve``: the same lines, split into
MultiRecord payloads the way SageMaker splits them, one ``<input-name>.out`` written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import botocore.exceptions
import numpy as np
from tqdm.auto import tqdm

from . import aws
from .errors import BatchJobError, InvalidArgument, ProtocolError, WaitTimeout
from .lines import decode_lines, dumps_line, iter_lines
from .wire import EMBEDDING_TYPES, MAX_DIMENSIONS, TASKS, decode_embedding, output_dtype

JSONLINES = "application/jsonlines"
MiB = 1024 * 1024
# The container refuses bodies over JV3_MAX_REQUEST_BYTES (6 MiB by default), so a mini-batch must too.
CONTAINER_MAX_PAYLOAD_MB = 6
# SageMaker: MaxPayloadInMB × MaxConcurrentTransforms must not exceed 100.
SAGEMAKER_PAYLOAD_BUDGET_MB = 100
RUN_PREFIX = "jv3-batch"

# The infra stack's CloudFormation outputs this client reads (docs/deploy.md, "Stack outputs"):
# the one place that names them. Optional ones may be absent.
STACK_OUTPUTS = {
    "model_name": "BatchModelName",
    "input_bucket": "BatchInputBucket",
    "output_bucket": "BatchOutputBucket",
    "role_arn": "TransformRoleArn",
    "kms_key_arn": "KmsKeyArn",
}
OPTIONAL_STACK_OUTPUTS = ("role_arn", "kms_key_arn")


# ---- 1. reading a corpus ----------------------------------------------------------------------


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
    path = Path(path)
    if not path.is_file():
        raise InvalidArgument(f"input file {str(path)!r} does not exist")
    kind = corpus_format(path, fmt)
    # newline="\n": lines end at \n only (a lone \r stays in its text); the csv module does its own
    with path.open(encoding="utf-8-sig", newline="" if kind == "csv" else "\n") as handle:
        if kind == "jsonl":
            for position, line in enumerate(iter_lines(handle)):
                yield _jsonl_record(line, position)
        elif kind == "csv":
            reader = csv.DictReader(handle, dialect="excel-tab" if path.suffix.lower() == ".tsv" else "excel")
            if reader.fieldnames is None or text_column not in reader.fieldnames:
                raise InvalidArgument(
                    f"{path.name} has no {text_column!r} column; columns: {', '.join(reader.fieldnames or [])}"
                )
            for position, row in enumerate(reader):
                record_id = row.get(id_column) if id_column in reader.fieldnames else None
                yield _dumps({"text": row[text_column] or "", "id": position if record_id in (None, "") else record_id})
        else:
            for position, line in enumerate(iter_lines(handle)):
                yield _dumps({"text": line, "id": position})


def _jsonl_record(line: str, position: int) -> str:
    try:
        record = json.loads(line)
    except ValueError:
        return line  # the endpoint answers it with an error record; the line keeps its place
    if isinstance(record, str):
        return _dumps({"text": record, "id": position})
    if isinstance(record, dict) and "id" not in record:
        return _dumps({**record, "id": position})
    return _dumps(record) if isinstance(record, dict) else line


def _dumps(obj) -> str:
    return dumps_line(obj)


# ---- 2. staging ---------------------------------------------------------------------------------


@dataclass
class Part:
    name: str  # part-00000.jsonl
    records: int
    first: int  # position of its first record in the corpus
    bytes: int
    max_record_bytes: int


@dataclass
class Manifest:
    """What ``stage_corpus`` wrote, and where the job's outputs go; stored as ``<run>/manifest.json``."""

    run_uri: str  # s3://input-bucket/jv3-batch/<run>
    output_uri: str  # s3://output-bucket/jv3-batch/<run>
    source: str
    parts: list[Part]
    task: str | None = None
    dimensions: int | None = None
    embedding_type: str = "float"
    jobs: list[str] = field(default_factory=list)

    @property
    def records(self) -> int:
        return sum(p.records for p in self.parts)

    @property
    def parts_uri(self) -> str:
        return f"{self.run_uri}/parts/"

    @property
    def manifest_uri(self) -> str:
        return f"{self.run_uri}/manifest.json"

    def output_key(self, part: Part) -> tuple[str, str]:
        bucket, prefix = aws.split_s3_uri(self.output_uri)
        return bucket, f"{prefix}/{part.name}.out" if prefix else f"{part.name}.out"

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        data = json.loads(raw)
        data["parts"] = [Part(**p) for p in data["parts"]]
        return cls(**data)

    def save(self, s3) -> None:
        bucket, key = aws.split_s3_uri(self.manifest_uri)
        s3.put_object(Bucket=bucket, Key=key, Body=self.to_json(), ContentType="application/json")

    @classmethod
    def load(cls, run_uri: str, s3) -> Manifest:
        bucket, key = aws.split_s3_uri(run_uri.rstrip("/") + "/manifest.json")
        try:
            return cls.from_json(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        except botocore.exceptions.ClientError as exc:
            raise BatchJobError(f"cannot read the run manifest s3://{bucket}/{key}: {exc}") from exc


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
) -> Manifest:
    """Write the corpus as JSON Lines part files under ``s3://input_bucket/jv3-batch/<run>/parts/``;
    ``task``, ``dimensions`` and ``embedding_type`` are the job's ``JV3_DEFAULT_*`` environment."""
    if records_per_part < 1:
        raise InvalidArgument(f"records_per_part must be at least 1, got {records_per_part}")
    job_environment(task=task, dimensions=dimensions, embedding_type=embedding_type)  # refuse bad values now
    run_name = run_name or new_run_name()
    manifest = Manifest(
        run_uri=f"s3://{input_bucket}/{RUN_PREFIX}/{run_name}",
        output_uri=f"s3://{output_bucket}/{RUN_PREFIX}/{run_name}",
        source=Path(path).name,
        parts=[],
        task=task,
        dimensions=dimensions,
        embedding_type=embedding_type,
    )
    bucket, parts_prefix = aws.split_s3_uri(manifest.parts_uri)
    buffer: list[bytes] = []
    first = 0

    def flush() -> None:
        nonlocal first
        if not buffer:
            return
        name = f"part-{len(manifest.parts):05d}.jsonl"
        body = b"".join(buffer)
        s3.put_object(Bucket=bucket, Key=parts_prefix + name, Body=body, ContentType=JSONLINES)
        manifest.parts.append(Part(name, len(buffer), first, len(body), max(len(b) for b in buffer)))
        first += len(buffer)
        buffer.clear()

    for line in corpus_lines(path, fmt=fmt, text_column=text_column, id_column=id_column):
        buffer.append(line.encode("utf-8") + b"\n")
        if len(buffer) >= records_per_part:
            flush()
    flush()
    if not manifest.parts:
        raise InvalidArgument(f"input file {str(path)!r} holds no records")
    manifest.save(s3)
    return manifest


# ---- 3. the job ---------------------------------------------------------------------------------


def response_bytes_per_record(dimensions: int | None, embedding_type: str) -> int:
    """A generous estimate of one JSON Lines output record."""
    d = dimensions or MAX_DIMENSIONS
    per_record = 96  # {"id":...,"index":...,"tokens":...,"embedding":...}
    if embedding_type == "float":
        return per_record + 24 * d
    if embedding_type == "base64":
        return per_record + 4 * math.ceil(4 * d / 3)
    return per_record + 5 * math.ceil(d / 8)


def max_payload_mb(
    *,
    avg_record_bytes: float,
    max_record_bytes: int,
    dimensions: int | None,
    embedding_type: str,
    response_budget_mb: float = 24,
    container_limit_mb: int = CONTAINER_MAX_PAYLOAD_MB,
) -> int:
    """``MaxPayloadInMB`` for a corpus: big enough for the largest record, small enough that the
    request fits the container (``JV3_MAX_REQUEST_BYTES``) and that the response of a full
    mini-batch (embeddings are far larger than short texts) stays near ``response_budget_mb``."""
    needed = max(1, math.ceil(max_record_bytes / MiB))
    if needed > container_limit_mb:
        raise InvalidArgument(
            f"a record of {max_record_bytes:,} bytes exceeds the container's {container_limit_mb} MB request limit"
        )
    records = response_budget_mb * MiB / response_bytes_per_record(dimensions, embedding_type)
    by_response = math.floor(records * max(avg_record_bytes, 1) / MiB)
    return max(needed, min(container_limit_mb, by_response))


@dataclass
class JobSettings:
    """Where a transform job runs; ``from_stack`` reads them from the infra stack's outputs."""

    model_name: str
    input_bucket: str
    output_bucket: str
    role_arn: str | None = None  # the Model carries the execution role; kept for reference
    kms_key_arn: str | None = None  # encrypts the outputs (TransformOutput.KmsKeyId)
    instance_type: str = "ml.g5.xlarge"
    instance_count: int = 1
    max_concurrent_transforms: int = 1

    @classmethod
    def from_stack(cls, stack_name: str, *, cloudformation, **overrides) -> JobSettings:
        outputs = stack_outputs(stack_name, cloudformation=cloudformation)
        values = {}
        for attribute, output in STACK_OUTPUTS.items():
            if output in outputs:
                values[attribute] = outputs[output]
            elif attribute not in OPTIONAL_STACK_OUTPUTS and overrides.get(attribute) is None:
                raise InvalidArgument(
                    f"stack {stack_name!r} has no output {output!r}; it has {', '.join(sorted(outputs)) or 'none'}"
                )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def stack_outputs(stack_name: str, *, cloudformation) -> dict[str, str]:
    """``{OutputKey: OutputValue}`` of a deployed CloudFormation stack."""
    try:
        stacks = cloudformation.describe_stacks(StackName=stack_name)["Stacks"]
    except botocore.exceptions.ClientError as exc:
        raise InvalidArgument(f"cannot read stack {stack_name!r}: {exc.response['Error'].get('Message', exc)}") from exc
    return {o["OutputKey"]: o["OutputValue"] for o in stacks[0].get("Outputs", [])}


def job_request(
    manifest: Manifest,
    settings: JobSettings,
    *,
    job_name: str,
    parts: Sequence[Part] | None = None,
    manifest_file_uri: str | None = None,
    payload_mb: int | None = None,
) -> dict:
    """The ``CreateTransformJob`` arguments for the whole corpus, or for ``parts`` listed in the
    SageMaker manifest file at ``manifest_file_uri``."""
    chosen = list(parts) if parts is not None else manifest.parts
    total = sum(p.records for p in chosen)
    payload_mb = payload_mb or max_payload_mb(
        avg_record_bytes=sum(p.bytes for p in chosen) / max(total, 1),
        max_record_bytes=max(p.max_record_bytes for p in chosen),
        dimensions=manifest.dimensions,
        embedding_type=manifest.embedding_type,
    )
    concurrency = max(1, min(settings.max_concurrent_transforms, SAGEMAKER_PAYLOAD_BUDGET_MB // payload_mb))
    environment = job_environment(
        task=manifest.task, dimensions=manifest.dimensions, embedding_type=manifest.embedding_type
    )
    data_source = (
        {"S3DataType": "ManifestFile", "S3Uri": manifest_file_uri}
        if manifest_file_uri
        else {"S3DataType": "S3Prefix", "S3Uri": manifest.parts_uri}
    )
    output = {"S3OutputPath": manifest.output_uri + "/", "Accept": JSONLINES, "AssembleWith": "Line"}
    if settings.kms_key_arn:
        output["KmsKeyId"] = settings.kms_key_arn
    return {
        "TransformJobName": job_name,
        "ModelName": settings.model_name,
        "MaxConcurrentTransforms": concurrency,
        "MaxPayloadInMB": payload_mb,
        "BatchStrategy": "MultiRecord",
        "Environment": environment,
        "TransformInput": {
            "DataSource": {"S3DataSource": data_source},
            "ContentType": JSONLINES,
            "CompressionType": "None",
            "SplitType": "Line",
        },
        "TransformOutput": output,
        "TransformResources": {"InstanceType": settings.instance_type, "InstanceCount": settings.instance_count},
    }


def submit(
    manifest: Manifest,
    settings: JobSettings,
    *,
    sagemaker,
    s3,
    parts: Sequence[Part] | None = None,
    job_name: str | None = None,
    payload_mb: int | None = None,
) -> str:
    """Create the transform job; with ``parts``, one that re-runs only those. Returns its name."""
    manifest_file_uri = None
    if parts is not None:
        if not parts:
            raise InvalidArgument("no parts to re-run: every part has complete outputs")
        job_name = job_name or f"{Path(manifest.run_uri).name}-r{len(manifest.jobs)}"[:63]
        # a SageMaker manifest file: a common prefix, then object names relative to it; outputs are
        # named by those relative names, so they overwrite the failed parts' outputs in place
        manifest_file_uri = f"{manifest.run_uri}/{job_name}.manifest"
        bucket, key = aws.split_s3_uri(manifest_file_uri)
        listing = [{"prefix": manifest.parts_uri}, *(p.name for p in parts)]
        s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(listing).encode(), ContentType="application/json")
    job_name = job_name or Path(manifest.run_uri).name
    request = job_request(
        manifest, settings, job_name=job_name, parts=parts, manifest_file_uri=manifest_file_uri, payload_mb=payload_mb
    )
    try:
        sagemaker.create_transform_job(**request)
    except botocore.exceptions.ClientError as exc:
        raise BatchJobError(f"cannot create transform job {job_name!r}: {exc.response['Error'].get('Message', exc)}") from exc
    manifest.jobs.append(job_name)
    manifest.save(s3)
    return job_name


def describe(job_name: str, *, sagemaker) -> dict:
    try:
        return sagemaker.describe_transform_job(TransformJobName=job_name)
    except botocore.exceptions.ClientError as exc:
        raise BatchJobError(f"cannot describe transform job {job_name!r}: {exc.response['Error'].get('Message', exc)}") from exc


def run_uri_of(description: dict) -> str:
    """The run folder (where manifest.json lies) of a job created by ``submit``."""
    uri = description["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"]
    if "/parts" in uri:
        return uri[: uri.rindex("/parts")]
    return uri.rsplit("/", 1)[0]


def manifest_of_job(job_name: str, *, sagemaker, s3) -> Manifest:
    return Manifest.load(run_uri_of(describe(job_name, sagemaker=sagemaker)), s3)


def parts_done(manifest: Manifest, s3) -> int:
    bucket, prefix = aws.split_s3_uri(manifest.output_uri)
    names = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        names.update(obj["Key"].rsplit("/", 1)[-1] for obj in page.get("Contents", []))
    return sum(f"{p.name}.out" in names for p in manifest.parts)


def wait(
    job_name: str,
    *,
    sagemaker,
    s3=None,
    manifest: Manifest | None = None,
    poll_interval: float = 30.0,
    timeout: float = 24 * 3600,
    progress: bool = True,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict:
    """Poll until the job stops; raise ``BatchJobError`` unless it completed. Shows parts with outputs."""
    deadline = clock() + timeout
    total = len(manifest.parts) if manifest else None
    with tqdm(total=total, unit="part", desc=job_name, disable=not progress, file=sys.stderr) as bar:
        while True:
            description = describe(job_name, sagemaker=sagemaker)
            status = description["TransformJobStatus"]
            if manifest is not None and s3 is not None:
                bar.n = parts_done(manifest, s3)
            bar.set_postfix_str(status)
            bar.refresh()
            if status == "Completed":
                return description
            if status in ("Failed", "Stopped"):
                reason = description.get("FailureReason", "no reason given")
                raise BatchJobError(f"transform job {job_name} {status.lower()}: {reason}")
            if clock() >= deadline:
                raise WaitTimeout(f"transform job {job_name} still {status} after {timeout:g} s")
            sleep(poll_interval)


# ---- 4. outputs ---------------------------------------------------------------------------------


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
                (_dumps(asdict(e)).encode() + b"\n" for e in self.errors),
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


def _read_part_output(manifest: Manifest, part: Part, s3) -> list[str] | None:
    bucket, key = manifest.output_key(part)
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return None
        raise
    try:
        return decode_lines(body, what=f"s3://{bucket}/{key}")
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
        lines = _read_part_output(manifest, part, s3)
        if lines is None or len(lines) != part.records:
            missing.append(part.name)
            continue
        part_ids, part_rows, part_errors = parse_output_lines(lines, manifest.embedding_type, part.first)
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


def failed_parts(manifest: Manifest, *, s3) -> list[Part]:
    """Parts whose ``.out`` is missing, has the wrong number of lines, or holds records that
    ``collect`` reports as errors (error records, embeddings that do not decode)."""
    failed = []
    for part in manifest.parts:
        lines = _read_part_output(manifest, part, s3)
        if lines is None or len(lines) != part.records:
            failed.append(part)
        elif parse_output_lines(lines, manifest.embedding_type, part.first)[2]:
            failed.append(part)
    return failed


def _is_error(line: str) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return True
    return not isinstance(record, dict) or "error" in record or "embedding" not in record


# ---- local rehearsal ----------------------------------------------------------------------------


def atomic_write(path: Path, chunks: Iterable[bytes]) -> Path:
    """Write ``chunks`` to a temporary file beside ``path``, then rename it over ``path``: readers
    see the old file or the whole new one, never half of it."""
    path = Path(path)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return path


def multirecord_payloads(lines: Iterable[bytes], max_payload_bytes: int) -> Iterator[list[bytes]]:
    """Group lines into mini-batches as SageMaker's MultiRecord + SplitType Line does: as many whole
    records (each with its newline) as fit in ``MaxPayloadInMB``; a record that alone exceeds it
    fails the job."""
    batch: list[bytes] = []
    size = 0
    for position, line in enumerate(lines):
        record = len(line) + 1
        if record > max_payload_bytes:
            raise BatchJobError(
                f"record {position} is {record:,} bytes, over MaxPayloadInMB ({max_payload_bytes / MiB:g} MB); "
                "SageMaker would fail the job"
            )
        if batch and size + record > max_payload_bytes:
            yield batch
            batch, size = [], 0
        batch.append(line)
        size += record
    if batch:
        yield batch


@dataclass
class LocalRunSummary:
    output: Path
    records: int
    errors: int
    requests: int
    seconds: float

    @property
    def records_per_second(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else float("inf")

    def cost_per_million(self, price_per_hour: float, records_per_second: float | None = None) -> float:
        """Dollars per million documents on an instance costing ``price_per_hour`` that embeds
        ``records_per_second`` (default: the rate measured here)."""
        rate = records_per_second or self.records_per_second
        return price_per_hour / 3600.0 / rate * 1e6

    def lines(self, price_per_hour: float, records_per_second: float | None = None) -> list[str]:
        rate = records_per_second or self.records_per_second
        return [
            f"output:   {self.output}",
            f"records:  {self.records:,} ({self.errors:,} errors) in {self.requests:,} requests",
            f"time:     {self.seconds:.2f} s ({self.records_per_second:,.1f} records/s)",
            f"cost:     ${self.cost_per_million(price_per_hour, rate):,.2f} per million documents at "
            f"${price_per_hour:g}/h and {rate:,.1f} records/s",
        ]


def post_records(url: str, lines: Sequence[bytes], *, timeout: float = 600.0) -> list[str]:
    """POST one MultiRecord payload to ``/invocations``; returns exactly one output line per record."""
    body = b"\n".join(lines) + b"\n"
    request = urllib.request.Request(
        f"{url}/invocations",
        data=body,
        method="POST",
        headers={"Content-Type": JSONLINES, "Accept": JSONLINES},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:500]
        raise BatchJobError(f"the endpoint refused a {len(body):,}-byte mini-batch with {exc.code}: {detail}") from exc
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise BatchJobError(f"cannot reach the endpoint at {url}: {exc}") from exc
    out = _response_lines(raw)
    if len(out) != len(lines):
        raise BatchJobError(f"the endpoint answered {len(lines)} records with {len(out)} lines")
    return out


def _response_lines(raw: bytes) -> list[str]:
    try:
        return decode_lines(raw, what="the endpoint's JSON Lines response")
    except ValueError as exc:
        raise BatchJobError(str(exc)) from None


def transform_file(
    url: str,
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    max_payload_mb: float = CONTAINER_MAX_PAYLOAD_MB,
    max_concurrent: int = 1,
    fmt: str | None = None,
    progress: bool = True,
) -> LocalRunSummary:
    """Send a corpus to a running endpoint the way a transform job would; write ``<name>.out``."""
    input_path = Path(input_path)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    output = output_dir / f"{input_path.name}.out"
    lines = [line.encode("utf-8") for line in corpus_lines(input_path, fmt=fmt)]
    payloads = multirecord_payloads(lines, int(max_payload_mb * MiB))
    counts = {"records": 0, "errors": 0, "requests": 0}
    started = time.perf_counter()

    def answers() -> Iterator[bytes]:
        with ThreadPoolExecutor(max(1, max_concurrent), thread_name_prefix="jv3-batch") as pool, tqdm(
            total=len(lines), unit="record", desc=input_path.name, disable=not progress, file=sys.stderr
        ) as bar:
            pending: deque[Future] = deque()
            for payload in payloads:
                pending.append(pool.submit(post_records, url, payload))
                if len(pending) >= 2 * max(1, max_concurrent):
                    yield from _drain(pending.popleft(), counts, bar)
            while pending:
                yield from _drain(pending.popleft(), counts, bar)

    atomic_write(output, answers())
    return LocalRunSummary(output, counts["records"], counts["errors"], counts["requests"], time.perf_counter() - started)


def _drain(future: Future, counts: dict, bar) -> Iterator[bytes]:
    out = future.result()
    counts["requests"] += 1
    counts["records"] += len(out)
    counts["errors"] += sum(_is_error(line) for line in out)
    bar.update(len(out))
    for line in out:
        yield line.encode("utf-8") + b"\n"


def run_local(
    model_dir: str | os.PathLike,
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    task: str | None = None,
    dimensions: int | None = None,
    embedding_type: str = "float",
    max_payload_mb: float = CONTAINER_MAX_PAYLOAD_MB,
    max_concurrent: int = 1,
    fmt: str | None = None,
    progress: bool = True,
    port: int | None = None,
    cwd: str | os.PathLike | None = None,
) -> LocalRunSummary:
    """Start the local endpoint with the job's environment, transform the file, stop the endpoint."""
    from .local import LocalEndpoint

    env = job_environment(task=task, dimensions=dimensions, embedding_type=embedding_type)
    with LocalEndpoint(model_dir, port=port, env=env, cwd=cwd) as endpoint:
        return transform_file(
            endpoint.url,
            input_path,
            output_dir,
            max_payload_mb=max_payload_mb,
            max_concurrent=max_concurrent,
            fmt=fmt,
            progress=progress,
        )


def job_environment(*, task: str | None, dimensions: int | None, embedding_type: str) -> dict[str, str]:
    """The container environment of a job: the ``JV3_DEFAULT_*`` variables, validated here."""
    if task is not None and task not in TASKS:
        raise InvalidArgument(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if dimensions is not None and not 1 <= dimensions <= MAX_DIMENSIONS:
        raise InvalidArgument(f"dimensions {dimensions} is out of range; expected 1 to {MAX_DIMENSIONS}")
    if embedding_type not in EMBEDDING_TYPES:
        raise InvalidArgument(f"unknown embedding_type {embedding_type!r}; expected one of {', '.join(EMBEDDING_TYPES)}")
    env = {"JV3_DEFAULT_ENCODING": embedding_type}
    if task:
        env["JV3_DEFAULT_TASK"] = task
    if dimensions:
        env["JV3_DEFAULT_DIMENSIONS"] = str(dimensions)
    return env
